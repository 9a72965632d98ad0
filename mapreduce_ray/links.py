"""A peer's job streams: one bidirectional Flight stream to each miner of its job, open across rounds.

Up, a thread of its own writes what rounds hand it, in order: each item is a function that makes
the frame and its signed message when its turn comes, so hashing and signing overlap sending.
Down, another thread reads the miner's signed messages (`Reduced`, `RoundFailed`, `Settled`) and hands each,
with its frame, to the round that is running. A stream that breaks, or a miner that sends
anything outside the protocol, ends the link with a MinerFaultError naming the miner; the next
round that needs the miner opens a new one.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

import pyarrow as pa
import pyarrow.flight as fl

from mapreduce_ray.errors import PEER_FAULTS, FrameRejectedError, MapReduceError, MinerFaultError
from mapreduce_ray.messages import Reduced, RoundFailed, Settled, StreamOpen, encode, open_body, seal_body
from mapreduce_ray.protocol import Verifier, audience
from mapreduce_ray.types import MinerSlot
from mapreduce_ray.wire.config import WireConfig
from mapreduce_ray.wire.endpoint import Remote
from mapreduce_ray.wire.errors import stream_fault, translated
from mapreduce_ray.wire.frames import CHUNK_SCHEMA, check_schema

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 5.0
CAUSE_GRACE_S = 1.0  # how long a failed write waits for the reading side to say why the stream broke

Outgoing = Callable[[], tuple[bytes, pa.RecordBatch | None]]  # makes (signed message, frame or None)
Incoming = Callable[["MinerLink", Reduced | RoundFailed | Settled, bytes, pa.RecordBatch | None], None]


class MinerLink:
    """The job stream of the peer at `opened.rank` to miner `index` of its job (`slot`).

    `incoming(link, body, wire, frame)` gets every message the miner sends; `broken(link, error)` is
    told once when the link ends otherwise than by `close()`: a MinerFaultError, or one of PEER_FAULTS
    when the miner refuses the stream because of this peer or its job.
    """

    def __init__(
        self,
        index: int,
        slot: MinerSlot,
        remote: Remote,
        opened: StreamOpen,
        verifier: Verifier,
        config: WireConfig,
        incoming: Incoming,
        broken: Callable[[MinerLink, MapReduceError], None],
    ):
        self.index, self.slot, self.remote = index, slot, remote
        self._verifier, self._config = verifier, config
        self._audience = audience(opened.job_id)
        self._incoming, self._broken = incoming, broken
        self.error: MapReduceError | None = None
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        try:
            with remote.errors():
                self._writer, self._reader = remote.exchange("exchange", encode(opened))
                self._writer.begin(CHUNK_SCHEMA)
        except PEER_FAULTS:
            raise  # the miner refuses this peer or its job: the round cannot go on elsewhere either
        except MapReduceError as e:
            raise MinerFaultError(f"miner {slot.name!r} could not be reached: {e}") from None
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._up = threading.Thread(target=self._send_loop, name=f"link-up-{slot.name}", daemon=True)
        self._down = threading.Thread(target=self._receive_loop, name=f"link-down-{slot.name}", daemon=True)
        self._up.start()
        self._down.start()

    @property
    def alive(self) -> bool:
        return self.error is None and not self._closing.is_set()

    def send(self, make: Outgoing, now: bool = False) -> None:
        """Send a message (and frame) to the miner: queued (`make` runs on the sending thread when its turn
        comes), or `now`, on this thread (for small messages: it saves a thread's wake-up)."""
        if not now:
            self._outbox.put(make)
            return
        with self._write_lock:
            self._write(make)

    def flush(self, timeout_s: float) -> bool:
        """Whether everything handed to `send` so far was written (or dropped) within `timeout_s`."""
        written = threading.Event()
        self._outbox.put(written)
        return written.wait(timeout_s)

    def cancel(self, why: str) -> None:
        """Break the stream off from this side."""
        self._fail(why)

    def close(self) -> None:
        """End the stream (the miner sees this peer leave); cancel it if the miner does not end its side."""
        if self._closing.is_set():
            return
        self._closing.set()
        self._outbox.put(None)
        self._up.join(CLOSE_TIMEOUT_S)
        self._down.join(CLOSE_TIMEOUT_S)
        if self._down.is_alive() or self._up.is_alive():
            self._reader.cancel()
        self.remote.close()

    def _send_loop(self) -> None:
        while (make := self._outbox.get()) is not None:
            if isinstance(make, threading.Event):
                make.set()
                continue
            with self._write_lock:
                self._write(make)
        if self.error is None:
            try:
                self._writer.done_writing()
            except Exception as e:
                log.debug("ending the stream to %s: %s", self.slot.name, e)

    def _write(self, make: Outgoing) -> None:
        """Make a message and write it (write lock held); a failure ends the link."""
        if not self.alive:
            return
        try:
            wire, frame = make()
            metadata = pa.py_buffer(wire)
            if frame is None:
                self._writer.write_metadata(metadata)
            else:
                self._writer.write_with_metadata(frame, metadata)
        except Exception as e:  # a broken stream, or a failure making the message
            self._down.join(CAUSE_GRACE_S)  # what broke it usually reaches the reading side: let that tell
            self._fail(f"{stream_fault(e)} while this peer was sending")

    def _receive_loop(self) -> None:
        who = f"miner {self.slot.name!r}"
        try:
            check_schema(self._reader.schema, who)
            while True:
                try:
                    message = self._reader.read_chunk()
                except StopIteration:
                    if not self._closing.is_set():
                        self._fail("ended the job stream")
                    return
                metadata = message.app_metadata
                if metadata is None or metadata.size > self._config.max_metadata_bytes:
                    self._fail("sent a frame without a signed message, or with one over the size limit")
                    return
                wire = metadata.to_pybytes()
                expected = (Reduced, RoundFailed, Settled)
                body, _ = open_body(self._verifier, wire, expected, self.slot.hotkey, self._audience)
                self._incoming(self, body, wire, message.data)
        except FrameRejectedError as e:
            self._end(MinerFaultError(str(e)))  # it names the miner already
        except MapReduceError as e:
            self._fail(f"sent a message that fails its check: {e}")
        except fl.FlightError as e:
            error = translated(e, who)
            if isinstance(error, PEER_FAULTS):  # the miner refuses the stream because of this peer or its job
                self._end(error)
            else:
                self._fail(f"broke off the job stream: {error}")
        except Exception as e:  # the IPC stream itself is broken
            self._fail(stream_fault(e))

    def _fail(self, why: str) -> None:
        self._end(MinerFaultError(f"miner {self.slot.name!r} {why}"[:600]))

    def _end(self, error: MapReduceError) -> None:
        with self._lock:
            if self.error is not None or self._closing.is_set():
                return
            self.error = error
        log.warning("%s", error)
        self._reader.cancel()
        self._broken(self, error)


class JobLinks:
    """A peer's links to the miners of its job, opened when a round first needs them; what they receive goes
    to the round that runs (`current`).

    `remote_of(index)` makes the Remote of the job's miner `index`; `keypair` signs what rounds send (`seal`), on
    the verifier's subnet."""

    def __init__(
        self, spec, rank: int, keypair, verifier: Verifier, config: WireConfig, remote_of: Callable[[int], Remote]
    ):
        self.spec, self.rank, self._keypair = spec, rank, keypair
        self._verifier, self._config, self._remote_of = verifier, config, remote_of
        self._links: dict[int, MinerLink] = {}
        self._lock = threading.Lock()
        self.current = None  # the running round: .received(link, body, wire, frame) and .broken(link, error)

    def seal(self, body, miner: str) -> bytes:
        """`body` signed by this peer for the miner with hotkey `miner`, on the job's subnet."""
        return seal_body(self._keypair, body, miner, self._verifier.netuid)

    def get(self, index: int) -> MinerLink:
        """The open link to miner `index`, opened now if there is none; MinerFaultError if it cannot be."""
        with self._lock:
            link = self._links.get(index)
            if link is not None and link.alive:
                return link
            opened = StreamOpen(self.spec.job_id, self.rank)
            link = MinerLink(
                index,
                self.spec.miners[index],
                self._remote_of(index),
                opened,
                self._verifier,
                self._config,
                self._incoming,
                self._broken,
            )
            self._links[index] = link
            return link

    def flush(self, indexes, deadline: float) -> None:
        """Wait until the links to `indexes` wrote (or dropped) all they were handed, cancelling those that do
        not by `deadline`: after this, nothing of a round's tensor is still on its way."""
        for index in indexes:
            with self._lock:
                link = self._links.get(index)
            if link is not None and not link.flush(max(deadline - time.monotonic(), 0)):
                link.cancel("did not take this peer's chunks before the round's deadline")

    def close(self) -> None:
        with self._lock:
            links, self._links = list(self._links.values()), {}
        for link in links:
            link.close()

    def _incoming(self, link: MinerLink, body, wire: bytes, frame) -> None:
        round_ = self.current
        if round_ is not None:
            round_.received(link, body, wire, frame)

    def _broken(self, link: MinerLink, error: MapReduceError) -> None:
        round_ = self.current
        if round_ is not None:
            round_.broken(link, error)
