"""The narrow view of a Bittensor subnet that miners, validators and peers need.

Two backends implement `Chain`: `EmbeddedChain` (a SQLite file, the offline
default) and `SubtensorChain` (the bittensor 11 SDK). Both raise the same errors
(`NotRegisteredError`, `NoValidatorPermitError`, `RateLimitedError`,
`ChainError`), so callers branch identically.

Writes are signed by a hotkey: `signer` is a `bittensor.sp_core.Keypair` holding
the hotkey's private key.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

from mapreduce_ray.errors import NotRegisteredError
from mapreduce_ray.wallets import WalletConfig

DEFAULT_NETUID = 10
U16_MAX = 65535  # the chain stores each weight as a u16, the largest as U16_MAX
UNKNOWN_WALLET = WalletConfig("NAME", "HOTKEY", "PATH")  # placeholders in a command, when only a hotkey is known


@dataclass(frozen=True)
class Neuron:
    """One uid of the subnet as the chain sees it."""

    uid: int
    hotkey: str
    coldkey: str
    stake: float  # TAO
    validator_permit: bool
    endpoint: str | None  # "ip:port" once served
    last_update: int  # block of the neuron's last weights (or its registration)
    certificate: str | None = None  # hex SHA-256 of its endpoint's TLS key, when it serves grpc+tls


@dataclass(frozen=True)
class Metagraph:
    """A snapshot of the subnet's neurons at `block`."""

    netuid: int
    block: int
    neurons: tuple[Neuron, ...]

    def by_hotkey(self, hotkey: str) -> Neuron | None:
        return self._by_hotkey.get(hotkey)

    @functools.cached_property
    def _by_hotkey(self) -> dict[str, Neuron]:
        return {n.hotkey: n for n in self.neurons}

    def neuron(self, uid: int) -> Neuron | None:
        return next((n for n in self.neurons if n.uid == uid), None)

    @property
    def validators(self) -> tuple[Neuron, ...]:
        return tuple(n for n in self.neurons if n.validator_permit)


class Chain(ABC):
    """A subnet (`netuid`) on some chain."""

    netuid: int

    @abstractmethod
    def describe(self) -> str:
        """Where this subnet lives, for messages: "netuid 10 on finney"."""

    @abstractmethod
    def how_to_register(self, wallet: WalletConfig) -> str:
        """The command that registers `wallet` on this subnet."""

    @abstractmethod
    def block(self) -> int:
        """The current block number."""

    @abstractmethod
    def register(self, hotkey: str, coldkey: str, stake: float = 0.0) -> int:
        """Register `hotkey` (owned by `coldkey`) and return its uid; an already registered hotkey keeps its uid."""

    @abstractmethod
    def uid_of(self, hotkey: str) -> int | None:
        """The uid of `hotkey`, or None when it is not registered."""

    @abstractmethod
    def metagraph(self) -> Metagraph:
        """Every neuron of the subnet, now."""

    @abstractmethod
    def serve(self, signer, endpoint: str, certificate: str | None = None) -> None:
        """Announce where the signer's hotkey can be reached ("ip:port"), and the hex SHA-256 of its endpoint's
        TLS key when it serves grpc+tls (None: plain gRPC; a digest announced before is retracted)."""

    @abstractmethod
    def set_weights(self, signer, weights: Mapping[int, float]) -> int | None:
        """Set the signer's weights on uids (relative, non-negative); needs a validator permit. None when the
        chain holds them now; on a commit-reveal subnet, the drand round at which the chain reveals them."""

    @abstractmethod
    def min_allowed_weights(self) -> int:
        """How many uids a validator's weights must name at least (a weight on itself alone is exempt)."""

    @abstractmethod
    def weights(self) -> dict[int, dict[int, float]]:
        """Weights on chain: {validator uid: {uid: weight in 0..1, the largest being 1}}."""

    def require_uid(self, hotkey: str, wallet: WalletConfig | None = None) -> int:
        """The uid of `hotkey`, or one line saying how to register it."""
        uid = self.uid_of(hotkey)
        if uid is None:
            raise self.not_registered(hotkey, wallet)
        return uid

    def not_registered(self, hotkey: str, wallet: WalletConfig | None = None) -> NotRegisteredError:
        """The error for an unregistered hotkey, naming the command that registers it."""
        who = f"hotkey {hotkey}" + (f" (wallet {wallet.describe()})" if wallet else "")
        fix = self.how_to_register(wallet or UNKNOWN_WALLET)
        return NotRegisteredError(f"{who} is not registered on {self.describe()}; register it: {fix}")
