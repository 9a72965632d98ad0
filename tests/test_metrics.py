"""Metrics: the bandwidth arithmetic, and the custom metrics on the node's Prometheus endpoint after a round."""

import re
import sys
import time
import urllib.request
import uuid
from collections import defaultdict

import pytest
import ray
import ray.cloudpickle
import torch

from actors import PeerActor
from mapreduce_ray.metrics import algbw, busbw, relay_efficiency
from mapreduce_ray.types import RoundKind

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # peers run this module's functions

MIB = 1024 * 1024
PEERS = 3
SCRAPE_TIMEOUT_S = 90  # Ray reports metrics every 10 s
SAMPLE = re.compile(r"^(\w+)\{(.*)\} (\S+)$")
LABEL = re.compile(r'(\w+)="([^"]*)"')


def test_bandwidths_and_relay_efficiency():
    assert algbw(8_000_000, 2.0) == 4_000_000
    assert busbw(3.0, RoundKind.ALL_REDUCE, 4) == 3.0 * 2 * 3 / 4
    assert busbw(3.0, RoundKind.BROADCAST, 4) == 3.0
    assert busbw(3.0, RoundKind.ALL_REDUCE, 1) == 0.0  # one peer moves nothing
    # 100 bytes over miners measured at 30 + 20 bytes/s: 2 s predicted; a 4 s round is at half of that
    assert relay_efficiency(100, 4.0, [30.0, 20.0]) == 0.5
    assert relay_efficiency(100, 4.0, [30.0, 0.0]) is None  # a miner whose throughput is unknown
    assert relay_efficiency(100, 4.0, []) is None


def scrape() -> dict[str, list[tuple[dict, float]]]:
    """Every sample on this node's metrics endpoint: {name: [(labels, value)]}."""
    node = ray.nodes()[0]
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples = defaultdict(list)
    for line in text.splitlines():
        if match := SAMPLE.match(line):
            name, labels, value = match.groups()
            samples[name].append((dict(LABEL.findall(labels)), float(value)))
    return samples


def scrape_until(ready, what: str) -> dict:
    deadline = time.monotonic() + SCRAPE_TIMEOUT_S
    while True:
        samples = scrape()
        if ready(samples):
            return samples
        if time.monotonic() > deadline:
            present = sorted(name for name in samples if name.startswith("ray_mapreduce"))
            raise AssertionError(
                f"{what} did not appear on the metrics endpoint within {SCRAPE_TIMEOUT_S} s: {present}"
            )
        time.sleep(0.5)


def of_job(samples: dict, name: str, job: str) -> list[tuple[dict, float]]:
    return [(labels, v) for labels, v in samples.get(name, []) if labels.get("job") == job]


def subnet_miners(samples: dict, name: str, netuid: str) -> set[str]:
    return {labels["miner"] for labels, _ in samples.get(name, []) if labels["netuid"] == netuid}


def all_reduce_1_mib(peer):
    peer.init_process_group()
    tensor = torch.full((MIB // 4,), float(peer.rank))
    peer.all_reduce(tensor)
    peer.destroy_process_group()
    return tensor[0].item()


def test_a_round_shows_up_in_the_custom_metrics(subnets):
    subnet, job = subnets[2], f"metrics-{uuid.uuid4().hex[:8]}"
    netuid = str(subnet.chain.netuid)
    actor = ray.remote(num_cpus=0)(PeerActor)
    peers = [actor.remote(rank, PEERS, job=job, **subnet.peer_options) for rank in range(1, PEERS + 1)]
    try:
        assert ray.get([p.run.remote(all_reduce_1_mib) for p in peers], timeout=60) == [2.0] * PEERS
        ray.get(subnet.validator.epoch.remote(), timeout=30)  # scores and weights now
        miners = {s["name"] for s in ray.get([m.status.remote() for m in subnet.miners], timeout=30)}
        samples = scrape_until(  # the peers stay up meanwhile: the validator's checks read their chunks
            lambda s: (
                len(of_job(s, "ray_mapreduce_round_seconds_count", job)) == PEERS
                and {labels["miner"] for labels, _ in s.get("ray_mapreduce_miner_score", [])} >= miners
                and {labels["miner"] for labels, _ in s.get("ray_mapreduce_checks_total", [])} >= miners
            ),
            f"job {job}'s round and the validator's checks and scores",
        )
    finally:
        for p in peers:
            ray.kill(p)
    # each peer process: one all_reduce round, its busbw = algbw * 2(n-1)/n, and eta
    assert [v for _, v in of_job(samples, "ray_mapreduce_round_seconds_count", job)] == [1.0] * PEERS
    algbws = {labels["WorkerId"]: v for labels, v in of_job(samples, "ray_mapreduce_algbw_bytes_per_second", job)}
    busbws = {labels["WorkerId"]: v for labels, v in of_job(samples, "ray_mapreduce_busbw_bytes_per_second", job)}
    assert len(algbws) == PEERS and all(v > 0 for v in algbws.values())
    assert busbws == pytest.approx({w: v * 2 * (PEERS - 1) / PEERS for w, v in algbws.items()})
    assert all(v > 0 for _, v in of_job(samples, "ray_mapreduce_relay_efficiency", job))
    assert len(of_job(samples, "ray_mapreduce_relay_efficiency", job)) == PEERS

    def total(name):
        return sum(v for labels, v in samples.get(name, []) if labels["netuid"] == netuid and labels["miner"] in miners)

    assert total("ray_mapreduce_miner_bytes_in_total") >= PEERS * MIB  # every peer's tensor went in
    assert total("ray_mapreduce_miner_bytes_out_total") >= PEERS * MIB  # and came back to every peer
    assert total("ray_mapreduce_miner_rounds_total") >= 2  # a segment at each miner
    assert total("ray_mapreduce_miner_round_seconds_count") >= 2
    assert total("ray_mapreduce_checks_total") >= 2  # the test validator checks every round
    assert total("ray_mapreduce_check_failures_total") == 0
    assert all(
        v > 0
        for labels, v in samples["ray_mapreduce_miner_score"]
        if labels["netuid"] == netuid and labels["miner"] in miners
    )
    weights = [
        v
        for labels, v in samples.get("ray_mapreduce_miner_weight", [])
        if labels["netuid"] == netuid and labels["miner"] in miners
    ]
    assert weights and all(0 < v <= 1 for v in weights)
