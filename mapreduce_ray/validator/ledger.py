"""MinerLedger: what a validator knows about its subnet's miners, kept in its own SQLite file.

Per uid it keeps the hotkey it belongs to, the host it runs on (as its
benchmarks found it), its state (available, busy, failed, banned), what
benchmarks measured (throughput of exact rounds, verified capacity, when),
how many assigned rounds finished on time, strikes, the EMA score, and a
history of events. It follows the metagraph: a uid whose
hotkey changed starts from nothing. Everything survives a restart of the
validator; the last block weights were set at is kept too.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Mapping
from enum import Enum
from pathlib import Path

from mapreduce_ray.errors import MapReduceError
from mapreduce_ray.store import create, transaction
from mapreduce_ray.validator.scoring import MinerRecord

_SCHEMA = """
CREATE TABLE IF NOT EXISTS miners (
    uid INTEGER PRIMARY KEY, hotkey TEXT NOT NULL, host TEXT NOT NULL DEFAULT '', state TEXT NOT NULL,
    throughput REAL NOT NULL DEFAULT 0, capacity INTEGER NOT NULL DEFAULT 0, benchmarked_at REAL NOT NULL DEFAULT 0,
    rounds_assigned INTEGER NOT NULL DEFAULT 0, rounds_on_time INTEGER NOT NULL DEFAULT 0,
    strikes INTEGER NOT NULL DEFAULT 0, banned_until REAL NOT NULL DEFAULT 0, score REAL NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS history (
    at REAL NOT NULL, uid INTEGER NOT NULL, hotkey TEXT NOT NULL, event TEXT NOT NULL, detail TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS history_by_uid ON history (uid);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class MinerState(str, Enum):
    AVAILABLE = "available"
    BUSY = "busy"  # serving a job
    FAILED = "failed"  # missed a deadline or died; available again after its next passed benchmark
    BANNED = "banned"  # struck; excluded until banned_until


class MinerLedger:
    """The ledger in the SQLite file at `path`; `clock` gives wall-clock seconds. A miner's throughput is the
    best of its last `best_of` benchmarks, if they all passed (see `record_benchmark`); a miner that passes
    one is due for that many at once."""

    def __init__(self, path: str | Path, clock: Callable[[], float] = time.time, best_of: int = 1):
        if best_of < 1:
            raise MapReduceError(f"a ledger keeps the best of at least 1 benchmark, not {best_of}")
        self.path = Path(path)
        self._clock = clock
        self._best_of = best_of
        create(self.path, _SCHEMA)

    def follow(self, miners: Mapping[int, str]) -> None:
        """Track these miners ({uid: hotkey}); a uid with a new hotkey, or gone, is forgotten."""
        with transaction(self.path) as db:
            known = dict(db.execute("SELECT uid, hotkey FROM miners"))
            for uid, hotkey in known.items():
                if miners.get(uid) != hotkey:
                    db.execute("DELETE FROM miners WHERE uid=?", (uid,))
                    self._log(db, uid, hotkey, "forgotten", {"reason": "hotkey changed or deregistered"})
            db.executemany(
                "INSERT OR IGNORE INTO miners (uid, hotkey, state) VALUES (?, ?, ?)",
                [(uid, hotkey, MinerState.AVAILABLE.value) for uid, hotkey in miners.items()],
            )

    def recover(self) -> None:
        """After a restart: jobs and benchmarks did not survive it, so no miner is busy."""
        with transaction(self.path) as db:
            db.execute("UPDATE miners SET state=? WHERE state=?", (MinerState.AVAILABLE.value, MinerState.BUSY.value))

    def record_benchmark(self, uid: int, size_bytes: int, seconds: float, passed: bool, host: str = "") -> None:
        """A benchmark round, counted as an assigned round: an exact result updates throughput and capacity
        (and the host, when known); any other outcome fails the miner and zeroes its throughput. Throughput is
        the best of the last `best_of` benchmarks since the last one that failed: a round only ever falls short
        of the miner's link (a lost packet, a busy core), so the best recent one measures the link most
        closely, and a slower link shows within `best_of` benchmarks."""
        with transaction(self.path) as db:
            hotkey = self._hotkey(db, uid)
            self._log(db, uid, hotkey, "benchmark", {"bytes": size_bytes, "seconds": seconds, "passed": passed})
            db.execute(
                "UPDATE miners SET benchmarked_at=?, rounds_assigned=rounds_assigned+1, "
                "rounds_on_time=rounds_on_time+?, host=CASE WHEN ?='' THEN host ELSE ? END WHERE uid=?",
                (self._clock(), int(passed), host, host, uid),
            )
            if passed:
                db.execute(
                    "UPDATE miners SET throughput=?, capacity=MAX(capacity, ?), "
                    "state=CASE WHEN state=? THEN ? ELSE state END WHERE uid=?",
                    (
                        max(self._passed(db, uid, hotkey)),
                        size_bytes,
                        MinerState.FAILED.value,
                        MinerState.AVAILABLE.value,
                        uid,
                    ),
                )
            else:
                db.execute(
                    "UPDATE miners SET throughput=0, state=CASE WHEN state=? THEN state ELSE ? END WHERE uid=?",
                    (MinerState.BANNED.value, MinerState.FAILED.value, uid),
                )

    def _passed(self, db: sqlite3.Connection, uid: int, hotkey: str) -> list[float]:
        """Bytes/s of each of this hotkey's last `best_of` benchmarks at the uid that passed, newest first, back
        to the last one that failed or to when the ledger last forgot the uid (read newest first along the
        uid's index, however long its history)."""
        rows = db.execute(
            "SELECT event, detail FROM history WHERE uid=? AND hotkey=? AND event IN ('benchmark', 'forgotten') "
            "ORDER BY rowid DESC LIMIT ?",
            (uid, hotkey, self._best_of),
        )
        passed = []
        for event, detail in rows:
            benchmark = json.loads(detail)
            if event == "forgotten" or not benchmark["passed"]:
                break
            passed.append(benchmark["bytes"] / benchmark["seconds"])
        return passed

    def due_for_benchmark(self, interval_s: float) -> list[int]:
        """Available or failed uids whose last benchmark is at least `interval_s` old, or whose throughput rests
        on fewer than `best_of` passed benchmarks (a miner that passes one is measured that many times at once),
        oldest first."""
        with transaction(self.path, write=False) as db:
            rows = db.execute(
                "SELECT uid, hotkey, benchmarked_at FROM miners WHERE state IN (?, ?) ORDER BY benchmarked_at, uid",
                (MinerState.AVAILABLE.value, MinerState.FAILED.value),
            ).fetchall()
            old = self._clock() - interval_s
            return [
                uid for uid, hotkey, at in rows if at <= old or 0 < len(self._passed(db, uid, hotkey)) < self._best_of
            ]

    def record_rounds(self, on_time: Mapping[int, bool]) -> None:
        """One round each of these miners was assigned ({uid: whether it delivered on time}), in one write."""
        with transaction(self.path) as db:
            for uid, in_time in on_time.items():
                hotkey = self._hotkey(db, uid)
                db.execute(
                    "UPDATE miners SET rounds_assigned=rounds_assigned+1, rounds_on_time=rounds_on_time+? WHERE uid=?",
                    (int(in_time), uid),
                )
                if not in_time:
                    self._log(db, uid, hotkey, "late", {})

    def strike(self, uid: int, ban_s: float, evidence: dict) -> None:
        """A verified wrong result: score zeroed, banned for `ban_s`, evidence kept."""
        with transaction(self.path) as db:
            hotkey = self._hotkey(db, uid)
            db.execute(
                "UPDATE miners SET strikes=strikes+1, score=0, state=?, banned_until=? WHERE uid=?",
                (MinerState.BANNED.value, self._clock() + ban_s, uid),
            )
            self._log(db, uid, hotkey, "strike", evidence)

    def fail(self, uid: int, reason: str) -> None:
        """A miner that could not be reached: failed (unless banned) until its next passed benchmark."""
        with transaction(self.path) as db:
            hotkey = self._hotkey(db, uid)
            db.execute(
                "UPDATE miners SET state=CASE WHEN state=? THEN state ELSE ? END WHERE uid=?",
                (MinerState.BANNED.value, MinerState.FAILED.value, uid),
            )
            self._log(db, uid, hotkey, "unreachable", {"reason": reason})

    def claim(self, uids: list[int], failed_too: bool = False) -> list[int]:
        """Mark busy those of `uids` that are available (or failed, for a benchmark); the ones claimed."""
        states = [MinerState.AVAILABLE.value, MinerState.FAILED.value if failed_too else MinerState.AVAILABLE.value]
        with transaction(self.path) as db:
            claimed = []
            for uid in uids:
                cursor = db.execute(
                    "UPDATE miners SET state=? WHERE uid=? AND state IN (?, ?)", (MinerState.BUSY.value, uid, *states)
                )
                if cursor.rowcount:
                    claimed.append(uid)
            return claimed

    def release(self, uids: list[int]) -> None:
        """Busy miners become available; a miner struck or failed meanwhile keeps that state."""
        with transaction(self.path) as db:
            db.executemany(
                "UPDATE miners SET state=? WHERE uid=? AND state=?",
                [(MinerState.AVAILABLE.value, uid, MinerState.BUSY.value) for uid in uids],
            )

    def available(self) -> list[int]:
        """Uids that may be handed to a job now (bans that ran out are lifted)."""
        with transaction(self.path) as db:
            db.execute(
                "UPDATE miners SET state=? WHERE state=? AND banned_until<=?",
                (MinerState.AVAILABLE.value, MinerState.BANNED.value, self._clock()),
            )
            rows = db.execute("SELECT uid FROM miners WHERE state=? ORDER BY uid", (MinerState.AVAILABLE.value,))
            return [uid for (uid,) in rows]

    def records(self) -> list[MinerRecord]:
        """Scoring input for every tracked miner."""
        now = self._clock()
        with transaction(self.path, write=False) as db:
            rows = db.execute(
                "SELECT uid, host, throughput, capacity, rounds_assigned, rounds_on_time, banned_until "
                "FROM miners ORDER BY uid"
            ).fetchall()
        return [
            MinerRecord(uid, host, throughput, capacity, assigned, on_time, struck=banned_until > now)
            for uid, host, throughput, capacity, assigned, on_time, banned_until in rows
        ]

    def scores(self) -> dict[int, float]:
        with transaction(self.path, write=False) as db:
            return dict(db.execute("SELECT uid, score FROM miners"))

    def save_scores(self, scores: Mapping[int, float]) -> None:
        with transaction(self.path) as db:
            db.executemany("UPDATE miners SET score=? WHERE uid=?", [(s, uid) for uid, s in scores.items()])

    def hosts(self) -> dict[int, str]:
        """{uid: host} of the miners whose host a benchmark found."""
        with transaction(self.path, write=False) as db:
            return dict(db.execute("SELECT uid, host FROM miners WHERE host!=''"))

    def table(self) -> list[dict]:
        """Every tracked miner as a dict of its columns, by uid, and `measured`: how many passed benchmarks its
        throughput rests on (`best_of` at most)."""
        with transaction(self.path, write=False) as db:
            cursor = db.execute("SELECT * FROM miners ORDER BY uid")
            names = [c[0] for c in cursor.description]
            rows = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
            for row in rows:
                row["measured"] = len(self._passed(db, row["uid"], row["hotkey"]))
            return rows

    def history(self, uid: int) -> list[tuple[str, dict]]:
        """(event, detail) of a uid's current hotkey and earlier ones, oldest first."""
        with transaction(self.path, write=False) as db:
            rows = db.execute("SELECT event, detail FROM history WHERE uid=? ORDER BY rowid", (uid,)).fetchall()
        return [(event, json.loads(detail)) for event, detail in rows]

    @property
    def epoch_at(self) -> int | None:
        """The block of the last scoring epoch."""
        return self._meta("epoch_at")

    @epoch_at.setter
    def epoch_at(self, block: int) -> None:
        self._set_meta("epoch_at", block)

    @property
    def weights_set_at(self) -> int | None:
        """The block the validator last set weights at."""
        return self._meta("weights_set_at")

    @weights_set_at.setter
    def weights_set_at(self, block: int) -> None:
        self._set_meta("weights_set_at", block)

    def _meta(self, key: str) -> int | None:
        with transaction(self.path, write=False) as db:
            row = db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def _set_meta(self, key: str, value: int) -> None:
        with transaction(self.path) as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def _hotkey(self, db: sqlite3.Connection, uid: int) -> str:
        row = db.execute("SELECT hotkey FROM miners WHERE uid=?", (uid,)).fetchone()
        if row is None:
            raise MapReduceError(f"the ledger at {self.path} tracks no miner uid {uid}; call follow() first")
        return row[0]

    def _log(self, db: sqlite3.Connection, uid: int, hotkey: str, event: str, detail: dict) -> None:
        db.execute(
            "INSERT INTO history VALUES (?, ?, ?, ?, ?)", (self._clock(), uid, hotkey, event, json.dumps(detail))
        )
