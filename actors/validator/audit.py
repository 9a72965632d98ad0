"""A validator's audit of live rounds: the peers' reports, checks of a random share of rounds, rulings.

After each round every peer reports (the `report` call) which miners delivered which segments,
with the miners' signed receipts, and which failed. Once every peer reported (or the round went
stale), each miner's reliability counts the round if it is evidence (mapreduce_ray.validator.evidence: the
round ran, and several distinct peer hotkeys reported; a round closed once is never opened again
by a later report), and a random `verify.fraction` of rounds is
checked: a few chunks of each delivered segment (`verify.chunks`; 0: all) are fetched from the
miner by ticket and recomputed here (actors.validator.checks). A wrong result, or a miner whose own
signatures show it sent peers different results, is a strike: score zeroed, banned for
`verify.ban_s`, evidence in the ledger. A chunk the miner cannot serve is a missed round. A
report may carry evidence that a chunk failed its peer's check (the miner's signed Reduced of
it): that chunk is checked here at once, and the peer's answer names the job's miners struck
now, which its next rounds leave out. In a
job with redundancy, peers whose miners disagree ask for a ruling (`dispute`): every replica is
checked chunk by chunk, the wrong ones are struck, and every peer asking gets the same answer.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from actors.validator.checks import ChunkCheck, Unverifiable, check_chunk
from actors.validator.directory import MinerDirectory
from actors.validator.jobs import Job, JobBook
from mapreduce_ray.errors import JobError
from mapreduce_ray.messages import Dispute, Excluded, RoundReport, Ruling, WrongChunk
from mapreduce_ray.metrics import record_check
from mapreduce_ray.plan import failover_order
from mapreduce_ray.types import JobSpec
from mapreduce_ray.validator.config import ValidatorConfig
from mapreduce_ray.validator.evidence import JobRounds, RoundEvidence, evidence_of, signed_result
from mapreduce_ray.validator.ledger import MinerLedger
from mapreduce_ray.validator.verify import Verdict

log = logging.getLogger(__name__)

CHECK_THREADS = 2
RULING_POLL_S = 0.05


class Auditor:
    """Audits the rounds of `jobs`' jobs for the validator with hotkey `validator` on subnet `netuid`.

    `followed()` gives the miners (uid -> hotkey) whose reliability the ledger keeps."""

    def __init__(
        self,
        config: ValidatorConfig,
        ledger: MinerLedger,
        jobs: JobBook,
        miners: MinerDirectory,
        validator: str,
        netuid: int,
        followed: Callable[[], dict[int, str]],
    ):
        self.config, self.ledger, self.jobs, self.miners = config, ledger, jobs, miners
        self._validator, self._netuid, self._followed = validator, netuid, followed
        self._lock = threading.Lock()
        self._rounds: dict[str, JobRounds] = {}  # job_id -> its rounds open and closed
        self._closed: dict[tuple[str, int], RoundEvidence] = {}  # complete rounds of jobs with redundancy
        self._rulings: dict[tuple[str, int, int], Future] = {}
        self._accused: dict[tuple[str, int, int, int], Future] = {}  # (job_id, seq, miner, segment) -> its check
        self._checks = ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="check")
        self._queued = 0
        self.stats = {"checks": 0, "check_failures": 0, "checks_skipped": 0, "checks_unverifiable": 0}

    def status(self) -> dict:
        """Checks done and failed, and the rounds still open or waiting for their check."""
        with self._lock:
            rounds_open = sum(len(rounds.open) for rounds in self._rounds.values())
            return {**self.stats, "rounds_open": rounds_open, "checks_queued": self._queued}

    # ---- reports ------------------------------------------------------------------------------------

    def report(self, report: RoundReport, peer: str) -> None:
        """A peer's RoundReport, once the miners' signatures in it check out."""
        job = self._job_of(report.job_id, report.rank, peer)
        results = {(d.miner, d.segment): evidence_of(job.spec, report, d, self._netuid) for d in report.deliveries}
        if any(not 0 <= m < len(job.spec.miners) for m in report.late):
            raise JobError(f"the report of rank {report.rank} names miners job {job.spec.name!r} does not have")
        self.jobs.touch(job)
        key = (job.spec.job_id, report.seq)
        with self._lock:
            rounds = self._rounds.setdefault(job.spec.job_id, JobRounds())
            rounds.admit(report.seq, report.rank)
            complete = False
            if not rounds.is_closed(report.seq):
                round_ = rounds.open.get(report.seq)
                if round_ is None:
                    round_ = rounds.open[report.seq] = RoundEvidence(job.spec, report.seq, dict(job.admitted))
                round_.add_report(report.rank, results, report.late)
                complete = round_.complete
            if complete:
                rounds.close(report.seq)
                if job.spec.redundancy > 1:  # disputes about it may still come
                    self._closed[key] = round_
        if complete:
            self._close(job, round_)
        for wrong in report.wrong:
            self._check_evidence(job, report, wrong)

    def excluded(self, job_id: str) -> Excluded:
        """The miners of a job (indexes) that are struck or banned now."""
        job = self.jobs.find(job_id)
        if job is None:
            return Excluded(job_id, ())
        struck = {r.uid for r in self.ledger.records() if r.struck}
        return Excluded(job_id, tuple(i for i, slot in enumerate(job.spec.miners) if slot.uid in struck))

    def _check_evidence(self, job: Job, report: RoundReport, wrong: WrongChunk) -> None:
        """A peer's evidence that a miner's chunk failed its check: the chunk is recomputed here now, once per
        miner and segment of a round (a second peer's evidence waits for that check), and the miner struck if it
        is wrong."""
        body = signed_result(job.spec, report, wrong.miner, wrong.segment, wrong.reduced, self._netuid)
        key = (job.spec.job_id, report.seq, wrong.miner, wrong.segment)
        with self._lock:
            check = self._accused.setdefault(key, Future())
            first = check.set_running_or_notify_cancel() if not (check.running() or check.done()) else False
        if not first:
            check.result(timeout=job.spec.timeout_s)
            return
        spec = job.spec
        uid, endpoint = spec.miners[wrong.miner].uid, spec.miners[wrong.miner].endpoint
        chunk = ChunkCheck(
            spec, dict(job.admitted), report.seq, wrong.miner, wrong.segment, body.chunk, body.digest, body.proofs
        )
        try:
            verdict = check_chunk(self.miners.remote(uid, endpoint), chunk, self._validator, spec.timeout_s)
            self._record(uid, spec.job_id, report.seq, wrong.segment, verdict)
        except (Unverifiable, JobError) as e:
            log.warning("miner uid %d could not be checked on rank %d's evidence: %s", uid, report.rank, e)
        finally:
            check.set_result(None)

    def tick(self) -> None:
        """Close rounds whose reports stopped coming; forget what no dispute or evidence can need any more."""
        now = time.monotonic()
        live = self.jobs.live_ids()
        with self._lock:
            self._rounds = {job_id: rounds for job_id, rounds in self._rounds.items() if job_id in live}
            stale = [
                (job_rounds, seq)
                for job_rounds in self._rounds.values()
                for seq, r in job_rounds.open.items()
                if now - r.opened_at > 2 * r.spec.timeout_s
            ]
            closed = [job_rounds.close(seq) for job_rounds, seq in stale]
            self._rulings = {k: r for k, r in self._rulings.items() if k[0] in live}
            self._accused = {k: c for k, c in self._accused.items() if k[0] in live}
            self._closed = {k: r for k, r in self._closed.items() if now - r.opened_at <= 2 * r.spec.timeout_s}
        for round_ in closed:
            job = self.jobs.find(round_.spec.job_id)
            if job is not None:
                self._close(job, round_)

    def _job_of(self, job_id: str, rank: int, peer: str) -> Job:
        job = self.jobs.find(job_id)
        if job is None or job.admitted.get(rank) != peer:
            raise JobError(f"hotkey {peer} holds no rank {rank} in a job {job_id} of this validator")
        return job

    def _close(self, job: Job, round_: RoundEvidence) -> None:
        """Count the round for each miner's reliability, and maybe check it."""
        followed = self._followed()
        if round_.counts:
            self.ledger.record_rounds(
                {
                    slot.uid: round_.on_time(index)
                    for index, slot in enumerate(round_.spec.miners)
                    if followed.get(slot.uid) == slot.hotkey
                }
            )
        if self.config.verify.fraction <= 0 or random.random() >= self.config.verify.fraction:
            return
        with self._lock:
            if self._queued >= self.config.verify.max_pending:
                self.stats["checks_skipped"] += 1
                return
            self._queued += 1
        self._checks.submit(self._check_round, job, round_)

    # ---- checks -------------------------------------------------------------------------------------

    def _check_round(self, job: Job, round_: RoundEvidence) -> None:
        """Check each segment each miner delivered (but those disputed: a ruling checks them)."""
        try:
            with self._lock:
                disputed = {s for job_id, seq, s in self._rulings if (job_id, seq) == (round_.spec.job_id, round_.seq)}
            for miner, segment in sorted(round_.heard):
                if segment not in disputed:
                    self._judge(job, round_, miner, segment, self.config.verify.chunks)
        except Exception:
            log.exception("checking round %d of job %s", round_.seq, round_.spec.job_id)
        finally:
            with self._lock:
                self._queued -= 1

    def _judge(self, job: Job, round_: RoundEvidence, miner: int, segment: int, chunks: int) -> Verdict | None:
        """Check `chunks` random chunks (0: all) of a miner's segment; strike it when wrong, count a miss when it
        cannot be checked. The Verdict, or None when it could not be checked."""
        uid = round_.spec.miners[miner].uid
        sent = round_.delivered(miner, segment)
        if sent is None:
            return None
        verdict = Verdict(False, sent) if isinstance(sent, str) else None
        picked = (
            range(len(sent))
            if not chunks or isinstance(sent, str)
            else random.sample(range(len(sent)), min(chunks, len(sent)))
        )
        try:
            for chunk in [] if verdict else sorted(picked):
                check = ChunkCheck(round_.spec, dict(job.admitted), round_.seq, miner, segment, chunk, sent[chunk])
                remote = self.miners.remote(uid, round_.spec.miners[miner].endpoint)
                verdict = check_chunk(remote, check, self._validator, round_.spec.timeout_s)
                if not verdict.ok:
                    break
        except (Unverifiable, JobError) as e:
            log.warning("miner uid %d could not be checked in round %d: %s", uid, round_.seq, e)
            self.ledger.record_rounds({uid: False})
            with self._lock:
                self.stats["checks_unverifiable"] += 1
            return None
        if verdict is None:
            return None
        self._record(uid, round_.spec.job_id, round_.seq, segment, verdict)
        return verdict

    def _record(self, uid: int, job_id: str, seq: int, segment: int, verdict: Verdict) -> None:
        """Count a check, and strike the miner it found wrong."""
        with self._lock:
            self.stats["checks"] += 1
            self.stats["check_failures"] += not verdict.ok
        record_check(self._netuid, uid, verdict.ok)
        if not verdict.ok:
            evidence = {"job": job_id, "seq": seq, "segment": segment, "reason": verdict.reason}
            log.warning("strike for miner uid %d: %s", uid, evidence)
            self.ledger.strike(uid, self.config.verify.ban_s, evidence)

    # ---- disputes -----------------------------------------------------------------------------------

    def arbitrate(self, dispute: Dispute, peer: str) -> Ruling:
        """Which of the miners that reduced the disputed segment is exact. The first peer to ask has every
        replica checked and the wrong ones struck; later ones get the same Ruling."""
        job = self._job_of(dispute.job_id, dispute.rank, peer)
        key = (dispute.job_id, dispute.seq, dispute.segment)
        with self._lock:
            ruling = self._rulings.setdefault(key, Future())
            first = ruling.set_running_or_notify_cancel() if not (ruling.running() or ruling.done()) else False
        if first:
            try:
                ruling.set_result(self._rule(job, dispute.seq, dispute.segment))
            except Exception as e:
                ruling.set_exception(e)
        return ruling.result(timeout=job.spec.timeout_s)

    def _rule(self, job: Job, seq: int, segment: int) -> Ruling:
        """Wait (within the round's deadline) for the replicas' reports, check each, strike the wrong."""
        spec: JobSpec = job.spec
        deadline = time.monotonic() + spec.timeout_s
        while True:
            with self._lock:
                open_ = self._rounds.get(spec.job_id, JobRounds()).open
                round_ = self._closed.get((spec.job_id, seq)) or open_.get(seq)
                miners = sorted(m for m, s in round_.heard if s == segment) if round_ else []
                ready = round_ is not None and (round_.complete or len(miners) >= spec.redundancy)
            if ready or time.monotonic() > deadline:
                break
            time.sleep(RULING_POLL_S)
        if round_ is None:
            return Ruling(spec.job_id, seq, segment, None, "no peer reported the round")
        exact, reasons = [], []
        for miner in miners:
            verdict = self._judge(job, round_, miner, segment, chunks=0)
            name = spec.miners[miner].name
            if verdict is None:
                reasons.append(f"{name}: could not be checked")
            elif verdict.ok:
                exact.append(miner)
            else:
                reasons.append(f"{name}: {verdict.reason}")
        order = failover_order(segment, len(spec.miners))
        winner = min(exact, key=order.index) if exact else None
        return Ruling(spec.job_id, seq, segment, winner, "; ".join(reasons) or "exact")
