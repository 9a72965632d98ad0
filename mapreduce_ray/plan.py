"""Segment planning: which miner reduces which elements, in which chunks.

Cost model: a miner's time in a round is proportional to the elements it reduces
divided by its throughput (its weight), and the round ends when the slowest miner
ends. Giving miner i the contiguous share numel * w_i / sum(w) minimizes that
maximum; shares are rounded to whole elements by largest remainder, so each is
within one element of its ideal. A miner holds no more than its verified capacity:
a segment whose share would exceed it gets what fits, and the rest is split again
among the others by weight (water-filling). Each segment is cut into chunks so reduction
and download overlap with upload. Nothing overlaps a segment's first upload or its last
download, so a segment gets up to CHUNKS_PER_SEGMENT chunks (each costs that fraction of its
time), none larger than the job's chunk size, and none smaller than MIN_CHUNK_BYTES or
CHUNK_BYTES_PER_PEER per peer: each chunk travels beside signed messages that name every
peer's digest and sketch (about 140 bytes per peer), which then stay under 1% of its bytes.
Every chunk also costs each party a fixed amount of CPU (signing, checking, a message per
peer), so on a fast link a chunk is no smaller than what its miner, at the intake its last
benchmark measured, takes in from every peer in CHUNK_INTAKE_S: fast miners get fewer,
larger chunks, and a slow link still gets small ones.
The chunks at either end of a segment are smaller still: they double from that floor up to
the segment's chunk size and halve back down to it at the end, so a miner has every peer's
first chunk, and a peer its last result, after a floor's time rather than a chunk's (the
download's lag behind the upload, set at the start, is paid again at the end).
A segment also costs every party a few messages whatever its size, so a small tensor goes
to fewer miners: at most one per MIN_SEGMENT_BYTES, the highest weights first.

Every party calls these functions with the same job spec and tensor spec, so every
party derives the same plan without exchanging it.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from fractions import Fraction

from mapreduce_ray.types import JobSpec, TensorSpec

PLANS_KEPT = 256
MIN_SEGMENT_BYTES = 64 * 1024
CHUNKS_PER_SEGMENT = 128
MIN_CHUNK_BYTES = 64 * 1024
CHUNK_BYTES_PER_PEER = 16 * 1024
CHUNK_INTAKE_S = 0.02  # a chunk from every peer takes at least this long at its miner's measured intake
CAPACITY_ALIGN = 16  # bytes; every dtype's itemsize divides it, so a segment's limit holds whole elements of any


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


def split_within(numel: int, weights: tuple[float, ...], limits: tuple[int, ...]) -> list[int]:
    """Sizes summing to `numel`, none above its limit, proportional to `weights` where the limits allow: a size
    that would exceed its limit is held at it and the rest split again among the others (water-filling).
    When every weighted size is at its limit, what is left goes to the unweighted ones with room. ValueError if
    the limits sum to less than `numel`."""
    if len(limits) != len(weights) or any(limit < 0 for limit in limits):
        raise ValueError(f"need one limit >= 0 per weight, got {limits} for {len(weights)} weights")
    if sum(limits) < numel:
        raise ValueError(f"{numel} elements exceed the segments' limits, {sum(limits)} in all")
    sizes = [0] * len(weights)
    left = numel
    full: set[int] = set()
    while left:
        room = [i for i, w in enumerate(weights) if w > 0 and i not in full]
        share = weights
        if not room:  # the weighted ones are full: the rest goes by room left
            room = [i for i in range(len(weights)) if i not in full and limits[i] > 0]
            share = limits
        split = split_by_weight(left, tuple(share[i] for i in room))
        over = [i for i, size in zip(room, split, strict=True) if size > limits[i]]
        if not over:
            for i, size in zip(room, split, strict=True):
                sizes[i] = size
            break
        for i in over:
            sizes[i] = limits[i]
            left -= limits[i]
            full.add(i)
    return sizes


def plan_segments(
    numel: int,
    weights: tuple[float, ...],
    chunk_elems: int,
    limits: tuple[int, ...] | None = None,
    min_chunk_elems: int = 1,
    paced_elems: tuple[int, ...] | None = None,
) -> tuple[Segment, ...]:
    """One segment per miner (possibly empty), covering [0, numel) in order; at most `limits[i]` elements in
    segment i (None: no limit). A segment's chunks hold 1/CHUNKS_PER_SEGMENT of it, or `paced_elems[i]` if
    more (all of it, or else at most a quarter of it), within [min_chunk_elems, chunk_elems] elements, ramping
    from min_chunk_elems at both ends; a segment no longer than its chunk is one chunk."""
    if chunk_elems < 1:
        raise ValueError(f"chunk_elems must be >= 1, got {chunk_elems}")
    sizes = split_by_weight(numel, weights) if limits is None else split_within(numel, weights, limits)
    paced = paced_elems or (0,) * len(sizes)
    segments = []
    start = 0
    for miner, size in enumerate(sizes):
        stop = start + size
        least = max(min_chunk_elems, -(-size // CHUNKS_PER_SEGMENT))
        step = min(chunk_elems, max(least, paced[miner]))
        if step < size:  # cut in at least four steps, so the ramps fit
            step = min(step, max(least, size // 4))
        segments.append(Segment(miner, start, stop, _cut(start, stop, step, min_chunk_elems)))
        start = stop
    return tuple(segments)


def _cut(start: int, stop: int, step: int, smallest: int) -> tuple[tuple[int, int], ...]:
    """[start, stop) in chunks of `step` elements (one shorter before the end), except at either end: there
    they double from `smallest` up to under `step`, and halve back down to it. Each ramp takes under two
    steps, and a segment cut in steps larger than `smallest` holds at least four, so they always fit."""
    if start == stop:
        return ()
    if stop - start <= step:
        return ((start, stop),)
    ramp = []
    while (size := smallest << len(ramp)) < step:
        ramp.append(size)
    head = list(itertools.accumulate(ramp, initial=start))
    tail = list(itertools.accumulate(ramp, lambda at, size: at - size, initial=stop))[::-1]
    cuts = head + list(range(head[-1] + step, tail[0], step)) + tail
    return tuple(zip(cuts, cuts[1:], strict=False))


@functools.lru_cache(maxsize=PLANS_KEPT)
def plan_round(job: JobSpec, tensor: TensorSpec) -> tuple[Segment, ...]:
    """The plan of one round: the job's miner weights, throughputs, capacities and chunk size applied to a
    tensor (kept for the next rounds of the same shape)."""
    itemsize = tensor.dtype_info.itemsize
    chunk_elems = max(1, job.chunk_bytes // itemsize)
    min_chunk_elems = max(MIN_CHUNK_BYTES, job.peer_count * CHUNK_BYTES_PER_PEER) // itemsize
    limits = segment_limits(tuple(m.capacity for m in job.miners), job.redundancy)
    elems = None if limits is None else tuple(limit // itemsize for limit in limits)
    weights = _weights_for(job.miner_weights, tensor.nbytes)
    paced = tuple(int(m.throughput * CHUNK_INTAKE_S / job.peer_count) // itemsize for m in job.miners)
    return plan_segments(tensor.numel, weights, chunk_elems, elems, min_chunk_elems, paced)


def segment_limits(capacities: tuple[int, ...], redundancy: int) -> tuple[int, ...] | None:
    """Bytes of a tensor each segment may take when miner i holds at most `capacities[i]` bytes and each
    segment goes to the first `redundancy` miners of its failover order: the least capacity among them, split
    `redundancy` ways (so no miner holds more than its capacity), rounded down to CAPACITY_ALIGN. None when a
    capacity is 0 (not told)."""
    if not all(capacities):
        return None
    n = len(capacities)
    return tuple(
        min(capacities[m] for m in failover_order(s, n)[:redundancy]) // redundancy // CAPACITY_ALIGN * CAPACITY_ALIGN
        for s in range(n)
    )


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
