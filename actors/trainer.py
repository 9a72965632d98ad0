"""TrainerActor: one data-parallel trainer of a small classifier on scikit-learn's digits.

Every trainer builds the same model, takes its equal share of each step's global batch,
and averages its gradients with the other trainers through the miners before stepping,
so P trainers take the same steps as one process on the whole global batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from mapreduce_ray.peer import Peer
from mapreduce_ray.training import average_gradients, batch_schedule, rank_share

CLASSES = 10
PIXEL_MAX = 16.0  # the digits' 8x8 pixels hold 0..16


@dataclass(frozen=True)
class TrainSettings:
    """steps of SGD (lr, momentum) on global batches of batch_size examples; an MLP with one hidden
    layer of `hidden` units; `seed` fixes the model, the split and the batches; test_fraction of the
    examples is held out."""

    steps: int = 150
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    hidden: int = 64
    seed: int = 0
    test_fraction: float = 0.2

    def __post_init__(self):
        for name in ("steps", "batch_size", "hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"train.test_fraction must be between 0 and 1, got {self.test_fraction}")


@dataclass(frozen=True)
class Digits:
    """scikit-learn's 1797 8x8 handwritten digits, features scaled to [0, 1], split by a seeded shuffle."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @classmethod
    def load(cls, seed: int, test_fraction: float) -> Digits:
        data = load_digits()
        x = torch.tensor(data.data, dtype=torch.float32) / PIXEL_MAX
        y = torch.tensor(data.target, dtype=torch.long)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        test = order[: int(len(y) * test_fraction)]
        train = order[len(test) :]
        return cls(x[train], y[train], x[test], y[test])


def make_model(settings: TrainSettings, features: int) -> torch.nn.Module:
    """The classifier, initialised from `settings.seed`."""
    torch.manual_seed(settings.seed)
    return torch.nn.Sequential(
        torch.nn.Linear(features, settings.hidden), torch.nn.ReLU(), torch.nn.Linear(settings.hidden, CLASSES)
    )


def make_optimizer(settings: TrainSettings, model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum)


def flat_parameters(model: torch.nn.Module) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of `model` on (x, y)."""
    with torch.no_grad():
        logits = model(x)
        return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


class TrainerActor:
    """Create with `ray.remote(TrainerActor).remote(rank, peer_count, settings, **peer_kwargs)`."""

    def __init__(self, rank: int, peer_count: int, settings: TrainSettings, **peer_kwargs: Any):
        torch.set_num_threads(1)
        self.peer = Peer(rank, peer_count, **peer_kwargs)
        self.settings = settings
        self.data = Digits.load(settings.seed, settings.test_fraction)
        self.batches = batch_schedule(len(self.data.train_y), settings.batch_size, settings.steps, settings.seed)
        rank_share(self.batches[0], rank, peer_count)  # refuses a batch that does not split evenly
        self.model = make_model(settings, self.data.train_x.shape[1])
        self.optimizer = make_optimizer(settings, self.model)

    def init_process_group(self) -> int:
        """Join the job and take rank 1's initial parameters; the gradient's size in bytes."""
        self.peer.init_process_group()
        start = self.peer.broadcast(flat_parameters(self.model) if self.peer.rank == 1 else None, src=1)
        torch.nn.utils.vector_to_parameters(start, self.model.parameters())
        return start.numel() * start.element_size()

    def step(self, index: int) -> dict:
        """Train on this rank's share of global batch `index`: its loss and hits, and when its all_reduce ran."""
        share = rank_share(self.batches[index], self.peer.rank, self.peer.peer_count)
        x, y = self.data.train_x[share], self.data.train_y[share]
        self.optimizer.zero_grad()
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        start = time.time()
        average_gradients(self.peer, self.model.parameters())
        end = time.time()
        self.optimizer.step()
        return {"loss": loss.item(), "hits": int((logits.argmax(1) == y).sum()), "start": start, "end": end}

    def evaluate(self) -> tuple[float, float]:
        """(loss, accuracy) on the held-out digits."""
        return evaluate(self.model, self.data.test_x, self.data.test_y)

    def parameters(self) -> torch.Tensor:
        return flat_parameters(self.model)

    def destroy_process_group(self) -> None:
        self.peer.destroy_process_group()
