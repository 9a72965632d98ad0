"""Relay all_reduce vs torch gloo all_reduce vs a numpy floor, measured in one run.

    python benchmarks/allreduce.py --peers 4 --miners 2 --output benchmarks/RESULTS.md

P peer actors each time relay all_reduce (through the miners) and torch.distributed
gloo all_reduce on the same float32 tensor, starting every repetition together
after a gloo barrier; a repetition lasts from the first peer's start to the last
peer's end. ray.util.collective allreduce (gloo) runs in its own P actors. The
methods take turns within every repetition, so drift in the machine's load hits
them alike. The numpy floor is one process summing P arrays and copying the sum
out P times.
algbw = bytes / time; busbw = algbw * 2(P-1)/P (NCCL's definition).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time

import numpy as np
import ray
import torch
import torch.distributed as dist
from report import append_run, markdown_table

from actors import init_local_ray, start_local_subnet
from mapreduce_ray import Peer
from mapreduce_ray.wire.config import WireConfig
from mapreduce_ray.wire.tls import create_certificate

SIZES = {"4KiB": 4 << 10, "1MiB": 1 << 20, "16MiB": 16 << 20, "100MiB": 100 << 20}
METHODS = ("relay", "gloo", "ray.util.collective")


def tensor_for(cache: dict[int, torch.Tensor], nbytes: int, rank: int) -> torch.Tensor:
    """This rank's float32 tensor of `nbytes`, made once per size."""
    if nbytes not in cache:
        cache[nbytes] = torch.rand(nbytes // 4, generator=torch.Generator().manual_seed(rank))
    return cache[nbytes]


class BenchPeer:
    """A peer process holding both a relay Peer and a gloo process group."""

    def __init__(self, rank: int, peers: int, rendezvous: str, peer_options: dict):
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://{rendezvous}", rank=rank - 1, world_size=peers)
        self.peer = Peer(rank, peers, job="bench", **peer_options)
        self.peer.init_process_group()
        self.tensors: dict[int, torch.Tensor] = {}

    def time_round(self, method: str, nbytes: int) -> tuple[float, float]:
        x = tensor_for(self.tensors, nbytes, self.peer.rank)
        run = self.peer.all_reduce if method == "relay" else dist.all_reduce
        dist.barrier()
        start = time.perf_counter()
        run(x)
        return start, time.perf_counter()


class CollectivePeer:
    """A peer in a ray.util.collective gloo group."""

    def __init__(self, rank: int, peers: int):
        import ray.util.collective as col

        torch.set_num_threads(1)
        self.col = col
        col.init_collective_group(peers, rank - 1, backend="gloo", group_name="bench")
        self.rank = rank
        self.tensors: dict[int, torch.Tensor] = {}

    def time_round(self, method: str, nbytes: int) -> tuple[float, float]:
        x = tensor_for(self.tensors, nbytes, self.rank)
        self.col.barrier(group_name="bench")
        start = time.perf_counter()
        self.col.allreduce(x, group_name="bench")
        return start, time.perf_counter()


def round_time(spans: list[tuple[float, float]]) -> float:
    """Last end minus first start across peers."""
    return max(end for _, end in spans) - min(start for start, _ in spans)


def numpy_floor(peers: int, nbytes: int, reps: int) -> list[float]:
    xs = [np.random.default_rng(r).random(nbytes // 4, dtype=np.float32) for r in range(peers)]
    outs = [np.empty_like(xs[0]) for _ in range(peers)]
    acc = np.empty_like(xs[0])
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        np.add(xs[0], xs[1 % peers], out=acc) if peers > 1 else np.copyto(acc, xs[0])
        for x in xs[2:]:
            np.add(acc, x, out=acc)
        for out in outs:
            np.copyto(out, acc)
        times.append(time.perf_counter() - start)
    return times


def wait_until_validator_idle(validator, timeout_s: float = 120.0) -> None:
    """Wait until the validator (its actor) has closed and checked every round it was told about."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = ray.get(validator.status.remote(), timeout=timeout_s)
        if status["rounds_open"] == 0 and status["checks_queued"] == 0:
            return
        time.sleep(0.05)
    raise TimeoutError(f"the validator still had work after {timeout_s:g} s: {status}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--miners", type=int, default=2)
    parser.add_argument("--chunk-mib", type=float, default=4)
    parser.add_argument("--redundancy", type=int, default=1, help="miners that reduce each segment of relay rounds")
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, from {list(SIZES)}")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--object-store-mib", type=int, default=2048)
    parser.add_argument(
        "--verify-fraction",
        type=float,
        default=0.1,
        help="share of relay rounds the validator checks (its default); checks finish between repetitions",
    )
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated subset of {list(METHODS)}; the numpy floor always runs "
        "(a subset, e.g. relay alone, is for profiling; the ratio to gloo then shows '-')",
    )
    parser.add_argument("--tls", action="store_true", help="every endpoint serves grpc+tls (one new certificate)")
    parser.add_argument(
        "--unchecked",
        action="store_true",
        help="relay peers skip the checks of every reduced chunk (Peer(verify_results=False)), to measure their cost",
    )
    parser.add_argument("--output", help="also write the table as markdown to this file")
    args = parser.parse_args()
    sizes = [s.strip() for s in args.sizes.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    for name, given, known in (("size", sizes, SIZES), ("method", methods, METHODS)):
        if unknown := [g for g in given if g not in known]:
            parser.error(f"unknown {name} {unknown}; choose from {list(known)}")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

    init_local_ray(object_store_mib=args.object_store_mib)
    wire = None
    if args.tls:
        folder = tempfile.mkdtemp(prefix="allreduce-tls-")
        cert, key = os.path.join(folder, "endpoint.pem"), os.path.join(folder, "endpoint.key")
        create_certificate(cert, key)
        wire = WireConfig(tls_cert=cert, tls_key=key)
    subnet = start_local_subnet(
        miners=args.miners,
        peers=args.peers,
        chunk_mib=args.chunk_mib,
        validator={"verify": {"fraction": args.verify_fraction}},
        wire=wire,
    )
    port = free_port()
    bench_peer = ray.remote(num_cpus=0)(BenchPeer)
    # the largest tensor: a job over its miners' proven capacity has them benchmarked at the size it needs
    options = {
        **subnet.peer_options,
        "redundancy": args.redundancy,
        "bandwidth": max(SIZES[s] for s in sizes),
        "verify_results": not args.unchecked,
    }
    peers = [bench_peer.remote(r, args.peers, f"127.0.0.1:{port}", options) for r in range(1, args.peers + 1)]
    groups = {m: peers for m in methods if m in ("relay", "gloo")}
    if "ray.util.collective" in methods:
        collective_peer = ray.remote(num_cpus=0)(CollectivePeer)
        groups["ray.util.collective"] = [collective_peer.remote(r, args.peers) for r in range(1, args.peers + 1)]

    rows = []
    for size in sizes:
        nbytes = SIZES[size]
        results: dict[str, list[float]] = {method: [] for method in groups}
        for rep in range(args.warmup + args.reps):
            for method, actors in groups.items():
                wait_until_validator_idle(subnet.validator)  # its checks of earlier relay rounds would skew any timing
                took = round_time(ray.get([a.time_round.remote(method, nbytes) for a in actors]))
                if rep >= args.warmup:
                    results[method].append(took)
        results["numpy floor"] = numpy_floor(args.peers, nbytes, args.warmup + args.reps)[args.warmup :]
        medians = {m: statistics.median(t) for m, t in results.items()}
        for method, t in medians.items():
            algbw = nbytes / t / 1e9
            rows.append(
                (
                    size,
                    method,
                    f"{t * 1e3:.2f}",
                    f"{algbw:.3f}",
                    f"{algbw * 2 * (args.peers - 1) / args.peers:.3f}",
                    f"{medians['gloo'] / t:.2f}" if "gloo" in medians else "-",
                    f"{medians['numpy floor'] / t:.2f}",
                )
            )
            print(" | ".join(rows[-1]), flush=True)

    header = ("size", "method", "median ms", "algbw GB/s", "busbw GB/s", "gloo time / time", "floor time / time")
    table = markdown_table(header, rows)
    print(table)
    if args.output:
        append_run(
            args.output,
            f"{args.peers} peers, {args.miners} miners, redundancy {args.redundancy}, chunk {args.chunk_mib:g} MiB, "
            f"float32, {args.reps} reps (median), validator checking {args.verify_fraction:g} of relay rounds "
            "between repetitions"
            + (", every endpoint over grpc+tls" if args.tls else "")
            + (", peers not checking results" if args.unchecked else ", peers checking every reduced chunk"),
            table,
        )
    subnet.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
