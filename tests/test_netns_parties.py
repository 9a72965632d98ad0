"""Parties on separate emulated hosts (network namespaces): a miner, a validator with its bot, a trainer.

Each host runs its own Ray and talks to the others only through the Flight endpoints announced on
chain, across the hosts' bridge. Needs root (CI runs as root); it must not run beside a bandwidth
benchmark, whose hosts share netns's names.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import netns  # noqa: E402
from conftest import NEW_MINER_BENCHMARKS, TRAINER_OVERRIDES, assert_exact_rounds  # noqa: E402

START_TIMEOUT_S = 120.0
BOTS = ("bot-0", "bot-1")  # a benchmark has a bot at each of its two ranks
RAY_LINE = r"Ray cluster ([\d.]+):\d+: 1 node\(s\) \['(\w+)'\]"
RAY = str(Path(sys.executable).parent / "ray")
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


def wait_for(log: Path, pattern: str, timeout_s: float = START_TIMEOUT_S) -> re.Match:
    """The first match of `pattern` in the log a host's process writes, waited for."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if log.exists() and (match := re.search(pattern, log.read_text(errors="replace"))):
            return match
        time.sleep(0.3)
    text = log.read_text(errors="replace")[-3000:] if log.exists() else "(no output)"
    raise AssertionError(f"no {pattern!r} in {log.name} within {timeout_s:g} s:\n{text}")


def job(module: str, *overrides: str, run_dir: Path) -> list[str]:
    return [sys.executable, "-u", "-m", module, *overrides, f"hydra.run.dir={run_dir / module}"]


def test_miner_validator_and_trainer_on_three_hosts_each_with_its_own_ray(tmp_path):
    env = {**os.environ, "MAPREDUCE_STATE_DIR": str(tmp_path / "state"), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # a Ray in a namespace must bind its host's address
    hosts = [netns.HostSpec(name) for name in ("miner", "validator", "trainer")]
    with netns.TestNetwork(hosts) as net:
        ip = net.addresses
        names = ("head", "miner", *BOTS, "validator", "trainer")
        logs = {name: tmp_path / f"{name}.log" for name in names}
        head = [RAY, "start", "--head", "--block", "--port=6379", f"--node-ip-address={ip['validator']}"]
        head += ["--num-cpus=1", "--object-store-memory=200000000", "--include-dashboard=false"]
        head += [f"--temp-dir={tempfile.mkdtemp(prefix='ray-')}", "--disable-usage-stats"]  # short: socket paths
        net.spawn("validator", head, env, logs["head"])
        wait_for(logs["head"], r"Ray runtime started")
        serve = ("status_interval_s=1",)
        on_head = ("ray=cluster", f"ray.address={ip['validator']}:6379", *serve)
        miner = job(
            "jobs.miner", "+wallet=dev-miner", "ray=local", f"miner.listen={ip['miner']}:0", *serve, run_dir=tmp_path
        )
        net.spawn("miner", miner, env, logs["miner"])
        for bot in BOTS:  # one per rank of a benchmark
            bot_job = job(
                "jobs.benchmark", "+wallet=dev-bench", f"wallet.hotkey={bot}", *on_head, run_dir=tmp_path / bot
            )
            net.spawn("validator", bot_job, env, logs[bot])
        wait_for(logs["miner"], rf"miner-\d+ \(hotkey \w+\) serving .* at endpoint {re.escape(ip['miner'])}:\d+")
        bots = [wait_for(logs[bot], r"benchmark-\d+ \(hotkey (\w+)\) serving")[1] for bot in BOTS]
        validator = job(
            "jobs.validator",
            "+wallet=dev-validator",
            f"endpoint.listen={ip['validator']}:0",
            f"validator.benchmark.bots=[{','.join(bots)}]",
            "validator.benchmark.size_mib=4",
            *on_head,
            run_dir=tmp_path,
        )
        net.spawn("validator", validator, env, logs["validator"])
        uid = wait_for(logs["validator"], rf"validator-(\d+) \(hotkey \w+\) serving .* at endpoint {ip['validator']}:")[
            1
        ]
        wait_for(logs["validator"], rf"0 job\(s\) open, {NEW_MINER_BENCHMARKS} benchmark\(s\)")
        trainer = job("jobs.local", f"subnet.validator_uid={uid}", *TRAINER_OVERRIDES, run_dir=tmp_path)
        in_host = ["ip", "netns", "exec", net.netns("trainer"), *trainer]
        done = subprocess.run(in_host, env=env, capture_output=True, text=True, timeout=300)
        logs["trainer"].write_text(done.stdout + done.stderr)
        assert done.returncode == 0, done.stderr[-3000:]
        assert_exact_rounds(done.stdout)
        rays = {name: wait_for(logs[name], RAY_LINE) for name in ("miner", *BOTS, "validator", "trainer")}
    assert all(rays[bot].groups() == rays["validator"].groups() for bot in BOTS)  # the validator's party: one Ray
    parties = {name: rays[name].groups() for name in ("miner", "validator", "trainer")}
    assert len({node for _, node in parties.values()}) == 3  # three Rays, each of one node on its own host
    assert parties["validator"][0] == ip["validator"]  # where its bots joined it
    # the miner's and the trainer's Rays started in their jobs, on their own host's loopback: nobody else
    # can reach them at all
    assert parties["miner"][0] == parties["trainer"][0] == "127.0.0.1"
