"""RoundEvidence, without Ray: signed evidence is accepted only as signed; completeness, misses, comparisons."""

import pyarrow as pa
import pytest
from bittensor.sp_core import Keypair

from mapreduce_ray.errors import BadSignatureError, JobError
from mapreduce_ray.evidence import RoundEvidence, evidence_of
from mapreduce_ray.messages import ContributionReceipt, RoundReport, SegmentResult, seal_body
from mapreduce_ray.transport import fingerprint
from mapreduce_ray.types import JobSpec, MinerSlot, ReduceOp, RoundKind, TensorSpec

MINER, OTHER, PEER1, PEER2 = (Keypair.create_from_uri(f"//{n}") for n in ("Miner", "Other", "Peer1", "Peer2"))
PEERS = {1: PEER1, 2: PEER2}
SPEC = JobSpec("job0000000001", "j", "ns", 2, (MinerSlot(1, MINER.ss58_address, 1.0),), 1024, 30.0, 1 << 20)
TENSOR = TensorSpec("float32", (4,))


def chunk(*values: float) -> pa.Buffer:
    return pa.py_buffer(pa.array(values, pa.float32()).buffers()[1].to_pybytes())


def report_of(rank: int, mine: list, result: list, signer: Keypair = MINER, seq: int = 1, kind=RoundKind.ALL_REDUCE):
    """A peer's report and its evidence about miner 0, with the miner's signatures for that peer."""
    peer = PEERS[rank].ss58_address
    op, src = (ReduceOp.AVG, None) if kind is RoundKind.ALL_REDUCE else (None, 1)
    prints = tuple(map(fingerprint, mine))
    receipt = seal_body(signer, ContributionReceipt(SPEC.job_id, seq, kind, op, src, 0, rank, prints, 0), peer)
    results = seal_body(
        signer, SegmentResult(SPEC.job_id, seq, 0, rank, 0, TENSOR, tuple(map(fingerprint, result)), 0, ()), peer
    )
    report = RoundReport(SPEC.job_id, seq, rank, "node-a", (0,), (receipt.decode(),), ((results.decode(),),), ())
    return report, evidence_of(SPEC, report, 0, peer, report.receipts[0], report.results[0], mine)


X1, X2, Y = [chunk(1, 2, 3, 4)], [chunk(3, 4, 5, 6)], [chunk(2, 3, 4, 5)]


def test_a_round_is_complete_once_every_peer_reported_and_the_miner_handed_over_what_it_signed():
    round_ = RoundEvidence(SPEC, 1)
    for rank, mine in ((1, X1), (2, X2)):
        report, evidence = report_of(rank, mine, Y)
        round_.add_report(rank, [(0, evidence)], report.late)
    assert not round_.complete and not round_.on_time(0)  # nothing handed over yet: withheld
    round_.offer(0, 0, [chunk(9, 9, 9, 9)])  # someone else's list: not what the miner signed
    assert not round_.complete
    round_.offer(0, 0, Y)
    assert round_.complete and round_.on_time(0)
    comparison = round_.comparison(0, 0)
    assert [c.chunks for c in comparison.contributions] == [X1, X2]
    assert [c.node for c in comparison.contributions] == ["node-a", "node-a"]
    assert (comparison.result, comparison.dtype, comparison.op, comparison.numel) == (Y, "float32", ReduceOp.AVG, 4)


def test_a_broadcast_is_compared_with_its_source_alone():
    round_ = RoundEvidence(SPEC, 1)
    for rank, mine in ((1, X1), (2, [])):
        report, evidence = report_of(rank, mine, X1, kind=RoundKind.BROADCAST)
        round_.add_report(rank, [(0, evidence)], ())
    round_.offer(0, 0, X1)
    comparison = round_.comparison(0, 0)
    assert [c.chunks for c in comparison.contributions] == [X1] and comparison.op is ReduceOp.SUM


def test_a_miner_that_sent_peers_different_results_is_convicted_by_its_own_signatures():
    round_ = RoundEvidence(SPEC, 1)
    round_.add_report(1, [(0, report_of(1, X1, Y)[1])], ())
    round_.add_report(2, [(0, report_of(2, X2, X1)[1])], ())
    assert round_.comparison(0, 0) == "the miner sent different results to different peers"


def test_misses_need_a_majority_of_the_peers():
    round_ = RoundEvidence(SPEC, 1)
    round_.add_report(1, [], late=(0,))
    assert round_.on_time(0)  # one of two peers is no majority
    round_.add_report(2, [], late=(0,))
    assert not round_.on_time(0)


def test_evidence_must_carry_the_miners_signatures_for_exactly_these_chunks():
    with pytest.raises(BadSignatureError, match=f"^contribution_receipt message from {OTHER.ss58_address} to "):
        report_of(1, X1, Y, signer=OTHER)  # not the job's miner
    report, _ = report_of(1, X1, Y)
    with pytest.raises(JobError, match="^the report of rank 1 carries other chunks than the miner signed for$"):
        evidence_of(SPEC, report, 0, PEER1.ss58_address, report.receipts[0], report.results[0], X2)
    other_round = RoundReport(SPEC.job_id, 2, 1, "n", (0,), report.receipts, report.results, ())
    with pytest.raises(JobError, match="^the report of rank 1 forwards signatures of another round$"):
        evidence_of(SPEC, other_round, 0, PEER1.ss58_address, report.receipts[0], report.results[0], X1)
