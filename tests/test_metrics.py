"""Metrics: the bandwidth arithmetic, the miners' throughput in job specs, and the custom metrics on the node's
Prometheus endpoint after a round."""

import dataclasses
import json
import re
import time
import urllib.request
import uuid
from collections import defaultdict

import pytest
import ray
import torch
from bittensor.sp_core import Keypair

from mapreduce_ray.errors import NotRegisteredError
from mapreduce_ray.messages import JobAdmission, decode
from mapreduce_ray.metrics import algbw, busbw, relay_efficiency
from mapreduce_ray.protocol import canonical
from mapreduce_ray.types import JobSpec, MinerSlot, RoundKind
from mapreduce_ray.wire.config import WireConfig
from mapreduce_ray.wire.endpoint import Remote

MIB = 1024 * 1024
PEERS = 3  # busbw = algbw * 4/3 (with 2 peers the factor would be 1)
SCRAPE_TIMEOUT_S = 90  # Ray reports metrics every 10 s
SAMPLE = re.compile(r"^(\w+)\{(.*)\} (\S+)$")
LABEL = re.compile(r'(\w+)="([^"]*)"')


def test_bandwidths_and_relay_efficiency():
    assert algbw(8_000_000, 2.0) == 4_000_000
    assert busbw(3.0, RoundKind.ALL_REDUCE, 4) == 4.5  # 3 * 2 * 3 / 4
    assert busbw(3.0, RoundKind.ALL_REDUCE, 1) == 0.0  # one peer moves nothing
    assert busbw(3.0, RoundKind.BROADCAST, 4) == 3.0
    # 2 peers' 100 bytes into miners measured at 30 + 20 bytes/s: 4 s at best; a 4 s round is at the bound
    assert relay_efficiency(100, 4.0, 2, [30.0, 20.0]) == 1.0
    assert relay_efficiency(100, 8.0, 2, [30.0, 20.0]) == 0.5
    assert relay_efficiency(100, 4.0, 2, [30.0, 0.0]) is None  # a miner whose throughput is unknown
    assert relay_efficiency(100, 4.0, 2, []) is None


def test_a_job_spec_carries_the_miners_throughput_through_the_message_codec():
    miners = (MinerSlot(1, "5Fminer1", "10.0.0.1:8091", 0.75, 1.5e8), MinerSlot(2, "5Fminer2", "[::1]:9", 0.25, 5e7))
    spec = JobSpec("0123456789ab", "default", 2, miners, 1024, 30.0, MIB)
    admission = JobAdmission(spec, 1, "5Fpeer")
    wire_body = json.loads(canonical(dataclasses.asdict(admission)))  # what seal_body signs and open_body parses
    assert decode(JobAdmission, wire_body, "JobAdmission") == admission


def scrape() -> dict[str, list[tuple[dict, float]]]:
    """Every sample on this node's metrics endpoint: {name: [(labels, value)]}."""
    here = ray.get_runtime_context().get_node_id()
    node = next(n for n in ray.nodes() if n["NodeID"] == here)
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
            raise AssertionError(f"{what} did not show on the metrics endpoint within {SCRAPE_TIMEOUT_S} s: {present}")
        time.sleep(0.5)


def by_rank(samples: dict, name: str, job: str) -> dict[str, float]:
    return {labels["rank"]: v for labels, v in samples.get(name, []) if labels.get("job") == job}


def by_miner(samples: dict, name: str, netuid: str) -> dict[str, float]:
    """{miner: value} of a miner-tagged metric on subnet `netuid` (counters summed over other labels)."""
    values = defaultdict(float)
    for labels, v in samples.get(name, []):
        if labels.get("netuid") == netuid:
            values[labels["miner"]] += v
    return dict(values)


def test_calls_into_the_validator_and_refusals_at_a_miner_show_up_by_name_and_error(subnets, run_peers):
    subnet = subnets[2]
    netuid = str(subnet.chain.netuid)
    status = ray.get(subnet.miners[0].status.remote(), timeout=30)
    stranger = Remote(
        "the miner",
        status["endpoint"],
        status["hotkey"],
        Keypair.create_from_uri("//metrics-stranger"),
        WireConfig(),
        netuid=subnet.chain.netuid,
    )
    with pytest.raises(NotRegisteredError):
        stranger.locations("reducers", b"reducers")
    stranger.close()
    run_peers(subnet, 2, lambda peer: peer.all_reduce(torch.ones(16)))

    def counted(samples, name, **tags):
        return sum(v for labels, v in samples.get(name, []) if all(labels.get(k) == t for k, t in tags.items()))

    scrape_until(
        lambda s: (
            counted(
                s, "ray_mapreduce_refusals_total", netuid=netuid, endpoint=status["name"], error="NotRegisteredError"
            )
            >= 1
            and counted(s, "ray_mapreduce_validator_calls_total", netuid=netuid, call="join") >= 2
            and counted(s, "ray_mapreduce_validator_calls_total", netuid=netuid, call="report") >= 2
        ),
        "a refused call at the miner and the peers' calls into the validator",
    )


def all_reduce_1_mib(peer):
    tensor = torch.full((MIB // 4,), float(peer.rank))
    peer.all_reduce(tensor)
    return tensor[0].item(), peer.spec


def test_a_round_shows_up_on_the_nodes_metrics_endpoint(subnets, run_peers):
    subnet, job = subnets[2], f"metrics-{uuid.uuid4().hex[:8]}"
    netuid = str(subnet.chain.netuid)
    before = scrape()
    results = run_peers(subnet, PEERS, all_reduce_1_mib, job=job)  # peer threads: the test process records
    assert [value for value, _ in results] == [2.0] * PEERS  # the average of ranks 1, 2 and 3
    spec = results[0][1]
    miners = {m.name for m in spec.miners}
    ray.get(subnet.validator.epoch.remote(), timeout=30)  # scores and weights now

    def added(samples, name):
        now, then = by_miner(samples, name, netuid), by_miner(before, name, netuid)
        return sum(now.get(m, 0.0) - then.get(m, 0.0) for m in miners)

    samples = scrape_until(
        lambda s: (
            len(by_rank(s, "ray_mapreduce_round_seconds_count", job)) == PEERS
            and added(s, "ray_mapreduce_miner_bytes_in_total") >= PEERS * MIB
            and added(s, "ray_mapreduce_checks_total") >= len(miners)  # the test validator checks every round
            and by_miner(s, "ray_mapreduce_miner_weight", netuid).keys() >= miners
        ),
        f"job {job}'s round, its miners' bytes and the validator's checks and weights",
    )
    # each peer: one all_reduce round, busbw = algbw * 2(n-1)/n, eta = n * D / sum(throughput) / t
    assert by_rank(samples, "ray_mapreduce_round_seconds_count", job) == {str(r): 1.0 for r in range(1, PEERS + 1)}
    algbws = by_rank(samples, "ray_mapreduce_algbw_bytes_per_second", job)
    assert len(algbws) == PEERS and all(v > 0 for v in algbws.values())
    busbws = by_rank(samples, "ray_mapreduce_busbw_bytes_per_second", job)
    assert busbws == pytest.approx({r: v * 2 * (PEERS - 1) / PEERS for r, v in algbws.items()}, rel=1e-6)
    throughput = sum(m.throughput for m in spec.miners)
    assert throughput > 0  # the validator told the peers what the miners' benchmarks measured
    etas = by_rank(samples, "ray_mapreduce_relay_efficiency", job)
    assert etas == pytest.approx({r: v * PEERS / throughput for r, v in algbws.items()}, rel=1e-6)
    # the miners took in every peer's tensor and shipped the result to every peer, one segment each
    assert added(samples, "ray_mapreduce_miner_bytes_out_total") >= PEERS * MIB
    assert added(samples, "ray_mapreduce_miner_rounds_total") >= len(miners)
    assert added(samples, "ray_mapreduce_miner_round_seconds_count") >= len(miners)
    assert added(samples, "ray_mapreduce_check_failures_total") == 0
    # the validator: its benchmarks at the start, then scores and each miner's share of the weights
    exact = [labels for labels, _ in samples.get("ray_mapreduce_benchmarks_total", []) if labels["outcome"] == "exact"]
    assert {labels["miner"] for labels in exact if labels["netuid"] == netuid} >= miners
    assert all(v > 0 for m, v in by_miner(samples, "ray_mapreduce_miner_score", netuid).items() if m in miners)
    weights = by_miner(samples, "ray_mapreduce_miner_weight", netuid)
    assert all(0 < weights[m] <= 1 for m in miners) and sum(weights.values()) == pytest.approx(1.0)
