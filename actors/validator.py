"""ValidatorActor: a validator in its own Ray, reached by other parties only through its endpoint.

It serves the validator's Flight endpoint, announced on chain: peers `join` and `leave` jobs
(actors.jobs), `report` their rounds (with evidence of chunks that failed their checks; the answer
names the job's struck miners) and `dispute` results (actors.audit), ask for a `benchmark` of
their job's miners, and anyone may read its `miners` table. A loop benchmarks miners with the
validator's bots (BenchmarkActors in the same Ray, which reach the miners over the miners'
endpoints), closes stale rounds, ends idle jobs, and every `epoch_blocks` turns the ledger's
measurements into EMA scores and weights on chain (mapreduce_ray.epoch). Everything it learns lives
in its SQLite ledger in the chain's state dir, so a restarted validator resumes.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace

import pyarrow.flight as fl
import ray

from actors.audit import Auditor
from actors.directory import MinerDirectory
from actors.jobs import JobBook, new_job_id
from mapreduce_ray.chain import ChainConfig
from mapreduce_ray.epoch import WeightsSet, run_epoch
from mapreduce_ray.errors import JobError, NoValidatorPermitError
from mapreduce_ray.ledger import MinerLedger
from mapreduce_ray.messages import (
    BenchmarkRequest,
    BenchmarkResult,
    Dispute,
    JobAdmission,
    JobLeave,
    JobRequest,
    Measurements,
    MinerMeasurement,
    Outcome,
    Reports,
    parse,
    seal_body,
)
from mapreduce_ray.metrics import record_benchmark, record_scores, record_validator_call
from mapreduce_ray.naming import benchmark_name
from mapreduce_ray.protocol import MetagraphCache
from mapreduce_ray.scoring import epoch_due
from mapreduce_ray.sketch import SECRET_BYTES
from mapreduce_ray.types import JobSpec
from mapreduce_ray.validation import ValidatorConfig
from mapreduce_ray.wallets import WalletConfig, load_identity
from mapreduce_ray.wire.auth import Caller, Rule
from mapreduce_ray.wire.config import WireConfig
from mapreduce_ray.wire.endpoint import Endpoint
from mapreduce_ray.wire.tls import announce_address

log = logging.getLogger(__name__)

MAX_CONCURRENCY = 32
RULES = {
    name: Rule(fl.FlightMethod.DO_ACTION) for name in ("join", "leave", "report", "dispute", "benchmark", "miners")
}
PROVE_POLL_S = 0.05  # how often a benchmark on demand looks for a free bot and for results


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


WORST_FIRST = (Outcome.WRONG, Outcome.LATE, Outcome.FAILED, Outcome.EXACT)  # a benchmark's outcome: its worst rank's


class ValidatorEndpoint(Endpoint):
    """The validator's calls, as other parties make them."""

    def __init__(self, listen: str, keypair, metagraph: MetagraphCache, wire: WireConfig, validator: ValidatorActor):
        super().__init__(listen, keypair, metagraph, RULES, wire)
        self._keypair, self._validator = keypair, validator

    def actions(self):
        return {
            "join": self._join,
            "leave": self._leave,
            "report": self._report,
            "dispute": self._dispute,
            "benchmark": self._benchmark,
            "miners": self._miners,
        }

    def do_action(self, context, action):
        self._validator.count_call(context.get_middleware("auth"))
        return super().do_action(context, action)

    def _join(self, caller, payload: bytes) -> bytes:
        admission = self._validator.jobs.join(parse(JobRequest, payload), caller.hotkey)
        return seal_body(self._keypair, admission, caller.hotkey, self.netuid)

    def _leave(self, caller, payload: bytes) -> bytes:
        self._validator.jobs.leave(parse(JobLeave, payload), caller.hotkey)
        return b"{}"

    def _report(self, caller, payload: bytes) -> bytes:
        reports = parse(Reports, payload).reports
        for report in reports:
            self._validator.audit.report(report, caller.hotkey)
        excluded = self._validator.audit.excluded(reports[-1].job_id if reports else "")
        return seal_body(self._keypair, excluded, caller.hotkey, self.netuid)

    def _dispute(self, caller, payload: bytes) -> bytes:
        ruling = self._validator.audit.arbitrate(parse(Dispute, payload), caller.hotkey)
        return seal_body(self._keypair, ruling, caller.hotkey, self.netuid)

    def _benchmark(self, caller, payload: bytes) -> bytes:
        measured = self._validator.measure_job(parse(BenchmarkRequest, payload), caller.hotkey)
        return seal_body(self._keypair, measured, caller.hotkey, self.netuid)

    def _miners(self, caller, payload: bytes) -> bytes:
        return json.dumps({"miners": self._validator.miners(), "weights": self._validator.status()["weights"]}).encode()


class ValidatorActor:
    """Create with `ray.remote(ValidatorActor).options(name=validator_name(uid), namespace=...,
    max_concurrency=MAX_CONCURRENCY).remote(wallet, chain, config)`.

    It listens on `listen` (host:port) and announces `advertise` (default: where it listens) on chain.
    """

    def __init__(
        self,
        wallet: WalletConfig,
        chain: ChainConfig,
        config: ValidatorConfig,
        listen: str = "127.0.0.1:0",
        advertise: str | None = None,
        wire: WireConfig | None = None,
    ):
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
        self._netuid = chain.netuid
        wire = wire or WireConfig()
        self.ledger = MinerLedger(chain.state_path / f"validator-{chain.netuid}-{self._identity.hotkey}.sqlite")
        self.ledger.recover()
        self._directory = MinerDirectory(self._metagraph, self._identity.keypair, wire)
        self.jobs = JobBook(config, self.ledger, self._directory, self._chain.describe(), self.prove)
        self.audit = Auditor(
            config, self.ledger, self.jobs, self._directory, self._identity.hotkey, chain.netuid, self._followed_now
        )
        self._lock = threading.Lock()  # guards the benchmark table, the bots in use and the stats
        self._benchmarks: list[_Benchmark] = []  # the loop's
        self._bots_in_use: set[str] = set()
        self._followed: dict[int, str] | None = None  # the miners the ledger last followed
        self._stats = {"benchmarks": 0, "epochs": 0}
        self._calls: Counter[tuple[str, str]] = Counter()  # (call, caller's hotkey) -> calls it made here
        self._last_weights = self._chain.weights().get(self.uid, {})  # what it set before a restart
        self._committed: WeightsSet | None = None  # weights the chain has yet to reveal
        self._refresh_miners()
        self.endpoint_server = ValidatorEndpoint(listen, self._identity.keypair, self._metagraph, wire, self)
        self.endpoint = advertise or self.endpoint_server.address
        announce_address(self._chain, self._identity.keypair, self.endpoint, wire)
        threading.Thread(target=self._loop, name="validator-loop", daemon=True).start()

    # ---- benchmarks ------------------------------------------------------------------------------

    def _start_benchmarks(self) -> None:
        served = self._directory.miners
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
            run = self._order_benchmark(uid, bots, size)
            if run is None:
                self.ledger.release([uid])
                continue
            with self._lock:
                self._benchmarks.append(run)

    def prove(self, sizes: dict[int, int]) -> dict[int, Outcome]:
        """Benchmark these miners ({uid: bytes per rank}) now, with the bots free (waiting for them within the
        benchmark deadline), record the results, and answer each one's outcome (LATE when no bots or results
        came in time). The miners are in a job of the caller's: they are not claimed here."""
        deadline = time.monotonic() + self.config.timeout_s
        waiting, running, outcomes = dict(sizes), [], {}
        while (waiting or running) and time.monotonic() < deadline:
            if waiting:
                self._collect_benchmarks()  # frees the loop's bots that are done: the loop may wait for our caller
            for uid in list(waiting):
                bots = self._take_bots()
                if bots is None:
                    break
                size = waiting.pop(uid)
                run = self._order_benchmark(uid, bots, size)
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
                outcomes[run.uid] = self._finish_benchmark(run, done=True)
        for run in running:  # its bots' rounds end by their own deadline
            outcomes[run.uid] = self._finish_benchmark(run, done=False)
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

    def _order_benchmark(self, uid: int, bots: list[tuple[str, object]], size: int) -> _Benchmark | None:
        """Admit `bots` at miner `uid`, one at each rank, and start their benchmark of `size` bytes per rank;
        None (recorded as failed, the bots freed) when the miner refused or could not be reached."""
        hotkeys = tuple(hotkey for hotkey, _ in bots)
        try:
            spec = self._benchmark_job(uid, hotkeys, size)
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

    def _benchmark_job(self, uid: int, bots: tuple[str, ...], size: int) -> JobSpec:
        """A one-miner job of `size` bytes per rank with bot `bots[r - 1]` at rank r, admitted at the miner: its
        spec made as a live job's is, with what the ledger knows of the miner."""
        record = next((r for r in self.ledger.records() if r.uid == uid), None)
        throughput = record.throughput if record else 0.0
        capacity = max(size, record.capacity if record else 0)  # what it holds for a job, or is asked to prove
        place = self._directory.place(uid)
        slot = self._directory.miners[uid].slot(1.0, throughput * self.config.benchmark.peers, place, capacity)
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

    def _collect_benchmarks(self) -> None:
        with self._lock:
            pending = list(self._benchmarks)
        overdue_s = 3 * self.config.timeout_s
        for run in pending:
            done = run.done()
            if not done and time.monotonic() - run.started <= overdue_s:
                continue
            with self._lock:
                if run not in self._benchmarks:
                    continue  # another thread collected it
                self._benchmarks.remove(run)
            try:
                self._finish_benchmark(run, done)
            finally:
                self.ledger.release([run.uid])

    def _finish_benchmark(self, run: _Benchmark, done: bool) -> Outcome:
        """Record a benchmark's result (not `done`: none came in time) and free its bots; the outcome. Bots that
        failed (one died, say) measured nothing: nothing is recorded against the miner."""
        try:
            results = ray.get(list(run.refs), timeout=0) if done else None
        except Exception as e:
            log.warning("benchmark of miner uid %d by bots %s failed: %s", run.uid, run.bots, e)
            return Outcome.FAILED
        finally:
            self._free_bots(run.bots)
        return self._record_benchmark(run.uid, run.size, results and combined(results))

    def _record_benchmark(self, uid: int, size: int, result: BenchmarkResult | None) -> Outcome:
        if result is None or result.miner_uid != uid or result.size_bytes != size:
            outcome = Outcome.LATE if result is None else Outcome.FAILED
            self.ledger.record_benchmark(uid, size, 0.0, False)
            record_benchmark(self._netuid, uid, outcome)
            return outcome
        miner = self._directory.miners.get(uid)
        host = "" if miner is None else (miner.host if self.config.host_key == "ip" else miner.endpoint)
        passed = result.outcome is Outcome.EXACT
        self.ledger.record_benchmark(uid, size, result.seconds, passed, host)
        record_benchmark(self._netuid, uid, result.outcome)
        with self._lock:
            self._stats["benchmarks"] += 1
        if result.outcome is Outcome.WRONG:
            evidence = {"benchmark": result.detail, "bytes": size}
            log.warning("strike for miner uid %d: %s", uid, evidence)
            self.ledger.strike(uid, self.config.verify.ban_s, evidence)
        return result.outcome

    # ---- the loop --------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:
                log.exception("validator loop")
            time.sleep(self.config.tick_s)

    def tick(self) -> None:
        """One pass of the loop: follow the miners, benchmarks, stale rounds and idle jobs, the epoch."""
        self._refresh_miners()
        self._collect_benchmarks()
        self._start_benchmarks()
        self.audit.tick()
        self.jobs.expire()
        if epoch_due(self.ledger.epoch_at, self._chain.block(), self.config.epoch_blocks):
            self.epoch()

    def epoch(self) -> dict[int, float]:
        """Score the miners and set weights now (when the chain allows); the weights set, or {}.
        `status()` shows them as the chain stores them, and on a commit-reveal subnet the ones it has yet to
        reveal beside them."""
        online = set(self._directory.miners)
        done = run_epoch(self.ledger, self._chain, self._identity.keypair, self.config.scoring, online)
        on_chain = self._chain.weights().get(self.uid, {})  # as the chain quantized them
        with self._lock:
            self._stats["epochs"] += 1
            self._last_weights = on_chain
            if done is not None:
                self._committed = done if done.reveal_round is not None else None
        record_scores(self._netuid, self.ledger.scores(), self._last_weights)  # replaced, never changed in place
        return done.weights if done else {}

    def _refresh_miners(self) -> None:
        """Follow the served miners in the ledger (a miner that stopped serving keeps its record)."""
        hotkeys = {uid: m.hotkey for uid, m in self._directory.refresh().items()}
        if hotkeys != self._followed:  # a write: on start, and when a miner came, left or changed hands
            self.ledger.follow(hotkeys)
            self._followed = hotkeys

    def _followed_now(self) -> dict[int, str]:
        return self._followed or {}

    # ---- status ----------------------------------------------------------------------------------

    def status(self) -> dict:
        with self._lock:
            return {
                "uid": self.uid,
                "hotkey": self._identity.hotkey,
                "endpoint": self.endpoint,
                "pid": os.getpid(),
                "jobs": len(self.jobs.summary()),
                "benchmarks_running": len(self._bots_in_use) // self.config.benchmark.peers,
                "weights": dict(self._last_weights),
                "weights_committed": None if self._committed is None else dict(self._committed.weights),
                "reveal_round": None if self._committed is None else self._committed.reveal_round,
                "weights_set_at": self.ledger.weights_set_at,
                **self._stats,
                "calls": sum(self._calls.values()),
                **self.audit.status(),
            }

    def count_call(self, caller: Caller) -> None:
        """Count an authenticated call into this validator (its name is one of RULES, its caller registered)."""
        with self._lock:
            self._calls[caller.call, caller.hotkey] += 1
        record_validator_call(self._netuid, caller.call)

    def calls(self) -> dict[str, dict[str, int]]:
        """The calls into this validator so far, by name and then by the hotkey that made them."""
        with self._lock:
            counted = dict(self._calls)
        by_name: dict[str, dict[str, int]] = {}
        for (call, hotkey), n in counted.items():
            by_name.setdefault(call, {})[hotkey] = n
        return by_name

    def miners(self) -> list[dict]:
        """The ledger: every tracked miner's state, measurements and score."""
        return self.ledger.table()

    def history(self, uid: int) -> list[tuple[str, dict]]:
        return self.ledger.history(uid)

    def job_table(self) -> list[dict]:
        return self.jobs.summary()


def combined(results: list[BenchmarkResult]) -> BenchmarkResult:
    """One benchmark's result from its ranks': the slowest rank's time and the worst rank's outcome."""
    worst = min(results, key=lambda r: WORST_FIRST.index(r.outcome))
    return replace(worst, seconds=max(r.seconds for r in results))
