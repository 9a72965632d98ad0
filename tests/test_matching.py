"""Choosing a job's miners: best score first, shares by throughput, capacity respected, reasons when impossible."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mapreduce_ray.errors import JobError
from mapreduce_ray.matching import Candidate, choose_miners

MIB = 1024 * 1024


def test_the_best_scored_miners_get_shares_by_throughput():
    candidates = [
        Candidate(1, throughput=100.0, capacity=64 * MIB, score=1.0),
        Candidate(2, throughput=300.0, capacity=64 * MIB, score=3.0),
        Candidate(3, throughput=100.0, capacity=64 * MIB, score=2.0),
    ]
    assert choose_miners(candidates, 64 * MIB, max_miners=2) == {2: 0.75, 3: 0.25}


def test_unbenchmarked_miners_are_not_handed_out():
    candidates = [Candidate(1, 0.0, 64 * MIB, 5.0), Candidate(2, 100.0, 0, 5.0), Candidate(3, 100.0, MIB, 0.0)]
    assert choose_miners(candidates, MIB, max_miners=3) == {3: 1.0}


def test_no_miner_at_all_gets_a_reason():
    with pytest.raises(JobError, match=r"^no miner is available with a passed benchmark; wait for the validator"):
        choose_miners([], MIB, max_miners=2)
    with pytest.raises(JobError, match="needs at least one miner; max_miners is 0"):
        choose_miners([Candidate(1, 1.0, MIB, 1.0)], MIB, max_miners=0)


def test_a_tensor_larger_than_the_miners_can_hold_gets_a_reason():
    candidates = [Candidate(1, 100.0, 16 * MIB, 1.0), Candidate(2, 100.0, 64 * MIB, 1.0)]
    with pytest.raises(JobError, match=r"needs more than miner\(s\) \[1\] can hold .* pass a smaller bandwidth"):
        choose_miners(candidates, 64 * MIB, max_miners=2)


@given(
    st.lists(
        st.tuples(st.floats(1, 1e9), st.integers(1, 2**30), st.floats(0, 10)),
        min_size=1,
        max_size=12,
        unique_by=lambda c: c[2],
    ),
    st.integers(1, 2**20),
    st.integers(1, 12),
)
def test_shares_sum_to_one_and_fit_every_capacity(specs, tensor_bytes, max_miners):
    candidates = [Candidate(uid, t, cap, score) for uid, (t, cap, score) in enumerate(specs)]
    try:
        shares = choose_miners(candidates, tensor_bytes, max_miners)
    except JobError:
        return
    assert sum(shares.values()) == pytest.approx(1.0)
    assert len(shares) == min(max_miners, len(candidates))
    by_uid = {c.uid: c for c in candidates}
    assert all(tensor_bytes * share <= by_uid[uid].capacity * (1 + 1e-12) for uid, share in shares.items())
    best = sorted(candidates, key=lambda c: -c.score)[: len(shares)]
    assert set(shares) == {c.uid for c in best}
