"""DistributedDataParallel with the miners' comm hook trains exactly as DDP with gloo does."""

import sys
import uuid

import ray
import ray.cloudpickle
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import free_port
from torch.nn.parallel import DistributedDataParallel

from mapreduce_ray import Peer
from mapreduce_ray.ddp import allreduce_hook

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the ranks below run in Ray workers

WORLD = 2
STEPS = 4
SHARE = 6  # examples per rank and step
FEATURES = 64
TIMEOUT_S = 120


def make_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, 256), torch.nn.Tanh(), torch.nn.Linear(256, 4))


def train_rank(rank: int, port: int, peer_options: dict | None) -> tuple[torch.Tensor, int]:
    """One DDP rank (0-based) training STEPS steps on its share of each global batch; its parameters, and
    how many rounds it ran through the miners (with the hook, when `peer_options` is given)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        # DDP cuts buckets by size only when it looks for unused parameters; otherwise all go in one
        model = DistributedDataParallel(make_net(), bucket_cap_mb=0.01, find_unused_parameters=True)
        peer = None
        if peer_options is not None:
            peer = Peer(rank + 1, WORLD, **peer_options)
            model.register_comm_hook(peer, allreduce_hook)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        data = torch.Generator().manual_seed(1)
        for _ in range(STEPS):
            x, y = torch.randn(WORLD * SHARE, FEATURES, generator=data), torch.randn(WORLD * SHARE, 4, generator=data)
            mine = slice(rank * SHARE, (rank + 1) * SHARE)
            optimizer.zero_grad()
            F.mse_loss(model(x[mine]), y[mine]).backward()
            optimizer.step()
        rounds = 0
        if peer is not None:
            rounds = peer._seq
            peer.destroy_process_group()
        return torch.nn.utils.parameters_to_vector(model.parameters()).detach(), rounds
    finally:
        dist.destroy_process_group()


class Rank:
    """A process of its own for one rank: the ranks wait for each other, so two of them must never
    queue on one worker, as tasks may."""

    def train(self, rank: int, port: int, peer_options: dict | None) -> tuple[torch.Tensor, int]:
        return train_rank(rank, port, peer_options)


def train(peer_options: dict | None) -> list[tuple[torch.Tensor, int]]:
    port, ranks = free_port(), [ray.remote(num_cpus=0)(Rank).remote() for _ in range(WORLD)]
    try:
        return ray.get([r.train.remote(i, port, peer_options) for i, r in enumerate(ranks)], timeout=TIMEOUT_S)
    finally:
        for r in ranks:
            ray.kill(r)


def rounds_done(subnet) -> int:
    return sum(s["rounds_done"] for s in ray.get([m.status.remote() for m in subnet.miners], timeout=30))


def test_ddp_with_the_hook_gets_the_parameters_ddp_with_gloo_gets(subnets):
    subnet = subnets[2]
    before = rounds_done(subnet)
    hooked = train({**subnet.peer_options, "job": uuid.uuid4().hex})
    reduced_by_miners = rounds_done(subnet) - before
    plain = train(None)

    initial = torch.nn.utils.parameters_to_vector(make_net().parameters()).detach()
    (hook_params, hook_rounds), (other_rank_params, other_rank_rounds) = hooked
    assert torch.equal(hook_params, other_rank_params)  # every rank holds the same bits
    assert hook_rounds == other_rank_rounds >= 2 * STEPS  # several buckets a step, each a round
    assert reduced_by_miners >= hook_rounds  # each round reached the miners (one segment per miner)
    assert not torch.allclose(hook_params, initial)
    print(f"largest difference from gloo: {(hook_params - plain[0][0]).abs().max().item():.2e}")
    torch.testing.assert_close(hook_params, plain[0][0], rtol=1e-5, atol=1e-6)


def test_the_hook_joins_once_and_averages_the_bucket_in_place():
    class FakePeer:
        spec = None
        joins = 0

        def init_process_group(self):
            self.joins += 1
            self.spec = "joined"

        def all_reduce(self, tensor, op):
            assert op == "avg"
            return tensor.div_(2)

    class Bucket:
        def __init__(self, values):
            self._buffer = torch.tensor(values)

        def buffer(self):
            return self._buffer

    peer, bucket = FakePeer(), Bucket([2.0, 4.0])
    for _ in range(2):
        result = allreduce_hook(peer, bucket).wait()
    assert result is bucket.buffer() and result.tolist() == [0.5, 1.0]
    assert peer.joins == 1
