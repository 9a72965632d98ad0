"""MinerActor: reduces its segment of every round in Ray's object store.

Each peer calls `reduce` once per round with its chunks of this miner's segment
(shipped inline when small, as object refs otherwise) and reads back a stream of
batches of reduced chunks, shipped the same way. A driver thread per round keeps
PREFETCH_CHUNKS chunks of every peer in flight, reduces chunk c as soon as every
peer's chunk c is local, in rank order, into a pooled buffer, puts the result
once and lets go of the pieces it used. The miner's node thus holds a few chunks
per peer at a time, not whole contributions. For a broadcast it re-puts the
source's chunks as its own objects, so the source uploads each byte once.

A round's objects stay alive until every peer has released it: a peer releases its
earlier rounds of a job by starting a later one here, and all of them by leaving
the job (`release_job`). At the round's deadline the miner lets go regardless.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from concurrent.futures import TimeoutError as FetchTimeout

import ray
import torch

from mapreduce_ray.errors import MapReduceError, RoundMismatchError, RoundTimeoutError
from mapreduce_ray.plan import Segment, plan_round
from mapreduce_ray.reduce import block_accumulator, reduce_chunk
from mapreduce_ray.shards import from_buffer
from mapreduce_ray.transport import prefetch, ship
from mapreduce_ray.types import RoundKind, RoundSpec

log = logging.getLogger(__name__)

MAX_CONCURRENCY = 256
PREFETCH_CHUNKS = 2


class _Round:
    """What one miner knows of one round. Every field is guarded by `cond`."""

    def __init__(self, first: RoundSpec, miner: int, rank: int, lock: threading.Lock):
        is_receiver = first.kind is RoundKind.BROADCAST and rank != first.src
        self.spec = dataclasses.replace(first, tensor=None) if is_receiver else first  # until the source arrives
        self.miner = miner
        self.cond = threading.Condition(lock)
        self.deadline = time.monotonic() + first.job.timeout_s
        self.chunks: dict[int, list] = {}
        self.results: list = []
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
        """Batches of reduced chunks in chunk order; a broadcast starts with [tensor spec]."""
        grace = self.spec.job.timeout_s
        if self.spec.kind is RoundKind.BROADCAST:
            with self.cond:
                self.wait_until(lambda: self.error is not None or self.spec.tensor is not None, self.deadline + grace)
                self.raise_if_failed()
                spec = self.spec.tensor
            yield [spec]
        sent = 0
        while True:
            with self.cond:
                self.wait_until(
                    lambda sent=sent: self.error is not None or self.done or len(self.results) > sent,
                    self.deadline + grace,
                )
                self.raise_if_failed()
                batch, sent, done = self.results[sent:], len(self.results), self.done
            if batch:
                yield batch
            elif done:
                return

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error
        if time.monotonic() > self.deadline + self.spec.job.timeout_s:
            raise RoundTimeoutError(f"{self.spec.describe()}: miner gave up waiting for its own driver")


class MinerActor:
    """A miner hosting segment reducers.

    Create with `ray.remote(MinerActor).options(max_concurrency=MAX_CONCURRENCY, ...)`.
    """

    def __init__(self, name: str):
        torch.set_num_threads(1)
        self.name = name
        self._lock = threading.Lock()
        self._rounds: dict[tuple[str, int], _Round] = {}
        self._buffers: list[tuple[torch.Tensor, torch.Tensor]] = []  # (out bytes, accumulator) free for reuse
        self._rounds_done = 0
        self._bytes_in = 0

    def status(self) -> dict:
        with self._lock:
            return {
                "name": self.name,
                "node_id": ray.get_runtime_context().get_node_id(),
                "pid": os.getpid(),
                "open_rounds": len(self._rounds),
                "rounds_done": self._rounds_done,
                "bytes_in": self._bytes_in,
            }

    def reduce(self, spec: RoundSpec, miner: int, rank: int, chunks: list | None):
        """Contribute `chunks` (this peer's shipped chunks of our segment, or None); stream results back."""
        with self._lock:
            self._release(spec.job.job_id, rank, before_seq=spec.seq)
            state = self._rounds.get(spec.key)
            if state is None:
                state = self._rounds[spec.key] = _Round(spec, miner, rank, self._lock)
                threading.Thread(target=self._run, args=(state,), name=f"round-{spec.seq}", daemon=True).start()
            state.join(spec, rank, chunks)
        yield from state.stream()

    def release_job(self, job_id: str, rank: int) -> None:
        """`rank` left the job: release every round of it."""
        with self._lock:
            self._release(job_id, rank, before_seq=None)

    def _release(self, job_id: str, rank: int, before_seq: int | None) -> None:
        for (job, seq), state in self._rounds.items():
            if job == job_id and (before_seq is None or seq < before_seq):
                state.released.add(rank)
                state.cond.notify_all()

    def _run(self, state: _Round) -> None:
        try:
            with state.cond:
                if not state.wait_until(lambda: state.ready, state.deadline):
                    missing = sorted(state.contributors - state.chunks.keys())
                    raise RoundTimeoutError(
                        f"{state.spec.describe()}: rank(s) {missing} sent nothing to miner {self.name!r} "
                        f"within {state.spec.job.timeout_s:g} s"
                    )
                state.raise_if_failed()
                spec = state.spec
                contributions = [state.chunks.pop(rank) for rank in sorted(state.contributors)]
            self._reduce_segment(state, spec, plan_round(spec.job, spec.tensor)[state.miner], contributions)
            del contributions
            with state.cond:
                state.done = True
                state.cond.notify_all()
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
                self._rounds.pop(state.spec.key, None)
                self._rounds_done += 1

    def _reduce_segment(self, state: _Round, spec: RoundSpec, segment: Segment, contributions: list[list]) -> None:
        for rank, chunks in zip(sorted(state.contributors), contributions, strict=True):
            if len(chunks) != len(segment.chunks):
                raise RoundMismatchError(
                    f"{spec.describe()}: rank {rank} sent {len(chunks)} chunks to miner {self.name!r}, "
                    f"the plan has {len(segment.chunks)}"
                )
        dtype = spec.tensor.dtype_info
        out_bytes, accumulator = self._take_buffers(max((b - a for a, b in segment.chunks), default=0) * dtype.itemsize)
        n = len(segment.chunks)
        in_flight = {c: [prefetch(chunks[c]) for chunks in contributions] for c in range(min(PREFETCH_CHUNKS, n))}
        try:
            for c, (a, b) in enumerate(segment.chunks):
                buffers = [f.result(timeout=max(state.deadline - time.monotonic(), 0)) for f in in_flight.pop(c)]
                for chunks in contributions:
                    chunks[c] = None  # this miner's hold on the piece ends here
                if c + PREFETCH_CHUNKS < n:
                    in_flight[c + PREFETCH_CHUNKS] = [prefetch(chunks[c + PREFETCH_CHUNKS]) for chunks in contributions]
                if spec.kind is RoundKind.BROADCAST:
                    result = ship(from_buffer(buffers[0], dtype), copy_inline=True)
                else:
                    out = out_bytes[: (b - a) * dtype.itemsize].view(dtype.torch_dtype)
                    reduce_chunk([from_buffer(buf, dtype) for buf in buffers], spec.op, out, accumulator)
                    result = ship(out, copy_inline=True)
                with state.cond:
                    self._bytes_in += sum(buf.size for buf in buffers)
                    state.results.append(result)
                    state.cond.notify_all()
                del buffers
        except FetchTimeout:  # the builtin TimeoutError only from Python 3.11 on
            raise RoundTimeoutError(
                f"{spec.describe()}: miner {self.name!r} could not fetch the peers' chunks "
                f"within {spec.job.timeout_s:g} s"
            ) from None
        finally:
            with self._lock:
                self._buffers.append((out_bytes, accumulator))

    def _take_buffers(self, nbytes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A chunk-sized output buffer and a block accumulator, reused across rounds."""
        with self._lock:
            out_bytes, accumulator = (
                self._buffers.pop() if self._buffers else (torch.empty(0, dtype=torch.uint8), block_accumulator())
            )
        if len(out_bytes) < nbytes:
            out_bytes = torch.empty(nbytes, dtype=torch.uint8)
        return out_bytes, accumulator


def _what(spec: RoundSpec) -> str:
    return f"{spec.kind.value} op={spec.op and spec.op.value} src={spec.src}"
