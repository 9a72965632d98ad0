"""Which miners serve a job, and with what share of every tensor.

Cost model: a round takes at least max(D/B_peer, n·D/ΣB_miner), so a job gets as
many miners as it may (`max_miners`), best score first; a round ends when the
slowest miner has moved its segment, so segments are sized in proportion to
measured throughput (then every miner finishes at once). A miner may take no
larger a segment than its verified capacity (the largest benchmark it passed).
A request that cannot be met gets the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mapreduce_ray.errors import JobError


@dataclass(frozen=True)
class Candidate:
    """An available (not busy, not banned) miner and what was measured about it."""

    uid: int
    throughput: float  # bytes/s of exact benchmark rounds
    capacity: int  # bytes: the largest benchmark that passed
    score: float


def choose_miners(candidates: Sequence[Candidate], tensor_bytes: int, max_miners: int) -> dict[int, float]:
    """{uid: share of every tensor} for a job whose largest tensor is `tensor_bytes`; JobError if impossible."""
    if max_miners < 1:
        raise JobError(f"a job needs at least one miner; max_miners is {max_miners}")
    usable = sorted((c for c in candidates if c.throughput > 0 and c.capacity > 0), key=lambda c: (-c.score, c.uid))
    if not usable:
        raise JobError(
            "no miner is available with a passed benchmark; wait for the validator's benchmarks, or start a miner"
        )
    chosen = usable[:max_miners]
    total = sum(c.throughput for c in chosen)
    short = [c.uid for c in chosen if tensor_bytes * c.throughput / total > c.capacity]
    if short:
        raise JobError(
            f"a {tensor_bytes} byte tensor needs more than miner(s) {short} can hold (verified capacity "
            f"{sum(c.capacity for c in chosen)} bytes over {len(chosen)} miners); pass a smaller bandwidth "
            "to Peer(...) or wait for more miners"
        )
    return {c.uid: c.throughput / total for c in chosen}
