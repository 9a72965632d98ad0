"""The typed bodies of the protocol's messages, and their strict JSON codec.

Calls carry a body as plain JSON (`encode`/`decode`), signed by btauth. Answers that the caller
must be able to show to others, and everything inside job streams, are signed messages
(`seal_body`/`open_body`, mapreduce_ray.protocol):

    wire = seal_body(keypair, Chunk(...), miner_hotkey, netuid)
    chunk, envelope = open_body(verifier, wire, Chunk)
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from mapreduce_ray.errors import MalformedMessageError
from mapreduce_ray.protocol import Kind, Verifier, canonical, json_object, seal
from mapreduce_ray.types import JobSpec, ReduceOp, RoundKind, TensorSpec

REPORT_BATCH = 64


@dataclass(frozen=True)
class JobRequest:
    """A peer asks to take `rank` in job `job` of `peer_count` peers, handing in tensors of up to `max_bytes`,
    each segment reduced by `redundancy` miners, NaN and Inf refused when `reject_nonfinite`. When `max_bytes`
    is over the miners' verified capacity, the validator may benchmark them at up to `benchmark_max_bytes`."""

    job: str
    rank: int
    peer_count: int
    max_bytes: int | None  # None: any size the job's miners can take
    redundancy: int
    reject_nonfinite: bool
    benchmark_max_bytes: int | None  # None: up to max_bytes; 0: no benchmark on demand
    verify_results: bool  # peers check every reduced chunk before use (mapreduce_ray.sketch)


@dataclass(frozen=True)
class JobAdmission:
    """The validator admits hotkey `peer` as `rank` of the job `spec`; sent to the peer and to every miner. The
    peer's copy alone carries the job's `secret` (hex), which keys the checks of its results (mapreduce_ray.sketch):
    miners never see it ("": the job's results go unchecked). The miners' copy names the job by its id only, so a
    benchmark's admission reads like a live job's."""

    spec: JobSpec
    rank: int
    peer: str
    secret: str = ""


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
    proof: str = ""  # the peer's sketch of the chunk, sealed for the job's peers ("": unchecked)


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
    """Beside each reduced chunk a miner streams, sealed once for every peer of the job (its receiver is
    `protocol.audience(job_id)`): the chunk's digest, and the digests of the inputs it reduced, in rank order
    (for a broadcast, the source's alone): the receipt. `tensor` is the round's tensor (for a broadcast, the
    source's). `proofs`: the inputs' sealed sketches, as their peers sent them, in the same order. To a broadcast
    source it comes without a frame."""

    job_id: str
    seq: int
    segment: int
    chunk: int
    tensor: TensorSpec
    digest: str
    inputs: tuple[str, ...]
    proofs: tuple[str, ...] = ()


@dataclass(frozen=True)
class RoundFailed:
    """A miner gives up `segment` of round `seq` (sealed for every peer of the job): `error` names one of
    mapreduce_ray.errors, `message` says why."""

    job_id: str
    seq: int
    segment: int
    error: str
    message: str


@dataclass(frozen=True)
class Verdict:
    """A peer's word on `segment` of round `seq` as the miner delivered it to the peer at `rank`: `tag`,
    sealed with the job's secret over the digests it kept and `struck` (mapreduce_ray.sketch.Sketcher.vouch),
    when every chunk passed its checks; "" when one failed. `struck`: the job's miners (indexes) the validator
    told this peer are struck, which every peer leaves out once a round's verdicts carry them. Sent only in
    jobs whose results are checked."""

    job_id: str
    seq: int
    segment: int
    rank: int
    tag: str
    struck: tuple[int, ...] = ()


@dataclass(frozen=True)
class Settled:
    """A miner relays its peers' verdicts on `segment` of round `seq` (sealed for every peer of the job),
    as soon as one refuses or all are in: `tags` in rank order of the ranks that receive ("": refused or
    missing), and their `struck` lists in the same order. A peer keeps the segment only when every tag
    vouches for the digests it kept itself (and the struck list beside it), so every peer keeps the same
    segment or none does, and all read the same struck lists."""

    job_id: str
    seq: int
    segment: int
    tags: tuple[str, ...]
    struck: tuple[tuple[int, ...], ...] = ()


@dataclass(frozen=True)
class Delivery:
    """What a peer got from one miner for one segment: the miner's signed Reduced message of every chunk
    (UTF-8 wires, in chunk order)."""

    miner: int
    segment: int
    reduced: tuple[str, ...]


@dataclass(frozen=True)
class WrongChunk:
    """A reduced chunk that failed a peer's check: the miner's signed Reduced message of it (a UTF-8 wire)."""

    miner: int
    segment: int
    reduced: str


@dataclass(frozen=True)
class RoundReport:
    """After a round, a peer tells the validator which miners delivered which segments (with their signed
    receipts, for checks), which died, failed or missed the deadline (`late`, indexes into the job's miners),
    and which sent a chunk that failed its check (`wrong`: the evidence, for the validator to rule on)."""

    job_id: str
    seq: int
    rank: int
    deliveries: tuple[Delivery, ...]
    late: tuple[int, ...]
    wrong: tuple[WrongChunk, ...] = ()


@dataclass(frozen=True)
class Excluded:
    """The validator's answer to a peer's reports: the miners of its job (indexes) that are struck or banned
    now, which the peer leaves out of its later rounds."""

    job_id: str
    miners: tuple[int, ...]


@dataclass(frozen=True)
class Reports:
    """Round reports a peer sends together (at most REPORT_BATCH), so the validator gets one call per while,
    not one per round."""

    reports: tuple[RoundReport, ...]

    def __post_init__(self):
        if not 1 <= len(self.reports) <= REPORT_BATCH:
            raise ValueError(f"a call carries 1 to {REPORT_BATCH} round reports, not {len(self.reports)}")


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
    """A benchmark bot's measurement of one miner: end-to-end seconds from `started_at` (wall clock, s), the
    outcome, and what went wrong."""

    miner_uid: int
    miner_hotkey: str
    size_bytes: int
    seconds: float
    outcome: Outcome
    detail: str
    started_at: float


@dataclass(frozen=True)
class BenchmarkRequest:
    """A peer of job `job_id` (at `rank`) asks the validator to benchmark the job's miners now."""

    job_id: str
    rank: int


@dataclass(frozen=True)
class MinerMeasurement:
    """A miner as a benchmark of `size_bytes` per rank just found it, and as the validator now records it:
    throughput in bytes/s per benchmark rank (0 after a failed benchmark), verified capacity in bytes."""

    uid: int
    hotkey: str
    outcome: Outcome
    size_bytes: int
    throughput: float
    capacity: int


@dataclass(frozen=True)
class Measurements:
    """The validator's answer to a BenchmarkRequest: each of the job's miners, measured."""

    job_id: str
    miners: tuple[MinerMeasurement, ...]


KINDS: dict[type, Kind] = {
    JobAdmission: Kind.JOB_SPEC,
    Ruling: Kind.RULING,
    Measurements: Kind.MEASUREMENTS,
    Excluded: Kind.EXCLUDED,
    Chunk: Kind.CHUNK,
    Await: Kind.AWAIT,
    Reduced: Kind.REDUCED,
    RoundFailed: Kind.ROUND_FAILED,
    Verdict: Kind.VERDICT,
    Settled: Kind.SETTLED,
}


def encode(body) -> bytes:
    """A call's body as canonical JSON."""
    return canonical(plain(body)).encode()


def plain(value):
    """A record as JSON-ready values: records as dicts, tuples as lists (dataclasses.asdict, without its copies)."""
    if hasattr(type(value), "__dataclass_fields__"):
        return {name: plain(getattr(value, name)) for name in _field_names(type(value))}
    if isinstance(value, tuple):
        return [plain(v) for v in value]
    return value


def parse(cls: type, payload: bytes):
    """A call's body of type `cls`; MalformedMessageError if it is not one."""
    return decode(cls, json_object(payload, f"a {cls.__name__}"), cls.__name__)


def seal_body(keypair, body, receiver: str, netuid: int) -> bytes:
    return seal(keypair, KINDS[type(body)], plain(body), receiver, netuid)


def open_body(
    verifier: Verifier,
    wire: bytes,
    cls: type | tuple[type, ...],
    sender: str | None = None,
    receiver: str | None = None,
):
    """(body, envelope) of a verified message of `cls`'s kind (or of one of several classes'), addressed to
    `receiver` (default: the verifier's hotkey)."""
    classes = cls if isinstance(cls, tuple) else (cls,)
    by_kind = {KINDS[c]: c for c in classes}
    envelope = verifier.open(wire, frozenset(by_kind), sender, receiver)
    body_class = by_kind[envelope.kind]
    return decode(body_class, envelope.body, body_class.__name__), envelope


def decode(hint, value, where: str):
    """`value` (parsed JSON) as type `hint`; MalformedMessageError naming `where` if it does not fit."""
    return _decoder(hint)(value, where)


@functools.cache
def _decoder(hint) -> Callable[[object, str], object]:
    """The function that decodes JSON values as `hint`, built once per type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner, optional = _decoder(next(a for a in args if a is not type(None))), type(None) in args
        return lambda value, where: None if value is None and optional else inner(value, where)
    if origin is tuple:
        item = _decoder(args[0])

        def sequence(value, where):
            if not isinstance(value, list):
                raise _mismatch(value, "tuple", where)
            return tuple(item(v, where) for v in value)

        return sequence
    if dataclasses.is_dataclass(hint):
        return _record_decoder(hint)
    if isinstance(hint, type) and issubclass(hint, Enum):

        def member(value, where):
            try:
                return hint(value)
            except ValueError:
                raise MalformedMessageError(f"{where} is {value!r}, not a {hint.__name__}") from None

        return member

    def scalar(value, where):
        if type(value) is hint:
            return value
        if hint is float and type(value) is int and abs(value) < 2**53:
            return float(value)
        raise _mismatch(value, getattr(hint, "__name__", str(hint)), where)

    return scalar


def _record_decoder(cls: type) -> Callable[[object, str], object]:
    names, hints = _field_names(cls), typing.get_type_hints(cls)
    fields = [(name, _decoder(hints[name])) for name in names]
    expected = set(names)

    def record(value, where):
        if not isinstance(value, dict):
            raise _mismatch(value, cls.__name__, where)
        if value.keys() != expected:
            raise MalformedMessageError(f"{where} has fields {sorted(value)}, expected {sorted(names)}")
        try:
            return cls(**{name: field(value[name], f"{where}.{name}") for name, field in fields})
        except (ValueError, TypeError) as e:  # a record's own checks
            raise MalformedMessageError(f"{where} does not hold: {e}") from None

    return record


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _mismatch(value, expected: str, where: str) -> MalformedMessageError:
    return MalformedMessageError(f"{where} is {_short(value)}, not {expected}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
