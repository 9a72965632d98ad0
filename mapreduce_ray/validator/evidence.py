"""What a validator gathers about one round from its peers' reports: no I/O.

Each peer reports, per miner and segment it got back, the miner's signed `Reduced` message of
every chunk (`evidence_of` accepts them only if that miner signed them for the job's peers, for
this round and segment, chunk by chunk), and the miners it saw die, fail or miss the deadline.
`RoundEvidence` says when every peer reported, which miners missed the round, which digests each
miner sent for a segment (and convicts a miner that sent different peers different results by
its own signatures), and so what a check of a segment must find. Peers' word on misses counts only
where it is evidence: for a round that ran (some miner signed results of it) and from a majority of
the job's distinct peer hotkeys, of which there must be several (one hotkey holding every rank, or
a majority of them, proves nothing about a miner).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from mapreduce_ray.errors import JobError, MessageRejectedError
from mapreduce_ray.messages import REPORT_BATCH, Delivery, Reduced, RoundReport, decode
from mapreduce_ray.protocol import Kind, attest, audience
from mapreduce_ray.types import JobSpec


def evidence_of(spec: JobSpec, report: RoundReport, delivery: Delivery, netuid: int) -> tuple[str, ...]:
    """The result digests `delivery.miner` sent the job's peers for a segment, chunk by chunk, if its
    signatures (on subnet `netuid`) vouch for them."""
    _require_place(spec, report, delivery.miner, delivery.segment)
    miner, segment = delivery.miner, delivery.segment
    bodies = [signed_result(spec, report, miner, segment, wire, netuid) for wire in delivery.reduced]
    if [body.chunk for body in bodies] != list(range(len(bodies))):
        raise JobError(f"the report of rank {report.rank} forwards signatures of another round or chunk")
    return tuple(body.digest for body in bodies)


def signed_result(spec: JobSpec, report: RoundReport, miner: int, segment: int, wire: str, netuid: int) -> Reduced:
    """The Reduced message a report forwards, if the job's `miner` signed it for the job's peers on subnet
    `netuid`, for the reported round and `segment`."""
    _require_place(spec, report, miner, segment)
    try:
        signed = attest(wire.encode(), Kind.REDUCED, spec.miners[miner].hotkey, audience(spec.job_id), netuid)
        body = decode(Reduced, signed.body, "Reduced")
    except MessageRejectedError as e:
        raise JobError(f"the report of rank {report.rank} forwards a message its miner did not sign: {e}") from None
    if (body.job_id, body.seq, body.segment) != (report.job_id, report.seq, segment):
        raise JobError(f"the report of rank {report.rank} forwards signatures of another round or chunk")
    return body


def _require_place(spec: JobSpec, report: RoundReport, miner: int, segment: int) -> None:
    if not 0 <= miner < len(spec.miners) or not 0 <= segment < len(spec.miners):
        raise JobError(f"the report of rank {report.rank} names a miner or segment job {spec.name!r} does not have")


@dataclass
class RoundEvidence:
    """The reports of one round, gathered until every peer reported."""

    spec: JobSpec
    seq: int
    peers: dict[int, str]  # rank -> the hotkey that holds it
    opened_at: float = field(default_factory=time.monotonic)
    results: dict[tuple[int, int], dict[int, tuple[str, ...]]] = field(default_factory=dict)  # (miner, segment) ->
    # rank -> result digests
    late: dict[int, set[int]] = field(default_factory=dict)  # miner -> ranks that saw it fail or miss the deadline
    reported: set[int] = field(default_factory=set)

    def add_report(self, rank: int, results: dict[tuple[int, int], tuple[str, ...]], late) -> None:
        """A peer's report: the digests it got per (miner, segment), and the miners it saw fail."""
        for key, digests in results.items():
            self.results.setdefault(key, {})[rank] = digests
        for miner in late:
            self.late.setdefault(miner, set()).add(rank)
        self.reported.add(rank)

    @property
    def heard(self) -> set[tuple[int, int]]:
        """The (miner, segment) pairs peers reported deliveries of."""
        return set(self.results)

    @property
    def complete(self) -> bool:
        return len(self.reported) == self.spec.peer_count

    @property
    def counts(self) -> bool:
        """Whether the round may move a miner's reliability: it ran (a miner's signed results of it came in)
        and its job has several distinct peer hotkeys."""
        return bool(self.results) and len(set(self.peers.values())) > 1

    def on_time(self, miner: int) -> bool:
        """Whether the miner made the round: no majority of the job's distinct peer hotkeys saw it fail or miss
        the deadline."""
        late = {self.peers[rank] for rank in self.late.get(miner, ()) if rank in self.peers}
        return len(late) < len(set(self.peers.values())) // 2 + 1

    def delivered(self, miner: int, segment: int) -> tuple[str, ...] | str | None:
        """The digests `miner` sent for `segment`; a reason string when its own signatures show it sent
        different peers different results; None when nobody reported it."""
        sent = set(self.results.get((miner, segment), {}).values())
        if not sent:
            return None
        if len(sent) > 1:
            return "the miner sent different results to different peers"
        return sent.pop()


ROUNDS_AHEAD = 16 * REPORT_BATCH  # how far past its oldest round not yet closed a job's reports may name a round


@dataclass
class JobRounds:
    """One job's rounds at the validator: those open (reports still coming in) and those closed, which later
    reports change nothing of. Memory stays bounded: reports may name no round more than ROUNDS_AHEAD past the
    oldest one not closed, and closed rounds are kept as a floor (every round below it is closed: a round
    older than every open one and than the newest closed one that nobody reported yet never will be) and the
    few closed above it."""

    open: dict[int, RoundEvidence] = field(default_factory=dict)
    floor: int = 1
    closed: set[int] = field(default_factory=set)  # closed rounds at or above the floor

    def is_closed(self, seq: int) -> bool:
        return seq < self.floor or seq in self.closed

    def admit(self, seq: int, rank: int) -> None:
        """Refuse a report of a round outside the window."""
        if not self.floor <= seq < self.floor + ROUNDS_AHEAD and not self.is_closed(seq):
            raise JobError(
                f"the report of rank {rank} names round {seq}, more than {ROUNDS_AHEAD} rounds past the job's "
                f"oldest open round {self.floor}"
            )

    def close(self, seq: int) -> RoundEvidence | None:
        """Close round `seq`; its evidence, if it was open."""
        round_ = self.open.pop(seq, None)
        self.closed.add(seq)
        newest = max(self.closed) + 1
        self.floor = max(self.floor, min(min(self.open, default=newest), newest))
        self.closed = {s for s in self.closed if s >= self.floor}
        return round_
