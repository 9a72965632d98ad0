"""Relay all_reduce vs torch gloo all_reduce between emulated hosts with capped links (run as root).

    python benchmarks/bandwidth.py --output benchmarks/RESULTS.md     # the full sweep
    python benchmarks/bandwidth.py --configs 100/200 --size-mib 16 --reps 1 --warmup 0   # a quick look

Every configuration "PEER/MINER" (Mbit/s each way of every peer's and every
miner's link) gets fresh hosts (benchmarks/netns.py): n peer hosts and m miner
hosts on one bridge. No Ray spans hosts: every miner host runs `jobs.miner` with
a Ray of its own, serving its Flight endpoint on the host's address; the
validator and its benchmark bots run in this driver's own Ray on the bridge,
uncapped (the validator benchmarks the miners over their endpoints and sizes
their segments by what it measured); every peer host runs one peer process (a
Peer needs no Ray; with --peer-ray it starts one of its own, as a notebook on a
local Ray would) holding a relay Peer and a gloo process group over the hosts'
links, told what to run by this driver over a plain TCP socket. Each repetition
runs relay all_reduce, then gloo all_reduce, of the same float32 tensor, each
timed from the first peer's start to the last peer's end, and reads every host's
byte counters around it.

Bounds, with B in bytes/s of the caps (the design's model, anchors section 1):
relay: max(D/B_peer, n·D/ΣB_miner) + RTT, since each peer sends D and receives D,
through a miner (two hops);
ring (gloo): 2(n-1)·D/(n·B_peer) + (n-1)·RTT, since each peer sends and receives
2(n-1)/n·D, in 2(n-1) steps one hop each.
--rtt-ms adds a round trip between hosts (delay lines, netns.py); --congestion sets
every host's TCP congestion control. The default is reno: this machine's default,
BBR, sizes its window by the path's least round trip, which on these links is a few
microseconds, so a connection carrying bulk data both ways (a relay's job stream)
is starved by the ACKs queued behind data (RESULTS.md, 2026-12-04); real links have
milliseconds of round trip, and cubic, Linux's default, is not built into this
machine's kernel. Miner hosts keep a connection's window across idle time, as jobs.miner
asks its operator to (mapreduce_ray/wire/tuning.py; --untuned-miners leaves Linux's
default); peer hosts keep Linux's defaults, and --keep-window gives every host that setting.
η = bound / time. The validator checks no live rounds here (--verify-fraction),
so the counters hold the all_reduce's own traffic (plus the peers' round reports).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import netns
import ray
from allreduce import BenchPeer, round_time, wait_until_validator_idle
from report import append_run, markdown_table

from actors import init_local_ray
from actors.subnet import register_dev_wallet, start_bot, start_validator
from mapreduce_ray.chain import ChainConfig
from mapreduce_ray.metrics import algbw, busbw
from mapreduce_ray.types import RoundKind
from mapreduce_ray.validator.config import ValidatorConfig
from mapreduce_ray.wallets import dev_peer_wallet, dev_wallet
from mapreduce_ray.wire.tuning import MINER_SYSCTLS

MIB = 1024 * 1024
GLOO_PORT = 29500
NODE_TIMEOUT_S = 120.0
ROUND_TIMEOUT_S = 300.0
PEER_OBJECT_STORE_MIB = 128
METHODS = ("relay", "gloo")
NAMESPACE = "bandwidth"
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Config:
    """One point of the sweep: caps in Mbit/s of every peer's and every miner's link."""

    peer_mbit: float
    miner_mbit: float

    @classmethod
    def parse(cls, text: str) -> Config:
        try:
            peer, miner = (float(x) for x in text.split("/"))
        except ValueError:
            raise SystemExit(f"configuration {text!r} is not PEER_MBIT/MINER_MBIT, e.g. 100/200") from None
        return cls(peer, miner)

    def bounds(self, nbytes: int, peers: int, miners: int, rtt_s: float = 0.0) -> dict[str, float]:
        """Each method's lower bound on the time of one all_reduce, in seconds, with `rtt_s` between hosts: the
        relay's bytes cross two hops (one round trip), a ring's 2(n-1) hops one after another."""
        peer_bps, miner_bps = self.peer_mbit * 1e6 / 8, self.miner_mbit * 1e6 / 8
        return {
            "relay": max(nbytes / peer_bps, peers * nbytes / (miners * miner_bps)) + rtt_s,
            "gloo": 2 * (peers - 1) * nbytes / (peers * peer_bps) + (peers - 1) * rtt_s,
        }

    def predicted_bytes(self, nbytes: int, peers: int, miners: int) -> dict[tuple[str, str], float]:
        """(method, role) -> bytes each host of the role sends (and receives) per all_reduce."""
        return {
            ("relay", "peer"): nbytes,
            ("relay", "miner"): peers * nbytes / miners,  # segments as the benchmark sizes them, equal caps
            ("gloo", "peer"): 2 * (peers - 1) * nbytes / peers,
            ("gloo", "miner"): 0,
        }


def hosts_for(
    config: Config, peers: int, miners: int, rtt_ms: float = 0.0, miner_sysctls: Mapping[str, str] | None = None
) -> list[netns.HostSpec]:
    """The peer and miner hosts; `rtt_ms` is added to the round trip between any two of them, and the miner
    hosts get `miner_sysctls`."""
    delay = rtt_ms / 4  # a frame crosses two hosts' links each way
    return [netns.HostSpec(f"peer-{r}", config.peer_mbit, delay) for r in range(1, peers + 1)] + [
        netns.HostSpec(f"miner-{i}", config.miner_mbit, delay, miner_sysctls or {}) for i in range(1, miners + 1)
    ]


class Control:
    """This driver's line of JSON commands to every peer process: which round to time next, and when to leave."""

    def __init__(self, peers: int):
        self._server = socket.create_server((netns.BRIDGE_IP, 0))
        self.address = f"{netns.BRIDGE_IP}:{self._server.getsockname()[1]}"
        self._peers = peers
        self._files: dict[int, object] = {}

    def accept(self, timeout_s: float) -> None:
        """Wait until every peer joined its job and reported for duty."""
        self._server.settimeout(timeout_s)
        while len(self._files) < self._peers:
            connection, _ = self._server.accept()
            connection.settimeout(ROUND_TIMEOUT_S)
            file = connection.makefile("rw")
            self._files[json.loads(file.readline())["rank"]] = file

    def round(self, method: str, nbytes: int) -> list[tuple[float, float]]:
        """Every peer's (start, end) of one round."""
        for file in self._files.values():
            file.write(json.dumps({"method": method, "nbytes": nbytes}) + "\n")
            file.flush()
        return [tuple(json.loads(file.readline())) for file in self._files.values()]

    def close(self) -> None:
        for file in self._files.values():
            with contextlib.suppress(OSError):
                file.write(json.dumps({"method": "leave"}) + "\n")
                file.flush()
        self._server.close()


def serve_peer(args) -> None:
    """A peer host's process: join the job and the gloo group, then time the rounds the driver asks for."""
    options = {
        "validator_uid": args.validator_uid,
        "connect_timeout_s": NODE_TIMEOUT_S,
        "verify_results": not args.unchecked,
    }
    if args.peer_ray:  # as a trainer driving its Peer from a notebook on a local Ray
        init_local_ray(object_store_mib=PEER_OBJECT_STORE_MIB, num_cpus=1, preallocate=False)
    bench = BenchPeer(args.peer, args.peers, args.rendezvous, options)
    host, port = args.control.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=NODE_TIMEOUT_S) as connection:
        connection.settimeout(None)
        file = connection.makefile("rw")
        file.write(json.dumps({"rank": args.peer}) + "\n")
        file.flush()
        while (command := json.loads(file.readline()))["method"] != "leave":
            file.write(json.dumps(bench.time_round(command["method"], command["nbytes"])) + "\n")
            file.flush()
    bench.peer.destroy_process_group()


def wait_for_line(log: Path, pattern: str, proc) -> re.Match:
    """The first match of `pattern` in a host process's log, waited for (it must not exit first)."""
    deadline = time.monotonic() + NODE_TIMEOUT_S
    while time.monotonic() < deadline:
        if log.exists() and (match := re.search(pattern, log.read_text(errors="replace"))):
            return match
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    raise RuntimeError(f"no {pattern!r} in {log} within {NODE_TIMEOUT_S:g} s")


def run_config(config: Config, args) -> list[dict]:
    """Every repetition's time and per-host traffic for both methods, on fresh hosts."""
    temp_dir = tempfile.mkdtemp(prefix="mrnet-")
    rows = []
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, temp_dir, ignore_errors=True)
        miner_sysctls = {} if args.untuned_miners else MINER_SYSCTLS  # as jobs.miner asks its operator
        hosts = hosts_for(config, args.peers, args.miners, args.rtt_ms, miner_sysctls)
        sysctls = {"net.ipv4.tcp_congestion_control": args.congestion}
        if args.keep_window:
            sysctls.update(MINER_SYSCTLS)  # on every host, peers' too
        net = stack.enter_context(netns.TestNetwork(hosts, sysctls))
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "MAPREDUCE_STATE_DIR": str(Path(temp_dir) / "chain")}
        env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # a Ray in a namespace binds its host's address
        os.environ["MAPREDUCE_STATE_DIR"] = env["MAPREDUCE_STATE_DIR"]
        chain = ChainConfig()
        init_local_ray(object_store_mib=args.object_store_mib)  # the validator's party, on the bridge
        netns.exit_on_sigterm()  # ray.init installed its own handler
        stack.callback(ray.shutdown)
        bots = [start_bot(chain, NAMESPACE, dev_wallet(chain.state_path, "dev-bench", f"bot-{i}")) for i in (0, 1)]
        for i in range(1, args.miners + 1):
            host = f"miner-{i}"
            command = [sys.executable, "-u", "-m", "jobs.miner", "+wallet=dev-miner", f"wallet.hotkey={host}"]
            command += ["ray=local", f"miner.listen={net.addresses[host]}:0", f"hydra.run.dir={temp_dir}/{host}"]
            log = Path(temp_dir) / f"{host}.log"
            proc = net.spawn(host, command, {**env, "PYTHONPATH": str(ROOT)}, log)
            wait_for_line(log, r"serving .* at endpoint", proc)
        settings = {
            "namespace": NAMESPACE,
            "chunk_bytes": int(args.chunk_mib * MIB),
            "timeout_s": ROUND_TIMEOUT_S,
            "verify": {"fraction": args.verify_fraction},
            "benchmark": {"bots": [hotkey for _, hotkey in bots], "interval_s": 3600},  # one per benchmark rank
        }
        validator_config = ValidatorConfig.from_dict(settings)
        uid, validator = start_validator(chain, validator_config, listen=f"{netns.BRIDGE_IP}:0")
        benchmark = validator_config.benchmark
        measured = [
            rank_bps * benchmark.peers for rank_bps in wait_benchmarked(validator, args.miners, benchmark.best_of)
        ]
        shares = ", ".join(f"{8e-6 * m:.1f} Mbit/s ({m / sum(measured):.3f})" for m in measured)
        print(f"the validator measured the miners taking in (their shares of a tensor): {shares}", flush=True)
        client = chain.open()
        control = Control(args.peers)
        stack.callback(control.close)
        for r in range(1, args.peers + 1):
            register_dev_wallet(client, dev_peer_wallet(chain.state_path, r))
            command = [sys.executable, "-u", __file__, "--peer", str(r), "--peers", str(args.peers)]
            command += ["--validator-uid", str(uid), "--control", control.address]
            command += ["--unchecked"] if args.unchecked else []
            command += ["--peer-ray"] if args.peer_ray else []
            command += ["--rendezvous", f"{net.addresses['peer-1']}:{GLOO_PORT}"]
            peer_env = {**env, "GLOO_SOCKET_IFNAME": "eth0", "PYTHONPATH": str(ROOT)}
            net.spawn(f"peer-{r}", command, peer_env, Path(temp_dir) / f"peer-{r}.log")
        control.accept(NODE_TIMEOUT_S)
        nbytes = args.nbytes
        for rep in range(args.warmup + args.reps):
            for method in METHODS:
                wait_until_validator_idle(validator)
                sampler = Sampler(net, args.timeline_s) if args.timeline_s else None
                before = net.counters()
                spans = control.round(method, nbytes)
                after = net.counters()
                if sampler is not None:
                    print(sampler.stop(f"{config.peer_mbit:g}/{config.miner_mbit:g} {method}"), flush=True)
                if rep >= args.warmup:
                    traffic = {h: after[h] - before[h] for h in after}
                    rows.append({"method": method, "seconds": round_time(spans), "traffic": traffic})
                    print(
                        f"{config.peer_mbit:g}/{config.miner_mbit:g} {method}: {rows[-1]['seconds']:.4g} s", flush=True
                    )
    return rows


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of this machine's CPUs so far."""
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return sum(fields) - idle, sum(fields)


class Sampler:
    """Every host's byte counters (and the machine's CPU use) every `period_s` while a round runs, to show when
    each link moved bytes."""

    def __init__(self, net: netns.TestNetwork, period_s: float):
        self._net, self._period_s = net, period_s
        self._samples: list[tuple[float, dict]] = []
        self._drops = net.drops()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set():
            self._samples.append((time.perf_counter(), self._net.counters(), cpu_times()))
            self._done.wait(self._period_s)

    def stop(self, title: str) -> str:
        """The timeline as text: per period, each host's Mbit/s sent and received."""
        self._done.set()
        self._thread.join()
        lines = [f"{title}: Mbit/s sent/received per {self._period_s:g} s"]
        start = self._samples[0][0]
        for (t0, c0, cpu0), (t1, c1, cpu1) in zip(self._samples, self._samples[1:], strict=False):
            mbit = {h: (c1[h] - c0[h]) for h in c1}
            scale = 8e-6 / (t1 - t0)
            rates = [f"{h} {scale * v.sent:4.0f}/{scale * v.received:4.0f}" for h, v in sorted(mbit.items())]
            busy = (cpu1[0] - cpu0[0]) / max(cpu1[1] - cpu0[1], 1)
            lines.append(f"  {t1 - start:6.2f}  cpu {busy:4.0%}  " + "  ".join(rates))
        drops = self._net.drops()
        lines.append(
            "  packets the links dropped (sending/receiving): "
            + "  ".join(f"{h} {d[0] - self._drops[h][0]}/{d[1] - self._drops[h][1]}" for h, d in sorted(drops.items()))
        )
        return "\n".join(lines)


def wait_benchmarked(validator, miners: int, times: int) -> list[float]:
    """Until every miner's throughput rests on `times` passed benchmarks; what the validator measured, by uid:
    bytes/s per benchmark rank (a job's segments are sized in their proportion)."""
    deadline = time.monotonic() + NODE_TIMEOUT_S
    while True:
        rows = ray.get(validator.miners.remote(), timeout=NODE_TIMEOUT_S)
        if sum(row["measured"] >= times for row in rows) >= miners:
            return [row["throughput"] for row in rows]
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the validator did not benchmark {miners} miner(s) {times} times within {NODE_TIMEOUT_S:g} s"
            )
        time.sleep(0.5)


def summarize(config: Config, rows: list[dict], args) -> list[tuple]:
    """One table row per method: medians of the repetitions."""
    nbytes = args.nbytes
    bounds = config.bounds(nbytes, args.peers, args.miners, args.rtt_ms / 1e3)
    predicted = config.predicted_bytes(nbytes, args.peers, args.miners)
    medians = {m: statistics.median(r["seconds"] for r in rows if r["method"] == m) for m in METHODS}
    table = []
    for method in METHODS:
        t = medians[method]
        mine = [r["traffic"] for r in rows if r["method"] == method]

        def per_host(role: str, field: str, mine=mine) -> float:
            """Median over repetitions of the mean over the role's hosts, in MiB."""
            means = [statistics.mean(getattr(v, field) for h, v in rep.items() if h.startswith(role)) for rep in mine]
            return statistics.median(means) / MIB

        table.append(
            (
                f"{config.peer_mbit:g}",
                f"{config.miner_mbit:g}",
                method,
                f"{t:.3g}",
                f"{algbw(nbytes, t) / 1e6:.3g}",
                f"{busbw(algbw(nbytes, t), RoundKind.ALL_REDUCE, args.peers) / 1e6:.3g}",
                f"{bounds[method]:.3g}",
                f"{bounds[method] / t:.2f}",
                f"{medians['gloo'] / t:.2f}",
                f"{per_host('peer', 'sent'):.3g} / {per_host('peer', 'received'):.3g}",
                f"{predicted[(method, 'peer')] / MIB:.3g}",
                f"{per_host('miner', 'sent'):.3g} / {per_host('miner', 'received'):.3g}",
                f"{predicted[(method, 'miner')] / MIB:.3g}",
            )
        )
    return table


HEADER = (
    "peer Mbit/s",
    "miner Mbit/s",
    "method",
    "median s",
    "algbw MB/s",
    "busbw MB/s",
    "bound s",
    "η = bound/time",
    "gloo time / time",
    "MiB sent / received per peer",
    "design, per peer",
    "MiB sent / received per miner",
    "design, per miner",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="100/200,100/1000,100/100", help="comma-separated PEER_MBIT/MINER_MBIT")
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--miners", type=int, default=2)
    parser.add_argument("--size-mib", type=float, default=64)
    parser.add_argument("--size-kib", type=float, help="the tensor's size in KiB instead")
    parser.add_argument("--chunk-mib", type=float, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--object-store-mib", type=int, default=1024)
    parser.add_argument("--verify-fraction", type=float, default=0.0, help="share of relay rounds the validator checks")
    parser.add_argument("--unchecked", action="store_true", help="peers skip the checks of reduced chunks")
    parser.add_argument("--timeline-s", type=float, default=0, help="print every host's rates per this period")
    parser.add_argument("--congestion", default="reno", help="every host's TCP congestion control")
    parser.add_argument("--rtt-ms", type=float, default=0.0, help="round trip added between any two hosts")
    windows = parser.add_mutually_exclusive_group()
    windows.add_argument(
        "--keep-window", action="store_true", help="every host keeps a TCP connection's window across idle time"
    )
    windows.add_argument(
        "--untuned-miners", action="store_true", help="miner hosts keep Linux's TCP settings, not jobs.miner's advice"
    )
    parser.add_argument("--peer-ray", action="store_true", help="every peer host runs a Ray of its own too")
    parser.add_argument("--output", help="also append the table as markdown to this file")
    parser.add_argument("--peer", type=int, help=argparse.SUPPRESS)  # the rest: a peer host's process
    parser.add_argument("--validator-uid", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--control", help=argparse.SUPPRESS)
    parser.add_argument("--rendezvous", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer is not None:
        serve_peer(args)
        return
    netns.require_root()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # every Ray here is local to this machine
    args.nbytes = int(args.size_kib * 1024) if args.size_kib else int(args.size_mib * MIB)
    allowed = Path("/proc/sys/net/ipv4/tcp_allowed_congestion_control").read_text().split()
    if args.congestion not in allowed:
        raise SystemExit(f"--congestion {args.congestion}: this machine's hosts may use {', '.join(allowed)}")
    configs = [Config.parse(c) for c in args.configs.split(",")]
    table = []
    for config in configs:
        table += summarize(config, run_config(config, args), args)
    markdown = markdown_table(HEADER, table)
    print(markdown)
    if args.output:
        append_run(
            args.output,
            f"capped hosts in network namespaces, {args.peers} peers, {args.miners} miners, {args.nbytes / 1024:g} KiB "
            f"float32, chunk at most {args.chunk_mib:g} MiB, {args.rtt_ms:g} ms added round trip, "
            f"TCP congestion control {args.congestion}"
            + (", windows kept across idle time" if args.keep_window else "")
            + (", miner hosts untuned" if args.untuned_miners else "")
            + (", a Ray on every peer host" if args.peer_ray else "")
            + f", {args.reps} reps (median)",
            markdown,
            command="python (as root)",
        )


if __name__ == "__main__":
    main()
