"""Parties as operators run them: each its own Ray (separate process groups, each its own GCS) on loopback,
meeting only through their Flight endpoints."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from conftest import NEW_MINER_BENCHMARKS, TRAINER_OVERRIDES, assert_exact_rounds, free_port, ray_head

from actors.subnet import register_dev_wallet
from mapreduce_ray import Peer
from mapreduce_ray.chain import ChainConfig
from mapreduce_ray.reference import reference_reduce
from mapreduce_ray.validator.ledger import MinerLedger
from mapreduce_ray.wallets import dev_wallet

START_TIMEOUT_S = 120.0
BOTS = ("bot-0", "bot-1")  # a benchmark has a bot at each of its two ranks
RAY_LINE = r"Ray cluster ([\d.]+:\d+): \d+ node\(s\) \[([^\]]*)\]"
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


def run_job(module: str, *overrides: str, env: dict, cwd) -> subprocess.Popen:
    command = [sys.executable, "-u", "-m", module, *overrides, f"hydra.run.dir={cwd}/{module}"]
    return subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(args: list[str], env: dict, cwd=None) -> subprocess.CompletedProcess:
    """Run python with `args` to the end (bounded), capturing its output."""
    command = [sys.executable, *args]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=START_TIMEOUT_S)


def test_three_parties_each_on_its_own_ray_meet_only_through_their_endpoints(tmp_path):
    """A miner operator (its Ray: a head and two miners), a validator (its Ray: a head, two bots, the validator)
    and a trainer (jobs.local, a Ray of its own in its process): the seed tutorial's flow (join, broadcast,
    all_reduce, leave) and 5 all_reduce rounds, every result checked bit for bit. Each party's Ray lists only
    its own nodes. The validator and one miner serve grpc+tls with certificates from jobs.certificate, pinned
    by their callers to what they announced. Then every service stops on SIGINT and leaves nothing behind."""
    env = {**os.environ, "MAPREDUCE_STATE_DIR": str(tmp_path / "state")}
    tls = {
        "miner-0": (),
        "miner-1": certificate(tmp_path, "miner-1", env),
        "validator": certificate(tmp_path, "v", env),
    }
    with ray_head(env) as operator, ray_head(env) as validating:
        services = {}
        try:
            for hotkey in ("miner-0", "miner-1"):
                overrides = ("+wallet=dev-miner", f"wallet.hotkey={hotkey}", *tls[hotkey], *on(operator))
                services[hotkey] = serve("jobs.miner", *overrides, env=env, cwd=tmp_path)
            for bot in BOTS:  # one per rank of a benchmark
                services[bot] = serve(
                    "jobs.benchmark",
                    "+wallet=dev-bench",
                    f"wallet.hotkey={bot}",
                    *on(validating),
                    env=env,
                    cwd=tmp_path,
                )
            rays = {name: output.wait_for(RAY_LINE) for name, (_, output) in services.items()}
            for hotkey, over in (("miner-0", ";"), ("miner-1", " over grpc\\+tls;")):
                services[hotkey][1].wait_for(
                    r"miner-\d+ \(hotkey \w+\) serving netuid 10 on the embedded chain .* at endpoint "
                    rf"127\.0\.0\.1:\d+{over}"
                )
            bots = [services[bot][1].wait_for(r"benchmark-\d+ \(hotkey (\w+)\) serving netuid 10")[1] for bot in BOTS]
            services["validator"] = serve(
                "jobs.validator",
                "+wallet=dev-validator",
                f"validator.benchmark.bots=[{','.join(bots)}]",
                "validator.benchmark.size_mib=4",
                *tls["validator"],
                *on(validating),
                env=env,
                cwd=tmp_path,
            )
            rays["validator"] = services["validator"][1].wait_for(RAY_LINE)
            output = services["validator"][1]
            uid = output.wait_for(
                r"validator-(\d+) \(hotkey \w+\) serving netuid 10 .* at endpoint [\d.:]+ over grpc\+tls"
            )
            uid = uid[1]
            output.wait_for(rf"validator-\d+: uid \d+ \w+: 0 job\(s\) open, {2 * NEW_MINER_BENCHMARKS} benchmark\(s\)")
            trainer = finish(
                ["-m", "jobs.local", f"subnet.validator_uid={uid}", *TRAINER_OVERRIDES, f"hydra.run.dir={tmp_path}/t"],
                env,
            )
            assert trainer.returncode == 0, trainer.stderr[-3000:]
            rays["trainer"] = re.search(RAY_LINE, trainer.stdout)
            assert_exact_rounds(trainer.stdout)
            assert "goes to the next miner" not in trainer.stdout + trainer.stderr  # both miners reached, one by TLS
            for proc, _ in services.values():
                proc.send_signal(signal.SIGINT)
            for name, (proc, out) in services.items():
                out.wait_for(r"(miner|benchmark|validator)-\d+ stopped")
                assert proc.wait(timeout=60) == 0, name
        finally:
            for proc, _ in services.values():
                if proc.poll() is None:
                    proc.kill()
        gcs = {name: match[1] for name, match in rays.items()}
        nodes = {name: set(filter(None, match[2].replace("'", "").split(", "))) for name, match in rays.items()}
        assert gcs["miner-0"] == gcs["miner-1"] == operator.address and nodes["miner-0"] == nodes["miner-1"]
        assert all(gcs[bot] == gcs["validator"] == validating.address for bot in BOTS)
        assert all(nodes[bot] == nodes["validator"] for bot in BOTS)
        parties = [nodes["miner-0"], nodes["validator"], nodes["trainer"]]
        assert all(len(p) == 1 for p in parties), nodes  # each its own one-node Ray
        assert len(set.union(*parties)) == 3, nodes  # ... and no node in two of them
        assert len({gcs["miner-0"], gcs["validator"], gcs["trainer"]}) == 3
        for head in (operator, validating):
            left = finish(["-c", LIVE_ACTORS, head.address], env)
            assert left.returncode == 0, left.stderr[-2000:]
            assert "named []" in left.stdout


def test_two_validators_benchmark_and_weigh_the_same_two_miners_and_their_jobs_share_them_exactly(tmp_path):
    """Two miners and two validators, each its own Ray (a head each, on loopback). Each validator benchmarks
    both miners with two bots of its own, and sets weights on both (a miner earns weight only from a passed
    benchmark of that validator's). Then each validator admits a job of two peers; both jobs get both miners,
    and their rounds run at the same time on them, every result bit-exact on every peer."""
    state = tmp_path / "state"
    env = {**os.environ, "MAPREDUCE_STATE_DIR": str(state)}
    fast_epochs = ("validator.epoch_blocks=1", "subnet.chain.tempo=1", "validator.benchmark.size_mib=1")
    with contextlib.ExitStack() as stack:
        heads = {name: stack.enter_context(ray_head(env)) for name in ("miner-0", "miner-1", "a", "b")}
        services = {}
        try:
            for hotkey in ("miner-0", "miner-1"):
                overrides = ("+wallet=dev-miner", f"wallet.hotkey={hotkey}", *on(heads[hotkey]))
                services[hotkey] = serve("jobs.miner", *overrides, env=env, cwd=tmp_path)
            for v in ("a", "b"):
                for bot in (f"{v}-bot-0", f"{v}-bot-1"):
                    overrides = ("+wallet=dev-bench", f"wallet.hotkey={bot}", *on(heads[v]))
                    services[bot] = serve("jobs.benchmark", *overrides, env=env, cwd=tmp_path)
            miners = {
                int(services[h][1].wait_for(r"miner-(\d+) \(hotkey \w+\) serving")[1]) for h in ("miner-0", "miner-1")
            }
            validators, hotkeys = {}, {}
            for v in ("a", "b"):
                bots = [
                    services[f"{v}-bot-{i}"][1].wait_for(r"benchmark-\d+ \(hotkey (\w+)\) serving")[1] for i in (0, 1)
                ]
                overrides = ("+wallet=dev-validator", f"wallet.hotkey=validator-{v}", *fast_epochs, *on(heads[v]))
                services[v] = serve(
                    "jobs.validator", *overrides, f"validator.benchmark.bots=[{','.join(bots)}]", env=env, cwd=tmp_path
                )
                serving = services[v][1].wait_for(r"validator-(\d+) \(hotkey (\w+)\) serving")
                validators[v], hotkeys[v] = int(serving[1]), serving[2]
            chain = ChainConfig(netuid=10, state_dir=str(state)).open()
            deadline = time.monotonic() + START_TIMEOUT_S
            while not all(set(chain.weights().get(uid, {})) == miners for uid in validators.values()):
                assert time.monotonic() < deadline, f"weights on chain: {chain.weights()}"
                time.sleep(0.5)
            assert all(w > 0 for uid in validators.values() for w in chain.weights()[uid].values())
            for hotkey in hotkeys.values():  # each validator's own ledger: its own passed benchmarks of each miner
                books = MinerLedger(state / f"validator-10-{hotkey}.sqlite", best_of=NEW_MINER_BENCHMARKS)
                while not all(
                    r["measured"] == NEW_MINER_BENCHMARKS and r["state"] == "available" for r in books.table()
                ):
                    assert time.monotonic() < deadline, f"validator {hotkey}'s ledger: {books.table()}"
                    time.sleep(0.5)

            peers = {}
            for v in ("a", "b"):
                for rank in (1, 2):
                    wallet = dev_wallet(state, "dev-peer", f"{v}-{rank}")
                    register_dev_wallet(chain, wallet)
                    peers[v, rank] = Peer(rank, 2, wallet=wallet, validator_uid=validators[v], state_dir=state, job=v)
            with ThreadPoolExecutor(len(peers)) as pool:
                specs = list(pool.map(lambda peer: peer.init_process_group(), peers.values()))
                assert all({slot.uid for slot in spec.miners} == miners for spec in specs)
                assert len({spec.job_id for spec in specs}) == 2  # one job per validator, both on both miners
                for k in range(5):
                    inputs = {
                        key: torch.randn(
                            262144, generator=torch.Generator().manual_seed(100 * k + 10 * (key[0] == "b") + key[1])
                        )
                        for key in peers
                    }
                    tensors = {key: t.clone() for key, t in inputs.items()}
                    list(
                        pool.map(lambda peer, tensor: peer.all_reduce(tensor, "avg"), peers.values(), tensors.values())
                    )
                    for v in ("a", "b"):
                        expected = reference_reduce([inputs[v, 1], inputs[v, 2]], "avg")
                        assert all(torch.equal(tensors[v, rank], expected) for rank in (1, 2)), (v, k)
                list(pool.map(lambda peer: peer.destroy_process_group(), peers.values()))
            for proc, _ in services.values():
                proc.send_signal(signal.SIGINT)
            for name, (proc, _) in services.items():
                assert proc.wait(timeout=60) == 0, name
        finally:
            for proc, _ in services.values():
                if proc.poll() is None:
                    proc.kill()


def certificate(folder, name: str, env: dict) -> tuple[str, str]:
    """Overrides that serve a new certificate made by jobs.certificate."""
    cert, key = f"{folder}/{name}.pem", f"{folder}/{name}.key"
    made = finish(["-m", "jobs.certificate", f"cert={cert}", f"key={key}", f"hydra.run.dir={folder}/{name}"], env)
    assert made.returncode == 0, made.stderr[-2000:]
    assert re.match(rf"wrote {re.escape(cert)} and {re.escape(key)} \(key sha256 [0-9a-f]{{64}}\)", made.stdout)
    return f"wire.tls_cert={cert}", f"wire.tls_key={key}"


def on(head) -> tuple[str, ...]:
    """Overrides that join a service to a party's Ray `head`, logging its status every second."""
    return ("ray=cluster", f"ray.address={head.address}", "status_interval_s=1")


def serve(module: str, *overrides: str, env: dict, cwd) -> tuple[subprocess.Popen, Output]:
    proc = run_job(module, *overrides, env=env, cwd=cwd)
    return proc, Output(proc)


def test_a_miner_without_a_wallet_a_cluster_a_reducer_or_its_certificate_says_what_to_do(tmp_path):
    env = {**os.environ, "MAPREDUCE_STATE_DIR": str(tmp_path / "state"), "RAY_ADDRESS": ""}
    no_wallet = finish(["-m", "jobs.miner", f"hydra.run.dir={tmp_path}/a"], env)
    assert no_wallet.returncode == 2
    assert no_wallet.stderr.strip().splitlines()[-1] == (
        "error: choose a wallet: +wallet=NAME, where conf/wallet/NAME.yaml exists (e.g. +wallet=dev-miner)"
    )
    no_reducer = ["-m", "jobs.miner", "+wallet=dev-miner", "miner.reducers=0", f"hydra.run.dir={tmp_path}/c"]
    no_reducer = finish(no_reducer, env)
    assert (no_reducer.returncode, no_reducer.stderr.strip()) == (2, "error: miner.reducers must be at least 1, got 0")
    no_tls = ["+wallet=dev-miner", f"wire.tls_cert={tmp_path}/none.pem", f"wire.tls_key={tmp_path}/none.key"]
    no_tls = finish(["-m", "jobs.miner", *no_tls, f"hydra.run.dir={tmp_path}/d"], env)
    assert no_tls.returncode == 2
    assert no_tls.stderr.startswith("error: wire.tls_cert/wire.tls_key: cannot read a certificate and its key (")
    assert no_tls.stderr.strip().endswith("; make one with python -m jobs.certificate cert=PATH key=PATH")
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
