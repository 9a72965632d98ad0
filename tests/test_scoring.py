"""Scoring: instant scores, the EMA, shared hosts, weights, cadence (pure functions)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mapreduce_ray.validator.scoring import (
    MIB,
    MinerRecord,
    ScoringConfig,
    epoch_due,
    instant_score,
    normalize,
    share_hosts,
    update_scores,
    weights_for,
)

CONFIG = ScoringConfig(ema_alpha=0.5, capacity_target=64 * MIB, min_reliability=0.9)


def test_instant_score_is_throughput_times_capacity_credit_times_reliability():
    record = MinerRecord(1, "a", throughput=100.0, capacity=32 * MIB, rounds_assigned=10, rounds_on_time=9)
    assert instant_score(record, CONFIG) == pytest.approx(100.0 * 0.5 * 0.9)
    bigger = MinerRecord(1, "a", throughput=100.0, capacity=128 * MIB)
    assert instant_score(bigger, CONFIG) == 100.0  # capacity credit saturates; no rounds yet: reliability 1


@pytest.mark.parametrize(
    "record",
    [
        MinerRecord(1, "a", throughput=100.0, capacity=64 * MIB, struck=True),
        MinerRecord(1, "a", throughput=100.0, capacity=64 * MIB, rounds_assigned=10, rounds_on_time=8),
        MinerRecord(1, "a", throughput=0.0, capacity=64 * MIB),
        MinerRecord(1, "a", throughput=100.0, capacity=0),
    ],
    ids=["struck", "unreliable", "no exact benchmark", "no capacity"],
)
def test_what_earns_nothing(record):
    assert instant_score(record, CONFIG) == 0.0


def test_scores_are_an_ema_and_a_strike_zeroes_at_once():
    fast = MinerRecord(1, "a", throughput=100.0, capacity=64 * MIB)
    scores = update_scores({}, [fast], CONFIG)
    assert scores == {1: 50.0}
    scores = update_scores(scores, [fast], CONFIG)
    assert scores == {1: 75.0}
    scores = update_scores(
        {**scores, 2: 40.0}, [MinerRecord(1, "a", throughput=100.0, capacity=64 * MIB, struck=True)], CONFIG
    )
    assert scores == {1: 0.0, 2: 40.0}  # uid 2 had no record this epoch and keeps its score


def test_an_unreliable_miner_drops_to_zero_at_once():
    steady = MinerRecord(1, "a", throughput=100.0, capacity=64 * MIB, rounds_assigned=10, rounds_on_time=10)
    scores = update_scores({}, [steady], CONFIG)
    lazy = MinerRecord(1, "a", throughput=100.0, capacity=64 * MIB, rounds_assigned=10, rounds_on_time=5)
    assert scores[1] > 0 and update_scores(scores, [lazy], CONFIG) == {1: 0.0}


def test_miners_on_one_host_share_the_best_score():
    scores = {1: 90.0, 2: 90.0, 3: 90.0, 4: 90.0, 5: 30.0}
    hosts = {1: "10.0.0.1", 2: "10.0.0.1", 3: "10.0.0.1", 4: "10.0.0.2", 5: "10.0.0.3"}
    assert share_hosts(scores, hosts) == {1: 30.0, 2: 30.0, 3: 30.0, 4: 90.0, 5: 30.0}
    struck = share_hosts({**scores, 3: 0.0}, hosts)  # a struck member gets nothing; the others share
    assert [struck[uid] for uid in (1, 2, 3)] == [45.0, 45.0, 0.0]
    weights = weights_for(scores, hosts)
    assert weights[1] + weights[2] + weights[3] == pytest.approx(weights[4])


def test_weights_sum_to_one_or_are_all_zero():
    assert normalize({1: 3.0, 2: 1.0}) == {1: 0.75, 2: 0.25}
    assert normalize({1: 0.0, 2: 0.0}) == {1: 0.0, 2: 0.0}


def test_an_epoch_is_due_at_first_and_then_every_epoch_blocks():
    assert epoch_due(None, 5, epoch_blocks=50)
    assert not epoch_due(10, 59, epoch_blocks=50)
    assert epoch_due(10, 60, epoch_blocks=50)


def test_a_simulated_subnet_orders_honest_fast_over_slow_over_the_rest():
    """Ten epochs of measurements: fast and slow honest miners, a lazy one, cheaters, a Sybil trio."""
    full = {"capacity": 64 * MIB, "rounds_assigned": 20}
    epoch = [
        MinerRecord(1, "fast", throughput=200.0, rounds_on_time=20, **full),
        MinerRecord(2, "slow", throughput=50.0, rounds_on_time=20, **full),
        MinerRecord(3, "lazy", throughput=200.0, rounds_on_time=12, **full),
        MinerRecord(4, "cheat", throughput=200.0, rounds_on_time=20, struck=True, **full),
        *(MinerRecord(uid, "sybil", throughput=200.0, rounds_on_time=20, **full) for uid in (5, 6, 7)),
    ]
    scores: dict[int, float] = {}
    for _ in range(10):
        scores = update_scores(scores, epoch, ScoringConfig())
    weights = weights_for(scores, {r.uid: r.host for r in epoch})
    assert weights[1] > weights[2] > weights[3] == weights[4] == 0.0
    assert weights[5] + weights[6] + weights[7] == pytest.approx(weights[1])
    assert sum(weights.values()) == pytest.approx(1.0)


@given(
    scores=st.lists(st.floats(0, 1e9, allow_nan=False), min_size=1, max_size=30),
    hosts=st.lists(st.integers(0, 5), min_size=30, max_size=30),
)
def test_weights_are_a_distribution_and_no_host_gains_by_splitting(scores, hosts):
    by_uid = dict(enumerate(scores))
    host_of = {uid: f"h{hosts[uid]}" for uid in by_uid}
    weights = weights_for(by_uid, host_of)
    assert all(w >= 0 for w in weights.values())
    assert sum(weights.values()) == pytest.approx(1.0) or all(w == 0 for w in weights.values())
    shared = share_hosts(by_uid, host_of)
    for host in set(host_of.values()):
        uids = [uid for uid in by_uid if host_of[uid] == host]
        assert sum(shared[uid] for uid in uids) == pytest.approx(max(by_uid[uid] for uid in uids))
        assert all(shared[uid] == 0 for uid in uids if by_uid[uid] == 0)
