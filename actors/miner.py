"""A miner operator's actors in the operator's own Ray: MinerActor serves the miner's endpoint, and
ReducerActors on other nodes of the same Ray serve more reducers of the same miner.

Each hosts a `Relay` (actors.relay): a Flight endpoint peers stream their segments to and validators
admit jobs at and fetch retained rounds from. The MinerActor listens on `listen` (host:port; port 0
picks a free one) and announces `advertise` (default: where it listens, with this node's IP for a
wildcard host) on the chain. With `reducers` > 1 it starts that many - 1 ReducerActors, spread over the
operator's nodes (or where `reducer_resources` puts them), each listening on the same host with a port
of its own; its endpoint lists every reducer (the `reducers` call), validators place each job at one, and that
job's peers stream to it directly. Every reducer speaks for the miner's hotkey, so the wallet (and the
TLS files, with TLS) must be readable on every node. Nothing from another party reaches them through Ray.
"""

from __future__ import annotations

import os

import ray
import torch

from actors.relay import Relay, RelaySettings
from mapreduce_ray.chain import ChainConfig
from mapreduce_ray.metrics import record_miner_round, record_refusal
from mapreduce_ray.naming import miner_name
from mapreduce_ray.protocol import MetagraphCache
from mapreduce_ray.remote import get
from mapreduce_ray.wallets import WalletConfig, load_identity
from mapreduce_ray.wire.config import WireConfig
from mapreduce_ray.wire.tls import announce_address

MAX_CONCURRENCY = 4  # status calls; the endpoint serves on threads of its own
START_TIMEOUT_S = 120.0
STATUS_TIMEOUT_S = 30.0
WILDCARDS = ("0.0.0.0", "::", "[::]", "")


def check_reducers(reducers: int) -> None:
    """One line naming the setting when a miner is asked for no reducer at all."""
    if reducers < 1:
        raise ValueError(f"miner.reducers must be at least 1, got {reducers}")


class MinerActor:
    """Create with `ray.remote(MinerActor).options(name=miner_name(uid), ...).remote(wallet, chain, ...)`.

    `relay_class` (with keyword arguments `relay_options`) is the endpoint to serve: Relay, or one of
    the misbehaving relays of actors.behaviours.
    """

    def __init__(
        self,
        wallet: WalletConfig,
        chain: ChainConfig,
        listen: str = "127.0.0.1:0",
        advertise: str | None = None,
        wire: WireConfig | None = None,
        settings: RelaySettings | None = None,
        relay_class: type = Relay,
        relay_options: dict | None = None,
        reducers: int = 1,
        reducer_resources: dict[str, float] | None = None,
    ):
        check_reducers(reducers)
        wire = wire or WireConfig()
        self._host = _Reducer(wallet, chain, listen, wire, settings, relay_class, relay_options)
        self.relay, self.uid, self.name = self._host.relay, self._host.uid, self._host.name
        self.endpoint = self._host.advertised(advertise)
        reducer = ray.remote(num_cpus=0)(ReducerActor).options(
            resources=reducer_resources or {}, scheduling_strategy=None if reducer_resources else "SPREAD"
        )
        host = listen.rpartition(":")[0]
        self._reducers = [
            reducer.remote(wallet, chain, f"{host}:0", wire, settings, relay_class, relay_options)
            for _ in range(reducers - 1)
        ]
        others = get([r.endpoint.remote() for r in self._reducers], START_TIMEOUT_S, f"starting {self.name}'s reducers")
        self.relay.locations = [self.endpoint, *others]
        announce_address(self._host.chain, self._host.identity.keypair, self.endpoint, wire)

    def status(self) -> dict:
        """The miner's identity and where it runs, its reducers' counters summed, and each reducer's own."""
        here = {"endpoint": self.endpoint, "node_id": ray.get_runtime_context().get_node_id(), **self.relay.status()}
        reducers = [here, *get([r.status.remote() for r in self._reducers], STATUS_TIMEOUT_S, "asking the reducers")]
        counters = [key for key, value in here.items() if isinstance(value, int | float)]
        return {
            "name": self.name,
            "uid": self.uid,
            "netuid": self._host.netuid,
            "hotkey": self._host.identity.hotkey,
            "endpoint": self.endpoint,
            "node_id": here["node_id"],
            "pid": os.getpid(),
            **{key: sum(r[key] for r in reducers) for key in counters},
            "reducers": reducers,
        }

    def shutdown(self) -> None:
        try:
            get([r.shutdown.remote() for r in self._reducers], STATUS_TIMEOUT_S, "stopping the reducers")
        finally:
            self.relay.shutdown()


class ReducerActor:
    """One more reducer of a miner, on a node of the operator's Ray: a Relay speaking for the miner's hotkey,
    announced nowhere but in the miner's `reducers` answer. Started by MinerActor with its own arguments."""

    def __init__(self, wallet, chain, listen, wire, settings, relay_class, relay_options):
        self._host = _Reducer(wallet, chain, listen, wire, settings, relay_class, relay_options)

    def endpoint(self) -> str:
        return self._host.advertised(None)

    def status(self) -> dict:
        node = ray.get_runtime_context().get_node_id()
        return {"endpoint": self.endpoint(), "node_id": node, **self._host.relay.status()}

    def shutdown(self) -> None:
        self._host.relay.shutdown()


class _Reducer:
    """A Relay of the miner whose wallet this is, listening on `listen`, its rounds counted in metrics."""

    def __init__(self, wallet, chain, listen, wire, settings, relay_class, relay_options):
        torch.set_num_threads(1)
        self.identity = load_identity(wallet)
        self.chain = chain.open()
        self.netuid = chain.netuid
        self.uid = self.chain.require_uid(self.identity.hotkey, wallet)
        self.name = miner_name(self.uid)
        self.relay = relay_class(
            listen,
            self.identity,
            MetagraphCache(self.chain),
            self.name,
            wire,
            settings or RelaySettings(),
            self._record,
            self._refused,
            **(relay_options or {}),
        )

    def advertised(self, advertise: str | None) -> str:
        """host:port to reach this reducer at: `advertise`, or where it listens (this node's IP for a wildcard)."""
        host, _, port = (advertise or self.relay.address).rpartition(":")
        return f"{ray.util.get_node_ip_address() if host in WILDCARDS else host}:{port}"

    def _record(self, bytes_in: int, bytes_out: int, seconds: float) -> None:
        record_miner_round(self.netuid, self.uid, bytes_in, bytes_out, seconds)

    def _refused(self, error: str) -> None:
        record_refusal(self.netuid, self.name, error)
