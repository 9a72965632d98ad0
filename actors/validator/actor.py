"""ValidatorActor: a validator in its own Ray, reached by other parties only through its endpoint.

It serves the validator's Flight endpoint, announced on chain: peers `join` and `leave` jobs
(actors.validator.jobs), `report` their rounds (with evidence of chunks that failed their checks; the
answer names the job's struck miners) and `dispute` results (actors.validator.audit), ask for a
`benchmark` of their job's miners (actors.validator.benchmarks), and anyone may read its `miners`
table; every call is counted by name and caller. A loop follows the served miners, has the bots
benchmark those due, closes stale rounds, ends idle jobs, and every `epoch_blocks` turns the ledger's
measurements into EMA scores and weights on chain (actors.validator.epochs). Everything it learns lives
in its SQLite ledger in the chain's state dir, so a restarted validator resumes.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable

from actors.validator.audit import Auditor
from actors.validator.benchmarks import Benchmarks
from actors.validator.directory import MinerDirectory
from actors.validator.epochs import Epochs
from actors.validator.jobs import JobBook
from mapreduce_ray.chain import ChainConfig
from mapreduce_ray.errors import NoValidatorPermitError
from mapreduce_ray.messages import (
    BenchmarkRequest,
    Dispute,
    JobLeave,
    JobRequest,
    Reports,
    parse,
    seal_body,
)
from mapreduce_ray.metrics import record_refusal, record_validator_call
from mapreduce_ray.naming import validator_name
from mapreduce_ray.protocol import MetagraphCache
from mapreduce_ray.validator.config import ValidatorConfig
from mapreduce_ray.validator.ledger import MinerLedger
from mapreduce_ray.wallets import WalletConfig, load_identity
from mapreduce_ray.wire.auth import Caller, Rule
from mapreduce_ray.wire.config import WireConfig
from mapreduce_ray.wire.endpoint import Endpoint
from mapreduce_ray.wire.tls import announce_address

log = logging.getLogger(__name__)

MAX_CONCURRENCY = 32
RULES = {name: Rule() for name in ("join", "leave", "report", "dispute", "benchmark", "miners")}


class ValidatorEndpoint(Endpoint):
    """The validator's calls, as other parties make them."""

    def __init__(
        self,
        listen: str,
        keypair,
        metagraph: MetagraphCache,
        wire: WireConfig,
        validator: ValidatorActor,
        on_refusal: Callable[[str], None] = lambda error: None,
    ):
        super().__init__(listen, keypair, metagraph, RULES, wire, on_refusal)
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

    def do_exchange(self, context, descriptor, reader, writer):
        self._validator.count_call(context.get_middleware("auth"))
        return super().do_exchange(context, descriptor, reader, writer)

    def _join(self, caller, payload: bytes) -> bytes:
        admission = self._validator.jobs.join(parse(JobRequest, payload), caller.hotkey)
        return self._answer(admission, caller)

    def _leave(self, caller, payload: bytes) -> bytes:
        self._validator.jobs.leave(parse(JobLeave, payload), caller.hotkey)
        return b"{}"

    def _report(self, caller, payload: bytes) -> bytes:
        reports = parse(Reports, payload).reports
        for report in reports:
            self._validator.audit.report(report, caller.hotkey)
        excluded = self._validator.audit.excluded(reports[-1].job_id if reports else "")
        return self._answer(excluded, caller)

    def _dispute(self, caller, payload: bytes) -> bytes:
        ruling = self._validator.audit.arbitrate(parse(Dispute, payload), caller.hotkey)
        return self._answer(ruling, caller)

    def _benchmark(self, caller, payload: bytes) -> bytes:
        measured = self._validator.benchmarks.measure_job(parse(BenchmarkRequest, payload), caller.hotkey)
        return self._answer(measured, caller)

    def _answer(self, body, caller) -> bytes:
        """`body` signed by this validator for the caller, on its subnet."""
        return seal_body(self._keypair, body, caller.hotkey, self.netuid)

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
        self.ledger = MinerLedger(
            chain.state_path / f"validator-{chain.netuid}-{self._identity.hotkey}.sqlite",
            best_of=config.benchmark.best_of,
        )
        self.ledger.recover()
        self._directory = MinerDirectory(self._metagraph, self._identity.keypair, wire)
        self.jobs = JobBook(
            config, self.ledger, self._directory, self._chain.describe(), lambda sizes: self.benchmarks.prove(sizes)
        )
        self.benchmarks = Benchmarks(config, self.ledger, self._directory, self.jobs, self._metagraph, chain.netuid)
        self.audit = Auditor(
            config, self.ledger, self.jobs, self._directory, self._identity.hotkey, chain.netuid, self._followed_now
        )
        self.epochs = Epochs(config, self.ledger, self._chain, self._directory, self._identity.keypair, self.uid)
        self._lock = threading.Lock()  # guards the call counts
        self._followed: dict[int, str] | None = None  # the miners the ledger last followed
        self._calls: Counter[tuple[str, str]] = Counter()  # (call, caller's hotkey) -> calls it made here
        self._refresh_miners()
        name = validator_name(self.uid)
        self.endpoint_server = ValidatorEndpoint(
            listen,
            self._identity.keypair,
            self._metagraph,
            wire,
            self,
            lambda error: record_refusal(chain.netuid, name, error),
        )
        self.endpoint = advertise or self.endpoint_server.address
        announce_address(self._chain, self._identity.keypair, self.endpoint, wire)
        threading.Thread(target=self._loop, name="validator-loop", daemon=True).start()

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
        self.benchmarks.collect()
        self.benchmarks.start_due()
        self.audit.tick()
        self.jobs.expire()
        if self.epochs.due():
            self.epochs.run()

    def epoch(self) -> dict[int, float]:
        """Score the miners and set weights now (when the chain allows); the weights set, or {}."""
        return self.epochs.run()

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
        """Who and where it is, its jobs, benchmarks and calls, its weights (actors.validator.epochs) and checks."""
        with self._lock:
            calls = sum(self._calls.values())
        return {
            "uid": self.uid,
            "hotkey": self._identity.hotkey,
            "endpoint": self.endpoint,
            "pid": os.getpid(),
            "jobs": len(self.jobs.summary()),
            "benchmarks": self.benchmarks.done,
            "benchmarks_running": self.benchmarks.running(),
            "calls": calls,
            **self.epochs.status(),
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
