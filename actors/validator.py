"""ValidatorActor: matches jobs to miners, benchmarks them, checks their rounds, scores them, sets weights.

Jobs. A peer sends a signed JobRequest; the validator picks the job's miners
from those that are available (not busy, not banned, benchmarked) by score, sizes
their segments by measured throughput within their verified capacity, marks them
busy, admits the peer at every miner with a signed JobAdmission and answers the
peer with the same admission. A job ends when one of its peers leaves (the others
cannot go on without it; they join again for a new job), or when it has been idle
for `job_idle_s`; its miners are free again.

Benchmarks. A background loop orders the configured benchmark bots to run real
rounds through one miner at a time (actors.benchmark); an exact result records
throughput, capacity and the miner's host; a wrong one is a strike.

Checks. After every round each peer forwards the miners' signed receipts and
results with its own chunks (mapreduce_ray.peer), and each miner hands over its
results. When a round is complete, a random `verify.fraction` of rounds is
checked (actors.checks) with a seed drawn then; a failed check is a strike:
score zeroed, banned for `verify.ban_s`, evidence in the ledger. Miners that peers
saw die, fail or miss their deadline lose reliability. In a job with redundancy,
peers whose miners disagree on a segment ask for a ruling (`arbitrate`): every
replica is recomputed exactly, the wrong ones are struck, and every peer asking
gets the same answer.

Weights. Every `epoch_blocks` the ledger's measurements become EMA scores and
weights on the chain (mapreduce_ray.epoch). Everything it learns lives in its
SQLite ledger in the chain's state dir, so a restarted validator resumes.
"""

from __future__ import annotations

import logging
import math
import os
import random
import secrets
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import ray

from actors.checks import check_segment
from actors.node import actor_node, node_endpoint
from mapreduce_ray.chain import ChainConfig
from mapreduce_ray.epoch import run_epoch
from mapreduce_ray.errors import JobError, MapReduceError, NoValidatorPermitError
from mapreduce_ray.evidence import RoundEvidence, Stored, evidence_of
from mapreduce_ray.ledger import MinerLedger
from mapreduce_ray.matching import Candidate, choose_miners
from mapreduce_ray.messages import (
    BenchmarkOrder,
    BenchmarkResult,
    Dispute,
    JobAdmission,
    JobLeave,
    JobRequest,
    Outcome,
    RoundReport,
    Ruling,
    open_body,
    seal_body,
)
from mapreduce_ray.metrics import record_benchmark, record_check, record_scores
from mapreduce_ray.naming import benchmark_name, miner_name
from mapreduce_ray.plan import failover_order, miner_loads
from mapreduce_ray.protocol import MetagraphCache, Verifier
from mapreduce_ray.remote import get
from mapreduce_ray.scoring import epoch_due
from mapreduce_ray.types import JobSpec, MinerSlot
from mapreduce_ray.validation import ValidatorConfig
from mapreduce_ray.verify import Verdict
from mapreduce_ray.wallets import WalletConfig, load_identity

log = logging.getLogger(__name__)

MAX_CONCURRENCY = 32
CHECK_THREADS = 2


@dataclass
class _Job:
    spec: JobSpec
    miners: list  # actor handles, in spec.miners order
    ranks: dict[int, str] = field(default_factory=dict)  # rank -> peer hotkey, of the peers still in it
    admitted: dict[int, str] = field(default_factory=dict)  # rank -> peer hotkey, of every peer admitted
    active_at: float = field(default_factory=time.monotonic)


@dataclass
class _Benchmark:
    uid: int
    bot: str  # the bot's hotkey
    started: float


class ValidatorActor:
    """Create with `ray.remote(ValidatorActor).options(name=validator_name(uid), namespace=...,
    max_concurrency=MAX_CONCURRENCY).remote(wallet, chain, config)`."""

    def __init__(self, wallet: WalletConfig, chain: ChainConfig, config: ValidatorConfig):
        self._identity = load_identity(wallet)
        self._chain = chain.open()
        self._metagraph = MetagraphCache(self._chain)
        me = self._metagraph.get(refresh=True).by_hotkey(self._identity.hotkey)
        if me is None:
            raise self._chain.not_registered(self._identity.hotkey, wallet)
        self.uid = me.uid
        if not me.validator_permit:
            raise NoValidatorPermitError(
                f"validator uid {self.uid} ({self._identity.hotkey}) holds no validator permit on "
                f"{self._chain.describe()}; permits go to the top stakers: add stake to its hotkey"
            )
        self.config = config
        self._verifier = Verifier(self._identity.hotkey, self._metagraph)
        self._netuid = chain.netuid
        self.ledger = MinerLedger(chain.state_path / f"validator-{chain.netuid}-{self._identity.hotkey}.sqlite")
        self.ledger.recover()
        self._chain.serve(self._identity.keypair, node_endpoint())
        self._lock = threading.Lock()  # guards the job, round and benchmark tables
        self._jobs: dict[str, _Job] = {}
        self._ended: dict[str, tuple[_Job, float]] = {}  # job id -> (job, when): its last reports may follow
        self._rounds: dict[tuple[str, int], RoundEvidence] = {}
        self._rulings: dict[tuple[str, int, int], Future] = {}  # (job id, seq, segment) -> its Ruling
        self._closed: dict[tuple[str, int], RoundEvidence] = {}  # complete rounds of jobs with redundancy
        self._benchmarks: dict[ray.ObjectRef, _Benchmark] = {}
        self._miners: dict[int, tuple[str, object]] = {}  # uid -> (hotkey, actor handle) of live miners
        self._followed: dict[int, str] | None = None  # the miners the ledger last followed
        self._checks = ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="check")
        self._queued_checks = 0
        self._stats = {"checks": 0, "check_failures": 0, "checks_skipped": 0, "benchmarks": 0, "epochs": 0}
        self._last_weights = self._chain.weights().get(self.uid, {})  # what it set before a restart
        self._refresh_miners()
        threading.Thread(target=self._loop, name="validator-loop", daemon=True).start()

    # ---- jobs -------------------------------------------------------------------------------

    def join(self, wire: bytes) -> bytes:
        """Admit the sender of a signed JobRequest; returns the JobAdmission signed for it."""
        request, envelope = open_body(self._verifier, wire, JobRequest)
        name, rank, peer = request.job, request.rank, envelope.sender
        with self._lock:
            job = self._jobs.get(name) or self._new_job(name, request)
            if job.spec.peer_count != request.peer_count:
                raise JobError(
                    f"job {name!r} has {job.spec.peer_count} peers but rank {rank} says {request.peer_count}; "
                    "pass the same peer_count on every peer"
                )
            if (request.redundancy, request.reject_nonfinite) != (job.spec.redundancy, job.spec.reject_nonfinite):
                raise JobError(
                    f"job {name!r} runs with redundancy={job.spec.redundancy}, "
                    f"reject_nonfinite={job.spec.reject_nonfinite} but rank {rank} asks for "
                    f"redundancy={request.redundancy}, reject_nonfinite={request.reject_nonfinite}; "
                    "pass the same on every peer"
                )
            if request.max_bytes is not None and request.max_bytes > job.spec.max_bytes:
                raise JobError(
                    f"rank {rank} hands in up to {request.max_bytes} bytes but job {name!r}'s miners verified "
                    f"capacity for {job.spec.max_bytes}; pass the same bandwidth on every peer"
                )
            if rank in job.ranks:
                raise JobError(
                    f"rank {rank} already joined job {name!r}; a rank joins once: call destroy_process_group() "
                    "first, or use another job name"
                )
            if peer in job.ranks.values():
                raise JobError(f"hotkey {peer} already holds a rank in job {name!r}; each peer needs its own hotkey")
            admission = JobAdmission(job.spec, rank, peer)
            try:
                self._admit(job.spec, job.miners, admission)
            except MapReduceError:
                if not job.ranks:
                    self._end_job(name, job)
                raise
            job.ranks[rank] = job.admitted[rank] = peer
            job.active_at = time.monotonic()
            return seal_body(self._identity.keypair, admission, peer)

    def leave(self, wire: bytes) -> None:
        """The sender of a signed JobLeave leaves its job, which ends: a round needs every peer."""
        leave, envelope = open_body(self._verifier, wire, JobLeave)
        with self._lock:
            for name, job in list(self._jobs.items()):
                if job.spec.job_id == leave.job_id and job.ranks.get(leave.rank) == envelope.sender:
                    self._end_job(name, job)

    def jobs(self) -> list[dict]:
        with self._lock:
            return [
                {"name": name, "job_id": j.spec.job_id, "peer_count": j.spec.peer_count, "ranks": sorted(j.ranks)}
                for name, j in self._jobs.items()
            ]

    def _new_job(self, name: str, request: JobRequest) -> _Job:
        """Choose, claim and describe the miners of a new job (lock held)."""
        self._refresh_miners()
        available = set(self.ledger.available()) & self._miners.keys()
        scores = self.ledger.scores()
        candidates = [
            Candidate(r.uid, r.throughput, r.capacity, scores.get(r.uid, 0.0))
            for r in self.ledger.records()
            if r.uid in available
        ]
        if not candidates:
            raise JobError(self._why_no_miner())
        shares = choose_miners(candidates, request.max_bytes or 0, self.config.max_miners, request.redundancy)
        claimed = self.ledger.claim(sorted(shares))
        if len(claimed) != len(shares):
            self.ledger.release(claimed)
            raise JobError("the chosen miners were taken by another job or a benchmark meanwhile; join again")
        capacity = {c.uid: c.capacity for c in candidates}
        # contribution bytes/s a miner took in during its benchmark: the ledger has bytes/s per benchmark rank
        throughput = {c.uid: c.throughput * self.config.benchmark.peers for c in candidates}
        loads = dict(zip(shares, miner_loads(tuple(shares.values()), request.redundancy), strict=True))
        spec = JobSpec(
            job_id=uuid.uuid4().hex[:12],
            name=name,
            namespace=self.config.namespace,
            peer_count=request.peer_count,
            miners=tuple(MinerSlot(uid, self._miners[uid][0], share, throughput[uid]) for uid, share in shares.items()),
            chunk_bytes=self.config.chunk_bytes,
            timeout_s=self.config.timeout_s,
            max_bytes=math.floor(min(capacity[uid] / load for uid, load in loads.items())),
            redundancy=request.redundancy,
            reject_nonfinite=request.reject_nonfinite,
        )
        job = _Job(spec, [self._miners[uid][1] for uid in shares])
        self._jobs[name] = job
        return job

    def _why_no_miner(self) -> str:
        where = f"{self._chain.describe()} in Ray namespace {self.config.namespace!r}"
        if not self._miners:
            return f"no miner of {where} is running; start one: python -m jobs.miner +wallet=NAME"
        rows = [row for row in self.ledger.table() if row["uid"] in self._miners]
        states = {row["uid"]: row["state"] for row in rows}
        unproven = [row["uid"] for row in rows if row["capacity"] == 0]
        return (
            f"none of the {len(self._miners)} running miner(s) of {where} is free: states {states}, "
            f"not yet benchmarked {unproven}; wait for a job to end or for the benchmarks, or start more miners"
        )

    def _admit(self, spec: JobSpec, miners: list, admission: JobAdmission) -> None:
        calls = [
            handle.admit.remote(seal_body(self._identity.keypair, admission, slot.hotkey))
            for slot, handle in zip(spec.miners, miners, strict=True)
        ]
        get(calls, spec.timeout_s, f"admitting rank {admission.rank} to job {spec.name!r} at its miners")

    def _end_job(self, name: str, job: _Job) -> None:
        """Forget a job and free its miners (lock held)."""
        if self._jobs.get(name) is job:
            del self._jobs[name]
        self._ended[job.spec.job_id] = (job, time.monotonic())
        self.ledger.release([slot.uid for slot in job.spec.miners])

    # ---- round reports and checks ---------------------------------------------------------------

    def report(self, wire: bytes, contributions: list) -> None:
        """A peer's RoundReport with, per delivering miner, the chunks the peer shipped to it."""
        report, envelope = open_body(self._verifier, wire, RoundReport)
        peer = envelope.sender
        with self._lock:
            job = self._job_by_id(report.job_id)
            if job is None or job.admitted.get(report.rank) != peer:
                return  # a job that ended long ago, or a sender that is not this rank
            job.active_at = time.monotonic()
        evidence = [
            (m, evidence_of(job.spec, report, m, peer, receipt, result_wires, chunks))
            for m, receipt, result_wires, chunks in zip(
                report.miners, report.receipts, report.results, contributions, strict=True
            )
        ]
        with self._lock:
            round_ = self._round(job.spec, report.seq)
            round_.add_report(report.rank, evidence, report.late)
        self._close_if_complete(round_)

    def hold_results(self, job_id: str, seq: int, miner: int, segment: int, results: list) -> None:
        """A miner hands over its results of a segment of a round (checked against the fingerprints it signed)."""
        with self._lock:
            job = self._job_by_id(job_id)
            if job is None or not 0 <= miner < len(job.spec.miners):
                return  # a benchmark's round, or a job that ended long ago
            round_ = self._round(job.spec, seq)
            round_.offer(miner, segment, results)
        self._close_if_complete(round_)

    def arbitrate(self, wire: bytes) -> bytes:
        """Rule on a signed Dispute: which of the miners that reduced the segment is exact. The first
        peer to ask has every replica recomputed and the wrong ones struck; later ones get the same Ruling."""
        dispute, envelope = open_body(self._verifier, wire, Dispute)
        key = (dispute.job_id, dispute.seq, dispute.segment)
        with self._lock:
            job = self._job_by_id(dispute.job_id)
            if job is None or job.admitted.get(dispute.rank) != envelope.sender:
                raise JobError(f"hotkey {envelope.sender} is no peer of job {dispute.job_id}; no ruling")
            round_ = self._closed.get((dispute.job_id, dispute.seq)) or self._round(job.spec, dispute.seq)
            ruling = self._rulings.setdefault(key, Future())
            first = not (ruling.running() or ruling.done()) and ruling.set_running_or_notify_cancel()
        if first:
            try:
                ruling.set_result(self._rule(round_, dispute.segment))
            except Exception as e:
                ruling.set_exception(e)
        decided = ruling.result(timeout=job.spec.timeout_s)
        return seal_body(self._identity.keypair, decided, envelope.sender)

    def _rule(self, round_: RoundEvidence, segment: int) -> Ruling:
        """Wait (within the round's deadline) for every replica's evidence, check each exactly, strike the wrong."""
        spec, deadline = round_.spec, time.monotonic() + round_.spec.timeout_s
        while True:
            with self._lock:
                miners = sorted(m for m, s in round_.heard if s == segment)
                ready = len(miners) > 1 and all(round_.comparison(m, segment) is not None for m in miners)
            if ready or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        exact, reasons = [], []
        for miner in miners:
            verdict = self._check_miner(round_, miner, segment, exact=True)
            if verdict is None:
                reasons.append(f"{spec.miners[miner].name}: not enough evidence")
            elif verdict.ok:
                exact.append(miner)
            else:
                reasons.append(f"{spec.miners[miner].name}: {verdict.reason}")
                self._strike(spec.miners[miner].uid, round_, verdict)
        order = failover_order(segment, len(spec.miners))
        winner = min(exact, key=order.index) if exact else None
        return Ruling(spec.job_id, round_.seq, segment, winner, "; ".join(reasons) or "exact")

    def _round(self, spec: JobSpec, seq: int) -> RoundEvidence:
        """The evidence gathered so far about a round (lock held)."""
        return self._rounds.setdefault((spec.job_id, seq), RoundEvidence(spec, seq))

    def _job_by_id(self, job_id: str) -> _Job | None:
        """A running job, or one that ended recently (lock held)."""
        job = next((j for j in self._jobs.values() if j.spec.job_id == job_id), None)
        return job or self._ended.get(job_id, (None,))[0]

    def _close_if_complete(self, round_: RoundEvidence) -> None:
        with self._lock:
            key = (round_.spec.job_id, round_.seq)
            if not round_.complete or self._rounds.get(key) is not round_:
                return
            del self._rounds[key]
            if round_.spec.redundancy > 1:  # disputes about it may still come
                self._closed[key] = round_
        self._close_round(round_)

    def _close_round(self, round_: RoundEvidence) -> None:
        """Count the round for each miner's reliability, and maybe check it."""
        followed = self._followed or {}
        for index, slot in enumerate(round_.spec.miners):
            if followed.get(slot.uid) == slot.hotkey:
                self.ledger.record_round(slot.uid, round_.on_time(index))
        if self.config.verify.fraction <= 0 or random.random() >= self.config.verify.fraction:
            return
        with self._lock:
            if self._queued_checks >= self.config.verify.max_pending:
                self._stats["checks_skipped"] += 1
                return
            self._queued_checks += 1
        self._checks.submit(self._check_round, round_)

    def _check_round(self, round_: RoundEvidence) -> None:
        """Check every segment every miner delivered (but those disputed: a ruling checks them); a check that
        cannot run (an object lost with its owner) is no strike."""
        try:
            with self._lock:
                disputed = {s for job_id, seq, s in self._rulings if (job_id, seq) == (round_.spec.job_id, round_.seq)}
                delivered = sorted((m, s) for m, s in round_.heard if s not in disputed)
            for miner, segment in delivered:
                uid = round_.spec.miners[miner].uid
                try:
                    verdict = self._check_miner(round_, miner, segment, self.config.verify.exact)
                except Exception as e:
                    log.warning("could not check miner uid %d in round %d: %s", uid, round_.seq, e)
                    continue
                if verdict is not None and not verdict.ok:
                    self._strike(uid, round_, verdict)
        finally:
            with self._lock:
                self._queued_checks -= 1

    def _check_miner(self, round_: RoundEvidence, miner: int, segment: int, exact: bool) -> Verdict | None:
        """The Verdict of one miner's segment of a round, or None when the reports do not allow a check."""
        with self._lock:
            comparison = round_.comparison(miner, segment)
        if comparison is None or isinstance(comparison, str):
            verdict = comparison and Verdict(False, math.inf, 0.0, comparison)
        else:
            uid = round_.spec.miners[miner].uid
            miner_node = actor_node(self._miners[uid][1])[0] if uid in self._miners else ""
            verdict = check_segment(
                comparison.contributions,
                Stored(comparison.result, miner_node),
                comparison.dtype,
                comparison.op,
                comparison.numel,
                secrets.randbits(63),
                self.config.verify.samples,
                exact,
                round_.spec.timeout_s,
            )
        if verdict is not None:
            with self._lock:
                self._stats["checks"] += 1
                self._stats["check_failures"] += not verdict.ok
            record_check(self._netuid, round_.spec.miners[miner].uid, verdict.ok)
        return verdict

    def _strike(self, uid: int, round_: RoundEvidence, verdict: Verdict) -> None:
        evidence = {"job": round_.spec.job_id, "seq": round_.seq, "reason": verdict.reason}
        log.warning("strike for miner uid %d: %s", uid, evidence)
        self.ledger.strike(uid, self.config.verify.ban_s, evidence)

    # ---- benchmarks ------------------------------------------------------------------------------

    def _start_benchmarks(self) -> None:
        bots = self._idle_bots()
        if not bots:
            return
        due = [uid for uid in self.ledger.due_for_benchmark(self.config.benchmark.interval_s) if uid in self._miners]
        for (bot_hotkey, bot), uid in zip(bots, due, strict=False):
            if not self.ledger.claim([uid], failed_too=True):
                continue
            try:
                order = self._benchmark_order(uid, bot_hotkey)
                ref = bot.run.remote(seal_body(self._identity.keypair, order, bot_hotkey))
            except Exception as e:  # the miner refused the admission, or died
                log.warning("could not start a benchmark of miner uid %d: %s", uid, e)
                self.ledger.record_benchmark(uid, self.config.benchmark.size_bytes, 0.0, False)
                self.ledger.release([uid])
                continue
            with self._lock:
                self._benchmarks[ref] = _Benchmark(uid, bot_hotkey, time.monotonic())

    def _benchmark_order(self, uid: int, bot_hotkey: str) -> BenchmarkOrder:
        """A one-miner job with the bot at every rank, admitted at the miner."""
        settings = self.config.benchmark
        hotkey, handle = self._miners[uid]
        spec = JobSpec(
            job_id=uuid.uuid4().hex[:12],
            name=f"benchmark-of-{miner_name(uid)}",
            namespace=self.config.namespace,
            peer_count=settings.peers,
            miners=(MinerSlot(uid, hotkey, 1.0),),
            chunk_bytes=self.config.chunk_bytes,
            timeout_s=settings.timeout_s,
            max_bytes=settings.size_bytes,
        )
        for rank in range(1, settings.peers + 1):
            self._admit(spec, [handle], JobAdmission(spec, rank, bot_hotkey))
        return BenchmarkOrder(spec, settings.size_bytes)

    def _idle_bots(self) -> list[tuple[str, object]]:
        graph = self._metagraph.get()
        with self._lock:
            busy = {b.bot for b in self._benchmarks.values()}
        bots = []
        for hotkey in self.config.benchmark.bots:
            neuron = graph.by_hotkey(hotkey)
            if neuron is None or hotkey in busy:
                continue
            try:
                bots.append((hotkey, ray.get_actor(benchmark_name(neuron.uid), namespace=self.config.namespace)))
            except ValueError:
                continue  # registered, but not running here
        return bots

    def _collect_benchmarks(self) -> None:
        with self._lock:
            pending = dict(self._benchmarks)
        if not pending:
            return
        done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
        overdue = [r for r, b in pending.items() if time.monotonic() - b.started > 3 * self.config.benchmark.timeout_s]
        for ref in set(done) | set(overdue):
            run = pending[ref]
            with self._lock:
                self._benchmarks.pop(ref, None)
            try:
                wire = ray.get(ref, timeout=0) if ref in done else None
                result = None if wire is None else open_body(self._verifier, wire, BenchmarkResult, sender=run.bot)[0]
                self._record_benchmark(run.uid, result)
            except Exception as e:
                log.warning("benchmark of miner uid %d by bot %s failed: %s", run.uid, run.bot, e)
            finally:
                self.ledger.release([run.uid])

    def _record_benchmark(self, uid: int, result: BenchmarkResult | None) -> None:
        size = self.config.benchmark.size_bytes
        if result is None or result.miner_uid != uid or result.size_bytes != size:
            self.ledger.record_benchmark(uid, size, 0.0, False)
            record_benchmark(self._netuid, uid, Outcome.LATE if result is None else Outcome.FAILED)
            return
        host = ""
        if uid in self._miners:
            node, ip = actor_node(self._miners[uid][1])
            host = ip if self.config.host_key == "ip" else node
        passed = result.outcome is Outcome.EXACT
        self.ledger.record_benchmark(uid, size, result.seconds, passed, host)
        record_benchmark(self._netuid, uid, result.outcome)
        with self._lock:
            self._stats["benchmarks"] += 1
        if result.outcome is Outcome.WRONG:
            evidence = {"benchmark": result.detail, "bytes": size}
            log.warning("strike for miner uid %d: %s", uid, evidence)
            self.ledger.strike(uid, self.config.verify.ban_s, evidence)

    # ---- the loop --------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:
                log.exception("validator loop")
            time.sleep(self.config.tick_s)

    def tick(self) -> None:
        """One pass of the loop: follow the miners, benchmarks, stale rounds and jobs, the epoch."""
        self._refresh_miners()
        self._collect_benchmarks()
        self._start_benchmarks()
        now = time.monotonic()
        with self._lock:
            stale = [k for k, r in self._rounds.items() if now - r.opened_at > 2 * r.spec.timeout_s]
            rounds = [self._rounds.pop(k) for k in stale]
            self._ended = {k: (j, t) for k, (j, t) in self._ended.items() if now - t <= 2 * j.spec.timeout_s}
            live = {j.spec.job_id for j in self._jobs.values()} | self._ended.keys()
            self._rulings = {k: r for k, r in self._rulings.items() if k[0] in live}
            self._closed = {k: r for k, r in self._closed.items() if now - r.opened_at <= 2 * r.spec.timeout_s}
            for name, job in list(self._jobs.items()):
                if now - job.active_at > self.config.job_idle_s:
                    log.warning("job %r idle for %.0f s: ended", name, now - job.active_at)
                    self._end_job(name, job)
        for round_ in rounds:
            self._close_round(round_)
        if epoch_due(self.ledger.epoch_at, self._chain.block(), self.config.epoch_blocks):
            self.epoch()

    def epoch(self) -> dict[int, float]:
        """Score the miners and set weights now (when the chain allows); the weights set, or {}.
        `status()` shows them as the chain stores them."""
        weights = run_epoch(self.ledger, self._chain, self._identity.keypair, self.config.scoring, set(self._miners))
        with self._lock:
            self._stats["epochs"] += 1
        if weights:
            on_chain = self._chain.weights().get(self.uid, {})  # as the chain quantized them
            with self._lock:
                self._last_weights = on_chain
        record_scores(self._netuid, self.ledger.scores(), self._last_weights)  # replaced, never changed in place
        return weights or {}

    def _refresh_miners(self) -> None:
        """Follow the metagraph's served neurons without a permit in the ledger (a miner whose actor is
        down keeps its record); the live miners are those whose actor runs in the namespace."""
        live, hotkeys = {}, {}
        for neuron in self._metagraph.get().neurons:
            if neuron.endpoint is None or neuron.validator_permit:
                continue
            hotkeys[neuron.uid] = neuron.hotkey
            try:
                live[neuron.uid] = (neuron.hotkey, ray.get_actor(miner_name(neuron.uid), self.config.namespace))
            except ValueError:
                continue
        if hotkeys != self._followed:  # a write: on start, and when a miner came, left or changed hands
            self.ledger.follow(hotkeys)
            self._followed = hotkeys
        self._miners = live

    # ---- status ----------------------------------------------------------------------------------

    def status(self) -> dict:
        with self._lock:
            return {
                "uid": self.uid,
                "hotkey": self._identity.hotkey,
                "pid": os.getpid(),
                "jobs": len(self._jobs),
                "benchmarks_running": len(self._benchmarks),
                "rounds_open": len(self._rounds),
                "checks_queued": self._queued_checks,
                "weights": dict(self._last_weights),
                "weights_set_at": self.ledger.weights_set_at,
                **self._stats,
            }

    def miners(self) -> list[dict]:
        """The ledger: every tracked miner's state, measurements and score."""
        return self.ledger.table()

    def history(self, uid: int) -> list[tuple[str, dict]]:
        return self.ledger.history(uid)
