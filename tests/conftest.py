"""One local Ray per test session, three local subnets (1, 2 and 3 miners) on it,
and helpers that run P peers as threads of the test process.

The subnets share one embedded chain in a temporary state dir (netuids 101..103);
MAPREDUCE_STATE_DIR points every process there, Ray's workers included.

Tests marked `cluster` run last: they shut the local Ray down and bring up a
multi-node ray.cluster_utils.Cluster of their own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

STATE_DIR = tempfile.mkdtemp(prefix="mapreduce-tests-")
os.environ["MAPREDUCE_STATE_DIR"] = STATE_DIR
os.environ.setdefault("BTCLI_TOKEN_SYMBOLS_CACHE", os.path.join(STATE_DIR, "btcli_token_symbols.json"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402
import ray  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from actors import LocalSubnet, init_local_ray, start_local_subnet  # noqa: E402
from actors.subnet import READY_TIMEOUT_S  # noqa: E402
from mapreduce_ray import Peer  # noqa: E402
from mapreduce_ray.chain import ChainConfig  # noqa: E402
from mapreduce_ray.validator.config import ValidatorConfig  # noqa: E402

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")

HEAD_STOP_GRACE_S = 5.0
HEAD_START_ATTEMPTS = 3
CHUNK_MIB = 0.25  # small chunks, so a 1 MiB tensor travels in several pieces
TIMEOUT_S = 30.0
# Benchmarks once, at the start; every round the tests run is checked, so an honest miner that
# failed a check would show up as a banned miner and failing tests.
VALIDATOR = {"benchmark": {"size_mib": 8, "interval_s": 3600}, "verify": {"fraction": 1.0, "chunks": 0}}


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


@pytest.fixture
def job_config():
    """job_config(name, *overrides, subnet=None): conf/{name}.yaml with Hydra `overrides`, its peers joining
    `subnet` (a LocalSubnet) instead of starting a subnet of their own."""
    return _job_config


def _job_config(name: str, *overrides: str, subnet: LocalSubnet | None = None):
    joined = []
    if subnet is not None:
        joined = [
            f"subnet.namespace={subnet.namespace}",
            f"subnet.validator_uid={subnet.validator_uid}",
            f"subnet.chain.netuid={subnet.chain.netuid}",
            f"subnet.chain.state_dir={subnet.chain.state_path}",
        ]
    with initialize_config_dir(config_dir=CONF, version_base=None):
        return compose(name, overrides=[*joined, *overrides])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class RayHead:
    address: str  # the GCS, host:port
    dashboard: str | None  # the dashboard's (and job API's) URL


@contextlib.contextmanager
def ray_head(env: dict, *, dashboard: bool = False, timeout_s: float = 120.0) -> Iterator[RayHead]:
    """`ray start --head --block` on loopback with `env`, in a process group and temp dir of its own, so stopping
    it never touches the test session's Ray; stopped with SIGTERM, then SIGKILL for what is left.

    Its ports come from `free_port`, so another process can bind one first; a head that exits while starting is
    started again on fresh ports (HEAD_START_ATTEMPTS in all)."""
    for _ in range(HEAD_START_ATTEMPTS):
        proc, head, temp_dir = _start_head(env, dashboard)
        up = False
        try:
            up = _wait_until_up(proc, head, temp_dir, timeout_s)
        finally:
            if not up:
                _stop_head(proc, temp_dir)
        if up:
            break
    else:
        raise RuntimeError(f"ray start --head exited while starting, {HEAD_START_ATTEMPTS} times")
    try:
        yield head
    finally:
        _stop_head(proc, temp_dir)


def _start_head(env: dict, dashboard: bool) -> tuple[subprocess.Popen, RayHead, str]:
    gcs, dashboard_port, temp_dir = free_port(), free_port(), tempfile.mkdtemp(prefix="ray-head-")
    command = [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--block"]
    command += [f"--port={gcs}", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    command += ["--num-cpus=2", "--object-store-memory=300000000", f"--ray-client-server-port={free_port()}"]
    command += [f"--dashboard-agent-listen-port={free_port()}", f"--include-dashboard={str(dashboard).lower()}"]
    command += ["--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"]
    proc = subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    return proc, RayHead(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard_port}" if dashboard else None), temp_dir


def _stop_head(proc: subprocess.Popen, temp_dir: str) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=HEAD_STOP_GRACE_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_until_up(proc: subprocess.Popen, head: RayHead, temp_dir: str, timeout_s: float) -> bool:
    """True once the head has written its own address (`ray start` does so when its GCS and raylet run) and still
    runs, with its dashboard answering if it has one; False if it exited first. An open port alone proves nothing:
    another process may hold it."""
    deadline = time.monotonic() + timeout_s
    address_file = os.path.join(temp_dir, "ray_current_cluster")
    while proc.poll() is None:
        try:
            with open(address_file) as f:
                written = f.read().strip() == head.address
            if written and head.dashboard:
                urllib.request.urlopen(f"{head.dashboard}/api/version", timeout=5).close()
            if written and proc.poll() is None:
                return True
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"ray start --head did not come up within {timeout_s:g} s")
        time.sleep(0.3)
    return False


# A trainer party's run in the multi-party tests: its own Ray (in the job), the seed tutorial's flow
# (join, broadcast, all_reduce, leave) and 5 all_reduce rounds, every result checked bit for bit.
TRAINER_OVERRIDES = ("ray=local", "topology.peers=2", "size_mib=1", "rounds=5")
NEW_MINER_BENCHMARKS = ValidatorConfig().benchmark.best_of  # of each new miner, back to back, before it takes jobs


def assert_exact_rounds(stdout: str) -> None:
    """jobs.local's table says the broadcast and the 5 all_reduce rounds were exact on every peer."""
    table = stdout.splitlines()[-3:]
    assert table[1].split()[:2] == ["broadcast", "1"] and table[1].endswith("exact"), table
    assert table[2].split()[:2] == ["all_reduce", "avg"] and table[2].split()[7] == "5", table
    assert table[2].endswith("exact"), table
