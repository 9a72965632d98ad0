"""Which miners serve a job, with what share of every tensor, and what capacity it still needs proven.

Cost model: a round takes at least max(D/B_peer, n·D/ΣB_miner), so a job gets as
many miners as it may (`max_miners`), best score first; a round ends when the
slowest miner has moved its segment, so segments are sized in proportion to
measured throughput (then every miner finishes at once). A miner may hold no more of
a tensor than its verified capacity (the largest benchmark it passed): the plan
water-fills segments within the capacities (mapreduce_ray.plan), so a job takes any
tensor up to the sum of its segments' limits. With redundancy r each segment also
goes to the next r-1 miners. A request that cannot be met gets the reason.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from mapreduce_ray.errors import JobError
from mapreduce_ray.plan import CAPACITY_ALIGN, failover_order, segment_limits


@dataclass(frozen=True)
class Candidate:
    """An available (not busy, not banned) miner and what was measured about it."""

    uid: int
    throughput: float  # bytes/s of exact benchmark rounds
    capacity: int  # bytes: the largest benchmark that passed
    score: float


def choose_miners(candidates: Sequence[Candidate], max_miners: int, redundancy: int = 1) -> list[Candidate]:
    """The miners of a job whose every segment is reduced by `redundancy` miners, best score first (the order of
    the job's segments); JobError if there are too few."""
    if max_miners < 1:
        raise JobError(f"a job needs at least one miner; max_miners is {max_miners}")
    usable = sorted((c for c in candidates if c.throughput > 0 and c.capacity > 0), key=lambda c: (-c.score, c.uid))
    if not usable:
        raise JobError(
            "no miner is available with a passed benchmark; wait for the validator's benchmarks, or start a miner"
        )
    chosen = usable[:max_miners]
    if len(chosen) < redundancy:
        raise JobError(
            f"redundancy {redundancy} needs {redundancy} miners but {len(chosen)} are available; "
            "pass a smaller redundancy to Peer(...) or wait for more miners"
        )
    return chosen


def shares(chosen: Sequence[Candidate]) -> dict[int, float]:
    """{uid: share of every tensor} by measured throughput, before capacities cap it."""
    total = sum(c.throughput for c in chosen)
    return {c.uid: c.throughput / total for c in chosen}


def job_capacity(chosen: Sequence[Candidate], redundancy: int) -> int:
    """The largest tensor, in bytes, these miners can take together (in this order)."""
    return sum(segment_limits(tuple(c.capacity for c in chosen), redundancy))


def capacity_wanted(chosen: Sequence[Candidate], tensor_bytes: int, redundancy: int) -> dict[int, int]:
    """{uid: bytes} of the miners whose capacity is below what their throughput share of a `tensor_bytes` tensor
    needs (with redundancy, of the largest segment they hold), rounded up as segment limits are."""
    weights = shares(chosen)
    portions = [math.ceil(tensor_bytes * weights[c.uid] / CAPACITY_ALIGN) + 1 for c in chosen]
    n = len(chosen)
    wanted = {}
    for m, miner in enumerate(chosen):
        held = [s for s in range(n) if m in failover_order(s, n)[:redundancy]]
        need = redundancy * CAPACITY_ALIGN * max(portions[s] for s in held)
        if need > miner.capacity:
            wanted[miner.uid] = need
    return wanted


def require_fit(chosen: Sequence[Candidate], tensor_bytes: int, redundancy: int, why: str = "") -> None:
    """JobError naming the fix unless a `tensor_bytes` tensor fits the miners' capacities."""
    capacity = job_capacity(chosen, redundancy)
    if tensor_bytes > capacity:
        raise JobError(
            f"a {tensor_bytes} byte tensor exceeds the verified capacity of the {len(chosen)} available miner(s), "
            f"{capacity} bytes in all{why}; pass a smaller bandwidth to Peer(...), or wait for more miners"
        )
