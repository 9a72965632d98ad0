"""jobs.train's training through miners vs the same training with torch gloo all_reduce, in one run.

    python benchmarks/train.py --peers 4 --miners 2 --steps 150 --output benchmarks/RESULTS.md

Two sets of P TrainerActors train the digits MLP from the same start on the same batches:
one averages its gradients through the miners (Peer.all_reduce), the other with
torch.distributed gloo all_reduce. The sets take turns step by step, so drift in the
machine's load hits both alike. A step lasts from the driver's call to the last trainer's
answer; an all_reduce from the first trainer's start to the last one's end. At the end the
two sets' parameters are compared.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time

import ray
import torch
import torch.distributed as dist
from report import append_run, markdown_table

from actors import init_local_ray, start_local_subnet
from actors.trainer import TrainerActor, TrainSettings

WARMUP_STEPS = 5


class GlooGroup:
    """The part of the Peer API a TrainerActor uses, over a torch.distributed gloo process group."""

    def __init__(self, rank: int, peer_count: int, port: int):
        self.rank, self.peer_count, self.port = rank, peer_count, port

    def init_process_group(self) -> None:
        init = f"tcp://127.0.0.1:{self.port}"
        dist.init_process_group("gloo", init_method=init, rank=self.rank - 1, world_size=self.peer_count)

    def broadcast(self, tensor: torch.Tensor | None, src: int) -> torch.Tensor:
        dist.broadcast(tensor, src - 1)
        return tensor

    def all_reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        dist.all_reduce(tensor)
        return tensor.div_(self.peer_count)

    def destroy_process_group(self) -> None:
        dist.destroy_process_group()


class GlooTrainer(TrainerActor):
    """A TrainerActor whose gradients are averaged by gloo."""

    def __init__(self, rank: int, peer_count: int, settings: TrainSettings, port: int):
        super().__init__(rank, peer_count, settings)
        self.peer = GlooGroup(rank, peer_count, port)

    def init_process_group(self) -> int:
        """As TrainerActor's, except that every rank passes the tensor broadcast fills."""
        self.peer.init_process_group()
        start = torch.nn.utils.parameters_to_vector(self.model.parameters()).detach().clone()
        torch.nn.utils.vector_to_parameters(self.peer.broadcast(start, src=1), self.model.parameters())
        return start.numel() * start.element_size()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--miners", type=int, default=2)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--output", help="append the results to this markdown file")
    args = parser.parse_args()

    init_local_ray(object_store_mib=1024)
    subnet = start_local_subnet(args.miners, peers=args.peers, validator={"benchmark": {"size_mib": 8}})
    settings = TrainSettings(steps=args.steps + WARMUP_STEPS)
    p, port = args.peers, free_port()
    relay = [
        ray.remote(num_cpus=0)(TrainerActor).remote(r, p, settings, job="bench-train", **subnet.peer_options)
        for r in range(1, p + 1)
    ]
    gloo = [ray.remote(num_cpus=0)(GlooTrainer).remote(r, p, settings, port) for r in range(1, p + 1)]
    nbytes = ray.get([t.init_process_group.remote() for t in relay + gloo], timeout=120)[0]
    timings = {"relay": [], "gloo": []}
    for index in range(settings.steps):
        for method, trainers in (("relay", relay), ("gloo", gloo)):
            start = time.perf_counter()
            spans = ray.get([t.step.remote(index) for t in trainers], timeout=60)
            if index >= WARMUP_STEPS:
                reduce_s = max(s["end"] for s in spans) - min(s["start"] for s in spans)
                timings[method].append((time.perf_counter() - start, reduce_s))
    relay_params, gloo_params = ray.get([relay[0].parameters.remote(), gloo[0].parameters.remote()], timeout=60)
    accuracy = ray.get([relay[0].evaluate.remote(), gloo[0].evaluate.remote()], timeout=60)
    ray.get([t.destroy_process_group.remote() for t in relay + gloo], timeout=60)
    subnet.shutdown()
    difference = (relay_params - gloo_params).abs().max().item()

    step = {m: statistics.median(s for s, _ in t) for m, t in timings.items()}
    reduce = {m: statistics.median(r for _, r in t) for m, t in timings.items()}
    header = ("method", "step ms", "all_reduce ms", "steps/s", "held-out accuracy", "gloo step time / step time")
    rows = [
        (
            m,
            f"{step[m] * 1e3:.1f}",
            f"{reduce[m] * 1e3:.1f}",
            f"{1 / step[m]:.1f}",
            f"{acc:.3f}",
            f"{step['gloo'] / step[m]:.3f}",
        )
        for m, (_, acc) in zip(("relay", "gloo"), accuracy, strict=True)
    ]
    table = markdown_table(header, rows)
    print(table)
    if args.output:
        append_run(
            args.output,
            f"training through miners vs gloo, {p} trainers, {args.miners} miners, a {nbytes / 1024:.1f} KiB "
            f"float32 gradient, median of {args.steps} steps after {WARMUP_STEPS} of warm-up",
            table,
            f"Largest difference between the two sets' parameters: {difference:.2e}",
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
