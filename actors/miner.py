"""MinerActor: a miner operator's reducer, a Ray actor in the operator's own Ray serving the miner's endpoint.

It hosts a `Relay` (actors.relay): the Flight endpoint peers stream their segments to and
validators admit jobs at and fetch retained rounds from. On start it listens on `listen`
(host:port; port 0 picks a free one) and announces `advertise` (default: where it listens,
with this node's IP for a wildcard host) on the chain, so any validator and any peer reach it
there. Nothing from another party reaches it through Ray.
"""

from __future__ import annotations

import os

import ray
import torch

from actors.relay import Relay, RelaySettings
from mapreduce_ray.chain import ChainConfig
from mapreduce_ray.metrics import record_miner_round
from mapreduce_ray.naming import miner_name
from mapreduce_ray.protocol import MetagraphCache
from mapreduce_ray.wallets import WalletConfig, load_identity
from mapreduce_ray.wire.config import WireConfig
from mapreduce_ray.wire.tls import announce_address

MAX_CONCURRENCY = 4  # status calls; the endpoint serves on threads of its own
WILDCARDS = ("0.0.0.0", "::", "[::]", "")


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
    ):
        torch.set_num_threads(1)
        self._identity = load_identity(wallet)
        self._chain = chain.open()
        self._netuid = chain.netuid
        self.uid = self._chain.require_uid(self._identity.hotkey, wallet)
        self.name = miner_name(self.uid)
        self.relay = relay_class(
            listen,
            self._identity,
            MetagraphCache(self._chain),
            self.name,
            wire or WireConfig(),
            settings or RelaySettings(),
            self._record,
            **(relay_options or {}),
        )
        host, _, port = (advertise or self.relay.address).rpartition(":")
        self.endpoint = f"{ray.util.get_node_ip_address() if host in WILDCARDS else host}:{port}"
        announce_address(self._chain, self._identity.keypair, self.endpoint, wire or WireConfig())

    def status(self) -> dict:
        return {
            "name": self.name,
            "uid": self.uid,
            "hotkey": self._identity.hotkey,
            "endpoint": self.endpoint,
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            **self.relay.status(),
        }

    def shutdown(self) -> None:
        self.relay.shutdown()

    def _record(self, bytes_in: int, bytes_out: int, seconds: float) -> None:
        record_miner_round(self._netuid, self.uid, bytes_in, bytes_out, seconds)
