"""Which chain a party talks to, as one picklable record (it travels to Ray actors)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mapreduce_ray.chain.base import DEFAULT_NETUID, Chain

STATE_DIR_ENV = "MAPREDUCE_STATE_DIR"
BACKENDS = ("embedded", "bittensor")


def default_state_dir() -> Path:
    """Where the embedded chain and development wallets live: $MAPREDUCE_STATE_DIR, else ~/.mapreduce-ray."""
    return Path(os.environ.get(STATE_DIR_ENV) or Path.home() / ".mapreduce-ray").expanduser().resolve()


@dataclass(frozen=True)
class ChainConfig:
    """backend "embedded": a SQLite chain in `state_dir` (None: default_state_dir()), offline.
    backend "bittensor": the real chain; `network` is finney, test, local, or a ws:// or wss:// URL.

    For the bittensor backend: version_key (of the weights a validator sets; the subnet's
    WeightsVersionKey wins when higher), fallback_endpoints (ws:// or wss:// URLs tried in turn
    when `network` cannot be reached; none by default, so a client never leaves the network it
    was given), serve_timeout_s (how long announcing an endpoint waits out the chain's serving
    rate limit, as after a restart that moved the endpoint).

    The rest shapes the embedded chain only (the real chain has its own):
    block_time_s, tempo (blocks), weights_rate_limit (blocks between a validator's
    weights; None: one tempo), max_uids, max_validators (permits go to the top
    stakers), immunity_period (blocks a new neuron cannot be replaced).
    """

    backend: str = "embedded"
    netuid: int = DEFAULT_NETUID
    network: str = "finney"
    state_dir: str | None = None
    version_key: int = 0
    fallback_endpoints: tuple[str, ...] = ()
    serve_timeout_s: float = 900.0
    block_time_s: float = 12.0
    tempo: int = 360
    weights_rate_limit: int | None = None
    max_uids: int = 256
    max_validators: int = 64
    immunity_period: int = 0

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown chain backend {self.backend!r}; use one of: {', '.join(BACKENDS)}")
        if self.version_key < 0:
            raise ValueError(f"chain.version_key must be at least 0, got {self.version_key}")
        object.__setattr__(self, "fallback_endpoints", tuple(self.fallback_endpoints))  # a list from YAML

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir).expanduser().resolve() if self.state_dir else default_state_dir()

    def open(self) -> Chain:
        """A client of this chain, for this process."""
        if self.backend == "bittensor":
            from mapreduce_ray.chain.subtensor import SubtensorChain

            return SubtensorChain(
                self.network,
                self.netuid,
                version_key=self.version_key,
                fallback_endpoints=self.fallback_endpoints,
                serve_timeout_s=self.serve_timeout_s,
            )
        from mapreduce_ray.chain.embedded import EmbeddedChain

        return EmbeddedChain(self.state_path / "chain.sqlite", self)
