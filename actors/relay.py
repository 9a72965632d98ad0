"""A miner's endpoint: admits peers to jobs, reduces the segments they stream, keeps rounds for checks.

No Ray here: `MinerActor` (actors.miner) hosts a Relay in the operator's own Ray.

Calls (btauth on each, mapreduce_ray.wire.auth):
- `admit` (validators only): a JobAdmission puts a peer's hotkey at a rank of a job.
- `exchange`: a peer's job stream, one per (peer, job), kept open across the job's rounds. Up come
  frames of the peer's chunks, each beside a signed `Chunk` naming its round, segment, place and
  digest (a broadcast receiver sends a signed `Await` instead). Down go the reduced chunks, each
  beside a signed `Reduced` (its digest, and the digests of the inputs: the receipt), or a signed
  `RoundFailed`. A miner reduces chunk c of a segment, in rank order, as soon as every peer's
  chunk c is in, and streams it down at once. A stream reads no further while its unreduced bytes
  exceed `wire.window_bytes`. In jobs whose results are checked, each receiving peer then sends a
  signed `Verdict` on the segment, and the miner relays them all in one `Settled` (at once when one
  refuses).
- `ticket` (validators only): every input of one chunk of a retained round, then the result,
  each beside its signed message, so a validator recomputes it on its own hardware.
- `reducers` (validators only): the Flight locations (a JSON list) of the miner's reducers; a validator
  places each job at one of them, and the job's peers stream there.

A round that misses its deadline, or whose peers disagree about it or leave, fails for every
peer in it with one RoundFailed naming why. A finished round's chunks are retained for
`retention_s`, within `retention_mib`, oldest first out.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.flight as fl
import torch

from mapreduce_ray.errors import (
    FrameRejectedError,
    JobError,
    LimitExceededError,
    MapReduceError,
    NonFiniteError,
    PeerLostError,
    RoundMismatchError,
    RoundTimeoutError,
)
from mapreduce_ray.messages import (
    Await,
    Chunk,
    JobAdmission,
    Reduced,
    RoundFailed,
    Settled,
    StreamOpen,
    Ticket,
    Verdict,
    open_body,
    parse,
    seal_body,
)
from mapreduce_ray.plan import Segment, plan_round
from mapreduce_ray.protocol import MetagraphCache, Verifier, audience
from mapreduce_ray.reduce import block_accumulator, reduce_chunk
from mapreduce_ray.shards import from_buffer
from mapreduce_ray.types import JobSpec, ReduceOp, RoundKind, TensorSpec
from mapreduce_ray.wallets import Identity
from mapreduce_ray.wire.auth import Rule
from mapreduce_ray.wire.config import MIB, WireConfig
from mapreduce_ray.wire.endpoint import Endpoint, location
from mapreduce_ray.wire.frames import CHUNK_SCHEMA, check_schema, digest, frame, frame_buffer, unframe

log = logging.getLogger(__name__)

RULES = {"admit": Rule(permit=True), "exchange": Rule(), "ticket": Rule(permit=True), "reducers": Rule(permit=True)}
WATCH_S = 0.1  # how often deadlines are looked at
REDUCE_THREADS = 4  # chunks reduced at once; streams go on reading meanwhile


@dataclass(frozen=True)
class RelaySettings:
    """retention_s, retention_mib: how long, and within how many MiB, finished rounds are kept for checks.
    job_idle_s: a job with no open stream for this long is forgotten. rounds_per_job: how many rounds (seqs) of
    one job may be open here at once (its peers run one round at a time, a fast one at most a round ahead).
    memory_mib: what the open rounds' inputs may take together; a round that would take more is refused before
    any of its bytes are read (its peers hand the segment to their next miner)."""

    retention_s: float = 120.0
    retention_mib: float = 512.0
    job_idle_s: float = 600.0
    rounds_per_job: int = 4
    memory_mib: float = 2048.0

    def __post_init__(self):
        if self.rounds_per_job < 1:
            raise ValueError(f"relay.rounds_per_job must be at least 1, got {self.rounds_per_job}")
        if self.memory_mib <= 0:
            raise ValueError(f"relay.memory_mib must be positive, got {self.memory_mib}")


@dataclass
class _Job:
    """A job as validators admitted its peers here."""

    spec: JobSpec
    index: int  # this miner's place in spec.miners
    validator: str  # hotkey of the validator that admitted it
    peers: dict[int, str] = field(default_factory=dict)  # rank -> hotkey
    streams: dict[int, _Stream] = field(default_factory=dict)  # rank -> its open stream
    left: set[int] = field(default_factory=set)
    active_at: float = field(default_factory=time.monotonic)


class _Stream:
    """The down side of one peer's job stream: sealed messages (with frames) written by its own thread, in the
    order they were put."""

    def __init__(self, rank: int, hotkey: str, writer):
        self.rank, self.hotkey = rank, hotkey
        self.pending = 0  # bytes received on this stream and not yet reduced
        self._writer = writer
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._drain, name=f"stream-down-{rank}", daemon=True)
        self._thread.start()

    def put(self, wire: pa.Buffer, batch: pa.RecordBatch | None = None) -> None:
        self._queue.put((wire, batch))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _drain(self) -> None:
        broken = False
        while (item := self._queue.get()) is not None:
            if broken:
                continue
            wire, batch = item
            try:
                if batch is None:
                    self._writer.write_metadata(wire)
                else:
                    self._writer.write_with_metadata(batch, wire)
            except (fl.FlightError, pa.ArrowException, OSError) as e:
                log.info("the stream to rank %d broke: %s", self.rank, e)
                broken = True


@dataclass(frozen=True)
class _Result:
    """A reduced chunk: its frame and digest, the inputs' digests, and its Reduced sealed for the job."""

    chunk: int
    frame: pa.RecordBatch
    digest: str
    inputs: tuple[str, ...]
    proofs: tuple[str, ...]
    wire: pa.Buffer


class _Round:
    """One segment of one round at this miner: each rank's chunks as they come, the reduced chunks, and who
    gets them. Guarded by the relay's lock."""

    def __init__(self, job: _Job, seq: int, segment: int, kind: RoundKind, op, src, tensor, now: float):
        self.job, self.seq, self.segment = job, seq, segment
        self.kind, self.op, self.src = kind, op, src
        self.tensor: TensorSpec | None = None
        self.plan: Segment | None = None
        self.opened = now
        self.deadline = now + job.spec.timeout_s
        self.contribution_deadline = now + job.spec.contribution_timeout_s
        # chunk -> rank -> (bytes, wire, digest, sealed sketch)
        self.inputs: dict[int, dict[int, tuple[pa.Buffer, bytes, str, str]]] = {}
        self.results: list[_Result] = []
        self.receivers: dict[int, int] = {}  # rank -> results it was sent
        self.heard: dict[int, float] = {}  # rank -> when it last sent anything for this round
        self.receipted = False  # a broadcast's source was sent its receipts
        self.verdicts: dict[int, Verdict] = {}  # rank -> its verdict, in checked jobs
        self.settled = False  # every peer was sent the verdicts
        self.reserved = False  # its inputs were found room for (relay.memory_mib)
        self.bytes_in = 0
        self.bytes_out = 0  # bytes of the reduced chunks (once, not per receiver)
        if tensor is not None:
            self.set_tensor(tensor)

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.job.spec.job_id, self.seq, self.segment)

    @property
    def contributors(self) -> list[int]:
        return [self.src] if self.kind is RoundKind.BROADCAST else list(range(1, self.job.spec.peer_count + 1))

    @property
    def audience(self) -> list[int]:
        """The ranks the reduced chunks go to."""
        return [r for r in range(1, self.job.spec.peer_count + 1) if self.kind is RoundKind.ALL_REDUCE or r != self.src]

    @property
    def reduced(self) -> bool:
        """Every chunk of the segment is reduced."""
        return self.plan is not None and len(self.results) == len(self.plan.chunks)

    @property
    def complete(self) -> bool:
        """Every chunk is reduced and was sent to every rank that gets it."""
        return self.reduced and all(self.receivers.get(r) == len(self.results) for r in self.audience)

    def sent_by(self, rank: int) -> int:
        """How many of its chunks `rank` sent."""
        return sum(rank in inputs for inputs in self.inputs.values())

    def describe(self) -> str:
        return f"{self.kind.value} #{self.seq} of job {self.job.spec.name!r}, segment {self.segment}"

    def set_tensor(self, tensor: TensorSpec) -> None:
        self.tensor = tensor
        self.plan = plan_round(self.job.spec, tensor)[self.segment]

    @property
    def planned_bytes(self) -> int:
        """What its inputs take here once every contributor's chunks are in (0 while its tensor is unknown)."""
        if self.plan is None:
            return 0
        return self.plan.numel * self.tensor.dtype_info.itemsize * len(self.contributors)

    def agree(self, rank: int, kind: RoundKind, op, src, tensor: TensorSpec | None) -> None:
        """Refuse a message that disagrees with what the round's first message said about it."""
        if (kind, op, src) != (self.kind, self.op, self.src):
            raise RoundMismatchError(
                f"{self.describe()}: rank {rank} asks for {_what(kind, op, src)}, others for "
                f"{_what(self.kind, self.op, self.src)}"
            )
        if tensor is not None and self.tensor is not None and tensor != self.tensor:
            raise RoundMismatchError(
                f"{self.describe()}: rank {rank} passed {tensor.describe()}, another rank {self.tensor.describe()}"
            )


class _Retained:
    """Finished rounds kept for checks: by key, oldest first, within a byte budget and a time window."""

    def __init__(self, settings: RelaySettings):
        self._settings = settings
        self._rounds: OrderedDict[tuple, tuple[float, int, _Round]] = OrderedDict()
        self._bytes = 0

    def add(self, state: _Round, now: float) -> None:
        size = state.bytes_in + state.bytes_out
        self._rounds[state.key] = (now, size, state)
        self._bytes += size
        self._expire(now)

    def get(self, key: tuple, now: float) -> _Round | None:
        self._expire(now)
        entry = self._rounds.get(key)
        return entry and entry[2]

    def _expire(self, now: float) -> None:
        budget = self._settings.retention_mib * MIB
        while self._rounds:
            at, size, _ = next(iter(self._rounds.values()))
            if now - at <= self._settings.retention_s and self._bytes <= budget:
                return
            self._rounds.popitem(last=False)
            self._bytes -= size


class Relay(Endpoint):
    """The endpoint of miner `name`, speaking for `identity`'s hotkey on `listen` (host:port).

    `on_round(bytes_in, bytes_out, seconds)` is told of every segment reduced, `on_refusal(error)` of every call
    refused (for metrics).
    """

    def __init__(
        self,
        listen: str,
        identity: Identity,
        metagraph: MetagraphCache,
        name: str,
        config: WireConfig,
        settings: RelaySettings,
        on_round: Callable[[int, int, float], None] = lambda *_: None,
        on_refusal: Callable[[str], None] = lambda error: None,
    ):
        super().__init__(listen, identity.keypair, metagraph, RULES, config, on_refusal)
        self.name = name
        self._keypair = identity.keypair
        self._verifier = Verifier(self.hotkey, metagraph)
        self._settings = settings
        self._on_round = on_round
        self._lock = threading.Condition()
        self._jobs: dict[str, _Job] = {}
        self._rounds: dict[tuple[str, int, int], _Round] = {}
        self._retained = _Retained(settings)
        # failed rounds: when they failed, their sealed RoundFailed, and the ranks it was sent to
        self._ended: OrderedDict[tuple[str, int, int], tuple[float, pa.Buffer, set[int]]] = OrderedDict()
        self._accumulators: list[torch.Tensor] = []
        self._reducers = ThreadPoolExecutor(REDUCE_THREADS, thread_name_prefix="reduce")
        self._counters = {"rounds_done": 0, "rounds_failed": 0, "bytes_in": 0}
        self._stopped = threading.Event()
        self.locations: list[str] = []  # host:port of every reducer of this miner, once they all listen
        threading.Thread(target=self._watch, name="relay-deadlines", daemon=True).start()

    def status(self) -> dict:
        with self._lock:
            return {"jobs": len(self._jobs), "open_rounds": len(self._rounds), **self._counters}

    def shutdown(self) -> None:
        self._stopped.set()
        super().shutdown()

    # ---- admit ----------------------------------------------------------------------------------

    def actions(self):
        return {"admit": self._admit, "reducers": self._list_reducers}

    def streams(self):
        return {"exchange": self._job_stream, "ticket": self._ticket}

    def _admit(self, caller, payload: bytes) -> bytes:
        admission = parse(JobAdmission, payload)
        spec = admission.spec
        index = next((i for i, m in enumerate(spec.miners) if m.hotkey == self.hotkey), None)
        if index is None:
            raise JobError(f"job {spec.name!r} ({spec.job_id}) does not include miner {self.name!r}")
        self.metagraph.vouched(admission.peer)  # the peer may have registered a moment ago
        with self._lock:
            job = self._jobs.setdefault(spec.job_id, _Job(spec, index, caller.hotkey))
            if job.spec != spec or job.validator != caller.hotkey:
                raise JobError(f"job {spec.job_id} was admitted here by another validator or with another spec")
            if admission.rank in job.streams and job.peers.get(admission.rank) != admission.peer:
                raise JobError(f"rank {admission.rank} of job {spec.name!r} is streaming here already")
            job.peers[admission.rank] = admission.peer
            job.left.discard(admission.rank)
            job.active_at = time.monotonic()
        return b"{}"

    def _list_reducers(self, caller, payload: bytes) -> bytes:
        """Where this miner's reducers listen (Flight locations, a JSON list): validators place each job at one,
        and its peers stream there."""
        if not self.locations:
            raise JobError(f"miner {self.name!r} is still starting its reducers; ask again")
        return json.dumps([location(address, self.config.tls) for address in self.locations]).encode()

    # ---- job streams ----------------------------------------------------------------------------

    def _job_stream(self, caller, payload: bytes, reader, writer) -> None:
        with self.answering():
            opened = parse(StreamOpen, payload)
            job = self._open_stream(opened, caller.hotkey)
        writer.begin(CHUNK_SCHEMA)
        stream = _Stream(opened.rank, caller.hotkey, writer)
        with self._lock:
            job.streams[opened.rank] = stream
        who = f"rank {opened.rank} of job {job.spec.name!r}"
        cause = None
        try:
            with self.answering():
                try:
                    self._read_stream(job, stream, reader, who)
                except MapReduceError as e:
                    cause = e
                    raise
        finally:
            self._close_stream(job, stream, cause)

    def _open_stream(self, opened: StreamOpen, hotkey: str) -> _Job:
        with self._lock:
            job = self._jobs.get(opened.job_id)
            if job is None:
                raise JobError(
                    f"miner {self.name!r} knows no job {opened.job_id}: it is unknown or finished; "
                    "call init_process_group() again"
                )
            if job.peers.get(opened.rank) != hotkey:
                raise JobError(f"hotkey {hotkey} was not admitted as rank {opened.rank} of job {job.spec.name!r}")
            if opened.rank in job.streams:
                raise JobError(f"rank {opened.rank} of job {job.spec.name!r} already streams to {self.name!r}")
            job.active_at = time.monotonic()
            return job

    def _read_stream(self, job: _Job, stream: _Stream, reader, who: str) -> None:
        with _ipc_refused(who):
            check_schema(reader.schema, who)
        while not self._stopped.is_set():
            try:
                with _ipc_refused(who):
                    message = reader.read_chunk()
            except StopIteration:
                return
            metadata = message.app_metadata
            if metadata is None or metadata.size > self.config.max_metadata_bytes:
                raise JobError(f"{who} sent a frame without its signed message, or one over the size limit")
            wire = metadata.to_pybytes()
            body, _ = open_body(self._verifier, wire, (Chunk, Await, Verdict), sender=stream.hotkey)
            if isinstance(body, Chunk):
                self._take_chunk(job, stream, body, wire, message.data, who)
            elif isinstance(body, Await):
                self._take_await(job, stream, body)
            else:
                self._take_verdict(job, stream, body)

    def _close_stream(self, job: _Job, stream: _Stream, cause: MapReduceError | None) -> None:
        """The peer closed its stream, lost it, or had it refused for `cause`: it left the job; rounds still
        waiting for it fail, naming it."""
        with self._lock:
            if job.streams.get(stream.rank) is stream:
                del job.streams[stream.rank]
            job.left.add(stream.rank)
            failed = [
                r for r in self._rounds.values() if r.job is job and stream.rank in r.contributors and not r.complete
            ]
            for state in failed:
                if state.plan is None or state.sent_by(stream.rank) < len(state.plan.chunks):
                    lost = f"left the job or lost its stream to miner {self.name!r}"
                    why = f"was cut off by miner {self.name!r}: {cause}" if cause else lost
                    self._fail(
                        state,
                        PeerLostError(
                            f"{state.describe()}: rank {stream.rank} {why} before sending its chunks. Every peer "
                            "calls every collective; start the job again: destroy_process_group(), then "
                            "init_process_group()"
                        ),
                    )
            if job.left >= job.peers.keys() and not job.streams:
                self._jobs.pop(job.spec.job_id, None)
            self._lock.notify_all()
        stream.close()

    def _take_chunk(self, job: _Job, stream: _Stream, chunk: Chunk, wire: bytes, batch, who: str) -> None:
        self._check_place(job, chunk.job_id, chunk.rank, chunk.segment, stream)
        if chunk.tensor.nbytes > job.spec.max_bytes:  # before planning its chunks
            raise JobError(
                f"{who} signed a tensor of {chunk.tensor.nbytes} bytes, over the job's max_bytes {job.spec.max_bytes}"
            )
        with self._lock:
            state = self._round(job, stream, chunk.seq, chunk.segment, chunk.kind, chunk.op, chunk.src, chunk.tensor)
            if state is None:
                return  # a round that already ended here
            state.heard[chunk.rank] = time.monotonic()
            try:
                state.agree(chunk.rank, chunk.kind, chunk.op, chunk.src, chunk.tensor)
                if chunk.kind is RoundKind.BROADCAST and chunk.rank != chunk.src:
                    raise RoundMismatchError(
                        f"{state.describe()}: rank {chunk.rank} sends chunks of a broadcast from rank {chunk.src}"
                    )
                if chunk.kind is RoundKind.BROADCAST and state.tensor is None:
                    state.set_tensor(chunk.tensor)
                    self._send_results(state)
                if not state.reserved:
                    self._reserve(state)
            except MapReduceError as e:
                self._fail(state, e)
                return
            if not state.plan.chunks:  # a broadcast's empty segment: its source's header is all there is
                self._send_results(state)
                return
            if not 0 <= chunk.chunk < len(state.plan.chunks) or chunk.rank in state.inputs.get(chunk.chunk, {}):
                self._fail(
                    state,
                    RoundMismatchError(
                        f"{state.describe()}: rank {chunk.rank} sent chunk {chunk.chunk} twice or out of the plan"
                    ),
                )
                return
            a, b = state.plan.chunks[chunk.chunk]
            nbytes = (b - a) * state.tensor.dtype_info.itemsize
        data = unframe(batch, nbytes, who)  # outside the lock: full validation and hashing take a while
        if digest(data) != chunk.digest:
            with self._lock:
                self._fail(
                    state,
                    RoundMismatchError(
                        f"{state.describe()}: rank {chunk.rank} sent bytes that do not match the digest it signed"
                    ),
                )
            return
        with self._lock:
            if state.key not in self._rounds:
                return
            inputs = state.inputs.setdefault(chunk.chunk, {})
            inputs[chunk.rank] = (data, wire, chunk.digest, chunk.proof)
            state.bytes_in += nbytes
            stream.pending += nbytes
            self._counters["bytes_in"] += nbytes
            if len(inputs) == len(state.contributors):
                self._reducers.submit(self._reduce, state, chunk.chunk)
            self._wait_for_window(stream, state)

    def _take_await(self, job: _Job, stream: _Stream, wanted: Await) -> None:
        self._check_place(job, wanted.job_id, wanted.rank, wanted.segment, stream)
        with self._lock:
            state = self._round(job, stream, wanted.seq, wanted.segment, RoundKind.BROADCAST, None, wanted.src, None)
            if state is None:
                return
            state.heard[wanted.rank] = time.monotonic()
            try:
                state.agree(wanted.rank, RoundKind.BROADCAST, None, wanted.src, None)
                if wanted.rank == wanted.src:
                    raise RoundMismatchError(f"{state.describe()}: rank {wanted.rank} is the source and awaits itself")
            except MapReduceError as e:
                self._fail(state, e)
                return
            state.receivers.setdefault(wanted.rank, 0)
            self._send_results(state)

    def _take_verdict(self, job: _Job, stream: _Stream, verdict: Verdict) -> None:
        """A peer's verdict on a segment it received: relayed to every peer once one refuses or all are in."""
        self._check_place(job, verdict.job_id, verdict.rank, verdict.segment, stream)
        key = (job.spec.job_id, verdict.seq, verdict.segment)
        with self._lock:
            state = self._rounds.get(key) or self._retained.get(key, time.monotonic())
            if state is None or state.settled:
                return  # a round that failed, was forgotten, or was settled by a refusal
            if verdict.rank not in state.audience:
                raise JobError(f"{state.describe()}: rank {verdict.rank} receives nothing of it and has no verdict")
            if not set(verdict.struck) <= set(range(len(job.spec.miners))):
                raise JobError(f"{state.describe()}: rank {verdict.rank} names miners the job does not have")
            state.verdicts.setdefault(verdict.rank, verdict)
            if verdict.tag and len(state.verdicts) < len(state.audience):
                return
            state.settled = True
            given = [state.verdicts.get(r) for r in state.audience]
            tags = tuple(v.tag if v else "" for v in given)
            settled = Settled(
                job.spec.job_id, state.seq, state.segment, tags, tuple(v.struck if v else () for v in given)
            )
            sealed = self._seal(settled, job.spec.job_id)
            for rank in range(1, job.spec.peer_count + 1):
                peer = job.streams.get(rank)
                if peer is not None:
                    peer.put(sealed)

    def _check_place(self, job: _Job, job_id: str, rank: int, segment: int, stream: _Stream) -> None:
        if job_id != job.spec.job_id or rank != stream.rank:
            raise JobError(f"rank {stream.rank} of job {job.spec.name!r} signed a message for another job or rank")
        if not 0 <= segment < len(job.spec.miners):
            raise JobError(f"job {job.spec.name!r} has no segment #{segment}")

    def _round(self, job: _Job, stream: _Stream, seq: int, segment: int, kind, op, src, tensor) -> _Round | None:
        """The round a message on `stream` belongs to, opened by its first message (lock held); None once it
        ended (a peer that comes to a failed round late is sent its RoundFailed)."""
        key = (job.spec.job_id, seq, segment)
        state = self._rounds.get(key)
        if state is None:
            if key in self._ended:
                _, failed, told = self._ended[key]
                if stream.rank not in told:
                    told.add(stream.rank)
                    stream.put(failed)
                return None
            if self._retained.get(key, time.monotonic()) is not None:
                return None
            open_seqs = {k[1] for k in self._rounds if k[0] == job.spec.job_id}
            if seq not in open_seqs and len(open_seqs) >= self._settings.rounds_per_job:
                raise JobError(
                    f"job {job.spec.name!r} already has rounds {sorted(open_seqs)} open at miner {self.name!r} "
                    f"(relay.rounds_per_job {self._settings.rounds_per_job}); a peer runs one round at a time"
                )
            if kind is RoundKind.ALL_REDUCE and (op is None or src is not None):
                raise JobError(f"an all_reduce of job {job.spec.name!r} needs an op and no source")
            if kind is RoundKind.BROADCAST and (op is not None or src is None or not 1 <= src <= job.spec.peer_count):
                raise JobError(f"a broadcast of job {job.spec.name!r} needs a source rank and no op")
            state = self._rounds[key] = _Round(job, seq, segment, kind, op, src, tensor, time.monotonic())
            job.active_at = time.monotonic()
        return state

    def _reserve(self, state: _Round) -> None:
        """Find room for a round's inputs before any is read (lock held): refuse a round the open ones leave no
        room for within relay.memory_mib."""
        taken = sum(r.planned_bytes for r in self._rounds.values() if r.reserved)
        budget = int(self._settings.memory_mib * MIB)
        if taken + state.planned_bytes > budget:
            raise LimitExceededError(
                f"{state.describe()}: miner {self.name!r} has no room for its {state.planned_bytes} bytes; open "
                f"rounds take {taken} of relay.memory_mib ({budget} bytes)"
            )
        state.reserved = True

    def _wait_for_window(self, stream: _Stream, state: _Round) -> None:
        """Read no further from this stream while its unreduced bytes are over the window (lock held)."""
        while stream.pending > self.config.window_bytes and state.key in self._rounds:
            if (
                not self._lock.wait(timeout=max(state.deadline - time.monotonic(), 0))
                and time.monotonic() > state.deadline
            ):
                return

    # ---- reducing -------------------------------------------------------------------------------

    def _reduce(self, state: _Round, index: int) -> None:
        """Reduce chunk `index` of a round whose inputs are all in, and send it down to every receiver (on a
        thread of the reducer pool)."""
        try:
            self._reduce_chunk(state, index)
        except Exception as e:  # every failure must reach the peers
            log.exception("%s: reducing chunk %d", state.describe(), index)
            with self._lock:
                self._fail(state, MapReduceError(f"{state.describe()}: miner {self.name!r} failed: {e!r}"))

    def _reduce_chunk(self, state: _Round, index: int) -> None:
        dtype = state.tensor.dtype_info
        with self._lock:
            inputs = state.inputs[index]
        ranks = state.contributors
        views = [from_buffer(inputs[rank][0], dtype) for rank in ranks]
        try:
            if state.job.spec.reject_nonfinite:
                _refuse_nonfinite(state, ranks, views, state.plan.chunks[index][0])
            if state.kind is RoundKind.BROADCAST:
                result = frame_buffer(inputs[state.src][0])
            else:
                out = torch.empty(len(views[0]), dtype=dtype.torch_dtype)
                accumulator = self._take_accumulator()
                try:
                    reduce_chunk(views, state.op, out, accumulator)
                finally:
                    with self._lock:
                        self._accumulators.append(accumulator)
                result = frame(self.falsify(state, index, out))
        except MapReduceError as e:
            with self._lock:
                self._fail(state, e)
            return
        self.delay(state, index)
        is_copy = state.kind is RoundKind.BROADCAST
        result_digest = inputs[state.src][2] if is_copy else ""
        inputs_digests = tuple(inputs[r][2] for r in ranks)
        proofs = self.relay_proofs(state, tuple(inputs[r][3] for r in ranks))
        sealed = self.result(state, index, result, inputs_digests, proofs, result_digest)
        with self._lock:
            if state.key not in self._rounds:
                return
            state.results.append(sealed)
            state.bytes_out += result.num_rows
            for rank in ranks:
                stream = state.job.streams.get(rank)
                if stream is not None:
                    stream.pending -= len(inputs[rank][0])
            if state.kind is RoundKind.ALL_REDUCE:
                for rank in ranks:
                    state.receivers.setdefault(rank, 0)
            self._send_results(state)
            self._lock.notify_all()

    def result(
        self, state: _Round, index: int, batch: pa.RecordBatch, inputs: tuple[str, ...], proofs, known: str = ""
    ) -> _Result:
        """Reduced chunk `index` as sent: its frame beside its Reduced, sealed for the job (`known`: the frame's
        digest, when known already)."""
        spec = state.job.spec
        result_digest = known or digest(batch.column(0).buffers()[1])
        reduced = Reduced(spec.job_id, state.seq, state.segment, index, state.tensor, result_digest, inputs, proofs)
        return _Result(index, batch, result_digest, inputs, proofs, self._seal(reduced, spec.job_id))

    def deliver(self, state: _Round, rank: int, result: _Result) -> _Result:
        """The reduced chunk to send `rank` (the misbehaving miners of actors.behaviours override this)."""
        return result

    def falsify(self, state: _Round, index: int, out: torch.Tensor) -> torch.Tensor:
        """The reduced chunk to send (the misbehaving miners of actors.behaviours override this)."""
        return out

    def delay(self, state: _Round, index: int) -> None:
        """Wait before sending a reduced chunk (the misbehaving miners of actors.behaviours override this)."""

    def relay_proofs(self, state: _Round, proofs: tuple[str, ...]) -> tuple[str, ...]:
        """The peers' sealed sketches to send beside a reduced chunk, in rank order (the misbehaving miners of
        actors.behaviours override this)."""
        return proofs

    def _take_accumulator(self) -> torch.Tensor:
        """A float32 block for half-type sums, this thread's until handed back."""
        with self._lock:
            return self._accumulators.pop() if self._accumulators else block_accumulator()

    def _send_results(self, state: _Round) -> None:
        """Send every receiver the reduced chunks it has not had yet, and a broadcast's source its receipts;
        retire the round once everyone has everything (lock held)."""
        for rank, sent in list(state.receivers.items()):
            stream = state.job.streams.get(rank)
            for result in state.results[sent:] if stream is not None else ():
                sent_result = self.deliver(state, rank, result)
                stream.put(sent_result.wire, sent_result.frame)
            state.receivers[rank] = len(state.results)
        if state.kind is RoundKind.BROADCAST and state.reduced and not state.receipted:
            source = state.job.streams.get(state.src)
            for result in state.results if source is not None else ():
                source.put(result.wire)
            state.receipted = True
        if state.complete:
            self._retire(state)

    def _seal(self, body, job_id: str) -> pa.Buffer:
        """`body` sealed once for every peer of the job."""
        return pa.py_buffer(seal_body(self._keypair, body, audience(job_id), self.netuid))

    def _retire(self, state: _Round) -> None:
        now = time.monotonic()
        self._rounds.pop(state.key, None)
        self._retained.add(state, now)
        self._counters["rounds_done"] += 1
        out = state.bytes_out * len(state.audience)
        self._on_round(state.bytes_in, out, now - state.opened)

    def _fail(self, state: _Round, error: MapReduceError) -> None:
        """End a round for every peer in it with `error` (lock held)."""
        if self._rounds.pop(state.key, None) is None:
            return
        self._counters["rounds_failed"] += 1
        log.info("%s failed: %s", state.describe(), error)
        body = RoundFailed(state.job.spec.job_id, state.seq, state.segment, type(error).__name__, str(error))
        failed = self._seal(body, state.job.spec.job_id)
        told = state.heard.keys() | state.receivers.keys()
        self._ended[state.key] = (time.monotonic(), failed, told)
        for rank in told:
            stream = state.job.streams.get(rank)
            if stream is not None:
                stream.put(failed)
                stream.pending -= sum(len(inputs[rank][0]) for inputs in state.inputs.values() if rank in inputs)
        self._lock.notify_all()

    def _watch(self) -> None:
        """Fail rounds past their deadlines, and forget idle jobs."""
        while not self._stopped.wait(WATCH_S):
            now = time.monotonic()
            with self._lock:
                for state in list(self._rounds.values()):
                    self._check_progress(state, now)
                while self._ended and now - next(iter(self._ended.values()))[0] > self._settings.retention_s:
                    self._ended.popitem(last=False)
                idle = [
                    j for j in self._jobs.values() if not j.streams and now - j.active_at > self._settings.job_idle_s
                ]
                for job in idle:
                    del self._jobs[job.spec.job_id]

    def _check_progress(self, state: _Round, now: float) -> None:
        """Fail a round whose contributors stay silent, or stop sending while others sent more (each for the
        job's contribution_timeout_s), or that is past its deadline; retire one whose receivers stopped asking
        (lock held)."""
        spec = state.job.spec
        wait = spec.contribution_timeout_s
        missing = [r for r in state.contributors if r not in state.heard]
        sent = {r: state.sent_by(r) for r in state.contributors}
        behind = [r for r, n in sent.items() if n < max(sent.values())] if state.plan is not None else []
        stalled = [r for r in behind if now - state.heard.get(r, state.opened) > wait]
        if missing and now > state.contribution_deadline:
            self._fail(
                state,
                self._peer_lost(
                    state, missing, f"sent nothing to miner {self.name!r} within {wait:g} s: they left or died"
                ),
            )
        elif stalled or (behind and now > state.deadline):
            counts = ", ".join(f"rank {r} {sent[r]}" for r in stalled or behind)
            why = f"stopped sending their chunks to miner {self.name!r} (sent of {len(state.plan.chunks)}: {counts})"
            self._fail(state, self._peer_lost(state, stalled or behind, why))
        elif now > state.deadline and state.reduced:
            self._retire(state)  # a broadcast receiver never asked for its segment
        elif now > state.deadline:
            self._fail(
                state, RoundTimeoutError(f"{state.describe()}: miner {self.name!r} missed its {spec.timeout_s:g} s")
            )

    def _peer_lost(self, state: _Round, ranks: list[int], why: str) -> PeerLostError:
        return PeerLostError(
            f"{state.describe()}: rank(s) {ranks} {why}. Every peer calls every collective; start the job again: "
            "destroy_process_group(), then init_process_group()"
        )

    # ---- tickets --------------------------------------------------------------------------------

    def _ticket(self, caller, payload: bytes, reader, writer) -> None:
        with self.answering():
            wanted = parse(Ticket, payload)
            with self._lock:
                state = self._retained.get((wanted.job_id, wanted.seq, wanted.segment), time.monotonic())
                if state is None or not 0 <= wanted.chunk < len(state.plan.chunks):
                    raise JobError(
                        f"miner {self.name!r} holds no chunk {wanted.chunk} of segment {wanted.segment} of round "
                        f"{wanted.seq} of job {wanted.job_id} (it keeps rounds for {self._settings.retention_s:g} s)"
                    )
                inputs = state.inputs[wanted.chunk]
                result = next(r for r in state.results if r.chunk == wanted.chunk)
        items = [(frame_buffer(inputs[rank][0]), pa.py_buffer(inputs[rank][1])) for rank in state.contributors]
        reduced = Reduced(
            wanted.job_id,
            wanted.seq,
            wanted.segment,
            result.chunk,
            state.tensor,
            result.digest,
            result.inputs,
            result.proofs,
        )
        items.append((result.frame, pa.py_buffer(seal_body(self._keypair, reduced, caller.hotkey, self.netuid))))
        writer.begin(CHUNK_SCHEMA)
        for batch, wire in items:
            writer.write_with_metadata(batch, wire)


@contextmanager
def _ipc_refused(who: str) -> Iterator[None]:
    """An IPC message Arrow cannot parse is refused as a frame, naming its sender."""
    try:
        yield
    except fl.FlightError:
        raise  # the call itself broke or was cancelled
    except (pa.ArrowException, OSError) as e:  # pyarrow's IOError is OSError
        raise FrameRejectedError(f"{who} sent a malformed IPC message: {' '.join(str(e).split())[:300]}") from None


def _refuse_nonfinite(state: _Round, ranks: list[int], views: list[torch.Tensor], offset: int) -> None:
    """NonFiniteError naming the first rank (and element) with a NaN or Inf."""
    if state.tensor.dtype_info.is_integer:
        return
    for rank, x in zip(ranks, views, strict=True):
        bad = torch.isfinite(x).logical_not().nonzero()
        if len(bad):
            raise NonFiniteError(
                f"{state.describe()}: rank {rank} handed in NaN or Inf (element {offset + int(bad[0])} of its flat "
                "tensor); this job refuses them: fix the tensor, or join with reject_nonfinite=False"
            )


def _what(kind: RoundKind, op: ReduceOp | None, src: int | None) -> str:
    return f"{kind.value} op={op and op.value} src={src}"
