"""Choosing a job's miners: best score first, shares by throughput, water-filled within verified capacity,
reasons when impossible, and the capacity a larger job would need proven."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mapreduce_ray.errors import JobError
from mapreduce_ray.plan import CAPACITY_ALIGN, failover_order, plan_round
from mapreduce_ray.types import JobSpec, MinerSlot, TensorSpec
from mapreduce_ray.validator.matching import (
    Candidate,
    capacity_wanted,
    choose_miners,
    job_capacity,
    require_fit,
    shares,
)

MIB = 1024 * 1024


def test_the_best_scored_miners_get_shares_by_throughput():
    candidates = [
        Candidate(1, throughput=100.0, capacity=64 * MIB, score=1.0),
        Candidate(2, throughput=300.0, capacity=64 * MIB, score=3.0),
        Candidate(3, throughput=100.0, capacity=64 * MIB, score=2.0),
    ]
    chosen = choose_miners(candidates, max_miners=2)
    assert [c.uid for c in chosen] == [2, 3]
    assert shares(chosen) == {2: 0.75, 3: 0.25}


def test_unbenchmarked_miners_are_not_handed_out():
    candidates = [Candidate(1, 0.0, 64 * MIB, 5.0), Candidate(2, 100.0, 0, 5.0), Candidate(3, 100.0, MIB, 0.0)]
    assert [c.uid for c in choose_miners(candidates, max_miners=3)] == [3]


def test_no_miner_at_all_gets_a_reason():
    with pytest.raises(JobError, match=r"^no miner is available with a passed benchmark; wait for the validator"):
        choose_miners([], max_miners=2)
    with pytest.raises(JobError, match="needs at least one miner; max_miners is 0"):
        choose_miners([Candidate(1, 1.0, MIB, 1.0)], max_miners=0)
    with pytest.raises(JobError, match="redundancy 2 needs 2 miners but 1 are available; pass a smaller redundancy"):
        choose_miners([Candidate(1, 1.0, MIB, 1.0)], max_miners=2, redundancy=2)


def test_a_job_takes_the_sum_of_its_miners_capacities_however_their_throughputs_differ():
    """The case that used to be refused: a fast miner's throughput share of 100 MiB is over the 64 MiB it proved,
    but the two together hold 128 MiB."""
    chosen = [Candidate(1, 900.0, 64 * MIB, 2.0), Candidate(2, 100.0, 64 * MIB, 1.0)]
    assert job_capacity(chosen, redundancy=1) == 128 * MIB
    require_fit(chosen, 100 * MIB, redundancy=1)
    with pytest.raises(
        JobError,
        match=rf"^a {128 * MIB + 1} byte tensor exceeds the verified capacity of the 2 available miner\(s\), "
        rf"{128 * MIB} bytes in all; pass a smaller bandwidth to Peer\(...\), or wait for more miners$",
    ):
        require_fit(chosen, 128 * MIB + 1, redundancy=1)


def test_with_redundancy_each_segment_fits_every_miner_that_holds_it():
    chosen = [Candidate(1, 1.0, 64 * MIB, 3.0), Candidate(2, 1.0, 32 * MIB, 2.0), Candidate(3, 1.0, 64 * MIB, 1.0)]
    # segment s goes to miners s and s+1: limits min(64, 32)/2, min(32, 64)/2, min(64, 64)/2
    assert job_capacity(chosen, redundancy=2) == (16 + 16 + 32) * MIB


def test_capacity_wanted_is_each_short_miners_throughput_share():
    chosen = [Candidate(1, 300.0, 16 * MIB, 2.0), Candidate(2, 100.0, 32 * MIB, 1.0)]
    wanted = capacity_wanted(chosen, 64 * MIB, redundancy=1)
    assert wanted == {1: 48 * MIB + CAPACITY_ALIGN}  # miner 2's 16 MiB share fits what it proved
    bigger = capacity_wanted([Candidate(1, 300.0, 60 * MIB, 2.0), Candidate(2, 100.0, 0, 1.0)], 64 * MIB, 1)
    assert bigger == {2: 16 * MIB + CAPACITY_ALIGN}


candidates_st = st.lists(
    st.tuples(st.floats(1, 1e9), st.integers(1, 2**24), st.floats(0, 10)),
    min_size=1,
    max_size=8,
    unique_by=lambda c: c[2],
)


@given(candidates_st, st.integers(1, 2**25), st.integers(1, 8), st.integers(1, 3), st.sampled_from([2, 4, 8, 16]))
def test_water_filled_shares_stay_within_capacity_and_sum_to_one_whenever_capacities_allow(
    specs, tensor_bytes, max_miners, redundancy, itemsize
):
    candidates = [Candidate(uid, t, cap, score) for uid, (t, cap, score) in enumerate(specs)]
    try:
        chosen = choose_miners(candidates, max_miners, redundancy)
    except JobError:
        assert len(candidates) < redundancy or min(max_miners, len(candidates)) < redundancy
        return
    assert len(chosen) == min(max_miners, len(candidates))
    capacity = job_capacity(chosen, redundancy)
    if redundancy == 1:  # exact: the capacities' sum, each rounded down to whole elements of any dtype
        assert capacity == sum(c.capacity // CAPACITY_ALIGN * CAPACITY_ALIGN for c in chosen)
    numel = tensor_bytes // itemsize
    if numel * itemsize > capacity:
        with pytest.raises(JobError, match="exceeds the verified capacity"):
            require_fit(chosen, numel * itemsize, redundancy)
        return
    weights = shares(chosen)
    slots = tuple(MinerSlot(c.uid, "h", "127.0.0.1:1", weights[c.uid], capacity=c.capacity) for c in chosen)
    job = JobSpec("j", "j", 2, slots, chunk_bytes=1 << 30, timeout_s=1, max_bytes=capacity, redundancy=redundancy)
    dtype = {2: "float16", 4: "float32", 8: "float64", 16: "complex128"}[itemsize]
    plan = plan_round(job, TensorSpec(dtype, (numel,)))
    assert sum(s.numel for s in plan) == numel  # the shares sum to 1
    n = len(chosen)
    for m, miner in enumerate(chosen):  # every miner holds at most its capacity, counting redundant copies
        held = sum(plan[s].numel for s in range(n) if m in failover_order(s, n)[:redundancy])
        assert held * itemsize <= miner.capacity


def test_a_benchmark_is_timed_from_its_last_rank_start_to_its_last_rank_end():
    from actors.validator.benchmarks import combined
    from mapreduce_ray.messages import BenchmarkResult, Outcome

    def rank(started_at: float, seconds: float, outcome=Outcome.EXACT) -> BenchmarkResult:
        return BenchmarkResult(7, "m", MIB, seconds, outcome, "", started_at)

    # rank 1 drew its data 0.3 s sooner and waited for rank 2: the miner served them in 5.5 s, not 5.8 s
    both = combined([rank(100.0, 5.8), rank(100.3, 5.4)])
    assert both.seconds == pytest.approx(5.5) and both.started_at == 100.3 and both.outcome is Outcome.EXACT
    # clocks that disagree cannot bend it below the last rank's own time, nor above the longest rank's
    assert combined([rank(100.0, 5.8), rank(200.0, 5.4)]).seconds == pytest.approx(5.4)
    assert combined([rank(100.0, 5.8), rank(90.0, 5.4)]).seconds == pytest.approx(5.8)
    assert combined([rank(100.0, 5.8), rank(100.0, 1.0, Outcome.WRONG)]).outcome is Outcome.WRONG
