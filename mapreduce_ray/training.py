"""Data-parallel training helpers: average a model's gradients through miners, and cut global batches.

    loss.backward()
    average_gradients(peer, model.parameters())   # every peer now holds the global batch's gradient
    optimizer.step()

With equal shards of one global batch, the average of the peers' mean-loss gradients is the
gradient of the global batch's mean loss, so P peers step as one process on the whole batch.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from mapreduce_ray.peer import Peer


def average_gradients(peer: Peer, parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """Average the parameters' gradients across all peers in one all_reduce round; the flat buffer averaged.

    A parameter without a gradient counts as zeros, so every peer hands in the same shape.
    """
    params = list(parameters)
    flat = torch.cat([_grad_of(p).reshape(-1) for p in params])
    peer.all_reduce(flat, "avg")
    offset = 0
    for p in params:
        n = p.numel()
        if p.grad is None:
            p.grad = torch.empty_like(p)
        p.grad.copy_(flat[offset : offset + n].view_as(p))
        offset += n
    return flat


def _grad_of(param: torch.nn.Parameter) -> torch.Tensor:
    return torch.zeros_like(param) if param.grad is None else param.grad.detach()


def batch_schedule(example_count: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """The global batch of every step: example indices from seeded epoch-wise shuffles, the same on every peer."""
    if not 0 < batch_size <= example_count:
        raise ValueError(f"batch_size must be in 1..{example_count} (the training examples), got {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    batches = []
    for _ in range(steps):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(example_count, generator=generator)])
        batches.append(order[:batch_size])
        order = order[batch_size:]
    return batches


def rank_share(batch: torch.Tensor, rank: int, peer_count: int) -> torch.Tensor:
    """Rank `rank`'s (1..peer_count) equal share of a global batch."""
    if len(batch) % peer_count:
        raise ValueError(f"a global batch of {len(batch)} does not split evenly across {peer_count} peers")
    size = len(batch) // peer_count
    return batch[(rank - 1) * size : rank * size]
