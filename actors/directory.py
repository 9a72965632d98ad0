"""The miners a validator sees: every served neuron without a validator permit, at the endpoint it announced."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from mapreduce_ray.errors import JobError
from mapreduce_ray.naming import miner_name
from mapreduce_ray.protocol import MetagraphCache
from mapreduce_ray.types import MinerSlot
from mapreduce_ray.wire.config import WireConfig
from mapreduce_ray.wire.endpoint import Remote


@dataclass(frozen=True)
class ServedMiner:
    uid: int
    hotkey: str
    endpoint: str  # host:port, as announced on chain
    certificate: str | None  # hex SHA-256 of its endpoint's TLS key, as announced on chain (None: plain gRPC)

    @property
    def host(self) -> str:
        return self.endpoint.rpartition(":")[0]

    def slot(self, weight: float, throughput: float = 0.0) -> MinerSlot:
        """This miner in a job, with `weight` and `throughput` (see MinerSlot)."""
        return MinerSlot(self.uid, self.hotkey, self.endpoint, weight, throughput, self.certificate or "")


class MinerDirectory:
    """Served miners by uid, refreshed from the metagraph, and one signed client per miner endpoint."""

    def __init__(self, metagraph: MetagraphCache, keypair, wire: WireConfig):
        self._metagraph, self._keypair, self._wire = metagraph, keypair, wire
        self._lock = threading.Lock()
        self.miners: dict[int, ServedMiner] = {}
        self._remotes: dict[ServedMiner, Remote] = {}

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
            for stale in set(self._remotes) - set(served.values()):
                self._remotes.pop(stale).close()
        return served

    def remote(self, uid: int) -> Remote:
        """The client of miner `uid`'s endpoint; JobError if it serves none."""
        with self._lock:
            miner = self.miners.get(uid)
            if miner is None:
                raise JobError(f"miner {miner_name(uid)!r} announces no endpoint on chain any more")
            if miner not in self._remotes:
                who = f"miner {miner_name(uid)!r} at {miner.endpoint}"
                self._remotes[miner] = Remote(
                    who, miner.endpoint, miner.hotkey, self._keypair, self._wire, miner.certificate
                )
            return self._remotes[miner]
