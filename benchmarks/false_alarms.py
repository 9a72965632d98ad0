"""False alarms of the peers' result checks: honest rounds of every supported dtype, counted.

    python benchmarks/false_alarms.py --rounds 1000 --output benchmarks/RESULTS.md

A local subnet of honest miners and P peers (threads of this process) run `--rounds`
all_reduce rounds per dtype (sum and, for floating types, avg taking turns) on fresh random
tensors whose scale changes every round, cut into several chunks per miner. Every peer
checks every reduced chunk against the peers' sketches (mapreduce_ray.sketch) and the peers
settle every segment together; anything that hands an honest miner's segment to the next
miner (a failed check, another peer's refusal, a timeout) counts as a false alarm. Every
result is also compared bit for bit with the reference reduction.
"""

from __future__ import annotations

import argparse
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from report import append_run, markdown_table

from actors import init_local_ray, start_local_subnet
from mapreduce_ray import Peer
from mapreduce_ray.dtypes import SUPPORTED, dtype_named
from mapreduce_ray.reference import reference_reduce

SCALES = (1e-3, 1.0, 1e3)


class AlarmCounter(logging.Handler):
    """Counts the rounds' log lines that hand a segment to the next miner: a failed check, a refusal, a timeout."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.alarms: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "goes to the next miner" in record.getMessage():
            self.alarms.append(record.getMessage())


def contribution(name: str, numel: int, seed: int, scale: float) -> torch.Tensor:
    dtype = dtype_named(name)
    generator = torch.Generator().manual_seed(seed)
    if dtype.is_integer:
        info = torch.iinfo(dtype.torch_dtype)
        return torch.randint(info.min, info.max, (numel,), generator=generator, dtype=dtype.torch_dtype)
    values = torch.randn(numel * (2 if dtype.torch_dtype.is_complex else 1), generator=generator, dtype=torch.float64)
    if dtype.torch_dtype.is_complex:
        values = torch.view_as_complex(values.reshape(numel, 2))
    return (values * scale).to(dtype.torch_dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1000, help="rounds per dtype")
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--miners", type=int, default=2)
    parser.add_argument("--numel", type=int, default=65536, help="elements per rank and round")
    parser.add_argument("--chunk-kib", type=float, default=64, help="so a segment travels in several chunks")
    parser.add_argument("--output", help="also append the result as markdown to this file")
    args = parser.parse_args()
    counter = AlarmCounter()
    logging.getLogger("mapreduce_ray.rounds").addHandler(counter)
    init_local_ray(object_store_mib=512)
    subnet = start_local_subnet(
        args.miners, peers=args.peers, chunk_mib=args.chunk_kib / 1024, validator={"verify": {"fraction": 0.0}}
    )
    rows = []
    try:
        for name in sorted(SUPPORTED):
            ops = ["sum"] if dtype_named(name).is_integer else ["sum", "avg"]
            peers = [Peer(r, args.peers, job=f"alarms-{name}", **subnet.peer_options) for r in range(1, 1 + args.peers)]
            for peer in peers:
                peer.init_process_group()
            before, wrong, start = len(counter.alarms), 0, time.perf_counter()
            try:
                with ThreadPoolExecutor(args.peers) as pool:
                    for k in range(args.rounds):
                        op, scale = ops[k % len(ops)], SCALES[k % len(SCALES)]
                        tensors = [contribution(name, args.numel, k * 1000 + r, scale) for r in range(args.peers)]
                        expected = reference_reduce(tensors, op)
                        results = list(pool.map(lambda p, t=tensors, o=op: p.all_reduce(t[p.rank - 1], o), peers))
                        wrong += sum(not torch.equal(result, expected) for result in results)
            finally:
                for peer in peers:
                    peer.destroy_process_group()
            seconds = time.perf_counter() - start
            alarms = len(counter.alarms) - before
            rows.append((name, str(args.rounds), str(alarms), str(wrong), f"{seconds:.1f}"))
            print(f"{name}: {args.rounds} rounds, {alarms} false alarms, {wrong} wrong results, {seconds:.1f} s")
    finally:
        subnet.shutdown()
    table = markdown_table(("dtype", "rounds", "false alarms", "results not bit-exact", "seconds"), rows)
    print(table)
    if args.output:
        title = (
            f"false alarms of the peers' checks, {args.peers} peers, {args.miners} honest miners, "
            f"{args.numel} elements per rank, chunk {args.chunk_kib:g} KiB"
        )
        append_run(args.output, title, table)


if __name__ == "__main__":
    main()
