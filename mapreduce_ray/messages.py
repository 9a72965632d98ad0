"""The typed bodies of the protocol's messages, and their strict JSON codec.

Calls carry a body as plain JSON (`encode`/`decode`), signed by btauth. Answers that the caller
must be able to show to others, and everything inside job streams, are signed messages
(`seal_body`/`open_body`, mapreduce_ray.protocol):

    wire = seal_body(keypair, Chunk(...), miner_hotkey)
    chunk, envelope = open_body(verifier, wire, Chunk)
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from enum import Enum

from mapreduce_ray.errors import MalformedMessageError
from mapreduce_ray.protocol import Kind, Verifier, canonical, json_object, seal
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
    """A peer leaves its job, which ends it: the validator frees its miners."""

    job_id: str
    rank: int


@dataclass(frozen=True)
class StreamOpen:
    """The descriptor of a job stream: the peer at `rank` of job `job_id` streams to this miner."""

    job_id: str
    rank: int


@dataclass(frozen=True)
class Chunk:
    """Beside each frame a peer streams: chunk `chunk` of `segment` of round `seq`, with the BLAKE3
    digest of its bytes, and what the round is (every chunk says it, so any miner can take over)."""

    job_id: str
    seq: int
    kind: RoundKind
    op: ReduceOp | None
    src: int | None
    tensor: TensorSpec
    segment: int
    rank: int
    chunk: int
    digest: str


@dataclass(frozen=True)
class Await:
    """A broadcast receiver asks the miner for `segment` of round `seq` (it sends no frames)."""

    job_id: str
    seq: int
    src: int
    segment: int
    rank: int


@dataclass(frozen=True)
class Reduced:
    """Beside each reduced chunk a miner streams to the peer at `rank`: the chunk's digest, and the digests
    of the inputs it reduced, in rank order (for a broadcast, the source's alone): the receipt. `tensor`
    is the round's tensor (for a broadcast, the source's). To a broadcast source it comes without a frame."""

    job_id: str
    seq: int
    segment: int
    rank: int
    chunk: int
    tensor: TensorSpec
    digest: str
    inputs: tuple[str, ...]


@dataclass(frozen=True)
class RoundFailed:
    """A miner gives up `segment` of round `seq`: `error` names one of mapreduce_ray.errors, `message` says why."""

    job_id: str
    seq: int
    segment: int
    error: str
    message: str


@dataclass(frozen=True)
class Delivery:
    """What a peer got from one miner for one segment: the miner's signed Reduced message of every chunk
    (UTF-8 wires, in chunk order)."""

    miner: int
    segment: int
    reduced: tuple[str, ...]


@dataclass(frozen=True)
class RoundReport:
    """After a round, a peer tells the validator which miners delivered which segments (with their signed
    receipts, for checks) and which died, failed or missed the deadline (`late`, indexes into the job's miners)."""

    job_id: str
    seq: int
    rank: int
    deliveries: tuple[Delivery, ...]
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
class Ticket:
    """A validator asks a miner for chunk `chunk` of `segment` of a round it retained: every input, then
    the result."""

    job_id: str
    seq: int
    segment: int
    chunk: int


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
    JobAdmission: Kind.JOB_SPEC,
    Ruling: Kind.RULING,
    Chunk: Kind.CHUNK,
    Await: Kind.AWAIT,
    Reduced: Kind.REDUCED,
    RoundFailed: Kind.ROUND_FAILED,
}


def encode(body) -> bytes:
    """A call's body as canonical JSON."""
    return canonical(dataclasses.asdict(body)).encode()


def parse(cls: type, payload: bytes):
    """A call's body of type `cls`; MalformedMessageError if it is not one."""
    return decode(cls, json_object(payload, f"a {cls.__name__}"), cls.__name__)


def seal_body(keypair, body, receiver: str) -> bytes:
    return seal(keypair, KINDS[type(body)], dataclasses.asdict(body), receiver)


def open_body(verifier: Verifier, wire: bytes, cls: type | tuple[type, ...], sender: str | None = None):
    """(body, envelope) of a verified message of `cls`'s kind (or of one of several classes')."""
    classes = cls if isinstance(cls, tuple) else (cls,)
    by_kind = {KINDS[c]: c for c in classes}
    envelope = verifier.open(wire, frozenset(by_kind), sender)
    body_class = by_kind[envelope.kind]
    return decode(body_class, envelope.body, body_class.__name__), envelope


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
        try:
            return hint(**{f: decode(hints[f], value[f], f"{where}.{f}") for f in fields})
        except (ValueError, TypeError) as e:  # a record's own checks
            raise MalformedMessageError(f"{where} does not hold: {e}") from None
    if isinstance(hint, type) and issubclass(hint, Enum):
        try:
            return hint(value)
        except ValueError:
            raise MalformedMessageError(f"{where} is {value!r}, not a {hint.__name__}") from None
    if hint is float and type(value) is int and abs(value) < 2**53:
        return float(value)
    if hint in (int, str, bool, float) and type(value) is hint:
        return value
    raise MalformedMessageError(f"{where} is {_short(value)}, not {getattr(hint, '__name__', hint)}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
