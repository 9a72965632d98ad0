"""A validator's jobs: which peers hold which ranks of which job, and which miners serve it.

A peer's signed JobRequest (the `join` call) opens a job, or joins the open job of that name.
A new job gets the available miners (not busy, not banned, benchmarked) best score first, with
segments sized by measured throughput within verified capacity (mapreduce_ray.matching); the
miners are marked busy. Each peer is admitted at every miner of its job (the miners' `admit`
calls, in parallel) before it gets its JobAdmission, signed for it. A job ends when one of its
peers leaves (the others cannot go on without it), or when it has been idle for `job_idle_s`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from actors.directory import MinerDirectory
from mapreduce_ray.errors import EndpointError, JobError, MapReduceError, RoundTimeoutError
from mapreduce_ray.ledger import MinerLedger
from mapreduce_ray.matching import Candidate, choose_miners
from mapreduce_ray.messages import JobAdmission, JobLeave, JobRequest, encode
from mapreduce_ray.plan import miner_loads
from mapreduce_ray.types import JobSpec, MinerSlot
from mapreduce_ray.validation import ValidatorConfig

log = logging.getLogger(__name__)

UNREACHABLE = (EndpointError, RoundTimeoutError)  # what a miner that is down or away looks like


@dataclass
class Job:
    spec: JobSpec
    ranks: dict[int, str] = field(default_factory=dict)  # rank -> hotkey, of the peers still in it
    admitted: dict[int, str] = field(default_factory=dict)  # rank -> hotkey, of every peer admitted
    active_at: float = field(default_factory=time.monotonic)


class JobBook:
    """The open jobs, and the ones that ended recently (their last reports may still come)."""

    def __init__(self, config: ValidatorConfig, ledger: MinerLedger, miners: MinerDirectory, describe: str):
        self.config, self.ledger, self.miners = config, ledger, miners
        self._where = describe
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._ended: dict[str, tuple[Job, float]] = {}
        self._calls = ThreadPoolExecutor(8, thread_name_prefix="admit")

    def join(self, request: JobRequest, peer: str) -> JobAdmission:
        """Admit `peer` to the job it asks for, at every miner of the job. A new job whose miners cannot all be
        reached is made again without them (they are marked failed until their next passed benchmark)."""
        name, rank = request.job, request.rank
        with self._lock:
            while True:
                job = self._jobs.get(name) or self._new_job(name, request)
                _check_fits(job, request, peer)
                admission = JobAdmission(job.spec, rank, peer)
                refused = self.admit(job.spec, admission)
                if not refused:
                    break
                unreachable = {uid: e for uid, e in refused.items() if isinstance(e, UNREACHABLE)}
                if job.ranks or len(unreachable) < len(refused):
                    raise next(iter(refused.values()))
                for uid, error in unreachable.items():
                    log.warning("miner uid %d is unreachable: %s", uid, error)
                    self.ledger.fail(uid, str(error))
                self._end(name, job)
            job.ranks[rank] = job.admitted[rank] = peer
            job.active_at = time.monotonic()
            return admission

    def leave(self, leave: JobLeave, peer: str) -> None:
        """A peer leaves its job, which ends: a round needs every peer."""
        with self._lock:
            for name, job in list(self._jobs.items()):
                if job.spec.job_id == leave.job_id and job.ranks.get(leave.rank) == peer:
                    self._end(name, job)

    def admit(self, spec: JobSpec, admission: JobAdmission) -> dict[int, MapReduceError]:
        """Admit a peer at every miner of `spec` (in parallel, within the job's deadline); the miners (uid) that
        refused or could not be reached, with why."""
        payload = encode(admission)
        calls = {slot.uid: self._calls.submit(self._admit_at, slot, payload, spec.timeout_s) for slot in spec.miners}
        return {uid: error for uid, call in calls.items() if (error := call.result()) is not None}

    def _admit_at(self, slot: MinerSlot, payload: bytes, timeout_s: float) -> MapReduceError | None:
        try:
            self.miners.remote(slot.uid, slot.endpoint).call("admit", payload, timeout_s)
        except MapReduceError as e:
            return e
        return None

    def find(self, job_id: str) -> Job | None:
        """A running job, or one that ended recently."""
        with self._lock:
            job = next((j for j in self._jobs.values() if j.spec.job_id == job_id), None)
            return job or self._ended.get(job_id, (None,))[0]

    def touch(self, job: Job) -> None:
        job.active_at = time.monotonic()

    def live_ids(self) -> set[str]:
        with self._lock:
            return {j.spec.job_id for j in self._jobs.values()} | self._ended.keys()

    def expire(self) -> None:
        """End idle jobs; forget jobs that ended long ago."""
        now = time.monotonic()
        with self._lock:
            self._ended = {k: (j, t) for k, (j, t) in self._ended.items() if now - t <= 2 * j.spec.timeout_s}
            for name, job in list(self._jobs.items()):
                if now - job.active_at > self.config.job_idle_s:
                    log.warning("job %r idle for %.0f s: ended", name, now - job.active_at)
                    self._end(name, job)

    def summary(self) -> list[dict]:
        with self._lock:
            return [
                {"name": name, "job_id": j.spec.job_id, "peer_count": j.spec.peer_count, "ranks": sorted(j.ranks)}
                for name, j in self._jobs.items()
            ]

    def _new_job(self, name: str, request: JobRequest) -> Job:
        """Choose, claim and describe the miners of a new job (lock held)."""
        served = self.miners.refresh()
        available = set(self.ledger.available()) & served.keys()
        scores = self.ledger.scores()
        candidates = [
            Candidate(r.uid, r.throughput, r.capacity, scores.get(r.uid, 0.0))
            for r in self.ledger.records()
            if r.uid in available
        ]
        if not candidates:
            raise JobError(self._why_no_miner(served))
        shares = choose_miners(candidates, request.max_bytes or 0, self.config.max_miners, request.redundancy)
        claimed = self.ledger.claim(sorted(shares))
        if len(claimed) != len(shares):
            self.ledger.release(claimed)
            raise JobError("the chosen miners were taken by another job or a benchmark meanwhile; join again")
        capacity = {c.uid: c.capacity for c in candidates}
        # contribution bytes/s a miner took in during its benchmark: the ledger has bytes/s per benchmark rank
        throughput = {c.uid: c.throughput * self.config.benchmark.peers for c in candidates}
        loads = dict(zip(shares, miner_loads(tuple(shares.values()), request.redundancy), strict=True))
        try:
            places = {uid: self.miners.place(uid) for uid in shares}
        except MapReduceError:
            self.ledger.release(claimed)
            raise
        slots = tuple(served[uid].slot(share, throughput[uid], places[uid]) for uid, share in shares.items())
        spec = JobSpec(
            job_id=uuid.uuid4().hex[:12],
            name=name,
            peer_count=request.peer_count,
            miners=slots,
            chunk_bytes=self.config.chunk_bytes,
            timeout_s=self.config.timeout_s,
            max_bytes=math.floor(min(capacity[uid] / load for uid, load in loads.items())),
            redundancy=request.redundancy,
            reject_nonfinite=request.reject_nonfinite,
        )
        job = self._jobs[name] = Job(spec)
        return job

    def _why_no_miner(self, served: dict) -> str:
        if not served:
            return f"no miner of {self._where} serves an endpoint; start one: python -m jobs.miner +wallet=NAME"
        rows = [row for row in self.ledger.table() if row["uid"] in served]
        states = {row["uid"]: row["state"] for row in rows}
        unproven = [row["uid"] for row in rows if row["capacity"] == 0]
        return (
            f"none of the {len(served)} miner(s) of {self._where} is free: states {states}, "
            f"not yet benchmarked {unproven}; wait for a job to end or for the benchmarks, or start more miners"
        )

    def _end(self, name: str, job: Job) -> None:
        """Forget a job and free its miners (lock held)."""
        if self._jobs.get(name) is job:
            del self._jobs[name]
        self._ended[job.spec.job_id] = (job, time.monotonic())
        self.ledger.release([slot.uid for slot in job.spec.miners])


def _check_fits(job: Job, request: JobRequest, peer: str) -> None:
    """Refuse a request that does not fit the job it would join."""
    spec, name, rank = job.spec, request.job, request.rank
    if spec.peer_count != request.peer_count:
        raise JobError(
            f"job {name!r} has {spec.peer_count} peers but rank {rank} says {request.peer_count}; "
            "pass the same peer_count on every peer"
        )
    if not 1 <= rank <= spec.peer_count:
        raise JobError(f"job {name!r} has ranks 1..{spec.peer_count}, not {rank}")
    if (request.redundancy, request.reject_nonfinite) != (spec.redundancy, spec.reject_nonfinite):
        raise JobError(
            f"job {name!r} runs with redundancy={spec.redundancy}, reject_nonfinite={spec.reject_nonfinite} but "
            f"rank {rank} asks for redundancy={request.redundancy}, reject_nonfinite={request.reject_nonfinite}; "
            "pass the same on every peer"
        )
    if request.max_bytes is not None and request.max_bytes > spec.max_bytes:
        raise JobError(
            f"rank {rank} hands in up to {request.max_bytes} bytes but job {name!r}'s miners verified "
            f"capacity for {spec.max_bytes}; pass the same bandwidth on every peer"
        )
    if rank in job.ranks:
        raise JobError(
            f"rank {rank} already joined job {name!r}; a rank joins once: call destroy_process_group() "
            "first, or use another job name"
        )
    if peer in job.ranks.values():
        raise JobError(f"hotkey {peer} already holds a rank in job {name!r}; each peer needs its own hotkey")
