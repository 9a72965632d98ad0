"""A hostile peer inside a job: the round fails for every peer with one error naming it, no tensor changes,
and the miner lets go of the round.

Rank 2 of a three-peer job either speaks on its own stream by hand (sending a chunk signed as another
rank, or one chunk and then nothing), or is a real Peer that changes its tensor's shape mid-job. Ranks
1 and 3 are real peers. No Ray.
"""

from __future__ import annotations

import re
import time

import torch
from wire_world import NUMEL, SPEC, WAIT_S, HandPeer, honest_round_fails, on_every_peer, world_fixture

from mapreduce_ray.errors import JobError, PeerLostError, RoundMismatchError
from mapreduce_ray.plan import plan_round
from mapreduce_ray.reference import reference_reduce

world = world_fixture("hostile-peer", 3)


def test_a_peer_that_signs_chunks_as_another_rank_is_cut_off_and_the_round_fails_naming_it(world):
    relay = world.relay("cuts-off-impostor")
    spec = world.job([relay], 3, timeout_s=9.0)
    hand = HandPeer(world, spec, 2, relay)

    def impostor(tensor):
        deadline = time.monotonic() + WAIT_S
        while not relay.status()["open_rounds"]:  # the honest peers opened the round
            assert time.monotonic() < deadline
            time.sleep(0.05)
        hand.send(tensor, 0, as_rank=1)
        return hand.refusal()

    try:
        *messages, refused = honest_round_fails(world, hand, impostor, PeerLostError)
    finally:
        hand.close()
    assert type(refused) is JobError and str(refused) == "rank 2 of job 'wire' signed a message for another job or rank"
    for message in messages:
        assert message.startswith(
            "all_reduce #1 of job 'wire', segment 0: rank 2 was cut off by miner 'cuts-off-impostor': rank 2 of job "
            "'wire' signed a message for another job or rank before sending its chunks."
        ), message


def test_a_peer_that_stops_mid_round_is_named_and_the_round_fails_for_the_others(world):
    relay = world.relay("sees-a-stall")
    spec = world.job([relay], 3, timeout_s=9.0)
    hand = HandPeer(world, spec, 2, relay)
    chunks = len(plan_round(spec, SPEC)[0].chunks)

    def stalls(tensor):
        hand.send(tensor, 0)  # then nothing, with the stream left open

    try:
        *messages, _ = honest_round_fails(world, hand, stalls, PeerLostError)
    finally:
        hand.close()
    for message in messages:
        assert message.startswith(
            f"all_reduce #1 of job 'wire', segment 0: rank(s) [2] stopped sending their chunks to miner "
            f"'sees-a-stall' (sent of {chunks}: rank 2 1)."
        ), message


def test_a_peer_that_changes_its_tensors_shape_mid_job_fails_the_round_for_everyone(world):
    relay = world.relay("sees-a-new-shape")
    spec = world.job([relay], 3, timeout_s=9.0)
    peers = world.attached(spec)
    tensors = [torch.randn(NUMEL, generator=torch.Generator().manual_seed(r)) for r in (1, 2, 3)]
    try:
        expected = reference_reduce([t.clone() for t in tensors], "sum")
        on_every_peer(peers, lambda p: p.all_reduce(tensors[p.rank - 1], "sum"))
        assert all(torch.equal(t, expected) for t in tensors)
        second = [t.clone() for t in tensors]
        second[1] = torch.ones(NUMEL + 500)  # rank 2 changes its tensor's shape
        before = [t.clone() for t in second]
        results = on_every_peer(peers, lambda p: p.all_reduce(second[p.rank - 1], "sum"))
    finally:
        for peer in peers:
            peer.destroy_process_group()
    shapes = r"float32 \((2000|2500),\)"
    for result in results:
        assert type(result) is RoundMismatchError, result
        assert re.fullmatch(
            rf"all_reduce #2 of job 'wire', segment 0: rank \d passed {shapes}, another rank {shapes}", str(result)
        ), result
    assert all(torch.equal(t, b) for t, b in zip(second, before, strict=True))
    assert relay.status()["open_rounds"] == 0
