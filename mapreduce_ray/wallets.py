"""Bittensor wallets: which hotkey a party signs with.

A wallet is (name, hotkey, path) as in `conf/wallet/NAME.yaml`. Development
wallets live under the state dir and are created without prompts when missing;
any other wallet is a user's own and is only ever read.
"""

from __future__ import annotations

import fcntl
from dataclasses import dataclass
from pathlib import Path

import bittensor as bt
from bittensor.sp_core import Keypair

from mapreduce_ray.errors import WalletError


@dataclass(frozen=True)
class WalletConfig:
    name: str
    hotkey: str = "default"
    path: str = "~/.bittensor/wallets"

    def describe(self) -> str:
        return f"{self.name}/{self.hotkey}"

    @property
    def directory(self) -> Path:
        return Path(self.path).expanduser().resolve()


@dataclass(frozen=True)
class Identity:
    """A hotkey with its private key, and the wallet it came from (None for a bare keypair)."""

    keypair: Keypair
    wallet: WalletConfig | None

    @property
    def hotkey(self) -> str:
        return self.keypair.ss58_address


def dev_wallet(state_dir: Path, name: str, hotkey: str) -> WalletConfig:
    """A development wallet inside the state dir."""
    return WalletConfig(name, hotkey, str(state_dir / "wallets"))


def dev_peer_wallet(state_dir: Path, rank: int) -> WalletConfig:
    """The development wallet a local subnet registers for `rank`."""
    return dev_wallet(state_dir, "dev-peer", f"rank-{rank}")


def is_dev_wallet(wallet: WalletConfig, state_dir: Path) -> bool:
    return wallet.directory.is_relative_to((state_dir / "wallets").resolve())


def ensure_dev_wallet(wallet: WalletConfig) -> None:
    """Create a development wallet's coldkey and hotkey if missing (no password, nothing printed); one process
    at a time, since services started together create the same coldkey."""
    bt_wallet = bt.Wallet(wallet.name, wallet.hotkey, str(wallet.directory))
    wallet.directory.mkdir(parents=True, exist_ok=True)
    with open(wallet.directory / ".create.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not bt_wallet.coldkeypub_file.exists_on_device():
            bt_wallet.create_new_coldkey(use_password=False, overwrite=False, suppress=True)
        if not bt_wallet.hotkey_file.exists_on_device():
            bt_wallet.create_new_hotkey(use_password=False, overwrite=False, suppress=True)


def load_identity(wallet: WalletConfig) -> Identity:
    """The wallet's hotkey, read from disk; one clear line if it is missing or unreadable."""
    bt_wallet = bt.Wallet(wallet.name, wallet.hotkey, str(wallet.directory))
    if not bt_wallet.hotkey_file.exists_on_device():
        raise WalletError(
            f"wallet {wallet.describe()} has no hotkey at {bt_wallet.hotkey_file.path}; create it with "
            f"`btcli wallet new-hotkey --wallet {wallet.name} --wallet-hotkey {wallet.hotkey} "
            f"--wallet-path {wallet.directory}`, or choose a wallet that exists"
        )
    try:
        keypair = bt_wallet.hotkey
    except Exception as e:
        raise WalletError(
            f"cannot read the hotkey of wallet {wallet.describe()} ({e}); if it is encrypted, set BT_WALLET_PASSWORD"
        ) from None
    return Identity(keypair, wallet)


def coldkey_of(wallet: WalletConfig) -> str:
    """The wallet's coldkey address (from coldkeypub.txt; the private coldkey is never read)."""
    try:
        return bt.Wallet(wallet.name, wallet.hotkey, str(wallet.directory)).coldkeypub.ss58_address
    except Exception as e:
        raise WalletError(f"cannot read the coldkey address of wallet {wallet.describe()}: {e}") from None


def identity_of(wallet) -> Identity:
    """An Identity from what a user hands in: a WalletConfig, a bittensor Wallet, or a hotkey Keypair."""
    if isinstance(wallet, Identity):
        return wallet
    if isinstance(wallet, WalletConfig):
        return load_identity(wallet)
    if isinstance(wallet, bt.Wallet):
        return load_identity(WalletConfig(wallet.name, wallet.hotkey_str, str(wallet.path)))
    if isinstance(wallet, Keypair):
        return Identity(wallet, None)
    raise WalletError(
        f"wallet must be a bittensor.Wallet, a hotkey Keypair or a WalletConfig, got {type(wallet).__name__}"
    )
