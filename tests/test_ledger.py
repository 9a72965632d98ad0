"""MinerLedger: the validator's own record of miners, following the metagraph and surviving restarts."""

import pytest

from mapreduce_ray.errors import MapReduceError
from mapreduce_ray.validator.ledger import MinerLedger, MinerState
from mapreduce_ray.validator.scoring import MIB, MinerRecord


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def ledger(tmp_path, clock):
    ledger = MinerLedger(tmp_path / "validator.sqlite", clock)
    ledger.follow({1: "hk-1", 2: "hk-2"})
    return ledger


def test_followed_miners_start_available_with_nothing_measured(ledger):
    assert ledger.available() == [1, 2]
    assert ledger.records() == [MinerRecord(1, ""), MinerRecord(2, "")]
    assert ledger.hosts() == {}
    assert ledger.due_for_benchmark(interval_s=600) == [1, 2]


def test_benchmarks_set_throughput_the_largest_capacity_that_passed_and_the_host(ledger, clock):
    ledger.record_benchmark(1, 64 * MIB, 0.5, passed=True, host="10.0.0.1")
    clock.now += 1
    ledger.record_benchmark(1, 16 * MIB, 0.25, passed=True)
    record = ledger.records()[0]
    assert (record.throughput, record.capacity, record.host) == (16 * MIB / 0.25, 64 * MIB, "10.0.0.1")
    assert (record.rounds_assigned, record.rounds_on_time) == (2, 2)
    assert ledger.hosts() == {1: "10.0.0.1"}
    assert ledger.due_for_benchmark(interval_s=600) == [2]
    clock.now += 600
    assert ledger.due_for_benchmark(interval_s=600) == [2, 1]
    assert ledger.history(1) == [
        ("benchmark", {"bytes": 64 * MIB, "seconds": 0.5, "passed": True}),
        ("benchmark", {"bytes": 16 * MIB, "seconds": 0.25, "passed": True}),
    ]


def test_a_wrong_benchmark_result_earns_no_credit_until_one_passes(ledger):
    ledger.record_benchmark(2, 64 * MIB, 0.5, passed=True)
    ledger.record_benchmark(2, 64 * MIB, 0.5, passed=False)
    assert ledger.records()[1].throughput == 0.0
    assert ledger.available() == [1]
    ledger.record_benchmark(2, 64 * MIB, 0.4, passed=True)
    assert ledger.available() == [1, 2]


def test_throughput_is_the_best_of_the_last_benchmarks_since_one_failed(tmp_path, clock):
    ledger = MinerLedger(tmp_path / "best.sqlite", clock, best_of=3)
    ledger.follow({1: "hk-1"})

    def throughput(seconds: float, passed: bool = True) -> float:
        ledger.record_benchmark(1, 64 * MIB, seconds, passed)
        return ledger.records()[0].throughput

    assert throughput(0.5) == 64 * MIB / 0.5
    assert throughput(0.4) == 64 * MIB / 0.4  # faster: taken at once
    assert throughput(0.8) == 64 * MIB / 0.4  # one slow round is not the link
    assert throughput(0.8) == 64 * MIB / 0.4
    assert throughput(0.8) == 64 * MIB / 0.8  # three in a row are: the 0.4 s one left the window
    assert throughput(0.8, passed=False) == 0.0
    assert throughput(1.0) == 64 * MIB / 1.0  # nothing from before the failure counts
    ledger.follow({1: "hk-new"})
    ledger.record_benchmark(1, 64 * MIB, 2.0, passed=True)
    assert ledger.records()[0].throughput == 64 * MIB / 2.0  # nor anything of the uid's earlier hotkey


def test_a_miner_that_passes_a_benchmark_is_due_until_its_throughput_rests_on_best_of(tmp_path, clock):
    ledger = MinerLedger(tmp_path / "new.sqlite", clock, best_of=2)
    ledger.follow({1: "hk-1", 2: "hk-2"})
    ledger.record_benchmark(1, 64 * MIB, 0.5, passed=True)
    ledger.record_benchmark(2, 64 * MIB, 0.5, passed=False)
    assert ledger.due_for_benchmark(interval_s=600) == [1]  # a failed one waits out the interval
    clock.now += 1
    ledger.record_benchmark(1, 64 * MIB, 0.5, passed=True)
    assert ledger.due_for_benchmark(interval_s=600) == []
    ledger.record_benchmark(1, 64 * MIB, 0.5, passed=False)
    ledger.record_benchmark(1, 64 * MIB, 0.5, passed=True)
    assert ledger.due_for_benchmark(interval_s=600) == [1]  # nothing before the failure counts
    ledger.follow({1: "hk-1"})  # uid 2 deregistered
    ledger.follow({1: "hk-1", 2: "hk-2"})  # and back: measured afresh
    assert ledger.due_for_benchmark(interval_s=600) == [2, 1]


def test_a_ledger_keeps_the_best_of_at_least_one_benchmark(tmp_path):
    with pytest.raises(MapReduceError, match=r"^a ledger keeps the best of at least 1 benchmark, not 0$"):
        MinerLedger(tmp_path / "none.sqlite", best_of=0)


def test_rounds_count_towards_reliability(ledger):
    for on_time in (True, True, False, True):
        ledger.record_rounds({1: on_time})
    assert ledger.records()[0].reliability == 0.75
    assert ledger.history(1) == [("late", {})]


def test_a_strike_zeroes_the_score_and_bans_until_the_ban_runs_out(ledger, clock):
    ledger.save_scores({1: 5.0, 2: 7.0})
    ledger.strike(1, ban_s=60.0, evidence={"round": 3, "difference": 1.5, "bound": 0.01})
    assert ledger.scores() == {1: 0.0, 2: 7.0}
    assert ledger.available() == [2]
    assert ledger.records()[0].struck
    assert ledger.history(1) == [("strike", {"round": 3, "difference": 1.5, "bound": 0.01})]
    clock.now += 60.0
    assert ledger.available() == [1, 2]
    assert not ledger.records()[0].struck


def test_a_busy_miner_is_not_handed_out(ledger):
    assert ledger.claim([1]) == [1]
    assert ledger.claim([1, 2]) == [2]  # 1 is busy already
    assert ledger.available() == []
    assert ledger.due_for_benchmark(interval_s=0) == []
    ledger.release([1, 2])
    assert ledger.available() == [1, 2]


def test_a_miner_struck_or_failed_while_busy_keeps_that_state(ledger):
    ledger.claim([1, 2])
    ledger.strike(1, ban_s=60.0, evidence={})
    ledger.record_benchmark(2, MIB, 1.0, passed=False)
    ledger.release([1, 2])
    assert ledger.available() == []
    assert [row["state"] for row in ledger.table()] == [MinerState.BANNED.value, MinerState.FAILED.value]
    assert ledger.claim([2]) == [] and ledger.claim([2], failed_too=True) == [2]  # benchmarks take failed ones


def test_a_restart_frees_busy_miners(ledger, tmp_path, clock):
    ledger.claim([1])
    restarted = MinerLedger(tmp_path / "validator.sqlite", clock)
    restarted.recover()
    assert restarted.available() == [1, 2]


def test_a_new_hotkey_on_an_old_uid_starts_from_nothing(ledger):
    ledger.record_benchmark(1, 64 * MIB, 0.5, passed=True)
    ledger.save_scores({1: 9.0, 2: 3.0})
    ledger.follow({1: "hk-new", 2: "hk-2"})
    assert ledger.scores() == {1: 0.0, 2: 3.0}
    assert ledger.records()[0] == MinerRecord(1, "")
    assert ledger.history(1)[-1] == ("forgotten", {"reason": "hotkey changed or deregistered"})
    ledger.follow({2: "hk-2"})  # uid 1 deregistered
    assert ledger.available() == [2]


def test_everything_survives_a_restart(ledger, tmp_path, clock):
    ledger.record_benchmark(1, 64 * MIB, 0.5, passed=True)
    ledger.record_rounds({1: True})
    ledger.strike(2, ban_s=600.0, evidence={"round": 1})
    ledger.save_scores({1: 4.0})
    ledger.weights_set_at = 1234
    ledger.epoch_at = 1200
    restarted = MinerLedger(tmp_path / "validator.sqlite", clock)
    assert restarted.records() == ledger.records()
    assert restarted.scores() == {1: 4.0, 2: 0.0}
    assert (restarted.weights_set_at, restarted.epoch_at) == (1234, 1200)
    assert restarted.available() == [1]
    assert restarted.history(2) == [("strike", {"round": 1})]


def test_an_untracked_uid_names_the_fix(ledger):
    with pytest.raises(MapReduceError, match=r"tracks no miner uid 7; call follow\(\) first"):
        ledger.record_rounds({7: True})
