"""A validator's benchmarks of miners: its bots play a one-miner job at the miner, as a live job's.

The validator's loop starts one for each miner due (`start_due`) and collects them when done
(`collect`); a job whose miners must prove more capacity, or a peer asking for its job's miners
to be measured (`measure_job`), has them benchmarked at once (`prove`). A benchmark admits a bot
of the validator's at each rank (drawn at random from the free ones), made as a live job's spec
is, with a job secret so its results are checked as a live job's are; its time from its last
rank's start to its last rank's end (bots' wall clocks) and its worst rank's outcome are the
result, recorded in the ledger (a wrong result is a strike).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass, field, replace

import ray

from actors.validator.directory import MinerDirectory
from actors.validator.jobs import JobBook, new_job_id
from mapreduce_ray.errors import JobError
from mapreduce_ray.messages import (
    BenchmarkRequest,
    BenchmarkResult,
    JobAdmission,
    Measurements,
    MinerMeasurement,
    Outcome,
)
from mapreduce_ray.metrics import record_benchmark
from mapreduce_ray.naming import benchmark_name
from mapreduce_ray.protocol import MetagraphCache
from mapreduce_ray.sketch import SECRET_BYTES
from mapreduce_ray.types import JobSpec
from mapreduce_ray.validator.config import ValidatorConfig
from mapreduce_ray.validator.ledger import MinerLedger

log = logging.getLogger(__name__)

PROVE_POLL_S = 0.05  # how often a benchmark on demand looks for a free bot and for results
WORST_FIRST = (Outcome.WRONG, Outcome.LATE, Outcome.FAILED, Outcome.EXACT)  # a benchmark's outcome: its worst rank's


@dataclass
class _Benchmark:
    """A benchmark of miner `uid` running: `refs[r - 1]` is the BenchmarkResult of the bot at rank r."""

    uid: int
    bots: tuple[str, ...]  # the hotkeys of the bots, by rank
    size: int  # bytes per rank
    refs: tuple[ray.ObjectRef, ...]
    started: float = field(default_factory=time.monotonic)

    def done(self) -> bool:
        return len(ray.wait(list(self.refs), num_returns=len(self.refs), timeout=0)[0]) == len(self.refs)


class Benchmarks:
    """The benchmarks of the validator whose settings are `config`, run by its bots (BenchmarkActors in its Ray
    namespace) at the miners of `miners`, admitted through `jobs`, recorded in `ledger`."""

    def __init__(
        self,
        config: ValidatorConfig,
        ledger: MinerLedger,
        miners: MinerDirectory,
        jobs: JobBook,
        metagraph: MetagraphCache,
        netuid: int,
    ):
        self.config, self.ledger, self.miners, self.jobs = config, ledger, miners, jobs
        self._metagraph, self._netuid = metagraph, netuid
        self._lock = threading.Lock()  # guards the loop's runs, the bots in use and the count
        self._running: list[_Benchmark] = []  # the loop's
        self._bots_in_use: set[str] = set()
        self.done = 0  # benchmarks recorded

    def running(self) -> int:
        """Benchmarks under way (the loop's and those on demand)."""
        with self._lock:
            return len(self._bots_in_use) // self.config.benchmark.peers

    def start_due(self) -> None:
        """Start a benchmark of each served miner due for one, while bots are free."""
        served = self.miners.miners
        size = self.config.benchmark.size_bytes
        for uid in self.ledger.due_for_benchmark(self.config.benchmark.interval_s):
            if uid not in served:
                continue
            bots = self._take_bots()
            if bots is None:
                return
            if not self.ledger.claim([uid], failed_too=True):
                self._free_bots(hotkey for hotkey, _ in bots)
                continue
            run = self._order(uid, bots, size)
            if run is None:
                self.ledger.release([uid])
                continue
            with self._lock:
                self._running.append(run)

    def collect(self) -> None:
        """Record the loop's benchmarks that are done, or long overdue, and free their miners and bots."""
        with self._lock:
            pending = list(self._running)
        overdue_s = 3 * self.config.timeout_s
        for run in pending:
            done = run.done()
            if not done and time.monotonic() - run.started <= overdue_s:
                continue
            with self._lock:
                if run not in self._running:
                    continue  # another thread collected it
                self._running.remove(run)
            try:
                self._finish(run, done)
            finally:
                self.ledger.release([run.uid])

    def prove(self, sizes: dict[int, int]) -> dict[int, Outcome]:
        """Benchmark these miners ({uid: bytes per rank}) now, with the bots free (waiting for them within the
        benchmark deadline), record the results, and answer each one's outcome (LATE when no bots or results
        came in time). The miners are in a job of the caller's: they are not claimed here."""
        deadline = time.monotonic() + self.config.timeout_s
        waiting, running, outcomes = dict(sizes), [], {}
        while (waiting or running) and time.monotonic() < deadline:
            if waiting:
                self.collect()  # frees the loop's bots that are done: the loop may wait for our caller
            for uid in list(waiting):
                bots = self._take_bots()
                if bots is None:
                    break
                size = waiting.pop(uid)
                run = self._order(uid, bots, size)
                if run is None:
                    outcomes[uid] = Outcome.FAILED
                else:
                    running.append(run)
            if running:
                ray.wait([ref for run in running for ref in run.refs], num_returns=1, timeout=PROVE_POLL_S)
            else:
                time.sleep(PROVE_POLL_S)
            for run in [run for run in running if run.done()]:
                running.remove(run)
                outcomes[run.uid] = self._finish(run, done=True)
        for run in running:  # its bots' rounds end by their own deadline
            outcomes[run.uid] = self._finish(run, done=False)
        for uid, size in waiting.items():
            log.warning("no benchmark bots were free to benchmark miner uid %d at %d bytes in time", uid, size)
            outcomes[uid] = Outcome.LATE
        return outcomes

    def measure_job(self, request: BenchmarkRequest, peer: str) -> Measurements:
        """Benchmark a job's miners now, as one of its peers asks: each at the larger of the usual benchmark size
        and the capacity it holds for the job, up to the job's and this validator's largest benchmark."""
        job = self.jobs.find(request.job_id)
        if job is None or job.ranks.get(request.rank) != peer:
            raise JobError(f"hotkey {peer} holds no rank {request.rank} in a running job {request.job_id!r}")
        largest = min(job.benchmark_max_bytes, self.config.benchmark.max_size_bytes)
        if largest <= 0:
            raise JobError(
                f"job {job.spec.name!r} lets the validator run no benchmark; join with Peer(benchmark_max_size=...)"
            )
        usual = self.config.benchmark.size_bytes
        sizes = {slot.uid: min(max(usual, slot.capacity), largest) for slot in job.spec.miners}
        outcomes = self.prove(sizes)
        records = {r.uid: r for r in self.ledger.records()}
        return Measurements(
            job.spec.job_id,
            tuple(
                MinerMeasurement(
                    slot.uid,
                    slot.hotkey,
                    outcomes[slot.uid],
                    sizes[slot.uid],
                    records[slot.uid].throughput if slot.uid in records else 0.0,
                    records[slot.uid].capacity if slot.uid in records else 0,
                )
                for slot in job.spec.miners
            ),
        )

    def _order(self, uid: int, bots: list[tuple[str, object]], size: int) -> _Benchmark | None:
        """Admit `bots` at miner `uid`, one at each rank, and start their benchmark of `size` bytes per rank;
        None (recorded as failed, the bots freed) when the miner refused or could not be reached."""
        hotkeys = tuple(hotkey for hotkey, _ in bots)
        try:
            spec = self._job(uid, hotkeys, size)
        except Exception as e:  # the miner refused the admission, or cannot be reached
            log.warning("could not start a benchmark of miner uid %d: %s", uid, e)
            self._free_bots(hotkeys)
            self.ledger.record_benchmark(uid, size, 0.0, False)
            return None
        seed, secret = secrets.randbits(63), secrets.token_bytes(SECRET_BYTES)  # its results checked as a live job's
        refs = tuple(
            handle.run.remote(spec, size, rank, seed, secret) for rank, (_, handle) in enumerate(bots, start=1)
        )
        return _Benchmark(uid, hotkeys, size, refs)

    def _job(self, uid: int, bots: tuple[str, ...], size: int) -> JobSpec:
        """A one-miner job of `size` bytes per rank with bot `bots[r - 1]` at rank r, admitted at the miner: its
        spec made as a live job's is, with what the ledger knows of the miner."""
        record = next((r for r in self.ledger.records() if r.uid == uid), None)
        throughput = record.throughput if record else 0.0
        capacity = max(size, record.capacity if record else 0)  # what it holds for a job, or is asked to prove
        place = self.miners.place(uid)
        slot = self.miners.miners[uid].slot(1.0, throughput * self.config.benchmark.peers, place, capacity)
        job_id = new_job_id()
        spec = JobSpec(
            job_id=job_id,
            name=job_id,
            peer_count=len(bots),
            miners=(slot,),
            chunk_bytes=self.config.chunk_bytes,
            timeout_s=self.config.timeout_s,
            max_bytes=capacity,
        )
        for rank, hotkey in enumerate(bots, start=1):
            refused = self.jobs.admit(spec, JobAdmission(spec, rank, hotkey))
            if refused:
                raise next(iter(refused.values()))
        return spec

    def _take_bots(self) -> list[tuple[str, object]] | None:
        """`benchmark.peers` free bots of this validator's drawn at random (with more bots than ranks, who joins
        a benchmark changes), marked in use: (hotkey, actor handle) each; None if fewer are free."""
        graph = self._metagraph.get()
        free = []
        for hotkey in self.config.benchmark.bots:
            neuron = graph.by_hotkey(hotkey)
            if neuron is None:
                continue
            try:
                free.append((hotkey, ray.get_actor(benchmark_name(neuron.uid), namespace=self.config.namespace)))
            except ValueError:
                continue  # registered, but not running in this validator's Ray
        with self._lock:
            free = [(hotkey, handle) for hotkey, handle in free if hotkey not in self._bots_in_use]
            if len(free) < self.config.benchmark.peers:
                return None
            taken = secrets.SystemRandom().sample(free, self.config.benchmark.peers)
            self._bots_in_use.update(hotkey for hotkey, _ in taken)
            return taken

    def _free_bots(self, hotkeys) -> None:
        with self._lock:
            self._bots_in_use.difference_update(hotkeys)

    def _finish(self, run: _Benchmark, done: bool) -> Outcome:
        """Record a benchmark's result (not `done`: none came in time) and free its bots; the outcome. Bots that
        failed (one died, say) measured nothing: nothing is recorded against the miner."""
        try:
            results = ray.get(list(run.refs), timeout=0) if done else None
        except Exception as e:
            log.warning("benchmark of miner uid %d by bots %s failed: %s", run.uid, run.bots, e)
            return Outcome.FAILED
        finally:
            self._free_bots(run.bots)
        return self._record(run.uid, run.size, results and combined(results))

    def _record(self, uid: int, size: int, result: BenchmarkResult | None) -> Outcome:
        if result is None or result.miner_uid != uid or result.size_bytes != size:
            outcome = Outcome.LATE if result is None else Outcome.FAILED
            self.ledger.record_benchmark(uid, size, 0.0, False)
            record_benchmark(self._netuid, uid, outcome)
            return outcome
        miner = self.miners.miners.get(uid)
        host = "" if miner is None else (miner.host if self.config.host_key == "ip" else miner.endpoint)
        passed = result.outcome is Outcome.EXACT
        self.ledger.record_benchmark(uid, size, result.seconds, passed, host)
        record_benchmark(self._netuid, uid, result.outcome)
        with self._lock:
            self.done += 1
        if result.outcome is Outcome.WRONG:
            evidence = {"benchmark": result.detail, "bytes": size}
            log.warning("strike for miner uid %d: %s", uid, evidence)
            self.ledger.strike(uid, self.config.verify.ban_s, evidence)
        return result.outcome


def combined(results: list[BenchmarkResult]) -> BenchmarkResult:
    """One benchmark's result from its ranks': the worst rank's outcome, and the time from when the last rank
    started to when the last one ended. Before every rank started the miner could deliver no chunk, so a bot
    that started early (another took longer to draw its data) does not count its wait against the miner."""
    worst = min(results, key=lambda r: WORST_FIRST.index(r.outcome))
    last = max(results, key=lambda r: r.started_at)
    span = max(r.started_at + r.seconds for r in results) - last.started_at
    # within what the clocks cannot bend: the last rank's own time, and the longest rank's
    seconds = min(max(span, last.seconds), max(r.seconds for r in results))
    return replace(worst, seconds=seconds, started_at=last.started_at)
