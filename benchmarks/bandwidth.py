"""Relay all_reduce vs torch gloo all_reduce between emulated hosts with capped links (run as root).

    python benchmarks/bandwidth.py --output benchmarks/RESULTS.md     # the full sweep, ~8 min
    python benchmarks/bandwidth.py --configs 100/200 --size-mib 16 --reps 1 --warmup 0   # a quick look

Every configuration "PEER/MINER" (Mbit/s each way of every peer's and every
miner's link) gets fresh hosts (benchmarks/netns.py): n peer hosts and m miner
hosts on one bridge. The Ray head, the validator, its benchmark bot and this
driver run on the bridge, uncapped; every host runs one Ray node. A local subnet
starts with one miner pinned to each miner host (the validator benchmarks them,
and sizes their segments by what it measured), and one peer actor per peer host
holds both a relay Peer and a gloo process group over the hosts' links. Each
repetition runs relay all_reduce, then gloo all_reduce, of the same float32
tensor, each timed from the first peer's start to the last peer's end, and reads
every host's byte counters around it.

Bounds, with B in bytes/s of the caps (the design's model, anchors section 1):
relay: max(D/B_peer, n·D/ΣB_miner), since each peer sends D and receives D;
ring (gloo): 2(n-1)·D/(n·B_peer), since each peer sends and receives 2(n-1)/n·D.
η = bound / time. The validator checks no live rounds here (--verify-fraction),
so the counters hold the all_reduce's own traffic (plus Ray's control messages).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import allreduce
import netns
import ray
from allreduce import BenchPeer, round_time, wait_until_validator_idle
from report import append_run, markdown_table

from actors import MinerPlan, start_local_subnet
from mapreduce_ray.chain import ChainConfig
from mapreduce_ray.metrics import algbw, busbw
from mapreduce_ray.types import RoundKind

MIB = 1024 * 1024
RAY_PORT = 6390
GLOO_PORT = 29500
NODE_TIMEOUT_S = 60.0
ROUND_TIMEOUT_S = 300.0
HEAD = "head"
HOST_RESOURCE = 100
METHODS = ("relay", "gloo")


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

    def bounds(self, nbytes: int, peers: int, miners: int) -> dict[str, float]:
        """Each method's lower bound on the time of one all_reduce, in seconds."""
        peer_bps, miner_bps = self.peer_mbit * 1e6 / 8, self.miner_mbit * 1e6 / 8
        return {
            "relay": max(nbytes / peer_bps, peers * nbytes / (miners * miner_bps)),
            "gloo": 2 * (peers - 1) * nbytes / (peers * peer_bps),
        }

    def predicted_bytes(self, nbytes: int, peers: int, miners: int) -> dict[tuple[str, str], float]:
        """(method, role) -> bytes each host of the role sends (and receives) per all_reduce."""
        return {
            ("relay", "peer"): nbytes,
            ("relay", "miner"): peers * nbytes / miners,  # segments as the benchmark sizes them, equal caps
            ("gloo", "peer"): 2 * (peers - 1) * nbytes / peers,
            ("gloo", "miner"): 0,
        }


def hosts_for(config: Config, peers: int, miners: int) -> list[netns.HostSpec]:
    return [netns.HostSpec(f"peer-{r}", config.peer_mbit) for r in range(1, peers + 1)] + [
        netns.HostSpec(f"miner-{i}", config.miner_mbit) for i in range(1, miners + 1)
    ]


def ray_node(address: str, resource: str, object_store_mib: int, temp_dir: str, head: bool) -> list[str]:
    """`ray start` for one node at `address`, offering HOST_RESOURCE units of the custom resource `resource`
    (every actor pinned there takes one)."""
    command = [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--block", "--disable-usage-stats"]
    command += [f"--node-ip-address={address}", "--num-cpus=1", f"--object-store-memory={object_store_mib * MIB}"]
    command += [f"--resources={json.dumps({resource: HOST_RESOURCE})}", f"--temp-dir={temp_dir}"]
    if head:
        return [*command, "--head", f"--port={RAY_PORT}", "--include-dashboard=false"]
    return [*command, f"--address={netns.BRIDGE_IP}:{RAY_PORT}"]


def wait_for_nodes(count: int, deadline: float) -> None:
    while len([n for n in ray.nodes() if n["Alive"]]) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len([n for n in ray.nodes() if n['Alive']])} of {count} Ray nodes came up")
        time.sleep(0.2)


def start_cluster(net: netns.TestNetwork, args, temp_dir: str) -> None:
    """The head on the bridge, this driver connected to it, then one node per host, one at a time."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    log = Path(temp_dir) / "nodes.log"
    net.spawn(None, ray_node(netns.BRIDGE_IP, HEAD, args.object_store_mib, temp_dir, head=True), env, log)
    deadline = time.monotonic() + NODE_TIMEOUT_S
    while True:
        try:
            socket.create_connection((netns.BRIDGE_IP, RAY_PORT), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Ray head did not come up within {NODE_TIMEOUT_S:g} s; see {log}") from None
            time.sleep(0.3)
    ray.init(address=f"{netns.BRIDGE_IP}:{RAY_PORT}", _node_ip_address=netns.BRIDGE_IP, log_to_driver=False)
    netns.exit_on_sigterm()  # ray.init installed its own handler
    for i, host in enumerate(net.hosts, start=2):
        address = net.addresses[host]
        net.spawn(host, ray_node(address, host, args.object_store_mib, temp_dir, head=False), env, log)
        wait_for_nodes(i, time.monotonic() + NODE_TIMEOUT_S)


def run_config(config: Config, args) -> list[dict]:
    """Every repetition's time and per-host traffic for both methods, on fresh hosts."""
    temp_dir = tempfile.mkdtemp(prefix="mrnet-")  # Ray's sockets must fit in 107 characters
    rows = []
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, temp_dir, ignore_errors=True)
        net = stack.enter_context(netns.TestNetwork(hosts_for(config, args.peers, args.miners)))
        try:
            start_cluster(net, args, temp_dir)
            subnet = start_local_subnet(
                [MinerPlan(resources={f"miner-{i}": 1}) for i in range(1, args.miners + 1)],
                peers=args.peers,
                chunk_mib=args.chunk_mib,
                timeout_s=ROUND_TIMEOUT_S,
                chain=ChainConfig(state_dir=str(Path(temp_dir) / "chain")),
                home_resources={HEAD: 1},
                validator={"verify": {"fraction": args.verify_fraction}, "benchmark": {"interval_s": 3600}},
            )
            rendezvous = f"{net.addresses['peer-1']}:{GLOO_PORT}"
            bench_peer = ray.remote(num_cpus=0)(BenchPeer)
            peers = [
                bench_peer.options(
                    resources={f"peer-{r}": 1}, runtime_env={"env_vars": {"GLOO_SOCKET_IFNAME": "eth0"}}
                ).remote(r, args.peers, rendezvous, subnet.peer_options)
                for r in range(1, args.peers + 1)
            ]
            nbytes = int(args.size_mib * MIB)
            for rep in range(args.warmup + args.reps):
                for method in METHODS:
                    wait_until_validator_idle(subnet)
                    before = net.counters()
                    spans = ray.get([p.time_round.remote(method, nbytes) for p in peers], timeout=ROUND_TIMEOUT_S)
                    after = net.counters()
                    if rep >= args.warmup:
                        traffic = {h: after[h] - before[h] for h in after}
                        rows.append({"method": method, "seconds": round_time(spans), "traffic": traffic})
                        print(
                            f"{config.peer_mbit:g}/{config.miner_mbit:g} {method}: {rows[-1]['seconds']:.2f} s",
                            flush=True,
                        )
        finally:
            ray.shutdown()
    return rows


def summarize(config: Config, rows: list[dict], args) -> list[tuple]:
    """One table row per method: medians of the repetitions."""
    nbytes = int(args.size_mib * MIB)
    bounds = config.bounds(nbytes, args.peers, args.miners)
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
                f"{t:.2f}",
                f"{algbw(nbytes, t) / 1e6:.1f}",
                f"{busbw(algbw(nbytes, t), RoundKind.ALL_REDUCE, args.peers) / 1e6:.1f}",
                f"{bounds[method]:.2f}",
                f"{bounds[method] / t:.2f}",
                f"{medians['gloo'] / t:.2f}",
                f"{per_host('peer', 'sent'):.1f} / {per_host('peer', 'received'):.1f}",
                f"{predicted[(method, 'peer')] / MIB:.1f}",
                f"{per_host('miner', 'sent'):.1f} / {per_host('miner', 'received'):.1f}",
                f"{predicted[(method, 'miner')] / MIB:.1f}",
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
    parser.add_argument("--chunk-mib", type=float, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--object-store-mib", type=int, default=1024)
    parser.add_argument("--verify-fraction", type=float, default=0.0, help="share of relay rounds the validator checks")
    parser.add_argument("--output", help="also append the table as markdown to this file")
    args = parser.parse_args()
    netns.require_root()
    configs = [Config.parse(c) for c in args.configs.split(",")]
    ray.cloudpickle.register_pickle_by_value(allreduce)  # the peers' class travels to the hosts' workers
    table = []
    for config in configs:
        table += summarize(config, run_config(config, args), args)
    markdown = markdown_table(HEADER, table)
    print(markdown)
    if args.output:
        append_run(
            args.output,
            f"capped hosts in network namespaces, {args.peers} peers, {args.miners} miners, {args.size_mib:g} MiB "
            f"float32, chunk {args.chunk_mib:g} MiB, {args.reps} reps (median)",
            markdown,
            command="python (as root)",
        )


if __name__ == "__main__":
    main()
