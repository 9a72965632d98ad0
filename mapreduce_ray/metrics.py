"""Prometheus metrics of peers, miners and the validator (ray.util.metrics), and the bandwidth arithmetic.

Ray exports them on the metrics endpoint of the node where the recording process runs,
prefixed `ray_` (counters also get `_total`), e.g. `ray_mapreduce_miner_bytes_in_total{miner="miner-1"}`.
Each metric object is created on its first record in a process, so importing this module needs no Ray.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import ray
from ray.util import metrics

from mapreduce_ray.messages import Outcome
from mapreduce_ray.naming import miner_name
from mapreduce_ray.types import RoundKind, RoundSpec

ROUND_TAGS = ("job", "collective", "rank")
MINER_TAGS = ("netuid", "miner")
LATENCY_BOUNDARIES_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def algbw(nbytes: int, seconds: float) -> float:
    """Algorithm bandwidth: the tensor's bytes over the round's time, bytes/s."""
    return nbytes / seconds


def busbw(algbw_: float, kind: RoundKind, peers: int) -> float:
    """Bus bandwidth, NCCL's definition: algbw·2(n-1)/n for an all_reduce of n peers, algbw for a broadcast."""
    return algbw_ * 2 * (peers - 1) / peers if kind is RoundKind.ALL_REDUCE else algbw_


def relay_efficiency(nbytes: int, seconds: float, peers: int, miner_throughputs: Sequence[float]) -> float | None:
    """η = bound / round time, bound = peers·nbytes / Σ miner throughput (bytes/s): how long the job's miners,
    at their measured throughput, need to take in every peer's tensor. Peers' link speeds are unknown here,
    so the bound has only the miners' term. None when a miner's throughput is unknown (0)."""
    if not miner_throughputs or min(miner_throughputs) <= 0:
        return None
    return peers * nbytes / sum(miner_throughputs) / seconds


@dataclass(frozen=True)
class _Metric:
    """A named metric; `get()` is its ray.util.metrics object in this process, made on first use.
    Names, descriptions and tags must be ASCII (Ray encodes them so)."""

    kind: type
    name: str
    description: str
    tag_keys: tuple[str, ...]

    def get(self):
        return _instance(self)


@functools.cache
def _instance(metric: _Metric):
    options = {"boundaries": list(LATENCY_BOUNDARIES_S)} if metric.kind is metrics.Histogram else {}
    return metric.kind(metric.name, description=metric.description, tag_keys=metric.tag_keys, **options)


ROUND_SECONDS = _Metric(metrics.Histogram, "mapreduce_round_seconds", "A collective round at a peer, s", ROUND_TAGS)
ALGBW = _Metric(metrics.Gauge, "mapreduce_algbw_bytes_per_second", "Tensor bytes / round time", ROUND_TAGS)
BUSBW = _Metric(metrics.Gauge, "mapreduce_busbw_bytes_per_second", "algbw*2(n-1)/n for all_reduce", ROUND_TAGS)
RELAY_EFFICIENCY = _Metric(
    metrics.Gauge, "mapreduce_relay_efficiency", "Round time the miners' throughput allows / round time", ROUND_TAGS
)
MINER_BYTES_IN = _Metric(metrics.Counter, "mapreduce_miner_bytes_in", "Contribution bytes received", MINER_TAGS)
MINER_BYTES_OUT = _Metric(metrics.Counter, "mapreduce_miner_bytes_out", "Result bytes shipped to peers", MINER_TAGS)
MINER_ROUNDS = _Metric(metrics.Counter, "mapreduce_miner_rounds", "Segments of rounds reduced", MINER_TAGS)
MINER_ROUND_SECONDS = _Metric(
    metrics.Histogram, "mapreduce_miner_round_seconds", "First contribution to last result shipped, s", MINER_TAGS
)
CHECKS = _Metric(metrics.Counter, "mapreduce_checks", "Miner results the validator checked", MINER_TAGS)
CHECK_FAILURES = _Metric(metrics.Counter, "mapreduce_check_failures", "Checks a miner failed", MINER_TAGS)
BENCHMARKS = _Metric(
    metrics.Counter, "mapreduce_benchmarks", "Benchmarks of a miner, by outcome", (*MINER_TAGS, "outcome")
)
MINER_SCORE = _Metric(metrics.Gauge, "mapreduce_miner_score", "A miner's score at the validator", MINER_TAGS)
REFUSALS = _Metric(
    metrics.Counter, "mapreduce_refusals", "Calls an endpoint refused, by error", ("netuid", "endpoint", "error")
)
VALIDATOR_CALLS = _Metric(
    metrics.Counter, "mapreduce_validator_calls", "Authenticated calls into the validator", ("netuid", "call")
)
MINER_WEIGHT = _Metric(metrics.Gauge, "mapreduce_miner_weight", "A miner's share of the validator weights", MINER_TAGS)


def _miner_tags(netuid: int, uid: int) -> dict[str, str]:
    return {"netuid": str(netuid), "miner": miner_name(uid)}


def _add(counter: _Metric, value: int, tags: dict[str, str]) -> None:
    """Counters take only positive increments (an empty segment moves no bytes)."""
    if value > 0:
        counter.get().inc(value, tags)


def record_round(round_: RoundSpec, rank: int, nbytes: int, seconds: float) -> None:
    """A collective round that peer `rank` finished: its latency, algbw, busbw and η (in a Ray worker or
    driver; a peer outside Ray records nothing)."""
    if not ray.is_initialized():
        return
    tags = {"job": round_.job.name, "collective": round_.kind.value, "rank": str(rank)}
    ROUND_SECONDS.get().observe(seconds, tags)
    bandwidth = algbw(nbytes, seconds)
    ALGBW.get().set(bandwidth, tags)
    BUSBW.get().set(busbw(bandwidth, round_.kind, round_.job.peer_count), tags)
    eta = relay_efficiency(nbytes, seconds, round_.job.peer_count, [m.throughput for m in round_.job.miners])
    if eta is not None:
        RELAY_EFFICIENCY.get().set(eta, tags)


def record_miner_round(netuid: int, uid: int, bytes_in: int, bytes_out: int, seconds: float) -> None:
    """A segment miner `uid` of subnet `netuid` reduced: contribution bytes in, result bytes out, latency."""
    tags = _miner_tags(netuid, uid)
    _add(MINER_BYTES_IN, bytes_in, tags)
    _add(MINER_BYTES_OUT, bytes_out, tags)
    MINER_ROUNDS.get().inc(1, tags)
    MINER_ROUND_SECONDS.get().observe(seconds, tags)


def record_check(netuid: int, uid: int, ok: bool) -> None:
    """The validator checked a result of miner `uid`."""
    tags = _miner_tags(netuid, uid)
    CHECKS.get().inc(1, tags)
    if not ok:
        CHECK_FAILURES.get().inc(1, tags)


def record_benchmark(netuid: int, uid: int, outcome: Outcome) -> None:
    """The validator collected a benchmark of miner `uid`."""
    BENCHMARKS.get().inc(1, {**_miner_tags(netuid, uid), "outcome": outcome.value})


def record_scores(netuid: int, scores: Mapping[int, float], weights: Mapping[int, float]) -> None:
    """The validator's scores by uid, and each scored miner's share of its last weights (0 without weight)."""
    total = sum(weights.values()) or 1.0
    for uid, score in scores.items():
        tags = _miner_tags(netuid, uid)
        MINER_SCORE.get().set(score, tags)
        MINER_WEIGHT.get().set(weights.get(uid, 0.0) / total, tags)


def record_validator_call(netuid: int, call: str) -> None:
    """An authenticated call into the validator of subnet `netuid`, by name (join, report, ...)."""
    VALIDATOR_CALLS.get().inc(1, {"netuid": str(netuid), "call": call})


def record_refusal(netuid: int, endpoint: str, error: str) -> None:
    """A call endpoint `endpoint` (miner-N, validator-N) of subnet `netuid` refused, by the error's class name."""
    REFUSALS.get().inc(1, {"netuid": str(netuid), "endpoint": endpoint, "error": error})
