"""Which miners serve a job, and with what share of every tensor.

Cost model: a round takes at least max(D/B_peer, n·D/ΣB_miner), so a job gets as
many miners as it may (`max_miners`), best score first; a round ends when the
slowest miner has moved its segment, so segments are sized in proportion to
measured throughput (then every miner finishes at once). With redundancy r each
segment also goes to the next r-1 miners, and a miner may hold no more of a
tensor than its verified capacity (the largest benchmark it passed).
A request that cannot be met gets the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mapreduce_ray.errors import JobError
from mapreduce_ray.plan import miner_loads


@dataclass(frozen=True)
class Candidate:
    """An available (not busy, not banned) miner and what was measured about it."""

    uid: int
    throughput: float  # bytes/s of exact benchmark rounds
    capacity: int  # bytes: the largest benchmark that passed
    score: float


def choose_miners(
    candidates: Sequence[Candidate], tensor_bytes: int, max_miners: int, redundancy: int = 1
) -> dict[int, float]:
    """{uid: share of every tensor} for a job whose largest tensor is `tensor_bytes`, each segment reduced
    by `redundancy` miners; JobError if impossible."""
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
    total = sum(c.throughput for c in chosen)
    loads = miner_loads(tuple(c.throughput / total for c in chosen), redundancy)
    short = [c.uid for c, load in zip(chosen, loads, strict=True) if tensor_bytes * load > c.capacity]
    if short:
        raise JobError(
            f"a {tensor_bytes} byte tensor needs more than miner(s) {short} can hold (verified capacity "
            f"{sum(c.capacity for c in chosen)} bytes over {len(chosen)} miners); pass a smaller bandwidth "
            "to Peer(...) or wait for more miners"
        )
    return {c.uid: c.throughput / total for c in chosen}
