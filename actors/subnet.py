"""Start a whole subnet (embedded chain, miners, validator) on a local Ray, in one call.

from actors import start_local_subnet
subnet = start_local_subnet(miners=2)
...  # Peer(rank, peer_count, **subnet.peer_options).init_process_group() from any process on the cluster
subnet.shutdown()

Its parties sign with development wallets in the chain's state dir, created and
registered on the embedded chain as needed: dev-validator (staked, so it holds a
validator permit), dev-miner/miner-{i} and dev-peer/rank-{r}.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import ray

from actors.miner import MAX_CONCURRENCY, MinerActor
from actors.validator import ValidatorActor
from mapreduce_ray.chain import Chain, ChainConfig
from mapreduce_ray.naming import DEFAULT_NAMESPACE, miner_name, validator_name
from mapreduce_ray.wallets import (
    WalletConfig,
    coldkey_of,
    dev_peer_wallet,
    dev_wallet,
    ensure_dev_wallet,
    load_identity,
)

MIB = 1024 * 1024
READY_TIMEOUT_S = 120.0
PROBE_TIMEOUT_S = 5.0
DEV_VALIDATOR_STAKE = 1000.0  # TAO on the embedded chain, enough for a validator permit


@dataclass
class LocalSubnet:
    """Handles on a running subnet's actors."""

    namespace: str
    chain: ChainConfig
    validator_uid: int
    validator: ray.actor.ActorHandle
    miners: list[ray.actor.ActorHandle]

    @property
    def peer_options(self) -> dict:
        """Peer(rank, peer_count, **peer_options) finds this subnet."""
        return {
            "validator_uid": self.validator_uid,
            "netuid": self.chain.netuid,
            "state_dir": str(self.chain.state_path),
            "namespace": self.namespace,
        }

    def shutdown(self) -> None:
        """Kill the subnet's actors."""
        for actor in [self.validator, *self.miners]:
            ray.kill(actor)


def connect_ray(
    address: str = "local", object_store_mib: int = 2048, num_cpus: int | None = None, preallocate: bool = True
) -> None:
    """Start a local Ray (address "local") or join a running cluster ("auto", "ray://...", "host:port").

    A "host:port" nobody listens on raises ConnectionError at once (Ray itself would retry for a minute).
    """
    if address == "local":
        init_local_ray(object_store_mib, num_cpus, preallocate)
        return
    host, _, port = address.rpartition(":")
    if host and port.isdigit():
        try:
            socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S).close()
        except OSError as e:
            raise ConnectionError(f"nothing answers at {address}: {e}") from None
    ray.init(address=address)


def init_local_ray(object_store_mib: int = 2048, num_cpus: int | None = None, preallocate: bool = True) -> None:
    """Start a Ray instance in this process for a local subnet.

    `preallocate` faults the object store's pages in at start; on machines where a
    first touch of memory is slow, it keeps `ray.put` at memory speed.
    """
    ray.init(
        address="local",
        num_cpus=num_cpus,
        object_store_memory=object_store_mib * MIB,
        include_dashboard=False,
        _system_config={"preallocate_plasma_memory": preallocate},
    )


def start_local_subnet(
    miners: int = 2,
    *,
    peers: int = 8,
    miner_weights: list[float] | None = None,
    chunk_mib: float = 64,
    timeout_s: float = 60.0,
    namespace: str = DEFAULT_NAMESPACE,
    chain: ChainConfig | None = None,
    miner_resources: dict[str, float] | None = None,
) -> LocalSubnet:
    """Start `miners` MinerActors and a ValidatorActor; starts a local Ray if none is connected.

    Registers development wallets for the validator, the miners and ranks 1..`peers`
    on the embedded `chain` (default: ChainConfig()). Segments are sized by
    `miner_weights` (equal when None). `miner_resources` (custom Ray resources) pins
    the miners to the nodes that offer them.
    """
    chain = chain or ChainConfig()
    weights = [1.0] * miners if miner_weights is None else list(miner_weights)
    if miners < 1 or len(weights) != miners:
        raise ValueError(f"need miners >= 1 and one weight per miner, got {miners} miners, weights {miner_weights}")
    if chain.backend != "embedded":
        raise ValueError("a local subnet runs on the embedded chain; on bittensor start jobs.miner and jobs.validator")
    if not ray.is_initialized():
        init_local_ray()
    client, state = chain.open(), chain.state_path
    validator_wallet = dev_wallet(state, "dev-validator", "default")
    validator_uid = register_dev_wallet(client, validator_wallet, DEV_VALIDATOR_STAKE)
    miner_wallets = [dev_wallet(state, "dev-miner", f"miner-{i}") for i in range(miners)]
    miner_uids = [register_dev_wallet(client, w) for w in miner_wallets]
    for rank in range(1, peers + 1):
        register_dev_wallet(client, dev_peer_wallet(state, rank))
    try:
        miner_actors = [
            _start(
                MinerActor,
                miner_name(uid),
                namespace,
                wallet,
                chain,
                max_concurrency=MAX_CONCURRENCY,
                resources=miner_resources,
            )
            for uid, wallet in zip(miner_uids, miner_wallets, strict=True)
        ]
        ray.get([m.status.remote() for m in miner_actors], timeout=READY_TIMEOUT_S)  # announced before jobs
        validator = _start(
            ValidatorActor,
            validator_name(validator_uid),
            namespace,
            validator_wallet,
            chain,
            namespace,
            int(chunk_mib * MIB),
            timeout_s,
            dict(zip(miner_uids, weights, strict=True)),
        )
    except ValueError as e:
        raise RuntimeError(
            f"a subnet already runs in Ray namespace {namespace!r} ({e}); shut it down or pass another namespace"
        ) from None
    ray.get(validator.jobs.remote(), timeout=READY_TIMEOUT_S)
    return LocalSubnet(namespace, chain, validator_uid, validator, miner_actors)


def register_dev_wallet(chain: Chain, wallet: WalletConfig, stake: float = 0.0) -> int:
    """Create a development wallet if missing and register it on the embedded chain; its uid."""
    ensure_dev_wallet(wallet)
    return chain.register(load_identity(wallet).hotkey, coldkey_of(wallet), stake)


def _start(actor_class, name: str, namespace: str, *args, max_concurrency: int = 1, resources: dict | None = None):
    remote_class = ray.remote(num_cpus=0)(actor_class)
    options = {"name": name, "namespace": namespace, "max_concurrency": max_concurrency, "resources": resources or {}}
    return remote_class.options(**options).remote(*args)
