"""Enums and the small, immutable records that peers, miners and validators exchange."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from mapreduce_ray.dtypes import DType, dtype_named
from mapreduce_ray.naming import miner_name

MAX_DIMS = 64  # torch's own limit on a tensor's dimensions


class ReduceOp(str, Enum):
    """How contributions are combined."""

    SUM = "sum"
    AVG = "avg"

    @classmethod
    def parse(cls, op: str | ReduceOp) -> ReduceOp:
        try:
            return cls(op)
        except ValueError:
            raise ValueError(f"unknown op {op!r}; use one of: avg, sum") from None


class RoundKind(str, Enum):
    ALL_REDUCE = "all_reduce"
    BROADCAST = "broadcast"


@dataclass(frozen=True)
class MinerSlot:
    """A miner taking part in a job: its uid, hotkey and endpoint (host:port, as announced on chain), its
    share of every tensor, and the contribution bytes/s it took in during its latest exact benchmark, as the
    validator measured (0: not told). `certificate`: the hex SHA-256 of its endpoint's TLS key, as announced
    on chain; peers pin its certificate to it ("": it serves plain gRPC). `capacity`: the most bytes of a
    tensor it may hold, its verified capacity (0: no limit told); segments are water-filled within it."""

    uid: int
    hotkey: str
    endpoint: str
    weight: float
    throughput: float = 0.0
    certificate: str = ""
    capacity: int = 0

    @property
    def name(self) -> str:
        return miner_name(self.uid)


@dataclass(frozen=True)
class JobSpec:
    """Everything the parties of a job agree on; the segment plan derives from it."""

    job_id: str
    name: str
    peer_count: int
    miners: tuple[MinerSlot, ...]
    chunk_bytes: int
    timeout_s: float
    max_bytes: int  # the largest tensor whose every segment fits its miners' verified capacity
    redundancy: int = 1  # miners that reduce each segment; peers compare their digests
    reject_nonfinite: bool = False  # miners refuse NaN and Inf in contributions, naming the rank

    @property
    def miner_weights(self) -> tuple[float, ...]:
        return tuple(m.weight for m in self.miners)

    @property
    def contribution_timeout_s(self) -> float:
        """How long a miner waits for every peer's contribution before naming the missing ranks."""
        return self.timeout_s / 3

    @property
    def attempt_timeout_s(self) -> float:
        """How long a peer waits for one miner's results before giving its segment to the next miner."""
        return self.timeout_s / 2


@dataclass(frozen=True)
class TensorSpec:
    """Element type and shape of the tensor a round carries."""

    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self):
        dtype_named(self.dtype)
        if len(self.shape) > MAX_DIMS or any(type(d) is not int or d < 0 for d in self.shape):
            raise ValueError(f"a tensor shape is up to {MAX_DIMS} non-negative ints, got {self.shape!r}")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def dtype_info(self) -> DType:
        return dtype_named(self.dtype)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype_info.itemsize

    def describe(self) -> str:
        return f"{self.dtype} {tuple(self.shape)}"


@dataclass(frozen=True)
class RoundSpec:
    """One collective call of a job, as one peer sees it.

    `tensor` is None only for a broadcast receiver that handed in no tensor; the
    source's spec is then authoritative.
    """

    job: JobSpec
    seq: int
    kind: RoundKind
    op: ReduceOp | None
    src: int | None
    tensor: TensorSpec | None

    def describe(self) -> str:
        return f"{self.kind.value} #{self.seq} of job {self.job.name!r}"
