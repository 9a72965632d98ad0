"""MinerActor: reduces its segment of every round in Ray's object store.

Each peer calls `reduce` once per round and segment with its chunks of that
segment (shipped inline when small, as object refs otherwise) and reads back a
stream of batches of reduced chunks, shipped the same way. A miner reduces its own
segment, and any other that peers hand it when that segment's miner failed or when
the job wants each segment reduced by several miners. A driver thread per round keeps
PREFETCH_CHUNKS chunks of every peer in flight, reduces chunk c as soon as every
peer's chunk c is local, in rank order, into a pooled buffer, puts the result
once and lets go of the pieces it used. The miner's node thus holds a few chunks
per peer at a time, not whole contributions. For a broadcast it re-puts the
source's chunks as its own objects, so the source uploads each byte once.

A round's objects stay alive until every peer has released it: a peer releases its
earlier rounds of a job by starting a later one here, and all of them by leaving
the job (`release_job`). At the round's deadline the miner lets go regardless.
A peer that sends nothing within the job's contribution timeout, or whose chunks
are lost with its process, fails the round for every peer with an error naming it.

Every message is signed: the validator admits each peer to a job (`admit`), peers
sign their contributions, and the miner signs a receipt for each contribution and
every batch of results (chunk fingerprints), addressed to the peer reading it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from concurrent.futures import TimeoutError as FetchTimeout
from dataclasses import dataclass, field

import ray
import torch
from blake3 import blake3
from ray.exceptions import ObjectLostError

from actors.node import node_endpoint
from mapreduce_ray.chain import ChainConfig
from mapreduce_ray.errors import (
    JobError,
    MapReduceError,
    NonFiniteError,
    PeerLostError,
    RoundMismatchError,
    RoundTimeoutError,
)
from mapreduce_ray.messages import (
    Contribution,
    ContributionReceipt,
    JobAdmission,
    JobLeave,
    SegmentResult,
    open_body,
    seal_body,
)
from mapreduce_ray.metrics import record_miner_round
from mapreduce_ray.naming import miner_name, validator_name
from mapreduce_ray.plan import Segment, plan_round
from mapreduce_ray.protocol import MetagraphCache, Verifier
from mapreduce_ray.reduce import block_accumulator, reduce_chunk
from mapreduce_ray.shards import from_buffer, to_buffer
from mapreduce_ray.transport import Shipped, fingerprint, prefetch, ship
from mapreduce_ray.types import JobSpec, RoundKind, RoundSpec
from mapreduce_ray.wallets import WalletConfig, load_identity

log = logging.getLogger(__name__)

MAX_CONCURRENCY = 256
PREFETCH_CHUNKS = 2


class _Round:
    """What one miner knows of one segment of one round. Every field is guarded by `cond`."""

    def __init__(self, first: RoundSpec, segment: int, rank: int, lock: threading.Lock):
        is_receiver = first.kind is RoundKind.BROADCAST and rank != first.src
        self.spec = dataclasses.replace(first, tensor=None) if is_receiver else first  # until the source arrives
        self.segment = segment
        self.cond = threading.Condition(lock)
        self.opened = time.monotonic()
        self.deadline = self.opened + first.job.timeout_s  # for the reduce and the result stream
        self.chunks: dict[int, list] = {}
        self.results: list = []  # (shipped, fingerprint, digest or "") per reduced chunk
        self.done = False
        self.error: MapReduceError | None = None
        self.released: set[int] = set()

    @property
    def contributors(self) -> set[int]:
        if self.spec.kind is RoundKind.BROADCAST:
            return {self.spec.src}
        return set(range(1, self.spec.job.peer_count + 1))

    @property
    def ready(self) -> bool:
        return self.error is not None or (self.spec.tensor is not None and self.contributors <= self.chunks.keys())

    def join(self, spec: RoundSpec, rank: int, chunks: list | None) -> None:
        if (spec.kind, spec.op, spec.src) != (self.spec.kind, self.spec.op, self.spec.src):
            self.fail(
                RoundMismatchError(
                    f"{spec.describe()}: rank {rank} asks for {_what(spec)}, others for {_what(self.spec)}"
                )
            )
        elif spec.kind is RoundKind.BROADCAST and rank == spec.src:
            self.spec = spec  # the source's tensor spec is authoritative
        elif spec.kind is RoundKind.ALL_REDUCE and spec.tensor != self.spec.tensor:
            self.fail(
                RoundMismatchError(
                    f"{spec.describe()}: rank {rank} passed {spec.tensor.describe()}, "
                    f"another rank {self.spec.tensor.describe()}"
                )
            )
        if chunks is not None:
            self.chunks[rank] = chunks
        self.cond.notify_all()

    def fail(self, error: MapReduceError) -> None:
        if self.error is None:
            self.error = error
        self.cond.notify_all()

    def wait_until(self, predicate, deadline: float) -> bool:
        """Wait (lock held) until predicate() or the deadline; True if predicate() holds."""
        return self.cond.wait_for(predicate, timeout=max(deadline - time.monotonic(), 0))

    def stream(self):
        """(first chunk, batch of (shipped, fingerprint, digest)) in chunk order; at least one batch."""
        sent = 0
        while True:
            with self.cond:
                self.wait_until(
                    lambda sent=sent: self.error is not None or self.done or len(self.results) > sent,
                    self.deadline,
                )
                self.raise_if_failed()
                batch, first, done = self.results[sent:], sent, self.done
                sent = len(self.results)
            if batch or (done and first == 0):
                yield first, batch
            if done:
                return

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error
        if time.monotonic() > self.deadline:
            raise RoundTimeoutError(f"{self.spec.describe()}: miner gave up waiting for its own driver")


@dataclass
class _Job:
    """A job as the validator admitted its peers here."""

    spec: JobSpec
    index: int  # this miner's place in spec.miners
    validator: str  # the hotkey of the validator that admitted its peers
    validator_actor: object = None  # its actor, once looked up
    peers: dict[int, str] = field(default_factory=dict)  # rank -> hotkey
    left: set[int] = field(default_factory=set)


class MinerActor:
    """A miner hosting segment reducers, signing as the wallet's hotkey.

    Create with `ray.remote(MinerActor).options(name=miner_name(uid), max_concurrency=MAX_CONCURRENCY, ...)`.
    On start it announces its endpoint (node ip : Ray GCS port) on the chain.
    """

    def __init__(self, wallet: WalletConfig, chain: ChainConfig):
        torch.set_num_threads(1)
        self._identity = load_identity(wallet)
        self._chain = chain.open()
        self._netuid = chain.netuid
        self.uid = self._chain.require_uid(self._identity.hotkey, wallet)
        self.name = miner_name(self.uid)
        self._verifier = Verifier(self._identity.hotkey, MetagraphCache(self._chain))
        self._chain.serve(self._identity.keypair, node_endpoint())
        self._lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}
        self._rounds: dict[tuple[str, int], _Round] = {}
        self._buffers: list[tuple[torch.Tensor, torch.Tensor]] = []  # (out bytes, accumulator) free for reuse
        self._rounds_done = 0
        self._bytes_in = 0

    def status(self) -> dict:
        with self._lock:
            return {
                "name": self.name,
                "uid": self.uid,
                "hotkey": self._identity.hotkey,
                "node_id": ray.get_runtime_context().get_node_id(),
                "pid": os.getpid(),
                "jobs": len(self._jobs),
                "open_rounds": len(self._rounds),
                "rounds_done": self._rounds_done,
                "bytes_in": self._bytes_in,
            }

    def admit(self, wire: bytes) -> None:
        """The validator admits a peer to a job (a signed JobAdmission addressed to this miner)."""
        admission, envelope = open_body(self._verifier, wire, JobAdmission)
        spec = admission.spec
        index = next((i for i, m in enumerate(spec.miners) if m.hotkey == self._identity.hotkey), None)
        if index is None:
            raise JobError(f"job {spec.name!r} ({spec.job_id}) does not include miner {self.name!r}")
        with self._lock:
            job = self._jobs.setdefault(spec.job_id, _Job(spec, index, envelope.sender))
            if job.spec != spec:
                raise JobError(f"job {spec.job_id} was admitted here with another spec")
            job.peers[admission.rank] = admission.peer
            job.left.discard(admission.rank)

    def reduce(self, wire: bytes, chunks: list | None):
        """Contribute `chunks` under a signed Contribution; stream back signed results, the first with a receipt.

        Items: (receipt or None, SegmentResult, batch of shipped chunks), each message signed for the peer.
        """
        contribution, envelope = open_body(self._verifier, wire, Contribution)
        c, peer = contribution, envelope.sender
        with self._lock:
            spec = self._admitted(c, peer)
            if tuple(fingerprint(chunk) for chunk in chunks or ()) != c.chunks:
                raise RoundMismatchError(f"{spec.describe()}: rank {c.rank} shipped other chunks than it signed for")
            self._release(spec.job.job_id, c.rank, before_seq=spec.seq)
            key = (c.job_id, c.seq, c.segment)
            state = self._rounds.get(key)
            if state is None:
                state = self._rounds[key] = _Round(spec, c.segment, c.rank, self._lock)
                threading.Thread(target=self._run, args=(state,), name=f"round-{spec.seq}", daemon=True).start()
            state.join(spec, c.rank, chunks)
        receipt = ContributionReceipt(c.job_id, c.seq, c.kind, c.op, c.src, c.miner, c.rank, c.chunks, c.segment)
        for first, batch in state.stream():
            prints, digests = tuple(f for _, f, _ in batch), tuple(d for _, _, d in batch if d)
            tensor = state.spec.tensor
            result = SegmentResult(c.job_id, c.seq, c.miner, c.rank, first, tensor, prints, c.segment, digests)
            yield (
                self._seal(receipt, peer) if first == 0 else None,
                self._seal(result, peer),
                [shipped for shipped, _, _ in batch],
            )

    def release_job(self, wire: bytes) -> None:
        """A peer left its job (signed JobLeave): release every round of it; forget the job once all left."""
        leave, envelope = open_body(self._verifier, wire, JobLeave)
        with self._lock:
            job = self._jobs.get(leave.job_id)
            if job is None or job.peers.get(leave.rank) != envelope.sender:
                return
            self._release(leave.job_id, leave.rank, before_seq=None)
            job.left.add(leave.rank)
            if job.left >= job.peers.keys():
                del self._jobs[leave.job_id]

    def _admitted(self, contribution: Contribution, sender: str) -> RoundSpec:
        """The round a contribution belongs to, if the validator admitted its sender at that rank."""
        job = self._jobs.get(contribution.job_id)
        if job is None:
            raise JobError(
                f"miner {self.name!r} knows no job {contribution.job_id}: it is unknown or finished; "
                "call init_process_group() again"
            )
        if job.peers.get(contribution.rank) != sender:
            raise JobError(f"hotkey {sender} was not admitted as rank {contribution.rank} of job {job.spec.name!r}")
        if contribution.miner != job.index:
            raise JobError(
                f"contribution for miner #{contribution.miner} of job {job.spec.name!r} sent to {self.name!r}"
            )
        if not 0 <= contribution.segment < len(job.spec.miners):
            raise JobError(f"job {job.spec.name!r} has no segment #{contribution.segment}")
        c = contribution
        return RoundSpec(job.spec, c.seq, c.kind, c.op, c.src, c.tensor)

    def _seal(self, body, receiver: str) -> bytes:
        return seal_body(self._identity.keypair, body, receiver)

    def _release(self, job_id: str, rank: int, before_seq: int | None) -> None:
        for (job, seq, _), state in self._rounds.items():
            if job == job_id and (before_seq is None or seq < before_seq):
                state.released.add(rank)
                state.cond.notify_all()

    def _run(self, state: _Round) -> None:
        try:
            with state.cond:
                job = state.spec.job
                if not state.wait_until(lambda: state.ready, state.opened + job.contribution_timeout_s):
                    missing = sorted(state.contributors - state.chunks.keys())
                    raise PeerLostError(
                        f"{state.spec.describe()}: rank(s) {missing} sent nothing to miner {self.name!r} within "
                        f"{job.contribution_timeout_s:g} s: they left or died. Every peer calls every collective; "
                        "start the job again: destroy_process_group(), then init_process_group()"
                    )
                state.raise_if_failed()
                spec = state.spec
                contributions = {rank: state.chunks.pop(rank) for rank in sorted(state.contributors)}
            segment = plan_round(spec.job, spec.tensor)[state.segment]
            bytes_in, bytes_out = self._reduce_segment(state, spec, segment, contributions)
            del contributions
            with state.cond:
                state.done = True
                state.cond.notify_all()
                results = [shipped for shipped, _, _ in state.results]
            record_miner_round(self._netuid, self.uid, bytes_in, bytes_out, time.monotonic() - state.opened)
            self._hand_over(spec, state.segment, results)
            with state.cond:
                state.wait_until(
                    lambda: len(state.released) >= spec.job.peer_count, time.monotonic() + spec.job.timeout_s
                )
        except MapReduceError as e:
            with state.cond:
                state.fail(e)
        except Exception as e:  # every failure must reach the peers
            log.exception("%s failed", state.spec.describe())
            with state.cond:
                state.fail(MapReduceError(f"{state.spec.describe()}: miner {self.name!r} failed: {e!r}"))
        finally:
            with self._lock:
                self._rounds.pop((state.spec.job.job_id, state.spec.seq, state.segment), None)
                self._rounds_done += 1

    def _reduce_segment(
        self, state: _Round, spec: RoundSpec, segment: Segment, contributions: dict[int, list]
    ) -> tuple[int, int]:
        """Reduce (or, for a broadcast, pass on) the segment chunk by chunk, publishing each result as it is
        done; (contribution bytes in, result bytes out to the peers)."""
        for rank, chunks in contributions.items():
            if len(chunks) != len(segment.chunks):
                raise RoundMismatchError(
                    f"{spec.describe()}: rank {rank} sent {len(chunks)} chunks to miner {self.name!r}, "
                    f"the plan has {len(segment.chunks)}"
                )
        dtype = spec.tensor.dtype_info
        out_bytes, accumulator = self._take_buffers(max((b - a for a, b in segment.chunks), default=0) * dtype.itemsize)
        n = len(segment.chunks)
        in_flight = {c: _prefetch(contributions, c) for c in range(min(PREFETCH_CHUNKS, n))}
        bytes_in = bytes_out = 0
        try:
            for c, (a, b) in enumerate(segment.chunks):
                buffers = {rank: _fetched(spec, rank, f, state.deadline) for rank, f in in_flight.pop(c).items()}
                for chunks in contributions.values():
                    chunks[c] = None  # this miner's hold on the piece ends here
                if c + PREFETCH_CHUNKS < n:
                    in_flight[c + PREFETCH_CHUNKS] = _prefetch(contributions, c + PREFETCH_CHUNKS)
                inputs = {rank: from_buffer(buf, dtype) for rank, buf in buffers.items()}
                if spec.job.reject_nonfinite:
                    _refuse_nonfinite(spec, inputs, a)
                if spec.kind is RoundKind.BROADCAST:
                    out = inputs[spec.src]
                else:
                    out = out_bytes[: (b - a) * dtype.itemsize].view(dtype.torch_dtype)
                    reduce_chunk(list(inputs.values()), spec.op, out, accumulator)
                shipped = self._ship_result(spec, c, out)
                digest = blake3(to_buffer(out)).hexdigest() if spec.job.redundancy > 1 else ""
                result = (shipped, fingerprint(shipped), digest)
                received = sum(buf.size for buf in buffers.values())
                bytes_in += received
                bytes_out += (b - a) * dtype.itemsize * spec.job.peer_count
                with state.cond:
                    self._bytes_in += received
                    state.results.append(result)
                    state.cond.notify_all()
                del buffers, inputs
        except FetchTimeout:  # the builtin TimeoutError only from Python 3.11 on
            raise RoundTimeoutError(
                f"{spec.describe()}: miner {self.name!r} could not fetch the peers' chunks "
                f"within {spec.job.timeout_s:g} s"
            ) from None
        finally:
            with self._lock:
                self._buffers.append((out_bytes, accumulator))
        return bytes_in, bytes_out

    def _hand_over(self, spec: RoundSpec, segment: int, results: list) -> None:
        """Give the validator of the round's job its own references to the results, so they outlive
        this miner's hold on them until the validator has decided whether to check the round."""
        with self._lock:
            job = self._jobs.get(spec.job.job_id)
        if job is None:
            return
        if job.validator_actor is None:
            neuron = self._verifier.metagraph.neuron(job.validator)
            try:
                job.validator_actor = ray.get_actor(validator_name(neuron.uid), namespace=spec.job.namespace)
            except (AttributeError, ValueError):
                return  # the validator is gone; nobody will check this round
        job.validator_actor.hold_results.remote(spec.job.job_id, spec.seq, job.index, segment, results)

    def _ship_result(self, spec: RoundSpec, chunk: int, reduced: torch.Tensor) -> Shipped:
        """Ship chunk `chunk` of this miner's reduced segment (the simulated miners in actors.behaviours
        override this to throttle, drop or falsify it)."""
        return ship(reduced, copy_inline=True)

    def _take_buffers(self, nbytes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A chunk-sized output buffer and a block accumulator, reused across rounds."""
        with self._lock:
            out_bytes, accumulator = (
                self._buffers.pop() if self._buffers else (torch.empty(0, dtype=torch.uint8), block_accumulator())
            )
        if len(out_bytes) < nbytes:
            out_bytes = torch.empty(nbytes, dtype=torch.uint8)
        return out_bytes, accumulator


def _prefetch(contributions: dict[int, list], chunk: int) -> dict:
    return {rank: prefetch(chunks[chunk]) for rank, chunks in contributions.items()}


def _fetched(spec: RoundSpec, rank: int, future, deadline: float):
    """The buffer of a peer's chunk; PeerLostError naming the rank when it was lost with its owner."""
    try:
        return future.result(timeout=max(deadline - time.monotonic(), 0))
    except ObjectLostError:
        raise PeerLostError(
            f"{spec.describe()}: the chunks of rank {rank} were lost with its process before they were reduced; "
            "start the job again: destroy_process_group(), then init_process_group()"
        ) from None


def _refuse_nonfinite(spec: RoundSpec, inputs: dict[int, torch.Tensor], offset: int) -> None:
    """NonFiniteError naming the first rank (and element) with a NaN or Inf."""
    if spec.tensor.dtype_info.is_integer:
        return
    for rank, x in inputs.items():
        bad = torch.isfinite(x).logical_not().nonzero()
        if len(bad):
            raise NonFiniteError(
                f"{spec.describe()}: rank {rank} handed in NaN or Inf (element {offset + int(bad[0])} of its flat "
                "tensor); this job refuses them: fix the tensor, or join with reject_nonfinite=False"
            )


def _what(spec: RoundSpec) -> str:
    return f"{spec.kind.value} op={spec.op and spec.op.value} src={spec.src}"
