"""ValidatorActor: hands out job specs. Peers join a job by name and rank.

This is the validator's role as the subnet's entry point; benchmarking, verifying
and scoring miners build on it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from mapreduce_ray.errors import JobError
from mapreduce_ray.types import JobSpec, MinerSlot


@dataclass
class _Job:
    spec: JobSpec
    ranks: set[int] = field(default_factory=set)


class ValidatorActor:
    """Create with `ValidatorActor.options(name=..., namespace=...).remote(...)`."""

    def __init__(self, namespace: str, miners: list[MinerSlot], chunk_bytes: int, timeout_s: float):
        if not miners:
            raise ValueError("a validator needs at least one miner")
        if chunk_bytes < 1 or timeout_s <= 0:
            raise ValueError(f"chunk_bytes and timeout_s must be positive, got {chunk_bytes}, {timeout_s}")
        self._namespace = namespace
        self._miners = tuple(miners)
        self._chunk_bytes = chunk_bytes
        self._timeout_s = timeout_s
        self._jobs: dict[str, _Job] = {}

    def join(self, name: str, rank: int, peer_count: int) -> JobSpec:
        """Add `rank` to job `name`, creating the job for its first peer."""
        job = self._jobs.get(name)
        if job is None:
            spec = JobSpec(
                job_id=uuid.uuid4().hex[:12],
                name=name,
                namespace=self._namespace,
                peer_count=peer_count,
                miners=self._miners,
                chunk_bytes=self._chunk_bytes,
                timeout_s=self._timeout_s,
            )
            job = self._jobs[name] = _Job(spec)
        if job.spec.peer_count != peer_count:
            raise JobError(
                f"job {name!r} has {job.spec.peer_count} peers but rank {rank} says {peer_count}; "
                "pass the same peer_count on every peer"
            )
        if rank in job.ranks:
            raise JobError(
                f"rank {rank} already joined job {name!r}; a rank joins once: call destroy_process_group() "
                "first, or use another job name"
            )
        job.ranks.add(rank)
        return job.spec

    def leave(self, job_id: str, rank: int) -> None:
        """Remove `rank`; the job ends when its last peer leaves."""
        for name, job in list(self._jobs.items()):
            if job.spec.job_id == job_id:
                job.ranks.discard(rank)
                if not job.ranks:
                    del self._jobs[name]
                return

    def jobs(self) -> list[dict]:
        return [
            {"name": name, "job_id": j.spec.job_id, "peer_count": j.spec.peer_count, "ranks": sorted(j.ranks)}
            for name, j in self._jobs.items()
        ]
