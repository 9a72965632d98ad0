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

    The rest shapes the embedded chain only (the real chain has its own):
    block_time_s, tempo (blocks), weights_rate_limit (blocks between a validator's
    weights; None: one tempo), max_uids, max_validators (permits go to the top
    stakers), immunity_period (blocks a new neuron cannot be replaced).
    """

    backend: str = "embedded"
    netuid: int = DEFAULT_NETUID
    network: str = "finney"
    state_dir: str | None = None
    block_time_s: float = 12.0
    tempo: int = 360
    weights_rate_limit: int | None = None
    max_uids: int = 256
    max_validators: int = 64
    immunity_period: int = 0

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown chain backend {self.backend!r}; use one of: {', '.join(BACKENDS)}")

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir).expanduser().resolve() if self.state_dir else default_state_dir()

    def open(self) -> Chain:
        """A client of this chain, for this process."""
        if self.backend == "bittensor":
            from mapreduce_ray.chain.subtensor import SubtensorChain

            return SubtensorChain(self.network, self.netuid)
        from mapreduce_ray.chain.embedded import EmbeddedChain

        return EmbeddedChain(self.state_path / "chain.sqlite", self)
