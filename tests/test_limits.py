"""Limits a miner and a validator keep from config, each refused with one error naming its setting.

At a miner (relay.*): the memory the open rounds' inputs may take
(a round that does not fit is refused before any of its bytes are read, and its peers hand the
segment to the next miner), and a tensor over the job's max_bytes (refused before its chunks are
planned). At a validator (validator.jobs_per_peer): the open jobs one peer hotkey may hold ranks in.
No Ray.
"""

from __future__ import annotations

import logging
import re

import pytest
import torch
from wire_world import SPEC, HandPeer, honest_round_fails, on_every_peer, world_fixture

from actors.relay import RelaySettings
from actors.validator.jobs import Job, JobBook
from mapreduce_ray.errors import JobError, LimitExceededError, PeerLostError
from mapreduce_ray.messages import JobRequest
from mapreduce_ray.reference import reference_reduce
from mapreduce_ray.types import TensorSpec
from mapreduce_ray.validator.config import ValidatorConfig

world = world_fixture("limits", 3)


def test_a_round_with_no_room_at_a_miner_goes_to_the_next_miner_and_is_exact(world, caplog):
    cramped = world.relay("cramped", settings=RelaySettings(memory_mib=0.01))  # 10 KiB for open rounds' inputs
    roomy = world.relay("roomy")
    spec = world.job([cramped, roomy], 2)
    peers = world.attached(spec)
    tensors = [torch.randn(4000, generator=torch.Generator().manual_seed(r)) for r in (1, 2)]
    expected = reference_reduce([t.clone() for t in tensors], "sum")
    try:
        with caplog.at_level(logging.WARNING):
            results = on_every_peer(peers, lambda p: p.all_reduce(tensors[p.rank - 1], "sum"))
    finally:
        for peer in peers:
            peer.destroy_process_group()
    assert not [r for r in results if isinstance(r, BaseException)], results
    assert all(torch.equal(t, expected) for t in tensors)
    handed_on = [r.getMessage() for r in caplog.records if r.name == "mapreduce_ray.rounds"]
    assert handed_on
    for message in handed_on:
        assert re.fullmatch(
            r"all_reduce #1 of job 'wire': miner 'miner-1' failed: all_reduce #1 of job 'wire', segment 0: miner "
            r"'cramped' has no room for its \d+ bytes; open rounds take 0 of relay.memory_mib \(10485 bytes\); "
            r"segment 0 goes to the next miner",
            message,
        ), message
    assert cramped.status()["open_rounds"] == 0


def test_a_peer_signing_a_tensor_over_the_jobs_max_bytes_is_cut_off_before_it_is_planned(world):
    relay = world.relay("plans-nothing-huge")
    spec = world.job([relay], 3, timeout_s=9.0)
    hand = HandPeer(world, spec, 2, relay)

    def huge(tensor):
        hand.send(tensor, 0, tensor_spec=TensorSpec("float32", (1 << 40,)))
        return hand.refusal()

    try:
        *messages, refused = honest_round_fails(world, hand, huge, PeerLostError)
    finally:
        hand.close()
    assert type(refused) is JobError
    assert str(refused) == (
        f"rank 2 of job 'wire' signed a tensor of {4 << 40} bytes, over the job's max_bytes {spec.max_bytes}"
    )
    assert SPEC.nbytes < spec.max_bytes


def test_a_validator_refuses_a_peer_holding_ranks_in_validator_jobs_per_peer_open_jobs():
    book = JobBook(ValidatorConfig(jobs_per_peer=2), None, None, "the validator", lambda sizes: {})
    for name in ("a", "b"):
        book._jobs[name] = Job(None, 0, "", ranks={1: "peer"})
    request = JobRequest("c", 1, 2, None, 1, False, None, False)
    with pytest.raises(LimitExceededError) as refused:
        book.join(request, "peer")
    assert str(refused.value) == (
        "hotkey peer holds ranks in 2 open jobs already (validator.jobs_per_peer 2); leave one "
        "(destroy_process_group()) before joining another"
    )
