"""A validator's jobs: which peers hold which ranks of which job, and which miners serve it.

A peer's signed JobRequest (the `join` call) opens a job, or joins the open job of that name.
A new job gets the available miners (not busy, not banned, benchmarked) best score first, with
segments sized by measured throughput within verified capacity (mapreduce_ray.validator.matching); the
miners are marked busy. A job whose largest tensor is over their capacity has them benchmarked
at the size it needs first, within the peer's and the validator's largest benchmark. Each peer
is admitted at every miner of its job (the miners' `admit` calls, in parallel) before it gets
its JobAdmission, signed for it, with the job's secret for checking results (never sent to the
miners). A job ends when one of its
peers leaves (the others cannot go on without it), or when it has been idle for `job_idle_s`.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from actors.validator.directory import MinerDirectory
from mapreduce_ray.errors import EndpointError, JobError, LimitExceededError, MapReduceError, RoundTimeoutError
from mapreduce_ray.messages import JobAdmission, JobLeave, JobRequest, Outcome, encode
from mapreduce_ray.sketch import SECRET_BYTES
from mapreduce_ray.types import JobSpec, MinerSlot
from mapreduce_ray.validator.config import ValidatorConfig
from mapreduce_ray.validator.ledger import MinerLedger
from mapreduce_ray.validator.matching import (
    Candidate,
    capacity_wanted,
    choose_miners,
    job_capacity,
    require_fit,
    shares,
)

log = logging.getLogger(__name__)

UNREACHABLE = (EndpointError, RoundTimeoutError)  # what a miner that is down or away looks like


@dataclass
class Job:
    spec: JobSpec
    benchmark_max_bytes: int  # the largest benchmark its peers let the validator run on its miners
    secret: str  # hex; keys the checks of its results, given to its peers and never to its miners ("": none)
    ranks: dict[int, str] = field(default_factory=dict)  # rank -> hotkey, of the peers still in it
    admitted: dict[int, str] = field(default_factory=dict)  # rank -> hotkey, of every peer admitted
    active_at: float = field(default_factory=time.monotonic)


class JobBook:
    """The open jobs, and the ones that ended recently (their last reports may still come)."""

    def __init__(
        self,
        config: ValidatorConfig,
        ledger: MinerLedger,
        miners: MinerDirectory,
        describe: str,
        prove: Callable[[dict[int, int]], dict[int, Outcome]],
    ):
        """`prove({uid: bytes})` benchmarks those miners now at those sizes, records the results in the ledger,
        and answers each one's outcome."""
        self.config, self.ledger, self.miners, self._prove = config, ledger, miners, prove
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
            self._check_jobs_held(name, peer)
            while True:
                job = self._jobs.get(name) or self._new_job(name, request)
                _check_fits(job, request, peer)
                admission = JobAdmission(job.spec, rank, peer, job.secret)
                refused = self.admit(job.spec, JobAdmission(job.spec, rank, peer))
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

    def _check_jobs_held(self, name: str, peer: str) -> None:
        """Refuse a peer that holds ranks in validator.jobs_per_peer other open jobs already (lock held)."""
        held = [n for n, job in self._jobs.items() if n != name and peer in job.ranks.values()]
        if len(held) >= self.config.jobs_per_peer:
            raise LimitExceededError(
                f"hotkey {peer} holds ranks in {len(held)} open jobs already (validator.jobs_per_peer "
                f"{self.config.jobs_per_peer}); leave one (destroy_process_group()) before joining another"
            )

    def leave(self, leave: JobLeave, peer: str) -> None:
        """A peer leaves its job, which ends: a round needs every peer."""
        with self._lock:
            for name, job in list(self._jobs.items()):
                if job.spec.job_id == leave.job_id and job.ranks.get(leave.rank) == peer:
                    self._end(name, job)

    def admit(self, spec: JobSpec, admission: JobAdmission) -> dict[int, MapReduceError]:
        """Admit a peer at every miner of `spec` (in parallel, within the job's deadline); the miners (uid) that
        refused or could not be reached, with why."""
        payload = encode(replace(admission, spec=replace(spec, name=spec.job_id)))  # miners see no job's name
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
        chosen = choose_miners(candidates, self.config.max_miners, request.redundancy)
        claimed = self.ledger.claim([c.uid for c in chosen])
        if len(claimed) != len(chosen):
            self.ledger.release(claimed)
            raise JobError("the chosen miners were taken by another job or a benchmark meanwhile; join again")
        try:
            chosen = self._fit(chosen, request)
            places = {c.uid: self.miners.place(c.uid) for c in chosen}
        except MapReduceError:
            self.ledger.release(claimed)
            raise
        weights = shares(chosen)
        # contribution bytes/s a miner took in during its benchmark: the ledger has bytes/s per benchmark rank
        slots = tuple(
            served[c.uid].slot(weights[c.uid], c.throughput * self.config.benchmark.peers, places[c.uid], c.capacity)
            for c in chosen
        )
        spec = JobSpec(
            job_id=new_job_id(),
            name=name,
            peer_count=request.peer_count,
            miners=slots,
            chunk_bytes=self.config.chunk_bytes,
            timeout_s=self.config.timeout_s,
            max_bytes=job_capacity(chosen, request.redundancy),
            redundancy=request.redundancy,
            reject_nonfinite=request.reject_nonfinite,
        )
        secret = secrets.token_hex(SECRET_BYTES) if request.verify_results else ""
        job = self._jobs[name] = Job(spec, self._largest_benchmark(request), secret)
        return job

    def _fit(self, chosen: list[Candidate], request: JobRequest) -> list[Candidate]:
        """The chosen (claimed) miners, once they hold the request's largest tensor: when it is over their
        verified capacity, they are benchmarked now at the size their throughput share needs, up to the
        smaller of the peer's and the validator's largest benchmark (capacity on demand)."""
        tensor_bytes, redundancy = request.max_bytes or 0, request.redundancy
        if tensor_bytes <= job_capacity(chosen, redundancy):
            return chosen
        largest = min(self._largest_benchmark(request), self.config.benchmark.max_size_bytes)
        capacity = {c.uid: c.capacity for c in chosen}
        sizes = {uid: min(need, largest) for uid, need in capacity_wanted(chosen, tensor_bytes, redundancy).items()}
        sizes = {uid: size for uid, size in sizes.items() if size > capacity[uid]}
        why = f" (benchmarks on demand go up to {largest} bytes: Peer(benchmark_max_size=) and the validator's "
        why += "validator.benchmark.max_size_mib)"
        if sizes:
            log.info("proving capacity on demand for a %d byte tensor: %s", tensor_bytes, sizes)
            failed = {uid: outcome for uid, outcome in self._prove(sizes).items() if outcome is not Outcome.EXACT}
            if failed:
                raise JobError(
                    f"miner(s) {sorted(failed)} did not pass a benchmark at the size this job needs "
                    f"({', '.join(o.value for o in failed.values())}); join again to be matched with other miners"
                )
            measured = {r.uid: r for r in self.ledger.records()}
            chosen = [replace(c, capacity=measured[c.uid].capacity) for c in chosen]
        require_fit(chosen, tensor_bytes, redundancy, why)
        return chosen

    def _largest_benchmark(self, request: JobRequest) -> int:
        """The largest benchmark a request lets this validator run: benchmark_max_bytes, by default the request's
        max_bytes (the validator's own limit when that is None too)."""
        if request.benchmark_max_bytes is not None:
            return request.benchmark_max_bytes
        return request.max_bytes if request.max_bytes is not None else self.config.benchmark.max_size_bytes

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
    if request.verify_results != bool(job.secret):
        raise JobError(
            f"job {name!r} runs with verify_results={bool(job.secret)} but rank {rank} asks for "
            f"verify_results={request.verify_results}; pass the same on every peer"
        )
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


def new_job_id() -> str:
    """A fresh job id: the one name of a job that its miners see, a live job's as a benchmark's."""
    return uuid.uuid4().hex[:12]
