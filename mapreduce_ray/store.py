"""SQLite files shared by several processes: WAL mode, one IMMEDIATE transaction per operation.

Writers of one process take turns on a lock of their own before SQLite's: SQLite's busy wait sleeps and
retries, and many threads writing at once starve some of them past any timeout. Commits are synced
as WAL's NORMAL level does (the file never corrupts; a power cut may lose the last commits).
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

BUSY_TIMEOUT_S = 30.0  # how long a writer waits for another process's transaction
_writers: dict[Path, threading.Lock] = {}  # one writer at a time per file in this process
_writers_lock = threading.Lock()


@contextlib.contextmanager
def transaction(path: Path, write: bool = True) -> Iterator[sqlite3.Connection]:
    """A connection inside one transaction: committed on success, rolled back on any error."""
    with _writer(path) if write else contextlib.nullcontext():
        db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()


def _writer(path: Path) -> threading.Lock:
    with _writers_lock:
        return _writers.setdefault(Path(path).resolve(), threading.Lock())


def create(path: Path, schema: str) -> None:
    """Create the file and its tables (`schema`: statements separated by ";") if missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _use_wal(path)
    with transaction(path) as db:
        for statement in schema.split(";")[:-1]:
            db.execute(statement)


def _use_wal(path: Path) -> None:
    """Put the file in WAL mode (kept in the file); SQLite may refuse while another process does the same."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        while True:
            try:
                db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    finally:
        db.close()
