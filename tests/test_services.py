"""jobs.miner, jobs.benchmark and jobs.validator, run the way an operator runs them against `ray start --head`."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import free_port, ray_head

START_TIMEOUT_S = 120.0
DRIVER = """
import sys, threading, torch, ray
from mapreduce_ray import Peer
ray.init(address=sys.argv[1], log_to_driver=False)
tensors = [torch.full((100_000,), float(r)) for r in (1, 2)]
peers = [Peer(r, 2, validator_uid=int(sys.argv[2]), job="operators") for r in (1, 2)]
for peer in peers:
    peer.init_process_group()
threads = [threading.Thread(target=p.all_reduce, args=(tensors[p.rank - 1], "sum")) for p in peers]
[t.start() for t in threads]
[t.join(timeout=60) for t in threads]
for peer in peers:
    peer.destroy_process_group()
print("sums", sorted({v for t in tensors for v in t.unique().tolist()}))
"""
LIVE_ACTORS = """
import sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
print("named", ray.util.list_named_actors(all_namespaces=True))
"""


class Output:
    """A subprocess's merged stdout/stderr, read on a thread so waits can have deadlines."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.lines, self._queue = proc, [], queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line)

    def wait_for(self, pattern: str, timeout_s: float = START_TIMEOUT_S) -> re.Match:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                break
            self.lines.append(line)
            if match := re.search(pattern, line):
                return match
        raise AssertionError(f"no line matching {pattern!r}; output:\n{''.join(self.lines)[-3000:]}")


@pytest.fixture
def head(tmp_path):
    """A Ray head on loopback, and the environment its clients use."""
    env = {**os.environ, "MAPREDUCE_STATE_DIR": str(tmp_path / "state")}
    with ray_head(env) as started:
        yield started.address, env


def run_job(module: str, *overrides: str, env: dict, cwd) -> subprocess.Popen:
    command = [sys.executable, "-u", "-m", module, *overrides, f"hydra.run.dir={cwd}/{module}"]
    return subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(args: list[str], env: dict, cwd=None) -> subprocess.CompletedProcess:
    """Run python with `args` to the end (bounded), capturing its output."""
    command = [sys.executable, *args]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=START_TIMEOUT_S)


def test_miner_and_validator_serve_a_peer_and_stop_cleanly_on_sigint(head, tmp_path):
    address, env = head
    common = (f"ray.address={address}", "status_interval_s=1")
    miner = run_job("jobs.miner", "+wallet=dev-miner", *common, env=env, cwd=tmp_path)
    bot = run_job("jobs.benchmark", "+wallet=dev-bench", *common, env=env, cwd=tmp_path)
    services = {"miner": (miner, Output(miner)), "benchmark": (bot, Output(bot))}
    try:
        services["miner"][1].wait_for(r"miner-\d+ \(hotkey \w+\) serving netuid 10 on the embedded chain")
        bot_hotkey = services["benchmark"][1].wait_for(r"benchmark-\d+ \(hotkey (\w+)\) serving netuid 10")[1]
        validator = run_job(
            "jobs.validator",
            "+wallet=dev-validator",
            f"validator.benchmark.bots=[{bot_hotkey}]",
            "validator.benchmark.size_mib=4",
            *common,
            env=env,
            cwd=tmp_path,
        )
        services["validator"] = (validator, Output(validator))
        validator_uid = services["validator"][1].wait_for(r"validator-(\d+) \(hotkey \w+\) serving netuid 10")[1]
        services["validator"][1].wait_for(r"validator-\d+: uid \d+ \w+: 0 job\(s\) open, 1 benchmark\(s\)")
        services["benchmark"][1].wait_for(r"benchmark-\d+: uid \d+ \w+: 1 benchmark\(s\) run")
        for rank in (1, 2):
            registered = finish(
                [
                    "-m",
                    "jobs.register",
                    "+wallet=dev-peer",
                    f"wallet.hotkey=rank-{rank}",
                    f"hydra.run.dir={tmp_path}/r",
                ],
                env,
                tmp_path,
            )
            assert registered.returncode == 0, registered.stderr[-2000:]
            assert re.search(rf"wallet dev-peer/rank-{rank} is uid \d+ on netuid 10", registered.stdout)
        driver = finish(["-c", DRIVER, address, validator_uid], env)
        assert driver.returncode == 0, driver.stderr[-3000:]
        assert "sums [3.0]" in driver.stdout
        services["miner"][1].wait_for(r"2 rounds done, 8\.8 MiB reduced")  # the benchmark's 2 x 4 MiB, then ours
        for proc, _ in services.values():
            proc.send_signal(signal.SIGINT)
        for name, (proc, output) in services.items():
            output.wait_for(rf"{name}-\d+ stopped")
            assert proc.wait(timeout=60) == 0
    finally:
        for proc, _ in services.values():
            if proc.poll() is None:
                proc.kill()
    left = finish(["-c", LIVE_ACTORS, address], env)
    assert left.returncode == 0, left.stderr[-2000:]
    assert "named []" in left.stdout


def test_a_miner_without_a_wallet_or_a_cluster_says_what_to_do(tmp_path):
    env = {**os.environ, "MAPREDUCE_STATE_DIR": str(tmp_path / "state"), "RAY_ADDRESS": ""}
    no_wallet = finish(["-m", "jobs.miner", f"hydra.run.dir={tmp_path}/a"], env)
    assert no_wallet.returncode == 2
    assert no_wallet.stderr.strip().splitlines()[-1] == (
        "error: choose a wallet: +wallet=NAME, where conf/wallet/NAME.yaml exists (e.g. +wallet=dev-miner)"
    )
    no_cluster = finish(
        [
            "-m",
            "jobs.miner",
            "+wallet=dev-miner",
            f"ray.address=127.0.0.1:{free_port()}",
            f"hydra.run.dir={tmp_path}/b",
        ],
        env,
    )
    assert no_cluster.returncode == 2
    assert re.search(
        r"error: no Ray cluster found at address '127.0.0.1:\d+': start one with `ray start --head`", no_cluster.stderr
    )
