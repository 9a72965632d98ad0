"""Enums and the small, immutable records that peers, miners and validators exchange."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from mapreduce_ray.dtypes import DType, dtype_named
from mapreduce_ray.naming import miner_name


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
    """A miner taking part in a job (its uid and hotkey), its share of every tensor, and the contribution
    bytes/s it took in during its latest exact benchmark, as the validator measured (0: not told)."""

    uid: int
    hotkey: str
    weight: float
    throughput: float = 0.0

    @property
    def name(self) -> str:
        return miner_name(self.uid)


@dataclass(frozen=True)
class JobSpec:
    """Everything the parties of a job agree on; the segment plan derives from it."""

    job_id: str
    name: str
    namespace: str
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
