"""The miners a validator sees: every served neuron without a validator permit, at the endpoint it announced."""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass

from mapreduce_ray.errors import JobError, MapReduceError
from mapreduce_ray.naming import miner_name
from mapreduce_ray.protocol import MetagraphCache
from mapreduce_ray.types import MinerSlot
from mapreduce_ray.wire.config import WireConfig
from mapreduce_ray.wire.endpoint import Remote

log = logging.getLogger(__name__)
REDUCERS_TTL_S = 60.0  # how long a miner's list of reducers is trusted before it is asked again


@dataclass(frozen=True)
class ServedMiner:
    uid: int
    hotkey: str
    endpoint: str  # host:port, as announced on chain
    certificate: str | None  # hex SHA-256 of its endpoint's TLS key, as announced on chain (None: plain gRPC)

    @property
    def host(self) -> str:
        return self.endpoint.rpartition(":")[0]

    def slot(self, weight: float, throughput: float = 0.0, endpoint: str | None = None, capacity: int = 0) -> MinerSlot:
        """This miner in a job, with `weight`, `throughput` and `capacity` (see MinerSlot), its peers streaming to
        `endpoint` (one of its reducers; default: the endpoint it announced)."""
        where = endpoint or self.endpoint
        return MinerSlot(self.uid, self.hotkey, where, weight, throughput, self.certificate or "", capacity)


class MinerDirectory:
    """Served miners by uid, refreshed from the metagraph; where each one's reducers listen, as its endpoint's
    `reducers` answer lists them; and one signed client per reducer."""

    def __init__(self, metagraph: MetagraphCache, keypair, wire: WireConfig):
        self._metagraph, self._keypair, self._wire = metagraph, keypair, wire
        self._lock = threading.Lock()
        self.miners: dict[int, ServedMiner] = {}
        self._remotes: dict[tuple[ServedMiner, str], Remote] = {}
        self._reducers: dict[ServedMiner, tuple[float, list[str]]] = {}  # (when asked, where they listen)
        self._placed: dict[ServedMiner, int] = {}  # jobs placed at a miner so far

    def refresh(self) -> dict[int, ServedMiner]:
        """Read the metagraph (through its cache); the served miners."""
        graph = self._metagraph.get()
        served = {
            n.uid: ServedMiner(n.uid, n.hotkey, n.endpoint, n.certificate)
            for n in graph.neurons
            if n.endpoint is not None and not n.validator_permit
        }
        with self._lock:
            self.miners = served
            gone = {miner for miner, _ in self._remotes} - set(served.values())
            closing = [self._remotes.pop(key) for key in list(self._remotes) if key[0] in gone]
            for miner in gone:
                self._reducers.pop(miner, None)
                self._placed.pop(miner, None)
        for remote in closing:  # outside the lock: closing waits for a connection being made
            remote.close()
        return served

    def place(self, uid: int) -> str:
        """The reducer of miner `uid` a new job streams to: its reducers in turn, as it listed them within
        REDUCERS_TTL_S (a restarted miner's reducers listen on new ports); its announced endpoint when it lists
        none. JobError if it serves no endpoint."""
        miner, remote = self._served(uid, None)
        now = time.monotonic()
        with self._lock:
            asked_at, reducers = self._reducers.get(miner, (-math.inf, []))
        if now - asked_at > REDUCERS_TTL_S:
            try:
                reducers = remote.locations("reducers", b"reducers")
            except MapReduceError as e:
                log.warning("miner uid %d lists no reducers (%s); its jobs go to its announced endpoint", uid, e)
                reducers = [miner.endpoint]
            asked_at = now
        with self._lock:
            self._reducers[miner] = (asked_at, reducers)
            turn = self._placed.get(miner, 0)
            self._placed[miner] = turn + 1
        return reducers[turn % len(reducers)]

    def remote(self, uid: int, address: str | None = None) -> Remote:
        """The client of miner `uid` at `address` (one of its reducers; default: its announced endpoint);
        JobError if it serves none."""
        return self._served(uid, address)[1]

    def _served(self, uid: int, address: str | None) -> tuple[ServedMiner, Remote]:
        with self._lock:
            miner = self.miners.get(uid)
            if miner is None:
                raise JobError(f"miner {miner_name(uid)!r} announces no endpoint on chain any more")
            where = address or miner.endpoint
            if (miner, where) not in self._remotes:
                who = f"miner {miner_name(uid)!r} at {where}"
                self._remotes[miner, where] = Remote(
                    who,
                    where,
                    miner.hotkey,
                    self._keypair,
                    self._wire,
                    miner.certificate,
                    netuid=self._metagraph.chain.netuid,
                )
            return miner, self._remotes[miner, where]
