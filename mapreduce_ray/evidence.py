"""What a validator gathers about one round before it checks it: no Ray calls, no I/O.

Each peer forwards, per miner and segment it heard about, the miner's signed
receipt and results with the chunks it shipped (`evidence_of` accepts them only
if the miner's signatures vouch for exactly those chunks); each miner hands over
its result chunks. A miner may deliver several segments of a round: its own,
one it took over from a failed miner, or replicas in a job with redundancy.
`RoundEvidence` collects both and says when the round is complete, which miners
missed it, and what a check of each miner's segment compares.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from mapreduce_ray.errors import JobError
from mapreduce_ray.messages import ContributionReceipt, RoundReport, SegmentResult, decode
from mapreduce_ray.plan import plan_round
from mapreduce_ray.protocol import Kind, attest
from mapreduce_ray.transport import Shipped, fingerprint
from mapreduce_ray.types import JobSpec, ReduceOp, RoundKind, TensorSpec

MAX_OFFERS = 4  # result lists accepted per miner and round (the miner's own, and a few from anyone else)


@dataclass(frozen=True)
class Stored:
    """A segment's shipped chunks and the Ray node whose store holds them ("" when unknown)."""

    chunks: Sequence[Shipped]
    node: str = ""


@dataclass(frozen=True)
class Evidence:
    """What one peer forwarded about one miner of one round."""

    receipt: ContributionReceipt
    segment: int
    tensor: TensorSpec  # the round's tensor, as the miner signed it
    contribution: Stored  # the peer's shipped chunks, on the peer's node
    result_prints: tuple[str, ...]  # the fingerprints of the reduced chunks the miner signed


def evidence_of(
    spec: JobSpec, report: RoundReport, miner: int, peer: str, receipt_wire: str, result_wires, chunks: list
) -> Evidence:
    """A peer's evidence about one miner, if the miner's signatures vouch for exactly these chunks."""
    hotkey = spec.miners[miner].hotkey
    receipt = decode(
        ContributionReceipt, attest(receipt_wire.encode(), Kind.CONTRIBUTION_RECEIPT, hotkey, peer).body, "receipt"
    )
    results = [
        decode(SegmentResult, attest(w.encode(), Kind.SEGMENT_RESULT, hotkey, peer).body, "result")
        for w in result_wires
    ]
    where = (report.job_id, report.seq, miner, receipt.segment, report.rank)
    if (
        not results
        or (receipt.job_id, receipt.seq, receipt.miner, receipt.segment, receipt.rank) != where
        or any((r.job_id, r.seq, r.miner, r.segment, r.rank) != where for r in results)
        or not 0 <= receipt.segment < len(spec.miners)
    ):
        raise JobError(f"the report of rank {report.rank} forwards signatures of another round")
    if tuple(fingerprint(c) for c in chunks) != receipt.chunks:
        raise JobError(f"the report of rank {report.rank} carries other chunks than the miner signed for")
    prints = tuple(p for r in results for p in r.chunks)
    return Evidence(receipt, receipt.segment, results[0].tensor, Stored(chunks, report.node), prints)


@dataclass(frozen=True)
class Comparison:
    """What a check of one miner compares: contributions in rank order, the result, how they combine."""

    contributions: list[Stored]
    result: list
    dtype: str
    op: ReduceOp
    numel: int


@dataclass
class RoundEvidence:
    """The reports and handed-over results of one round, gathered until it is complete."""

    spec: JobSpec
    seq: int
    opened_at: float = field(default_factory=time.monotonic)
    evidence: dict[tuple[int, int, int], Evidence] = field(default_factory=dict)  # (miner, segment, rank) ->
    late: dict[int, set[int]] = field(default_factory=dict)  # miner -> ranks that saw it fail or miss the deadline
    reported: set[int] = field(default_factory=set)
    offers: dict[tuple[int, int], list[list]] = field(default_factory=dict)  # (miner, segment) -> result lists

    def add_report(self, rank: int, evidence: Sequence[tuple[int, Evidence]], late: Sequence[int]) -> None:
        """A peer's report: (miner, evidence) per delivered segment, and the miners it saw fail."""
        for miner, item in evidence:
            self.evidence[(miner, item.segment, rank)] = item
        for miner in late:
            self.late.setdefault(miner, set()).add(rank)
        self.reported.add(rank)

    def offer(self, miner: int, segment: int, results: list) -> None:
        offers = self.offers.setdefault((miner, segment), [])
        if len(offers) < MAX_OFFERS:
            offers.append(results)

    def results(self, miner: int, segment: int) -> list | None:
        """The handed-over results of `miner` for `segment` whose fingerprints are the ones it signed."""
        signed = {e.result_prints for (m, s, _), e in self.evidence.items() if (m, s) == (miner, segment)}
        offers = self.offers.get((miner, segment), [])
        return next((o for o in offers if tuple(map(fingerprint, o)) in signed), None)

    @property
    def heard(self) -> set[tuple[int, int]]:
        """The (miner, segment) pairs peers reported deliveries of."""
        return {(m, s) for m, s, _ in self.evidence}

    @property
    def complete(self) -> bool:
        """Every peer reported, and every miner they heard from handed over the results it signed."""
        return len(self.reported) == self.spec.peer_count and all(self.results(m, s) is not None for m, s in self.heard)

    def on_time(self, miner: int) -> bool:
        """Whether the miner made the round: no majority of its peers saw it fail or miss the deadline,
        and its signed results reached the validator (so it cannot dodge checks by keeping them back)."""
        majority = self.spec.peer_count // 2 + 1
        withheld = any(m == miner and self.results(m, s) is None for m, s in self.heard)
        return len(self.late.get(miner, ())) < majority and not withheld

    def comparison(self, miner: int, segment: int) -> Comparison | str | None:
        """What to check for `miner`'s `segment`; a reason string when the evidence itself convicts it (it
        sent different results to different peers); None when the reports do not allow a check."""
        items = {rank: e for (m, s, rank), e in self.evidence.items() if (m, s) == (miner, segment)}
        if not items:
            return None
        if len({(e.result_prints, e.tensor) for e in items.values()}) != 1:
            return "the miner sent different results to different peers"
        first = next(iter(items.values()))
        if first.receipt.kind is RoundKind.BROADCAST:
            contributors, op = [first.receipt.src], ReduceOp.SUM
        else:
            contributors, op = list(range(1, self.spec.peer_count + 1)), first.receipt.op
        result = self.results(miner, segment)
        if result is None or any(rank not in items for rank in contributors):
            return None
        numel = plan_round(self.spec, first.tensor)[segment].numel
        return Comparison([items[r].contribution for r in contributors], result, first.tensor.dtype, op, numel)
