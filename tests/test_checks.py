"""A validator's check of a chunk, fetched by ticket from the miner and recomputed here: no Ray."""

from __future__ import annotations

import pytest
import torch
from wire_world import WireWorld, exact_round, world_fixture

from actors.relay import Relay
from actors.validator.checks import ChunkCheck, Unverifiable, check_chunk

PEERS = 3
NUMEL = 2 * 16384 + 200  # over 2 x 64 KiB: 2 segments of 16484 float32, each in 17 chunks of up to 1 KiB


class OneOff(Relay):
    """Adds 1e-3 to the first element of every chunk it reduces."""

    def falsify(self, state, index, out):
        out[0] += 1e-3
        return out


world = world_fixture("checks", PEERS)


def check(world: WireWorld, spec, relay: Relay, miner: int, segment: int, chunk: int, sent: str):
    admitted = {r: k.ss58_address for r, k in enumerate(world.peers, 1)}
    remote = world.remote(relay, world.validator)
    return check_chunk(
        remote, ChunkCheck(spec, admitted, 1, miner, segment, chunk, sent), world.validator.ss58_address, 10
    )


def sent_digest(relay: Relay, spec, segment: int, chunk: int) -> str:
    """The digest of what `relay` reduced, as it retained it (honest relays send exactly that)."""
    state = relay._retained.get((spec.job_id, 1, segment), 0.0)
    return next(r.digest for r in state.results if r.chunk == chunk)


def test_every_chunk_of_an_honest_round_passes(world):
    relays = [world.relay("honest-a"), world.relay("honest-b")]
    spec, tensors, expected = exact_round(world, relays, PEERS, NUMEL)
    assert all(torch.equal(t, expected) for t in tensors)
    for segment, relay in enumerate(relays):
        for chunk in (0, 16):
            verdict = check(world, spec, relay, segment, segment, chunk, sent_digest(relay, spec, segment, chunk))
            assert verdict.ok, verdict.reason


def test_a_miner_one_element_off_fails_its_check_naming_the_element(world):
    relay = world.relay("one-off", OneOff)
    spec, tensors, expected = exact_round(world, [relay], PEERS, NUMEL)
    assert not torch.equal(tensors[0], expected)  # no check before use here: that is what the validator catches
    verdict = check(world, spec, relay, 0, 0, 1, sent_digest(relay, spec, 0, 1))
    assert not verdict.ok
    assert verdict.reason.startswith("chunk 1: 1 of 256 elements differ; first at element 0")


def test_a_result_other_than_the_one_the_peers_reported_fails(world):
    relay = world.relay("honest-c")
    spec, _, _ = exact_round(world, [relay], PEERS, NUMEL)
    verdict = check(world, spec, relay, 0, 0, 0, "00" * 32)
    assert (verdict.ok, verdict.reason) == (False, "served another result than the one it sent the peers")


def test_a_round_the_miner_does_not_hold_is_unverifiable(world):
    relay = world.relay("honest-d")
    spec, _, _ = exact_round(world, [relay], PEERS, NUMEL)
    with pytest.raises(Unverifiable, match=r"honest-d did not serve chunk 500 of segment 0: .*holds no chunk 500"):
        check(world, spec, relay, 0, 0, 500, "00" * 32)


def test_a_validator_without_a_permit_gets_no_ticket(world):
    relay = world.relay("honest-e")
    spec, _, _ = exact_round(world, [relay], PEERS, NUMEL)
    admitted = {r: k.ss58_address for r, k in enumerate(world.peers, 1)}
    peer = world.peers[0]
    remote = world.remote(relay, peer)
    with pytest.raises(Unverifiable, match=r"refused the call: ticket is for validators, and uid \d+ .* holds no"):
        check_chunk(remote, ChunkCheck(spec, admitted, 1, 0, 0, 0, "00" * 32), peer.ss58_address, 10)
