"""EmbeddedChain: a subnet in one SQLite file, the offline default.

Several processes on one machine share it with no server: SQLite in WAL mode,
every write one `BEGIN IMMEDIATE` transaction. It keeps the rules of the real
chain that our roles depend on:

- a uid per registered hotkey; once the subnet is full, a new registration takes
  the uid of the non-immune neuron with the lowest incentive (stake-weighted
  weights it receives), oldest registration first, as the chain prunes
  (validator-permit holders are kept: their dividends protect them on chain);
- validator permits for the `max_validators` top stakers with stake > 0;
- weights quantized to u16 like the chain stores them, at most once per
  `weights_rate_limit` blocks per validator;
- blocks advance with wall-clock time, one per `block_time_s`.

Writes are signed: the signer must prove it holds the hotkey's private key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

from bittensor.intents import normalize
from bittensor.sp_core import ss58_decode, verify

from mapreduce_ray.chain.base import U16_MAX, Chain, Metagraph, Neuron
from mapreduce_ray.chain.config import ChainConfig
from mapreduce_ray.errors import ChainError, NoValidatorPermitError, RateLimitedError
from mapreduce_ray.store import create, transaction
from mapreduce_ray.wallets import WalletConfig

_PARAMETERS = {  # ChainConfig fields the chain file fixes, and their types
    "block_time_s": float,
    "tempo": int,
    "weights_rate_limit": int,
    "max_uids": int,
    "max_validators": int,
    "immunity_period": int,
}
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value REAL NOT NULL);
CREATE TABLE IF NOT EXISTS neurons (
    netuid INTEGER NOT NULL, uid INTEGER NOT NULL, hotkey TEXT NOT NULL, coldkey TEXT NOT NULL,
    stake REAL NOT NULL, endpoint TEXT, registered_at INTEGER NOT NULL, last_update INTEGER NOT NULL,
    weights_set_at INTEGER, certificate TEXT, PRIMARY KEY (netuid, uid), UNIQUE (netuid, hotkey));
CREATE TABLE IF NOT EXISTS weights (
    netuid INTEGER NOT NULL, src INTEGER NOT NULL, dst INTEGER NOT NULL, value INTEGER NOT NULL,
    PRIMARY KEY (netuid, src, dst));
"""


class EmbeddedChain(Chain):
    """Subnet `config.netuid` in the SQLite file at `path`, created on first use."""

    def __init__(self, path: str | Path, config: ChainConfig, clock: Callable[[], float] = time.time):
        """The chain's parameters are fixed by whoever creates the file; later openers read them."""
        self.path = Path(path)
        self.netuid = config.netuid
        self._clock = clock
        create(self.path, _SCHEMA)
        with self._transaction(write=True) as db:
            columns = {row[1] for row in db.execute("PRAGMA table_info(neurons)")}
            if "certificate" not in columns:  # a chain file of the first release
                db.execute("ALTER TABLE neurons ADD COLUMN certificate TEXT")
            db.execute("INSERT OR IGNORE INTO meta VALUES ('genesis', ?)", (self._clock(),))
            db.executemany(
                "INSERT OR IGNORE INTO meta VALUES (?, ?)",
                [(k, getattr(config, k)) for k in _PARAMETERS if getattr(config, k) is not None],
            )
            stored = dict(db.execute("SELECT key, value FROM meta"))
        self.config = dataclasses.replace(
            config, **{k: _PARAMETERS[k](v) for k, v in stored.items() if k in _PARAMETERS}
        )

    @property
    def rate_limit(self) -> int:
        return self.config.tempo if self.config.weights_rate_limit is None else self.config.weights_rate_limit

    def describe(self) -> str:
        return f"netuid {self.netuid} on the embedded chain at {self.path}"

    def how_to_register(self, wallet: WalletConfig) -> str:
        return (
            f"python -m jobs.register +wallet.name={wallet.name} +wallet.hotkey={wallet.hotkey} "
            f"+wallet.path={wallet.path} subnet.chain.netuid={self.netuid} subnet.chain.state_dir={self.path.parent}"
        )

    def block(self) -> int:
        with self._transaction() as db:
            return self._block(db)

    def register(self, hotkey: str, coldkey: str, stake: float = 0.0) -> int:
        _check_address(hotkey, "hotkey")
        _check_address(coldkey, "coldkey")
        if not (math.isfinite(stake) and stake >= 0):
            raise ChainError(f"stake must be a non-negative number of TAO, got {stake!r}")
        with self._transaction(write=True) as db:
            row = db.execute("SELECT uid FROM neurons WHERE netuid=? AND hotkey=?", (self.netuid, hotkey)).fetchone()
            if row:
                return row[0]
            block = self._block(db)
            uid = self._free_uid(db, block)
            db.execute("DELETE FROM neurons WHERE netuid=? AND uid=?", (self.netuid, uid))
            db.execute("DELETE FROM weights WHERE netuid=? AND (src=? OR dst=?)", (self.netuid, uid, uid))
            db.execute(
                "INSERT INTO neurons VALUES (?, ?, ?, ?, ?, NULL, ?, ?, NULL, NULL)",
                (self.netuid, uid, hotkey, coldkey, stake, block, block),
            )
            return uid

    def uid_of(self, hotkey: str) -> int | None:
        with self._transaction() as db:
            row = db.execute("SELECT uid FROM neurons WHERE netuid=? AND hotkey=?", (self.netuid, hotkey)).fetchone()
        return row[0] if row else None

    def metagraph(self) -> Metagraph:
        with self._transaction() as db:
            block = self._block(db)
            rows = db.execute(
                "SELECT uid, hotkey, coldkey, stake, endpoint, last_update, certificate FROM neurons "
                "WHERE netuid=? ORDER BY uid",
                (self.netuid,),
            ).fetchall()
        permits = self._permits((r[0], r[3]) for r in rows)
        neurons = tuple(
            Neuron(uid, hotkey, coldkey, stake, uid in permits, endpoint, last_update, certificate)
            for uid, hotkey, coldkey, stake, endpoint, last_update, certificate in rows
        )
        return Metagraph(self.netuid, block, neurons)

    def serve(self, signer, endpoint: str, certificate: str | None = None) -> None:
        hotkey = _proven_hotkey(signer)
        with self._transaction(write=True) as db:
            self._uid(db, hotkey)
            db.execute(
                "UPDATE neurons SET endpoint=?, certificate=? WHERE netuid=? AND hotkey=?",
                (endpoint, certificate, self.netuid, hotkey),
            )

    def min_allowed_weights(self) -> int:
        return 1

    def set_weights(self, signer, weights: Mapping[int, float]) -> None:
        hotkey = _proven_hotkey(signer)
        values = {int(uid): float(w) for uid, w in weights.items()}
        if any(not (math.isfinite(w) and w >= 0) for w in values.values()):
            raise ChainError(f"weights must be finite and non-negative, got {dict(weights)}")
        with self._transaction(write=True) as db:
            uid = self._uid(db, hotkey)
            rows = db.execute("SELECT uid, stake FROM neurons WHERE netuid=?", (self.netuid,)).fetchall()
            if uid not in self._permits(rows):  # (uid, stake) rows
                raise NoValidatorPermitError(
                    f"uid {uid} ({hotkey}) has no validator permit on {self.describe()}; "
                    f"permits go to the {self.config.max_validators} top stakers"
                )
            unknown = sorted(set(values) - {r[0] for r in rows})
            if unknown:
                raise ChainError(f"weights name uids {unknown} that are not registered on {self.describe()}")
            block = self._block(db)
            (set_at,) = db.execute(
                "SELECT weights_set_at FROM neurons WHERE netuid=? AND uid=?", (self.netuid, uid)
            ).fetchone()
            if set_at is not None and block - set_at < self.rate_limit:
                wait = self.rate_limit - (block - set_at)
                raise RateLimitedError(
                    f"uid {uid} set weights at block {set_at}; {self.describe()} allows it again in {wait} "
                    f"block(s) (~{wait * self.config.block_time_s:g} s)"
                )
            dsts, u16 = normalize(list(values), list(values.values())) if any(values.values()) else ([], [])
            db.execute("DELETE FROM weights WHERE netuid=? AND src=?", (self.netuid, uid))
            db.executemany(
                "INSERT INTO weights VALUES (?, ?, ?, ?)",
                [(self.netuid, uid, d, w) for d, w in zip(dsts, u16, strict=True) if w > 0],
            )
            db.execute(
                "UPDATE neurons SET weights_set_at=?, last_update=? WHERE netuid=? AND uid=?",
                (block, block, self.netuid, uid),
            )

    def weights(self) -> dict[int, dict[int, float]]:
        with self._transaction() as db:
            rows = db.execute(
                "SELECT src, dst, value FROM weights WHERE netuid=? ORDER BY src, dst", (self.netuid,)
            ).fetchall()
        result: dict[int, dict[int, float]] = {}
        for src, dst, value in rows:
            result.setdefault(src, {})[dst] = value / U16_MAX
        return result

    @contextlib.contextmanager
    def _transaction(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        try:
            with transaction(self.path, write) as db:
                yield db
        except sqlite3.Error as e:
            raise ChainError(f"the embedded chain at {self.path} failed: {e}") from None

    def _block(self, db: sqlite3.Connection) -> int:
        (genesis,) = db.execute("SELECT value FROM meta WHERE key='genesis'").fetchone()
        return int(max(self._clock() - genesis, 0) // self.config.block_time_s)

    def _uid(self, db: sqlite3.Connection, hotkey: str) -> int:
        row = db.execute("SELECT uid FROM neurons WHERE netuid=? AND hotkey=?", (self.netuid, hotkey)).fetchone()
        if row is None:
            raise self.not_registered(hotkey)
        return row[0]

    def _permits(self, stakes: Iterable[tuple[int, float]]) -> set[int]:
        """uids holding a validator permit: the top stakers with stake > 0."""
        staked = sorted(((uid, s) for uid, s in stakes if s > 0), key=lambda u: (-u[1], u[0]))
        return {uid for uid, _ in staked[: self.config.max_validators]}

    def _free_uid(self, db: sqlite3.Connection, block: int) -> int:
        """The next unused uid, or when full, the uid the chain would prune."""
        taken = [r[0] for r in db.execute("SELECT uid FROM neurons WHERE netuid=? ORDER BY uid", (self.netuid,))]
        if len(taken) < self.config.max_uids:
            return next(uid for uid in range(len(taken) + 1) if uid not in set(taken))
        incentive = self._incentives(db)
        permits = self._permits(db.execute("SELECT uid, stake FROM neurons WHERE netuid=?", (self.netuid,)))
        candidates = [
            (uid, registered_at)
            for uid, registered_at in db.execute(
                "SELECT uid, registered_at FROM neurons WHERE netuid=? AND ? - registered_at >= ?",
                (self.netuid, block, self.config.immunity_period),
            )
            if uid not in permits
        ]
        if not candidates:
            raise ChainError(
                f"{self.describe()} is full ({self.config.max_uids} uids) and every neuron is still immune; "
                f"try again in up to {self.config.immunity_period} blocks"
            )
        return min(candidates, key=lambda c: (incentive.get(c[0], 0.0), c[1], c[0]))[0]

    def _incentives(self, db: sqlite3.Connection) -> dict[int, float]:
        """Stake-weighted sum of the weights each uid receives."""
        rows = db.execute(
            "SELECT w.dst, SUM(w.value * n.stake) FROM weights w JOIN neurons n "
            "ON n.netuid = w.netuid AND n.uid = w.src WHERE w.netuid=? GROUP BY w.dst",
            (self.netuid,),
        ).fetchall()
        return dict(rows)


def _check_address(address: str, role: str) -> None:
    try:
        ss58_decode(address)
    except Exception:
        raise ChainError(f"{role} {address!r} is not an ss58 address") from None


def _proven_hotkey(signer) -> str:
    """The signer's hotkey, once it has shown it holds the private key."""
    challenge = b"mapreduce-ray embedded chain write"
    try:
        signature = signer.sign(challenge)
    except Exception:
        raise ChainError("chain writes must be signed by a hotkey keypair with its private key") from None
    if not verify(challenge, signature, signer.ss58_address, signer.crypto_type):
        raise ChainError(f"the signature of {signer.ss58_address} does not verify")
    return signer.ss58_address
