"""One local Ray per test session, three local subnets (1, 2 and 3 miners) on it,
and helpers that run P peers as threads of the test process.

The subnets share one embedded chain in a temporary state dir (netuids 101..103);
MAPREDUCE_STATE_DIR points every process there, Ray's workers included.

Tests marked `cluster` run last: they shut the local Ray down and bring up a
multi-node ray.cluster_utils.Cluster of their own.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor

STATE_DIR = tempfile.mkdtemp(prefix="mapreduce-tests-")
os.environ["MAPREDUCE_STATE_DIR"] = STATE_DIR
os.environ.setdefault("BTCLI_TOKEN_SYMBOLS_CACHE", os.path.join(STATE_DIR, "btcli_token_symbols.json"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402
import ray  # noqa: E402

from actors import LocalSubnet, init_local_ray, start_local_subnet  # noqa: E402
from actors.subnet import READY_TIMEOUT_S  # noqa: E402
from mapreduce_ray import Peer  # noqa: E402
from mapreduce_ray.chain import ChainConfig  # noqa: E402

CHUNK_MIB = 0.25  # small chunks, so a 1 MiB tensor travels in several pieces
TIMEOUT_S = 30.0
# Benchmarks once, at the start; every round the tests run is checked, so an honest miner that
# failed a check would show up as a banned miner and failing tests.
VALIDATOR = {"benchmark": {"size_mib": 8, "interval_s": 3600}, "verify": {"fraction": 1.0, "samples": 16}}


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.get_closest_marker("cluster") is not None)


@pytest.fixture(scope="session")
def local_ray():
    init_local_ray(object_store_mib=512, num_cpus=2)
    yield
    ray.shutdown()
    shutil.rmtree(STATE_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def subnets(local_ray):
    """Local subnets by miner count, each in its own namespace."""
    started = {
        m: start_local_subnet(
            m,
            chunk_mib=CHUNK_MIB,
            timeout_s=TIMEOUT_S,
            namespace=f"tests-{m}-miners",
            chain=ChainConfig(netuid=100 + m),
            validator=VALIDATOR,
            wait=False,
        )
        for m in (1, 2, 3)
    }
    for subnet in started.values():  # their benchmarks run side by side
        subnet.wait_benchmarked(READY_TIMEOUT_S)
    yield started
    if ray.is_initialized():  # cluster tests, when they ran, already shut this Ray down
        for subnet in started.values():
            subnet.shutdown()


@pytest.fixture
def run_peers():
    """run_peers(subnet, peer_count, fn, **peer_kwargs): fn(peer) on peers 1..peer_count of a new job on
    `subnet`, each in its own thread; returns the results in rank order."""
    return _run_peers


def _run_peers(subnet: LocalSubnet, peer_count: int, fn, **peer_kwargs) -> list:
    job = uuid.uuid4().hex
    options = {**subnet.peer_options, "job": job, **peer_kwargs}
    peers = [Peer(r, peer_count, **options) for r in range(1, peer_count + 1)]
    for peer in peers:
        peer.init_process_group()
    try:
        with ThreadPoolExecutor(peer_count) as pool:
            return list(pool.map(fn, peers))
    finally:
        for peer in peers:
            peer.destroy_process_group()
