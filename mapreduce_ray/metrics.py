"""Prometheus metrics of peers, miners and the validator (ray.util.metrics), and the bandwidth arithmetic.

Ray exports them on the metrics endpoint of the node where the recording process runs,
prefixed `ray_` (counters also get `_total`), e.g. `ray_mapreduce_miner_bytes_in_total{miner="miner-1"}`.

- algbw = tensor bytes / round time; busbw = algbw * 2(n-1)/n for all_reduce (NCCL's
  definition), = algbw for broadcast.
- eta (relay efficiency) = (D / sum of the job's miners' measured throughput) / round time:
  the time the miners' benchmarks predict for a D-byte tensor over the time the round took.
  Peers' own link speeds are not known to the library, so the bound has only the miners' term.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from ray.util import metrics

from mapreduce_ray.types import RoundKind, RoundSpec

MINER_TAGS = ("netuid", "miner")
LATENCY_BOUNDARIES_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def algbw(nbytes: int, seconds: float) -> float:
    """Algorithm bandwidth, bytes per second."""
    return nbytes / seconds


def busbw(algbw_: float, kind: RoundKind, peers: int) -> float:
    """Bus bandwidth, NCCL's definition: what each peer's link would carry in a ring."""
    return algbw_ * 2 * (peers - 1) / peers if kind is RoundKind.ALL_REDUCE else algbw_


def relay_efficiency(nbytes: int, seconds: float, miner_throughputs: Sequence[float]) -> float | None:
    """eta: the round time the miners' measured throughputs predict over the round's time; None when a
    miner's throughput is unknown."""
    if not miner_throughputs or min(miner_throughputs) <= 0:
        return None
    return nbytes / sum(miner_throughputs) / seconds


@functools.cache
def _metric(kind: type, name: str, description: str, tag_keys: tuple[str, ...]):
    """One metric object per name and process, created on first use (Ray must be connected by then)."""
    return kind(name, description=description, tag_keys=tag_keys)


@functools.cache
def _latency(name: str, description: str, tag_keys: tuple[str, ...]) -> metrics.Histogram:
    return metrics.Histogram(name, description, boundaries=list(LATENCY_BOUNDARIES_S), tag_keys=tag_keys)


def record_round(round_: RoundSpec, nbytes: int, seconds: float) -> None:
    """A collective round this peer finished: its latency, algbw, busbw and eta, tagged by job and collective."""
    tags = {"job": round_.job.name, "collective": round_.kind.value}
    keys = tuple(tags)
    _latency("mapreduce_round_seconds", "Time of a collective round at a peer", keys).observe(seconds, tags)
    bandwidth = algbw(nbytes, seconds)
    _metric(metrics.Gauge, "mapreduce_algbw_bytes_per_second", "Tensor bytes / round time", keys).set(bandwidth, tags)
    bus = busbw(bandwidth, round_.kind, round_.job.peer_count)
    _metric(metrics.Gauge, "mapreduce_busbw_bytes_per_second", "algbw * 2(n-1)/n (all_reduce)", keys).set(bus, tags)
    eta = relay_efficiency(nbytes, seconds, [m.throughput for m in round_.job.miners])
    if eta is not None:
        _metric(metrics.Gauge, "mapreduce_relay_efficiency", "Round time the miners predict / round time", keys).set(
            eta, tags
        )


def record_miner_round(netuid: int, miner: str, bytes_in: int, bytes_out: int, seconds: float) -> None:
    """A segment a miner of subnet `netuid` reduced: contribution bytes in, result bytes out (to every peer),
    and its latency."""
    tags = {"netuid": str(netuid), "miner": miner}
    keys = MINER_TAGS
    _metric(metrics.Counter, "mapreduce_miner_bytes_in", "Contribution bytes a miner received", keys).inc(
        bytes_in, tags
    )
    _metric(metrics.Counter, "mapreduce_miner_bytes_out", "Result bytes a miner handed to peers", keys).inc(
        bytes_out, tags
    )
    _metric(metrics.Counter, "mapreduce_miner_rounds", "Segments a miner reduced", keys).inc(1, tags)
    _latency("mapreduce_miner_round_seconds", "First contribution to last result, at a miner", keys).observe(
        seconds, tags
    )


def record_check(netuid: int, miner: str, ok: bool) -> None:
    """A validator's check of a result of a miner of subnet `netuid`."""
    tags = {"netuid": str(netuid), "miner": miner}
    _metric(metrics.Counter, "mapreduce_checks", "Results the validator checked", MINER_TAGS).inc(1, tags)
    if not ok:
        _metric(metrics.Counter, "mapreduce_check_failures", "Checks a miner failed", MINER_TAGS).inc(1, tags)


def record_scores(netuid: int, scores: dict[str, float], weights: dict[str, float]) -> None:
    """A validator's scores of subnet `netuid`'s miners, and each one's share of its last weights, by miner name."""
    score = _metric(metrics.Gauge, "mapreduce_miner_score", "A miner's score at the validator", MINER_TAGS)
    for miner, value in scores.items():
        score.set(value, {"netuid": str(netuid), "miner": miner})
    weight = _metric(metrics.Gauge, "mapreduce_miner_weight", "A miner's share of the validator's weights", MINER_TAGS)
    for miner, value in weights.items():
        weight.set(value, {"netuid": str(netuid), "miner": miner})
