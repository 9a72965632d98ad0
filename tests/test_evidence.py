"""RoundEvidence, without Ray: a report counts only with its miner's signatures; completeness, misses,
and what a miner was shown to have sent."""

from __future__ import annotations

import time

import pytest
from bittensor.sp_core import Keypair

from mapreduce_ray.errors import JobError
from mapreduce_ray.messages import REPORT_BATCH, Delivery, Reduced, RoundReport, seal_body
from mapreduce_ray.peer import _Reporter
from mapreduce_ray.protocol import audience
from mapreduce_ray.types import JobSpec, MinerSlot, TensorSpec
from mapreduce_ray.validator.evidence import ROUNDS_AHEAD, JobRounds, RoundEvidence, evidence_of

MINER, OTHER, PEER1, PEER2, PEER3 = (Keypair.create_from_uri(f"//{n}") for n in ("Miner", "Other", "P1", "P2", "P3"))
PEERS = {1: PEER1, 2: PEER2, 3: PEER3}
SLOTS = (MinerSlot(1, MINER.ss58_address, "127.0.0.1:1", 1.0), MinerSlot(2, OTHER.ss58_address, "127.0.0.1:2", 1.0))
SPEC = JobSpec("job000000001", "j", 3, SLOTS, 1024, 30.0, 1 << 20)
NETUID = 10  # the subnet the miners sign on
TENSOR = TensorSpec("float32", (4,))
PEERS = {1: "peer-a", 2: "peer-b", 3: "peer-c"}  # rank -> hotkey


def delivery(digests: list[str], signer: Keypair = MINER, seq: int = 1, miner: int = 0, to: str = "", **changes):
    """Miner `miner`'s signed Reduced messages for segment 0 (to the job's peers, or `to`), one per digest."""
    wires = []
    for index, d in enumerate(digests):
        fields = {"job_id": SPEC.job_id, "seq": seq, "segment": 0, "chunk": index, **changes}
        body = Reduced(**fields, tensor=TENSOR, digest=d, inputs=("aa",))
        wires.append(seal_body(signer, body, to or audience(SPEC.job_id), NETUID).decode())
    return Delivery(miner, 0, tuple(wires))


def add(round_: RoundEvidence, rank: int, deliveries: tuple[Delivery, ...], late: tuple[int, ...] = ()) -> None:
    report = RoundReport(SPEC.job_id, round_.seq, rank, deliveries, late)
    results = {(d.miner, d.segment): evidence_of(SPEC, report, d, NETUID) for d in deliveries}
    round_.add_report(rank, results, late)


def test_the_evidence_is_the_digests_the_miner_signed_for_that_peer():
    report = RoundReport(SPEC.job_id, 1, 2, (delivery(["d0", "d1"]),), ())
    assert evidence_of(SPEC, report, report.deliveries[0], NETUID) == ("d0", "d1")


@pytest.mark.parametrize(
    ("forged", "match"),
    [
        (delivery(["d0"], signer=OTHER), "did not sign"),
        (delivery(["d0"], to=PEER1.ss58_address), "did not sign"),  # signed for one peer, not the job
        (delivery(["d0"], seq=2), "another round or chunk"),
        (delivery(["d0"], segment=1), "another round or chunk"),
        (delivery(["d0"], chunk=3), "another round or chunk"),
        (Delivery(5, 0, ()), "names a miner or segment"),
    ],
    ids=["another signer", "another receiver", "another round", "another segment", "chunks out of order", "no miner"],
)
def test_a_report_counts_only_with_signatures_of_that_round_for_that_peer(forged, match):
    report = RoundReport(SPEC.job_id, 1, 2, (forged,), ())
    with pytest.raises(JobError, match=match):
        evidence_of(SPEC, report, forged, NETUID)


def test_a_round_is_complete_once_every_peer_reported():
    round_ = RoundEvidence(SPEC, 1, PEERS)
    add(round_, 1, (delivery(["d0"]),))
    add(round_, 2, (delivery(["d0"]),))
    assert not round_.complete and round_.heard == {(0, 0)}
    add(round_, 3, (delivery(["d0"]),))
    assert round_.complete
    assert round_.delivered(0, 0) == ("d0",) and round_.delivered(1, 0) is None


def test_a_miner_that_sent_peers_different_results_is_convicted_by_its_own_signatures():
    round_ = RoundEvidence(SPEC, 1, PEERS)
    add(round_, 1, (delivery(["d0", "d1"]),))
    add(round_, 2, (delivery(["d0", "XX"]),))
    assert round_.delivered(0, 0) == "the miner sent different results to different peers"


def test_misses_need_a_majority_of_the_peers():
    round_ = RoundEvidence(SPEC, 1, PEERS)
    add(round_, 1, (), late=(1,))
    assert round_.on_time(1)  # one of three peers: no majority
    add(round_, 2, (), late=(1,))
    assert not round_.on_time(1) and round_.on_time(0)


def test_misses_need_a_majority_of_distinct_hotkeys_not_of_ranks():
    round_ = RoundEvidence(SPEC, 1, {1: "peer-a", 2: "peer-a", 3: "peer-b"})
    add(round_, 1, (delivery(["d0"]),), late=(1,))
    add(round_, 2, (delivery(["d0"]),), late=(1,))
    assert round_.on_time(1)  # two ranks, one hotkey: one of two hotkeys is no majority
    add(round_, 3, (delivery(["d0"]),), late=(1,))
    assert not round_.on_time(1)


def test_only_a_round_that_ran_in_a_job_of_several_hotkeys_counts_for_reliability():
    never_ran = RoundEvidence(SPEC, 7, PEERS)  # reports of misses, and no miner's signature of the round
    for rank in PEERS:
        add(never_ran, rank, (), late=(0, 1))
    assert never_ran.complete and not never_ran.counts
    alone = RoundEvidence(SPEC, 1, dict.fromkeys(PEERS, "peer-a"))  # one hotkey holds every rank
    for rank in PEERS:
        add(alone, rank, (delivery(["d0"]),), late=(1,))
    assert not alone.counts
    ran = RoundEvidence(SPEC, 1, PEERS)
    for rank in PEERS:
        add(ran, rank, (delivery(["d0"]),), late=(1,))
    assert ran.counts and not ran.on_time(1) and ran.on_time(0)


class CountingValidator:
    """Stands for the validator's endpoint: records every batch of reports, each taking `call_s` to send."""

    def __init__(self, call_s: float):
        self.call_s, self.batches = call_s, []

    def send(self, reports: tuple[RoundReport, ...]) -> None:
        time.sleep(self.call_s)
        self.batches.append([r.seq for r in reports])


def test_a_peer_reports_every_round_of_a_fast_job_in_full_batches():
    """Rounds far faster than the reporting interval: full batches go at once, so none is dropped."""
    validator = CountingValidator(call_s=0.05)
    reporter = _Reporter(validator.send)
    rounds = 4 * REPORT_BATCH + 3
    for seq in range(1, rounds + 1):
        reporter.put(RoundReport(SPEC.job_id, seq, 1, (), ()))
        time.sleep(0.001)
    reporter.close(timeout_s=30)
    assert sorted(seq for batch in validator.batches for seq in batch) == list(range(1, rounds + 1))
    assert all(len(batch) <= REPORT_BATCH for batch in validator.batches)


def test_a_jobs_rounds_close_in_bounded_memory_and_refuse_reports_far_ahead():
    rounds = JobRounds()
    for seq in range(1, 1001):  # rounds close in order: nothing is kept but the floor
        rounds.admit(seq, 1)
        rounds.open[seq] = RoundEvidence(SPEC, seq, PEERS)
        assert rounds.close(seq).seq == seq
    assert (rounds.floor, rounds.closed, rounds.open) == (1001, set(), {})
    assert rounds.is_closed(7)  # a report of a closed round changes nothing
    rounds.admit(1001 + ROUNDS_AHEAD - 1, 2)
    with pytest.raises(JobError, match=rf"^the report of rank 2 names round {1001 + ROUNDS_AHEAD}, more than "):
        rounds.admit(1001 + ROUNDS_AHEAD, 2)


def test_a_round_nobody_reported_is_closed_once_no_older_round_is_open_and_a_newer_one_closed():
    rounds = JobRounds()
    for seq in (1, 2, 4, 5):
        rounds.open[seq] = RoundEvidence(SPEC, seq, PEERS)
    rounds.close(4)  # round 3 went unreported; 1 and 2 are still open
    assert (rounds.floor, rounds.closed) == (1, {4})
    rounds.close(1)
    rounds.close(2)
    assert (rounds.floor, rounds.closed) == (5, set()) and rounds.is_closed(3)  # 5 is open: the floor stops there
    rounds.close(5)
    assert (rounds.floor, rounds.closed, rounds.open) == (6, set(), {})
