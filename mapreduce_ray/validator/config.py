"""What a validator is told: its subnet, how it benchmarks, verifies and scores miners.

Plain settings, validated on construction, and the one place their defaults are defined: the
jobs' `validator.*` config is built from them (jobs.config), so `validator.verify.fraction=0.2` on
the command line sets VerifyConfig.fraction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mapreduce_ray.naming import DEFAULT_NAMESPACE
from mapreduce_ray.validator.scoring import MIB, ScoringConfig

HOST_KEYS = ("ip", "endpoint")


@dataclass(frozen=True)
class BenchmarkConfig:
    """Benchmarks: `bots` are the hotkeys of the benchmark bots this validator orders (each running
    `python -m jobs.benchmark +wallet=NAME` in the validator's Ray; list at least `peers` of them); each
    benchmark runs one all_reduce of `size_mib` per rank across `peers` ranks, each played by a bot of its
    own, through one miner, at most once per `interval_s` per miner, within the validator's `timeout_s`, as
    a live job's round; passing it proves `size_mib` of capacity. A miner's throughput is the best of its
    last `best_of` benchmarks, all passed (a round only falls short of a link, so one slowed by a lost packet
    does not skew the miner's share of a job); a miner that passes one is benchmarked until it has
    `best_of`, back to back. A job larger than its miners' verified capacity has them
    benchmarked at the size it needs, up to `max_size_mib` (capacity on demand)."""

    bots: tuple[str, ...] = ()
    size_mib: float = 64.0
    max_size_mib: float = 256.0
    peers: int = 2
    interval_s: float = 600.0
    best_of: int = 3

    def __post_init__(self):
        _require(self.size_mib > 0, "benchmark.size_mib", self.size_mib, "positive")
        _require(self.max_size_mib >= 0, "benchmark.max_size_mib", self.max_size_mib, "at least 0")
        _require(self.peers >= 1, "benchmark.peers", self.peers, "at least 1")
        _require(self.interval_s >= 0, "benchmark.interval_s", self.interval_s, "at least 0")
        _require(self.best_of >= 1, "benchmark.best_of", self.best_of, "at least 1")

    @property
    def size_bytes(self) -> int:
        return int(self.size_mib * MIB)

    @property
    def max_size_bytes(self) -> int:
        return int(self.max_size_mib * MIB)


@dataclass(frozen=True)
class VerifyConfig:
    """Checks of live rounds: `fraction` of reported rounds are checked; of each segment a miner delivered,
    `chunks` chunks picked at random (0: every chunk) are fetched from the miner and recomputed bit for bit.
    A failed check bans the miner for `ban_s`. At most `max_pending` rounds wait for their check; a round
    chosen beyond that goes unchecked (counted)."""

    fraction: float = 0.1
    chunks: int = 2
    ban_s: float = 3600.0
    max_pending: int = 2

    def __post_init__(self):
        _require(0 <= self.fraction <= 1, "verify.fraction", self.fraction, "in [0, 1]")
        _require(self.chunks >= 0, "verify.chunks", self.chunks, "at least 0")
        _require(self.ban_s >= 0, "verify.ban_s", self.ban_s, "at least 0")
        _require(self.max_pending >= 1, "verify.max_pending", self.max_pending, "at least 1")


@dataclass(frozen=True)
class ValidatorConfig:
    """A validator's settings.

    namespace: the Ray namespace of the validator's own actors (where it finds its bots). chunk_bytes,
    timeout_s: its jobs' chunk size and deadline (the jobs take them from `subnet.namespace`,
    `topology.chunk_mib` and `subnet.timeout_s`). max_miners: miners per job, best score first, segments
    sized by measured throughput. epoch_blocks: blocks between scoring epochs (weights are set then, as the
    chain's rate limit allows). host_key: what makes miners one host, sharing one score ("ip": the IP of
    the endpoint they announce; "endpoint": the whole host:port). tick_s: how often the validator's loop
    runs. job_idle_s: a job without a round or a join this long is ended and its miners freed. jobs_per_peer:
    how many open jobs one peer hotkey may hold a rank in (each new job claims miners).
    scoring, benchmark, verify: see ScoringConfig, BenchmarkConfig and VerifyConfig.
    """

    namespace: str = DEFAULT_NAMESPACE
    chunk_bytes: int = 4 * MIB
    timeout_s: float = 60.0
    max_miners: int = 8
    epoch_blocks: int = 60
    host_key: str = "ip"
    tick_s: float = 1.0
    job_idle_s: float = 600.0
    jobs_per_peer: int = 4
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)

    def __post_init__(self):
        for name in ("chunk_bytes", "timeout_s", "max_miners", "epoch_blocks", "tick_s", "job_idle_s", "jobs_per_peer"):
            _require(getattr(self, name) > 0, name, getattr(self, name), "positive")
        _require(self.host_key in HOST_KEYS, "host_key", self.host_key, f"one of {', '.join(HOST_KEYS)}")

    @classmethod
    def from_dict(cls, settings: dict) -> ValidatorConfig:
        """From nested plain settings (a Hydra config as a dict)."""
        settings = dict(settings)
        nested = {"scoring": ScoringConfig, "benchmark": BenchmarkConfig, "verify": VerifyConfig}
        for key, kind in nested.items():
            if key in settings:
                value = dict(settings[key])
                if key == "benchmark" and "bots" in value:
                    value["bots"] = tuple(value["bots"] or ())
                settings[key] = kind(**value)
        return cls(**settings)


def _require(holds: bool, name: str, value, what: str) -> None:
    if not holds:
        raise ValueError(f"validator.{name} must be {what}, got {value!r}")
