"""The typed bodies of the protocol's messages, and their strict JSON codec.

wire = seal_body(keypair, JobRequest("default", 1, 4, None, 1, False), validator_hotkey)
request, envelope = open_body(verifier, wire, JobRequest)
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from enum import Enum

from mapreduce_ray.errors import MalformedMessageError
from mapreduce_ray.protocol import Kind, Verifier, seal
from mapreduce_ray.types import JobSpec, ReduceOp, RoundKind, TensorSpec


@dataclass(frozen=True)
class JobRequest:
    """A peer asks to take `rank` in job `job` of `peer_count` peers, handing in tensors of up to `max_bytes`,
    each segment reduced by `redundancy` miners, NaN and Inf refused when `reject_nonfinite`."""

    job: str
    rank: int
    peer_count: int
    max_bytes: int | None  # None: any size the job's miners can take
    redundancy: int
    reject_nonfinite: bool


@dataclass(frozen=True)
class JobAdmission:
    """The validator admits hotkey `peer` as `rank` of the job `spec`; sent to the peer and to every miner."""

    spec: JobSpec
    rank: int
    peer: str


@dataclass(frozen=True)
class JobLeave:
    """A peer leaves: its rounds may be released."""

    job_id: str
    rank: int


@dataclass(frozen=True)
class Contribution:
    """A peer's part of one segment of one round at one miner: what the round is and the fingerprints of
    the chunks it ships. `miner` is the receiving miner's place in the job, `segment` the plan's segment."""

    job_id: str
    seq: int
    kind: RoundKind
    op: ReduceOp | None
    src: int | None
    tensor: TensorSpec | None
    miner: int
    rank: int
    chunks: tuple[str, ...]  # transport.fingerprint of each shipped chunk
    segment: int


@dataclass(frozen=True)
class ContributionReceipt:
    """A miner confirms it took a contribution to this round (kind, op, source) with these chunk fingerprints."""

    job_id: str
    seq: int
    kind: RoundKind
    op: ReduceOp | None
    src: int | None
    miner: int
    rank: int
    chunks: tuple[str, ...]
    segment: int


@dataclass(frozen=True)
class SegmentResult:
    """Reduced chunks `first_chunk`.. of `segment`, by fingerprint, from the job's miner `miner`.

    `tensor` is the round's tensor spec (for a broadcast, the source's). In a job with
    redundancy, `digests` are the BLAKE3 digests of the chunks' bytes, which peers
    compare across the segment's miners; otherwise empty."""

    job_id: str
    seq: int
    miner: int
    rank: int
    first_chunk: int
    tensor: TensorSpec
    chunks: tuple[str, ...]
    segment: int
    digests: tuple[str, ...]


@dataclass(frozen=True)
class RoundReport:
    """After a round, a peer forwards each miner's signed receipt and results, for the validator to check.

    `miners` lists the miner indexes that delivered a segment (a miner that took over
    a failed miner's segment is listed once per segment), `receipts` and `results`
    (every SegmentResult wire, in order) align with it, as UTF-8 text; `late` lists
    the miners that died, failed or missed their deadline; `node` is the Ray node that
    stored the peer's chunks. The shipped chunks travel beside the message.
    """

    job_id: str
    seq: int
    rank: int
    node: str
    miners: tuple[int, ...]
    receipts: tuple[str, ...]
    results: tuple[tuple[str, ...], ...]
    late: tuple[int, ...]


@dataclass(frozen=True)
class Dispute:
    """A peer got different digests for `segment` of a round from its miners and asks the validator to rule."""

    job_id: str
    seq: int
    segment: int
    rank: int


@dataclass(frozen=True)
class Ruling:
    """The validator's verdict on a dispute: the job's miner whose result is exact (None: none is), and why."""

    job_id: str
    seq: int
    segment: int
    miner: int | None
    reason: str


@dataclass(frozen=True)
class BenchmarkOrder:
    """The validator asks a benchmark bot to run one all_reduce of `size_bytes` per rank through the job's miner."""

    spec: JobSpec
    size_bytes: int


class Outcome(str, Enum):
    EXACT = "exact"  # every rank got the bitwise-exact result
    WRONG = "wrong"  # a result arrived, signed, and differs: the miner computed it wrong
    LATE = "late"  # no result before the deadline
    FAILED = "failed"  # the round broke off with an error


@dataclass(frozen=True)
class BenchmarkResult:
    """A benchmark bot's measurement of one miner: end-to-end seconds, the outcome, and what went wrong."""

    miner_uid: int
    miner_hotkey: str
    size_bytes: int
    seconds: float
    outcome: Outcome
    detail: str


KINDS: dict[type, Kind] = {
    JobRequest: Kind.JOB_REQUEST,
    JobAdmission: Kind.JOB_SPEC,
    JobLeave: Kind.JOB_LEAVE,
    Contribution: Kind.CONTRIBUTION,
    ContributionReceipt: Kind.CONTRIBUTION_RECEIPT,
    SegmentResult: Kind.SEGMENT_RESULT,
    RoundReport: Kind.ROUND_REPORT,
    Dispute: Kind.DISPUTE,
    Ruling: Kind.RULING,
    BenchmarkOrder: Kind.BENCHMARK_ORDER,
    BenchmarkResult: Kind.BENCHMARK_RESULT,
}


def seal_body(keypair, body, receiver: str) -> bytes:
    return seal(keypair, KINDS[type(body)], dataclasses.asdict(body), receiver)


def open_body(verifier: Verifier, wire: bytes, cls: type, sender: str | None = None):
    """(body, envelope) of a verified message of `cls`'s kind."""
    envelope = verifier.open(wire, KINDS[cls], sender)
    return decode(cls, envelope.body, cls.__name__), envelope


def decode(hint, value, where: str):
    """`value` (parsed JSON) as type `hint`; MalformedMessageError naming `where` if it does not fit."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return decode(next(a for a in args if a is not type(None)), value, where)
    if origin is tuple and isinstance(value, list):
        return tuple(decode(args[0], v, where) for v in value)
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        hints = typing.get_type_hints(hint)
        fields = [f.name for f in dataclasses.fields(hint)]
        if set(value) != set(fields):
            raise MalformedMessageError(f"{where} has fields {sorted(value)}, expected {sorted(fields)}")
        return hint(**{f: decode(hints[f], value[f], f"{where}.{f}") for f in fields})
    if isinstance(hint, type) and issubclass(hint, Enum):
        try:
            return hint(value)
        except ValueError:
            raise MalformedMessageError(f"{where} is {value!r}, not a {hint.__name__}") from None
    if hint is float and type(value) is int and abs(value) < 2**53:
        return float(value)
    if hint in (int, str, bool, float) and type(value) is hint:
        return value
    raise MalformedMessageError(f"{where} is {value!r}, not {getattr(hint, '__name__', hint)}")
