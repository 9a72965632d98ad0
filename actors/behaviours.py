"""Miners that misbehave on purpose: the incentive simulation's cast and the validator's test subjects.

Each is a MinerActor whose hooks throttle, drop, falsify or stall the reduced
chunks it hands back; everything else (signatures, protocol) stays honest, so
only the validator's measurements and checks, or the peers' failover, can tell.
With `live_only=True` a cheater behaves during benchmarks (a job whose ranks all
share one hotkey, as a benchmark bot's do) and cheats in real jobs.
"""

from __future__ import annotations

import threading
import time

import torch

from actors.miner import MinerActor
from mapreduce_ray.transport import Shipped, ship
from mapreduce_ray.types import RoundSpec

MIB = 1024 * 1024


class ThrottledMiner(MinerActor):
    """Honest, but moves at most `mib_per_s` MiB/s: it waits bytes / rate before shipping each chunk."""

    def __init__(self, wallet, chain, mib_per_s: float):
        super().__init__(wallet, chain)
        self._bytes_per_s = mib_per_s * MIB

    def _ship_result(self, spec: RoundSpec, chunk: int, reduced: torch.Tensor) -> Shipped:
        time.sleep(reduced.nbytes / self._bytes_per_s)
        return super()._ship_result(spec, chunk, reduced)


class LazyMiner(MinerActor):
    """Drops every other round it serves (the first included): it answers only after the deadline."""

    def __init__(self, wallet, chain):
        super().__init__(wallet, chain)
        self._served = 0
        self._counter = threading.Lock()

    def _ship_result(self, spec: RoundSpec, chunk: int, reduced: torch.Tensor) -> Shipped:
        if chunk == 0:
            with self._counter:
                self._served += 1
                drop = self._served % 2 == 1
            if drop:
                time.sleep(2 * spec.job.timeout_s)
        return super()._ship_result(spec, chunk, reduced)


class Cheater(MinerActor):
    """A miner that falsifies its results (in real jobs only, with `live_only`)."""

    def __init__(self, wallet, chain, live_only: bool = False):
        super().__init__(wallet, chain)
        self._live_only = live_only

    def _ship_result(self, spec: RoundSpec, chunk: int, reduced: torch.Tensor) -> Shipped:
        if not (self._live_only and _is_benchmark(self, spec)):
            self._falsify(chunk, reduced)
        return super()._ship_result(spec, chunk, reduced)

    def _falsify(self, chunk: int, reduced: torch.Tensor) -> None:
        """Change the reduced chunk in place."""
        raise NotImplementedError


class OneElementOffMiner(Cheater):
    """Adds a small amount (1e-3) to the first element of its segment."""

    def _falsify(self, chunk, reduced):
        if chunk == 0:
            reduced[0] += 1e-3


class ScalingMiner(Cheater):
    """Returns its result scaled by 1.01."""

    def _falsify(self, chunk, reduced):
        reduced.mul_(1.01)


class ZerosMiner(Cheater):
    """Returns zeros without reducing anything it was given."""

    def _falsify(self, chunk, reduced):
        reduced.zero_()


class ReplayingMiner(Cheater):
    """Returns the chunks of the first round it served again in every later round of the same shape."""

    def __init__(self, wallet, chain, live_only: bool = False):
        super().__init__(wallet, chain, live_only)
        self._stale: dict[tuple[int, int], Shipped] = {}  # (chunk, bytes) -> the chunk shipped first

    def _ship_result(self, spec, chunk, reduced):
        if self._live_only and _is_benchmark(self, spec):
            return MinerActor._ship_result(self, spec, chunk, reduced)
        key = (chunk, reduced.nbytes)
        with self._lock:
            stale = self._stale.get(key)
        if stale is not None:
            return stale
        shipped = ship(reduced, copy_inline=True)
        with self._lock:
            self._stale[key] = shipped
        return shipped


class PausingMiner(MinerActor):
    """Honest, but stalls at `point` of the first real round it serves, for twice the round's deadline
    (long enough for a test to kill it there); `wait_paused` says when it got there.

    Points: "received" (every contribution in, nothing reduced), "reducing" (the first chunk reduced
    and shipped, the next not), "reduced" (every chunk shipped, the result stream not yet ended).
    """

    POINTS = ("received", "reducing", "reduced")

    def __init__(self, wallet, chain, point: str):
        super().__init__(wallet, chain)
        if point not in self.POINTS:
            raise ValueError(f"point must be one of {self.POINTS}, got {point!r}")
        self._point = point
        self._paused = threading.Event()

    def wait_paused(self, timeout_s: float) -> bool:
        return self._paused.wait(timeout_s)

    def _reduce_segment(self, state, spec, segment, contributions):
        self._pause(spec, "received")
        moved = super()._reduce_segment(state, spec, segment, contributions)
        self._pause(spec, "reduced")
        return moved

    def _ship_result(self, spec, chunk, reduced):
        if chunk == 1:
            self._pause(spec, "reducing")
        return super()._ship_result(spec, chunk, reduced)

    def _pause(self, spec: RoundSpec, point: str) -> None:
        if point != self._point or _is_benchmark(self, spec):
            return
        with self._lock:
            first = not self._paused.is_set()
            self._paused.set()
        if first:
            time.sleep(2 * spec.job.timeout_s)


def _is_benchmark(miner: MinerActor, spec: RoundSpec) -> bool:
    """Whether the round belongs to a benchmark: a job whose ranks all share one hotkey."""
    with miner._lock:
        job = miner._jobs.get(spec.job.job_id)
        return job is not None and spec.job.peer_count > 1 and len(set(job.peers.values())) == 1
