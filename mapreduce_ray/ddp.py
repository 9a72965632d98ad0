"""A DistributedDataParallel communication hook that averages gradient buckets through miners.

An existing DDP script keeps its process group (DDP still uses it to broadcast the
initial parameters and buffers) and adds one line after wrapping the model:

    model = DistributedDataParallel(net)
    model.register_comm_hook(Peer(dist.get_rank() + 1, dist.get_world_size(), **subnet_options), allreduce_hook)

Peer ranks run from 1, torch.distributed ranks from 0. Each bucket DDP hands the hook
becomes one all_reduce round through the miners; the peer joins its job on the first one.
"""

import torch
import torch.distributed as dist

from mapreduce_ray.peer import Peer


def allreduce_hook(peer: Peer, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average `bucket`'s flat gradient buffer across all peers in place; a completed future holding it."""
    if peer.spec is None:
        peer.init_process_group()
    done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    done.set_result(peer.all_reduce(bucket.buffer(), "avg"))
    return done
