"""Peak memory of one miner reducing P contributions of S bytes, measured.

    python benchmarks/miner_memory.py --peers 4 --size-mib 64 --chunk-mib 8 --output benchmarks/RESULTS.md

Two Ray nodes on this machine: P peer actors on the head, one miner alone on the
second node, so every contribution is pulled into the miner's own object store.
That store is made deliberately small (default 3*S, half the bound (P+2)*S for
P = 4). Rounds run back to back; every result is checked bit for bit against
the reference; a sampler reads, every few milliseconds, the miner node's store
bytes in use and the miner process's private memory (RssAnon). If a round needed
more memory than the store has, Ray would spill to disk or allocate outside the
store; both counters are reported and must be zero.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import threading
import time

import ray
import torch
from ray._private.internal_api import node_stats
from ray.cluster_utils import Cluster

from actors import PeerActor, start_local_subnet
from mapreduce_ray.reference import reference_reduce
from mapreduce_ray.shards import digest

MIB = 1024 * 1024


def private_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no RssAnon for pid {pid}")


class Sampler(threading.Thread):
    """Tracks the peak of (store bytes on the miner's node + miner private bytes)."""

    def __init__(self, node: dict, pid: int):
        super().__init__(daemon=True)
        self.address, self.port, self.pid = node["NodeManagerAddress"], node["NodeManagerPort"], pid
        self.peak = self.store_at_peak = self.private_at_peak = 0
        self.running = True

    def store_stats(self):
        return node_stats(self.address, self.port, include_memory_info=False).store_stats

    def sample(self) -> tuple[int, int]:
        return self.store_stats().object_store_bytes_used, private_bytes(self.pid)

    def run(self) -> None:
        while self.running:
            store, private = self.sample()
            if store + private > self.peak:
                self.peak, self.store_at_peak, self.private_at_peak = store + private, store, private
            time.sleep(0.002)


def contribution(rank: int, numel: int, seed: int) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(seed + rank))


def all_reduce_round(peer, numel: int, seed: int) -> str:
    tensor = contribution(peer.rank, numel, seed)
    peer.all_reduce(tensor)
    return digest(tensor)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--size-mib", type=float, default=64)
    parser.add_argument("--chunk-mib", type=float, default=8)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--miner-store-mib", type=float, help="object store of the miner's node (default 3*S)")
    parser.add_argument("--output", help="also append the result as markdown to this file")
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    size = int(args.size_mib * MIB)
    miner_store = int((args.miner_store_mib or 3 * args.size_mib) * MIB)
    numel = size // 4

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "object_store_memory": (args.peers + 2) * size + 256 * MIB,
            "resources": {"peer_node": args.peers},
        },
    )
    cluster.add_node(num_cpus=1, object_store_memory=miner_store, resources={"miner_node": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        subnet = start_local_subnet(1, peers=args.peers, chunk_mib=args.chunk_mib, miner_resources={"miner_node": 0.01})
        status = ray.get(subnet.miners[0].status.remote())
        node = next(n for n in ray.nodes() if n["NodeID"] == status["node_id"])
        peer_actor = ray.remote(num_cpus=0, resources={"peer_node": 1})(PeerActor)
        options = {"job": "memory", **subnet.peer_options}
        peers = [peer_actor.remote(r, args.peers, **options) for r in range(1, args.peers + 1)]
        ray.get([p.init_process_group.remote() for p in peers])
        sampler = Sampler(node, status["pid"])
        base_store, base_private = sampler.sample()
        sampler.start()
        exact = True
        for k in range(args.rounds):
            digests = ray.get([p.run.remote(all_reduce_round, numel, 100 * k) for p in peers])
            expected = digest(reference_reduce([contribution(r, numel, 100 * k) for r in range(1, args.peers + 1)]))
            exact &= all(d == expected for d in digests)
        sampler.running = False
        sampler.join()
        final = sampler.store_stats()
        ray.get([p.destroy_process_group.remote() for p in peers])
    finally:
        ray.shutdown()
        cluster.shutdown()

    peak = sampler.peak - base_store - base_private
    bound = (args.peers + 2) * size
    header = (
        "| peers P | S MiB | chunk MiB | rounds | miner node store MiB | store used at peak MiB "
        "| miner private at peak MiB | peak MiB | (P+2)·S MiB | peak / bound | spilled | fallback | results |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    report = (
        f"| {args.peers} | {args.size_mib:g} | {args.chunk_mib:g} | {args.rounds} | {miner_store / MIB:.0f} "
        f"| {(sampler.store_at_peak - base_store) / MIB:.1f} | {(sampler.private_at_peak - base_private) / MIB:.1f} "
        f"| {peak / MIB:.1f} | {bound / MIB:.0f} | {peak / bound:.2f} "
        f"| {final.spilled_bytes_total} B | {final.object_store_bytes_fallback} B "
        f"| {'exact' if exact else 'MISMATCH'} |"
    )
    print(header + "\n" + report)
    if args.output:
        with open(args.output, "a") as f:
            f.write(
                f"\n## {datetime.date.today().isoformat()}: miner peak memory\n\n"
                f"Command: `python {' '.join(sys.argv)}`\n\n{header}\n{report}\n"
            )


if __name__ == "__main__":
    main()
