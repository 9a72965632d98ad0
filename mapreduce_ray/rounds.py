"""One collective round at one peer: what goes to which miner, what comes back, and when it is done.

A `Round` hands each segment of the plan to the first miner of the segment's failover order (to
the first `redundancy` of them), streaming this peer's chunks of it (a broadcast receiver only asks
for it). Every reduced chunk that comes back is checked before it is kept: signed by that miner,
for this peer, this round and segment; a receipt naming this peer's own chunk digest among the
inputs; a frame of exactly the planned size whose bytes match the signed digest; and, when the job's
results are checked, a sum that fits every peer's sealed sketch of its own chunk (mapreduce_ray.sketch:
a check the miner cannot predict). A miner that
fails, breaks off, sends anything else or misses its deadline loses the segment to the next miner
of the order (every peer derives the same order, so they meet there), and its chunks go out again.
When results are checked, each peer then gives the miner its verdict on the segment, and keeps the
segment only once the miner relays every peer's verdict vouching for the same digests: so a miner
that gives one peer a right sum and another a wrong one loses the segment at every peer, and they
all meet at the next miner (and leave it out of the job's later rounds). Replicas of a segment
must agree digest for digest; when they do not, the validator rules. The user's tensor is written
once, at the end, after every segment came back: a round that fails leaves it as it was.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from mapreduce_ray.errors import (
    PEER_FAULTS,
    InvalidTensorError,
    MapReduceError,
    MinerFaultError,
    RoundMismatchError,
    RoundTimeoutError,
    WrongResultError,
)
from mapreduce_ray.links import JobLinks, MinerLink
from mapreduce_ray.messages import (
    Await,
    Chunk,
    Delivery,
    Reduced,
    RoundFailed,
    RoundReport,
    Ruling,
    Settled,
    Verdict,
    WrongChunk,
)
from mapreduce_ray.plan import Segment, failover_order, plan_round
from mapreduce_ray.shards import FlatTensor, flatten, from_buffer, new_tensor
from mapreduce_ray.sketch import Sketcher, SketchError, check, real_count, signed_sum, sketch
from mapreduce_ray.types import RoundKind, RoundSpec, TensorSpec
from mapreduce_ray.wire.errors import KNOWN
from mapreduce_ray.wire.frames import digest, frame, unframe

log = logging.getLogger(__name__)

EMPTY_DIGEST = digest(b"")
SEND_NOW_BYTES = 256 * 1024  # a round this small sends its chunks on the caller's thread


@dataclass
class _Attempt:
    """One miner reducing one segment of the round for this peer."""

    segment: int
    miner: int
    deadline: float
    received: dict[int, tuple[pa.Buffer | None, str, bytes]] = field(default_factory=dict)  # chunk -> (bytes,
    # digest, the signed Reduced)
    error: MapReduceError | None = None
    refused: MapReduceError | None = None  # why this peer refused the segment, in a checked job
    done: bool = False

    @property
    def running(self) -> bool:
        return self.error is None and not self.done

    @property
    def digests(self) -> tuple[str, ...]:
        return tuple(self.received[c][1] for c in sorted(self.received))


Dispute = Callable[["Round", int], Ruling]  # (round, segment) -> the validator's ruling


class Round:
    """`spec` as the peer at `rank` runs it over `links`, with its flat tensor (None: a broadcast receiver
    that handed in none). `dispute` asks the validator to rule when replicas disagree (None: no validator).
    `sketcher` seals this peer's sketches and checks every result against the peers' (None: unchecked).
    `excluded`: the job's miners (indexes) that get no segment of this round. `struck`: the job's miners the
    validator told this peer are struck, which it tells the other peers in its verdicts."""

    def __init__(
        self,
        spec: RoundSpec,
        rank: int,
        links: JobLinks,
        flat: FlatTensor | None,
        dispute: Dispute | None = None,
        sketcher: Sketcher | None = None,
        excluded: frozenset[int] = frozenset(),
        struck: frozenset[int] = frozenset(),
        bandwidth: int | None = None,
    ):
        self.spec, self.rank, self.links, self.flat = spec, rank, links, flat
        self._bandwidth = bandwidth  # the largest tensor this peer takes in a broadcast it allocates for
        self._dispute, self._sketcher = dispute, sketcher
        job = spec.job
        self.started = time.monotonic()
        self.deadline = self.started + job.timeout_s
        self.receiving = spec.kind is RoundKind.ALL_REDUCE or rank != spec.src
        self.sending = spec.kind is RoundKind.ALL_REDUCE or rank == spec.src
        self.tensor: TensorSpec | None = spec.tensor if self.sending else None
        self.plan: tuple[Segment, ...] | None = plan_round(job, spec.tensor) if spec.tensor else None
        if spec.kind is RoundKind.ALL_REDUCE:
            self.segments = [s.miner for s in self.plan if s.chunks]
        else:
            self.segments = list(range(len(job.miners)))
        self._cond = threading.Condition()
        self._untried = {s: [m for m in failover_order(s, len(job.miners)) if m not in excluded] for s in self.segments}
        self._attempts: list[_Attempt] = []
        # (segment, chunk) -> digest and sealed sketch of this peer's chunk, made once for every miner it goes to
        self._signed: dict[tuple[int, int], tuple[str, str]] = {}
        self._sent_to: set[int] = set()
        self.failed: set[int] = set()
        self.wrong: list[WrongChunk] = []  # chunks that failed this peer's check: evidence for the validator
        self._struck = tuple(sorted(struck))
        self.left_out: set[int] = set()  # miners every peer leaves out from now on: a peer refused them, or was
        # told they are struck (read in verdicts that every peer read alike)
        self.reported = False  # the validator has this round's report
        small = self.sending and spec.tensor.nbytes <= SEND_NOW_BYTES
        self._first: list | None = [] if small else None  # the first sends, when they go out on this thread
        self._fatal: MapReduceError | None = None

    def describe(self) -> str:
        return self.spec.describe()

    # ---- running --------------------------------------------------------------------------------

    def run(self) -> None:
        """Send, wait for every segment (failing over, disputing), and write the result into the tensor."""
        self.links.current = self
        try:
            with self._cond:
                for segment in self.segments:
                    for _ in range(self.spec.job.redundancy):
                        self._launch(segment)
                first, self._first = self._first, None
            for link, make in first or ():  # small: sent on this thread, outside the lock
                link.send(make, now=True)
            with self._cond:
                self._wait()
            chosen = {s: self._agreed(s) for s in self.segments}
        finally:
            self.links.current = None
            self.links.flush(self._sent_to, self.deadline)
        if self.receiving:
            self._write(chosen)

    def _wait(self) -> None:
        """Until every segment is settled, or the round cannot end well (lock held)."""
        while self._fatal is None and not all(self._settled(s) for s in self.segments):
            now = time.monotonic()
            running = [a for a in self._attempts if a.running]
            for attempt in running:
                if now >= attempt.deadline:
                    late = MinerFaultError(f"miner {self._name(attempt)!r} missed its deadline")
                    self._fail(attempt, attempt.refused or late)
            if self._fatal is None and not all(self._settled(s) for s in self.segments):
                deadlines = [a.deadline for a in self._attempts if a.running]
                self._cond.wait(timeout=max(min(deadlines, default=now) - time.monotonic(), 0.001))
        if self._fatal is not None:
            raise self._fatal
        missing = sorted(s for s in self.segments if not self._complete(s))
        wrong = [a.error for a in self._attempts if isinstance(a.error, WrongResultError) and a.segment in missing]
        if wrong:
            raise WrongResultError(f"{self.describe()}: no miner delivered segment(s) {missing} exactly: {wrong[0]}")
        if missing:
            failed = sorted(self.spec.job.miners[m].name for m in self.failed)
            raise RoundTimeoutError(
                f"{self.describe()}: no miner delivered segment(s) {missing} within {self.spec.job.timeout_s:g} s; "
                f"miners that failed: {failed}"
            )

    def _settled(self, segment: int) -> bool:
        """No miner works on the segment any more, and none will."""
        if any(a.running for a in self._attempts if a.segment == segment):
            return False
        enough = len(self._complete(segment)) >= self.spec.job.redundancy
        return enough or not self._untried[segment] or time.monotonic() >= self.deadline

    def _complete(self, segment: int) -> list[_Attempt]:
        return [a for a in self._attempts if a.segment == segment and a.done]

    def _launch(self, segment: int) -> None:
        """Hand the segment to its next untried miner, if any and if time is left (lock held)."""
        while self._untried[segment] and time.monotonic() < self.deadline:
            miner = self._untried[segment].pop(0)
            last = not self._untried[segment]
            deadline = self.deadline if last else min(self.deadline, time.monotonic() + self.spec.job.attempt_timeout_s)
            attempt = _Attempt(segment, miner, deadline)
            self._attempts.append(attempt)
            try:
                link = self.links.get(miner)
                self._send(link, segment)
                self._sent_to.add(miner)
                self._settle_if_empty(attempt)
                return
            except MinerFaultError as e:
                self._fail(attempt, e, relaunch=False)

    def _send(self, link: MinerLink, segment: int) -> None:
        """Hand the link this peer's part of `segment`: its chunks, or a receiver's request."""
        job, r = self.spec.job, self.spec
        hotkey = link.slot.hotkey
        if not self.sending:
            ask = Await(job.job_id, r.seq, r.src, segment, self.rank)
            makes = [lambda: (self.links.seal(ask, hotkey), None)]
        elif not self.plan[segment].chunks:  # a broadcast's empty segment: the miner learns there is nothing
            head = Chunk(job.job_id, r.seq, r.kind, r.op, r.src, r.tensor, segment, self.rank, 0, EMPTY_DIGEST)
            makes = [lambda: (self.links.seal(head, hotkey), None)]
        else:
            makes = [
                lambda index=index, a=a, b=b: self._make_chunk(hotkey, segment, index, a, b)
                for index, (a, b) in enumerate(self.plan[segment].chunks)
            ]
        for make in makes:
            if self._first is not None:
                self._first.append((link, make))
            else:
                link.send(make)

    def _make_chunk(self, hotkey: str, segment: int, index: int, a: int, b: int):
        """(signed Chunk, frame) of this peer's chunk `index` of `segment`: elements [a, b)."""
        r = self.spec
        values = self.flat.flat[a:b]
        batch = frame(values)
        key = (segment, index)
        if key not in self._signed:
            proof = ""
            if self._sketcher is not None:  # on the sending thread, while earlier chunks travel
                dtype = self.flat.dtype
                signs = self._sketcher.signs(real_count(dtype, b - a))
                proof = self._sketcher.seal(sketch(values, dtype, signs), r.seq, segment, index, self.rank)
            self._signed[key] = (digest(batch.column(0).buffers()[1]), proof)
        chunk_digest, proof = self._signed[key]
        body = Chunk(r.job.job_id, r.seq, r.kind, r.op, r.src, r.tensor, segment, self.rank, index, chunk_digest, proof)
        return self.links.seal(body, hotkey), batch

    def _settle_if_empty(self, attempt: _Attempt) -> None:
        """A broadcast's empty segment brings nothing back."""
        if self.plan is not None and not self.plan[attempt.segment].chunks:
            attempt.done = True

    def _fail(self, attempt: _Attempt, error: MapReduceError, relaunch: bool = True) -> None:
        """An attempt failed: the segment goes to the next miner of its order (lock held)."""
        if not attempt.running:
            return
        attempt.error = error
        self.failed.add(attempt.miner)
        log.warning("%s: %s; segment %d goes to the next miner", self.describe(), error, attempt.segment)
        if relaunch:
            self._launch(attempt.segment)
        self._cond.notify_all()

    # ---- what miners send (called on the links' threads) ----------------------------------------

    def received(
        self, link: MinerLink, body: Reduced | RoundFailed | Settled, wire: bytes, data: pa.RecordBatch | None
    ):
        """A message from miner `link.index` for this round."""
        if body.job_id != self.spec.job.job_id or body.seq != self.spec.seq:
            return  # a round that ended here already
        with self._cond:
            attempt = self._running(body.segment, link.index)
            if attempt is None or (attempt.refused is not None and isinstance(body, Reduced)):
                return
            if isinstance(body, Settled):
                self._settle(attempt, body)
                return
            if isinstance(body, RoundFailed):
                error = KNOWN.get(body.error)
                if error is not None and issubclass(error, PEER_FAULTS):
                    # the round ends here as the miner says; its report names the miner as not delivering, which
                    # the validator counts only if another miner's signed results show the round ran all the same
                    self._fatal = error(body.message)
                    self.failed.add(link.index)
                    self._cond.notify_all()
                else:
                    self._fail(attempt, MinerFaultError(f"miner {self._name(attempt)!r} failed: {body.message}"))
                return
        try:
            kept = self._check(attempt, body, data)
        except MapReduceError as e:
            fault = WrongResultError if isinstance(e, WrongResultError) else MinerFaultError
            with self._cond:
                if fault is WrongResultError:
                    self.wrong.append(WrongChunk(attempt.miner, attempt.segment, wire.decode()))
                self._refuse(link, attempt, fault(f"miner {self._name(attempt)!r} {e}"))
            return
        with self._cond:
            if not attempt.running or attempt.refused is not None:
                return
            attempt.received[body.chunk] = (kept, body.digest, wire)
            if len(attempt.received) < len(self.plan[attempt.segment].chunks):
                return
            if self._sketcher is None:
                attempt.done = True
                self._cond.notify_all()
            elif self.receiving:
                tag = self._sketcher.vouch(self.spec.seq, attempt.segment, self.rank, attempt.digests, self._struck)
                self._give_verdict(link, attempt, tag)

    def _refuse(self, link: MinerLink, attempt: _Attempt, error: MapReduceError) -> None:
        """This peer refuses what the miner sent it of a segment. In a checked job the other peers learn it
        from the miner, and the segment fails over at all of them at once (or at its deadline, if the miner
        keeps it to itself); otherwise it fails over here now (lock held)."""
        if self._sketcher is None:
            self._fail(attempt, error)
        elif attempt.refused is None:
            attempt.refused = error
            self._give_verdict(link, attempt, "")

    def _give_verdict(self, link: MinerLink, attempt: _Attempt, tag: str) -> None:
        r, hotkey = self.spec, link.slot.hotkey
        verdict = Verdict(r.job.job_id, r.seq, attempt.segment, self.rank, tag, self._struck)
        link.send(lambda: (self.links.seal(verdict, hotkey), None))

    def _settle(self, attempt: _Attempt, settled: Settled) -> None:
        """Every receiving peer's verdict on a segment: kept if all vouch for what this peer kept (lock held)."""
        seq, segment, name = self.spec.seq, attempt.segment, self._name(attempt)
        ranks = self._receivers()
        verdicts = list(zip(ranks, settled.tags, settled.struck, strict=False))
        refused = [rank for rank, tag in zip(ranks, settled.tags, strict=False) if not tag]
        if len(settled.tags) != len(ranks) or len(settled.struck) != len(ranks):
            why = f"relayed {len(settled.tags)} verdicts for {len(ranks)} peers"
        elif refused:
            self.left_out.add(attempt.miner)  # every peer read the same refusal
            why = f"delivered segment {segment} that rank(s) {refused} refused"
        elif len(attempt.received) < len(self.plan[segment].chunks):
            why = f"relayed verdicts on segment {segment} before it delivered it"
        elif not all(self._sketcher.vouches(t, seq, segment, r, attempt.digests, s) for r, t, s in verdicts):
            why = f"sent the peers different chunks of segment {segment}"
        else:
            self.left_out.update(m for _, _, struck in verdicts for m in struck if 0 <= m < len(self.spec.job.miners))
            attempt.done = True
            self._cond.notify_all()
            return
        self._fail(attempt, attempt.refused or MinerFaultError(f"miner {name!r} {why}"))

    def _receivers(self) -> list[int]:
        """The ranks that receive a segment, in order."""
        ranks = range(1, self.spec.job.peer_count + 1)
        return [rank for rank in ranks if self.spec.kind is RoundKind.ALL_REDUCE or rank != self.spec.src]

    def broken(self, link: MinerLink, error: MapReduceError) -> None:
        """A link ended: its running attempts fail, or the round does if the miner refused this peer's job."""
        with self._cond:
            for attempt in [a for a in self._attempts if a.miner == link.index and a.running]:
                if isinstance(error, PEER_FAULTS):
                    self._fatal = error
                    self._cond.notify_all()
                else:
                    self._fail(attempt, error)

    def _running(self, segment: int, miner: int) -> _Attempt | None:
        return next((a for a in self._attempts if (a.segment, a.miner) == (segment, miner) and a.running), None)

    def _check(self, attempt: _Attempt, body: Reduced, data: pa.RecordBatch | None) -> pa.Buffer | None:
        """The bytes of a reduced chunk, once the miner's message vouches for exactly them; raises why not."""
        self._learn(body.tensor)
        chunks = self.plan[attempt.segment].chunks
        if not 0 <= body.chunk < len(chunks) or body.chunk in attempt.received:
            raise MinerFaultError(f"sent chunk {body.chunk} of segment {attempt.segment} twice or outside the plan")
        mine = self._signed.get((attempt.segment, body.chunk), (None,))[0]
        if self.spec.kind is RoundKind.ALL_REDUCE:
            expected = len(body.inputs) == self.spec.job.peer_count and body.inputs[self.rank - 1] == mine
        else:
            expected = len(body.inputs) == 1 and body.inputs[0] == (mine if self.sending else body.digest)
        if not expected:
            raise MinerFaultError("receipted other inputs than this peer's chunk")
        if not self.receiving:
            if data is not None:
                raise MinerFaultError("sent a broadcast's source the broadcast back")
            return None
        a, b = chunks[body.chunk]
        who = f"sent chunk {body.chunk} of segment {attempt.segment}, but"
        kept = unframe(data, (b - a) * self.tensor.dtype_info.itemsize, who)
        if digest(kept) != body.digest:
            raise MinerFaultError(
                f"sent chunk {body.chunk} of segment {attempt.segment} whose bytes do not match its signed digest"
            )
        if self._sketcher is not None:
            try:
                self._verify(attempt.segment, body, kept, b - a)
            except SketchError as e:
                raise WrongResultError(
                    f"sent chunk {body.chunk} of segment {attempt.segment} that fails its check: {e}"
                ) from None
        return kept

    def _verify(self, segment: int, body: Reduced, kept: pa.Buffer, numel: int) -> None:
        """SketchError unless the reduced chunk fits the sketches its peers sealed (on the link's thread)."""
        r, dtype = self.spec, self.tensor.dtype_info
        ranks = range(1, r.job.peer_count + 1) if r.kind is RoundKind.ALL_REDUCE else (r.src,)
        if len(body.proofs) != len(ranks):
            raise SketchError(f"it came with {len(body.proofs)} sketches for {len(ranks)} contributions")
        seal = self._sketcher
        parts = [
            seal.open(proof, dtype.is_integer, r.seq, segment, body.chunk, rank)
            for proof, rank in zip(body.proofs, ranks, strict=True)
        ]
        signs = seal.signs(real_count(dtype, numel))
        result = signed_sum(from_buffer(kept, dtype), dtype, signs)
        check(result, parts, dtype, r.op if r.kind is RoundKind.ALL_REDUCE else None, numel)

    def _learn(self, tensor: TensorSpec) -> None:
        """The round's tensor as a miner states it: a broadcast receiver learns it from the first."""
        with self._cond:
            if self.tensor is None:
                over = None
                if tensor.nbytes > self.spec.job.max_bytes:
                    over = f"over the job's {self.spec.job.max_bytes} bytes"
                elif self.flat is None and self._bandwidth is not None and tensor.nbytes > self._bandwidth:
                    over = (
                        f"over this peer's bandwidth of {self._bandwidth} bytes; pass Peer(bandwidth=) of at least "
                        f"{tensor.nbytes} to take it"
                    )
                if over is not None:  # refused before anything is allocated for it
                    self._fatal = InvalidTensorError(
                        f"{self.describe()}: the source's tensor ({tensor.describe()}) is {over}"
                    )
                    self._cond.notify_all()
                    raise self._fatal
                self.tensor, self.plan = tensor, plan_round(self.spec.job, tensor)
                for segment in self.segments:
                    for attempt in self._attempts:
                        if attempt.segment == segment and attempt.running and not self.plan[segment].chunks:
                            attempt.done = True
                self._cond.notify_all()
        if tensor != self.tensor:
            raise RoundMismatchError(f"stated tensor {tensor.describe()}, not {self.tensor.describe()}")

    # ---- agreeing and writing -------------------------------------------------------------------

    def _agreed(self, segment: int) -> _Attempt:
        """The attempt whose result this peer uses: the only one, the one replicas agree on, or the one the
        validator rules exact."""
        done = self._complete(segment)
        if all(a.digests == done[0].digests for a in done):
            return done[0]
        if self._dispute is None:
            raise MinerFaultError(f"{self.describe()}: miners disagree on segment {segment} and no validator rules")
        ruling = self._dispute(self, segment)
        winner = next((a for a in done if a.miner == ruling.miner), None)
        if winner is None:
            raise MinerFaultError(
                f"{self.describe()}: the miners of segment {segment} disagree and the validator found none "
                f"of them exact: {ruling.reason}"
            )
        return winner

    def _write(self, chosen: dict[int, _Attempt]) -> None:
        """The one write into the user's tensor (a new one for a receiver that handed in none)."""
        if self.flat is None:
            self.flat = flatten(new_tensor(self.tensor))
        elif self.flat.spec != self.tensor:
            raise RoundMismatchError(
                f"{self.describe()}: rank {self.spec.src} sends {self.tensor.describe()} "
                f"but rank {self.rank} passed {self.flat.spec.describe()}"
            )
        target = self.flat.flat.view(torch.uint8).numpy()  # bytes: a received frame need not be aligned
        size = self.flat.dtype.itemsize
        for segment, attempt in chosen.items():
            for index, (a, b) in enumerate(self.plan[segment].chunks):
                target[a * size : b * size] = np.frombuffer(attempt.received[index][0], np.uint8)
        self.flat.commit()

    def report(self) -> RoundReport:
        """What this peer tells the validator about the round: who delivered what, who failed."""
        with self._cond:
            deliveries = tuple(
                Delivery(a.miner, a.segment, tuple(a.received[c][2].decode() for c in sorted(a.received)))
                for a in self._attempts
                if a.done and a.received
            )
            late = tuple(sorted(self.failed))
            return RoundReport(self.spec.job.job_id, self.spec.seq, self.rank, deliveries, late, tuple(self.wrong))

    def _name(self, attempt: _Attempt) -> str:
        return self.spec.job.miners[attempt.miner].name
