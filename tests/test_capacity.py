"""Capacity on demand and Peer.request_benchmark: a job over its miners' verified capacity has them benchmarked at
the size it needs (within benchmark_max_size) instead of being refused, and a peer can have its job's miners
benchmarked between rounds."""

from __future__ import annotations

import uuid

import pytest
import ray
import torch

from mapreduce_ray import Peer
from mapreduce_ray.errors import JobError
from mapreduce_ray.messages import Outcome
from mapreduce_ray.reference import reference_reduce

MIB = 1024 * 1024
WAIT_S = 60


def capacities(subnet) -> dict[int, int]:
    return {row["uid"]: row["capacity"] for row in ray.get(subnet.validator.miners.remote(), timeout=WAIT_S)}


def test_a_job_over_the_proven_capacity_has_its_miners_benchmarked_and_runs_exact(subnets, run_peers):
    subnet = subnets[2]
    before = capacities(subnet)
    size = sum(before.values()) + 4 * MIB  # more than the two miners proved together
    tensors = [torch.randn(size // 4, generator=torch.Generator().manual_seed(rank)) for rank in (1, 2)]
    expected = reference_reduce(tensors, "avg")
    results = run_peers(subnet, 2, lambda peer: peer.all_reduce(tensors[peer.rank - 1]), bandwidth=size)
    assert all(torch.equal(result, expected) for result in results)
    after = capacities(subnet)
    assert sum(after.values()) >= size
    assert all(after[uid] >= before[uid] for uid in before) and after != before


def test_a_job_that_allows_no_benchmark_is_refused_naming_the_setting(subnets):
    subnet = subnets[2]
    size = sum(capacities(subnet).values()) + 4 * MIB
    peer = Peer(1, 2, size, None, benchmark_max_size=0, job=uuid.uuid4().hex, **subnet.peer_options)
    with pytest.raises(
        JobError,
        match=rf"^a {size} byte tensor exceeds the verified capacity of the 2 available miner\(s\), \d+ bytes in all "
        r"\(benchmarks on demand go up to 0 bytes: Peer\(benchmark_max_size=\) and the validator's "
        r"validator\.benchmark\.max_size_mib\); pass a smaller bandwidth",
    ):
        peer.init_process_group()
    assert peer.spec is None


def test_request_benchmark_measures_the_jobs_miners_between_rounds(subnets, run_peers):
    subnet = subnets[2]
    tensors = [torch.full((1000,), float(rank)) for rank in (1, 2)]

    def measure_then_reduce(peer: Peer):
        measured = peer.request_benchmark() if peer.rank == 1 else None
        return measured, peer.spec, peer.all_reduce(tensors[peer.rank - 1])

    (measured, spec, first), (_, _, second) = run_peers(subnet, 2, measure_then_reduce)
    assert torch.equal(first, torch.full((1000,), 1.5)) and torch.equal(second, first)
    assert [m.uid for m in measured] == [slot.uid for slot in spec.miners]
    ledger = capacities(subnet)
    for m in measured:
        assert m.outcome is Outcome.EXACT
        assert m.size_bytes >= subnet.config.benchmark.size_bytes
        assert m.throughput > 0 and m.capacity == ledger[m.uid] >= m.size_bytes


def test_request_benchmark_needs_a_job():
    with pytest.raises(JobError, match=r"^rank 1 has not joined a job through a validator; call init_process_group"):
        Peer(1, 1).request_benchmark()


@pytest.mark.parametrize("value", [-1, 1.5, "big"])
def test_benchmark_max_size_must_be_bytes(value):
    with pytest.raises(ValueError, match=rf"^benchmark_max_size must be an int >= 0 \(bytes\) or None, got {value!r}"):
        Peer(1, 1, benchmark_max_size=value)
