"""Segment planning: which miner reduces which elements, in which chunks.

Cost model: a miner's time in a round is proportional to the elements it reduces
divided by its throughput (its weight), and the round ends when the slowest miner
ends. Giving miner i the contiguous share numel * w_i / sum(w) minimizes that
maximum; shares are rounded to whole elements by largest remainder, so each is
within one element of its ideal. Each segment is cut into chunks of at most
`chunk_elems` elements so reduction and download overlap with upload. A segment also
costs every party a few messages whatever its size, so a small tensor goes to fewer
miners: at most one per MIN_SEGMENT_BYTES, the highest weights first.

Every party calls these functions with the same job spec and tensor spec, so every
party derives the same plan without exchanging it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from fractions import Fraction

from mapreduce_ray.types import JobSpec, TensorSpec

PLANS_KEPT = 256
MIN_SEGMENT_BYTES = 64 * 1024


@dataclass(frozen=True)
class Segment:
    """The elements [start, stop) reduced by miner `miner`, cut into chunks."""

    miner: int
    start: int
    stop: int
    chunks: tuple[tuple[int, int], ...]

    @property
    def numel(self) -> int:
        return self.stop - self.start


def split_by_weight(numel: int, weights: tuple[float, ...]) -> list[int]:
    """Sizes summing to `numel`, proportional to `weights`, by largest remainder."""
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    if not weights or any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"miner weights must be finite and >= 0, got {weights}")
    total = sum(Fraction(w) for w in weights)
    if total == 0:
        raise ValueError("at least one miner weight must be positive")
    quotas = [numel * Fraction(w) / total for w in weights]
    sizes = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda i: (sizes[i] - quotas[i], i))
    for i in by_remainder[: numel - sum(sizes)]:
        sizes[i] += 1
    return sizes


def plan_segments(numel: int, weights: tuple[float, ...], chunk_elems: int) -> tuple[Segment, ...]:
    """One segment per miner (possibly empty), covering [0, numel) in order."""
    if chunk_elems < 1:
        raise ValueError(f"chunk_elems must be >= 1, got {chunk_elems}")
    segments = []
    start = 0
    for miner, size in enumerate(split_by_weight(numel, weights)):
        stop = start + size
        chunks = tuple((a, min(a + chunk_elems, stop)) for a in range(start, stop, chunk_elems))
        segments.append(Segment(miner, start, stop, chunks))
        start = stop
    return tuple(segments)


@functools.lru_cache(maxsize=PLANS_KEPT)
def plan_round(job: JobSpec, tensor: TensorSpec) -> tuple[Segment, ...]:
    """The plan of one round: the job's miner weights and chunk size applied to a tensor (kept for the next
    rounds of the same shape)."""
    chunk_elems = max(1, job.chunk_bytes // tensor.dtype_info.itemsize)
    return plan_segments(tensor.numel, _weights_for(job.miner_weights, tensor.nbytes), chunk_elems)


def _weights_for(weights: tuple[float, ...], nbytes: int) -> tuple[float, ...]:
    """The miners' weights for a tensor of `nbytes`: those beyond one per MIN_SEGMENT_BYTES (the lowest
    weights, the later miners among equals) get none."""
    used = min(len(weights), max(1, nbytes // MIN_SEGMENT_BYTES))
    kept = set(sorted(range(len(weights)), key=lambda i: (-weights[i], i))[:used])
    return tuple(w if i in kept else 0.0 for i, w in enumerate(weights))


def failover_order(segment: int, miner_count: int) -> tuple[int, ...]:
    """The miners that may reduce `segment`, in the order peers try them: its own miner, then the
    following ones round the ring. Every peer derives the same order, so peers that see the same
    miners fail pick the same replacements."""
    return tuple((segment + k) % miner_count for k in range(miner_count))


def miner_loads(weights: tuple[float, ...], redundancy: int) -> list[float]:
    """Each miner's fraction of a tensor when every segment goes to the first `redundancy` miners
    of its failover order."""
    total = sum(weights)
    loads = [0.0] * len(weights)
    for segment, weight in enumerate(weights):
        for miner in failover_order(segment, len(weights))[:redundancy]:
            loads[miner] += weight / total
    return loads
