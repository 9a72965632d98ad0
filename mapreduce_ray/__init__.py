"""mapreduce-ray: all_reduce and broadcast through miner relays in Ray's object store."""

from mapreduce_ray.errors import (
    InvalidTensorError,
    JobError,
    MapReduceError,
    RoundMismatchError,
    RoundTimeoutError,
    UnsupportedDtypeError,
)
from mapreduce_ray.peer import Peer
from mapreduce_ray.types import JobSpec, ReduceOp

__all__ = [
    "InvalidTensorError",
    "JobError",
    "JobSpec",
    "MapReduceError",
    "Peer",
    "ReduceOp",
    "RoundMismatchError",
    "RoundTimeoutError",
    "UnsupportedDtypeError",
]
