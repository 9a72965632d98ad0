"""Miners that misbehave on purpose: the incentive simulation's cast and the validator's test subjects.

Each is a Relay (serve one with MinerActor(..., relay_class=..., relay_args=...)) whose hooks
throttle, stall or falsify the reduced chunks it sends; everything else (signatures, protocol)
stays honest, so only the validator's measurements and checks, or the peers' failover, can tell.
A benchmark reads like any job, so a cheater can only play for time: with `honest_jobs=n` it
behaves in the first n jobs it serves (a miner's first jobs are the validator's benchmarks of it,
`benchmark.best_of` of them back to back) and cheats in every later one.
"""

from __future__ import annotations

import math
import threading
import time

import torch

from actors.relay import Relay, _Round
from mapreduce_ray.errors import PeerLostError
from mapreduce_ray.messages import plain
from mapreduce_ray.shards import from_buffer
from mapreduce_ray.sketch import real_count, smallest_caught
from mapreduce_ray.types import ReduceOp
from mapreduce_ray.wire.frames import frame

MIB = 1024 * 1024


class ThrottledRelay(Relay):
    """Honest, but moves at most `mib_per_s` MiB/s: it waits bytes / rate before sending each reduced chunk."""

    def __init__(self, *args, mib_per_s: float):
        super().__init__(*args)
        self._bytes_per_s = mib_per_s * MIB

    def delay(self, state: _Round, index: int) -> None:
        a, b = state.plan.chunks[index]
        time.sleep((b - a) * state.tensor.dtype_info.itemsize / self._bytes_per_s)


class LazyRelay(Relay):
    """Drops every other round it serves (the first included): it answers only after the deadline."""

    def __init__(self, *args):
        super().__init__(*args)
        self._served = 0
        self._counter = threading.Lock()

    def delay(self, state: _Round, index: int) -> None:
        if index == 0:
            with self._counter:
                self._served += 1
                drop = self._served % 2 == 1
            if drop:
                time.sleep(2 * state.job.spec.timeout_s)


class Cheater(Relay):
    """A miner that falsifies its results, after its first `honest_jobs` jobs."""

    def __init__(self, *args, honest_jobs: int = 0):
        super().__init__(*args)
        self._honest_jobs = honest_jobs
        self._job_order = JobOrder()

    def honest(self, state: _Round) -> bool:
        """Whether the round belongs to one of the first `honest_jobs` jobs this miner served."""
        return self._job_order.index(state) < self._honest_jobs

    def falsify(self, state: _Round, index: int, out: torch.Tensor) -> torch.Tensor:
        if not self.honest(state):
            self._falsify(index, out)
        return out

    def _falsify(self, index: int, out: torch.Tensor) -> None:
        """Change the reduced chunk in place."""
        raise NotImplementedError


class OneElementOffRelay(Cheater):
    """Moves the first element of its segment by the smallest error the peers' check claims to catch
    (mapreduce_ray.sketch.smallest_caught, from the contributions' norms), rounded away from the sum."""

    def falsify(self, state, index, out):
        if index or self.honest(state):
            return out
        dtype = state.tensor.dtype_info
        views = [from_buffer(state.inputs[index][rank][0], dtype).double() for rank in state.contributors]
        k = len(views) if state.op is ReduceOp.AVG else 1
        error = smallest_caught(dtype, [float(v.dot(v)) for v in views], k, real_count(dtype, len(out)))
        wrong = torch.tensor(float(out[0]) + error, dtype=out.dtype)
        if float(wrong) - float(out[0]) < error:
            wrong = torch.nextafter(wrong, torch.tensor(math.inf, dtype=out.dtype))
        out[0] = wrong
        return out


class ScalingRelay(Cheater):
    """Returns its result scaled by 1.01."""

    def _falsify(self, index, out):
        out.mul_(1.01)


class ZerosRelay(Cheater):
    """Returns zeros without reducing anything it was given."""

    def _falsify(self, index, out):
        out.zero_()


class SketchDroppingRelay(Cheater):
    """Reduces honestly but relays no sketch of rank 2's chunks."""

    def _falsify(self, index, out):
        pass

    def relay_proofs(self, state, proofs):
        if self.honest(state):
            return proofs
        return tuple("" if rank == 2 else proof for rank, proof in enumerate(proofs, 1))


class TwoFacedRelay(Cheater):
    """Reduces honestly, and sends the right sum to rank 1 but a wrong one (first element +1) to every other
    rank."""

    def _falsify(self, index, out):
        pass

    def deliver(self, state, rank, result):
        if rank == 1 or self.honest(state):
            return result
        wrong = from_buffer(result.frame.column(0).buffers()[1], state.tensor.dtype_info).clone()
        wrong[0] += 1
        return self.result(state, result.chunk, frame(wrong), result.inputs, result.proofs)


class BlamingRelay(Cheater):
    """Gives up every segment it reduces, blaming rank 2 for leaving (a lie: every peer sent its part), a second
    after it had every part: time for the other miners of the job to deliver theirs."""

    def _falsify(self, index: int, out: torch.Tensor) -> None:
        time.sleep(1.0)
        raise PeerLostError("rank 2 left the job")


class ReplayingRelay(Cheater):
    """Returns the chunks of the first round it served again in every later round of the same shape."""

    def __init__(self, *args, honest_jobs: int = 0):
        super().__init__(*args, honest_jobs=honest_jobs)
        self._stale: dict[tuple[int, int], torch.Tensor] = {}  # (chunk, bytes) -> the chunk sent first

    def falsify(self, state, index, out):
        if self.honest(state):
            return out
        return self._stale.setdefault((index, out.nbytes), out.clone())


class PausingRelay(Relay):
    """Honest, but stalls at `point` of the first round of the first job after its first `after_jobs` (its
    benchmarks, say), for twice the round's deadline (long enough for a test to kill it there); its status
    says `paused` once it got there.

    Points: "received" (the first chunk's inputs all in, nothing sent), "reducing" (the first chunk
    sent, the next not), "reduced" (every chunk reduced, the last not sent).
    """

    POINTS = ("received", "reducing", "reduced")

    def __init__(self, *args, point: str, after_jobs: int):
        super().__init__(*args)
        if point not in self.POINTS:
            raise ValueError(f"point must be one of {self.POINTS}, got {point!r}")
        self._point, self._after_jobs = point, after_jobs
        self._job_order = JobOrder()
        self._paused = threading.Event()

    def status(self) -> dict:
        return {**super().status(), "paused": self._paused.is_set()}

    def delay(self, state: _Round, index: int) -> None:
        last = len(state.plan.chunks) - 1
        at = {"received": 0, "reducing": 1, "reduced": last}[self._point]
        if index != at or self._job_order.index(state) < self._after_jobs or self._paused.is_set():
            return
        self._paused.set()
        time.sleep(2 * state.job.spec.timeout_s)


class CuriousRelay(Relay):
    """Honest, but notes what every job it serves looks like, as a miner out to tell benchmarks from live jobs
    would: its spec as admitted here (but its id), whether its name is its id, its ranks' hotkeys, what its
    rounds carry, and whether its chunks came with sealed sketches. status()["seen"]: one note per job, in the
    order they came."""

    def __init__(self, *args):
        super().__init__(*args)
        self._seen: dict[str, dict] = {}
        self._seen_lock = threading.Lock()

    def status(self) -> dict:
        with self._seen_lock:
            return {**super().status(), "seen": [dict(note) for note in self._seen.values()]}

    def relay_proofs(self, state, proofs):
        spec = state.job.spec
        with self._seen_lock:
            note = self._seen.setdefault(spec.job_id, {"rounds": [], "sketched": True})
            note["spec"] = {key: value for key, value in plain(spec).items() if key not in ("job_id", "name")}
            note["named_by_id"] = spec.name == spec.job_id
            note["hotkeys"] = [state.job.peers[rank] for rank in sorted(state.job.peers)]
            round_ = (state.kind.value, state.op and state.op.value, state.tensor.dtype)
            if round_ not in note["rounds"]:
                note["rounds"].append(round_)
            note["sketched"] = note["sketched"] and all(proofs)
        return proofs


class JobOrder:
    """The order in which a miner first saw its jobs."""

    def __init__(self):
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()

    def index(self, state: _Round) -> int:
        """How many other jobs the miner saw before the round's."""
        with self._lock:
            return self._seen.setdefault(state.job.spec.job_id, len(self._seen))
