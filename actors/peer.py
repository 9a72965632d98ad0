"""PeerActor: a trainer process on the cluster, holding one Peer.

Jobs and notebooks start P of these and run work in them with `run(fn, ...)`,
which calls fn(peer, ...) inside the actor, so the work lives with the caller.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mapreduce_ray.peer import Peer
from mapreduce_ray.types import JobSpec


class PeerActor:
    """Create with `ray.remote(PeerActor).remote(rank, peer_count, **peer_kwargs)`."""

    def __init__(self, rank: int, peer_count: int, **peer_kwargs: Any):
        torch.set_num_threads(1)
        self.peer = Peer(rank, peer_count, **peer_kwargs)

    def init_process_group(self) -> JobSpec:
        return self.peer.init_process_group()

    def destroy_process_group(self) -> None:
        self.peer.destroy_process_group()

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Return fn(peer, *args, **kwargs), run in this actor."""
        return fn(self.peer, *args, **kwargs)
