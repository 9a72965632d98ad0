"""Start a whole subnet (embedded chain, miners, validator, bots) on a local Ray, in one call.

from actors import start_local_subnet
subnet = start_local_subnet(miners=2)
...  # Peer(rank, peer_count, **subnet.peer_options).init_process_group() from any process on this machine
subnet.shutdown()

For convenience every party's actors share the one local Ray, but they talk to each
other only through their endpoints on loopback, as parties on separate machines do.
They sign with development wallets in the chain's state dir, created and registered
on the embedded chain as needed: dev-validator (staked, so it holds a validator
permit), dev-miner/miner-{i}, the benchmark bots dev-bench/bot-{i} and dev-peer/rank-{r}.
It is ready once the validator has benchmarked every miner.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

import ray

from actors.benchmark import BenchmarkActor
from actors.miner import MAX_CONCURRENCY, MinerActor
from actors.relay import Relay
from actors.validator import MAX_CONCURRENCY as VALIDATOR_CONCURRENCY
from actors.validator import ValidatorActor
from mapreduce_ray.chain import Chain, ChainConfig
from mapreduce_ray.naming import DEFAULT_NAMESPACE, benchmark_name, miner_name, validator_name
from mapreduce_ray.validator.config import ValidatorConfig
from mapreduce_ray.wallets import (
    WalletConfig,
    coldkey_of,
    dev_peer_wallet,
    dev_wallet,
    ensure_dev_wallet,
    load_identity,
)
from mapreduce_ray.wire.config import WireConfig

MIB = 1024 * 1024
READY_TIMEOUT_S = 120.0
PROBE_TIMEOUT_S = 5.0
POLL_S = 0.2
DEV_VALIDATOR_STAKE = 1000.0  # TAO on the embedded chain, enough for a validator permit
LOOPBACK = "127.0.0.1:0"  # where a local subnet's endpoints listen: loopback, a free port each


@dataclass
class LocalSubnet:
    """Handles on a running subnet's actors."""

    namespace: str
    chain: ChainConfig
    validator_uid: int
    validator: ray.actor.ActorHandle
    miners: list[ray.actor.ActorHandle]
    bots: list[ray.actor.ActorHandle]
    config: ValidatorConfig

    @property
    def peer_options(self) -> dict:
        """Peer(rank, peer_count, **peer_options) finds this subnet."""
        return {
            "validator_uid": self.validator_uid,
            "netuid": self.chain.netuid,
            "state_dir": str(self.chain.state_path),
        }

    def shutdown(self) -> None:
        """Kill the subnet's actors."""
        for actor in [self.validator, *self.miners, *self.bots]:
            ray.kill(actor)

    def wait_benchmarked(self, timeout_s: float, miners: list | None = None) -> list[dict]:
        """Wait until the validator has benchmarked `miners` (default: all of the subnet's) as often as their
        throughput takes (`benchmark.best_of` passes) and freed them for jobs; their ledger rows. RuntimeError
        naming the miners that did not pass in time."""
        uids = {ray.get(m.status.remote(), timeout=timeout_s)["uid"] for m in miners or self.miners}
        passes = self.config.benchmark.best_of
        deadline = time.monotonic() + timeout_s
        while True:
            rows = [r for r in ray.get(self.validator.miners.remote(), timeout=timeout_s) if r["uid"] in uids]
            unproven = sorted(uids - {r["uid"] for r in rows if r["measured"] >= passes and r["state"] != "busy"})
            if not unproven:
                return rows
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"miner(s) {unproven} did not pass {passes} benchmark(s) within {timeout_s:g} s: "
                    f"{[r for r in rows if r['uid'] in unproven]}"
                )
            time.sleep(POLL_S)


def connect_ray(
    address: str = "local", object_store_mib: int = 2048, num_cpus: int | None = None, preallocate: bool = True
) -> None:
    """Start a local Ray (address "local") or join a running cluster ("auto", "ray://...", "host:port").

    A "host:port" nobody listens on raises ConnectionError at once (Ray itself would retry for a minute).
    A process already connected to Ray (a notebook, a test) keeps that connection.
    """
    if ray.is_initialized():
        return
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


@dataclass(frozen=True)
class MinerPlan:
    """A miner to start: the endpoint it serves (Relay, or a misbehaving one of actors.behaviours) with its
    keyword arguments, where it listens (host:port), the custom Ray resources that pin it to a node
    (None: anywhere), and how many reducers it runs, the others where `reducer_resources` puts them (None:
    spread over the nodes)."""

    relay_class: type = Relay
    options: dict | None = None
    resources: dict[str, float] | None = None
    listen: str = LOOPBACK
    reducers: int = 1
    reducer_resources: dict[str, float] | None = None


def start_local_subnet(
    miners: int | list[MinerPlan] = 2,
    *,
    peers: int = 8,
    chunk_mib: float = 4,
    timeout_s: float = 60.0,
    namespace: str = DEFAULT_NAMESPACE,
    chain: ChainConfig | None = None,
    miner_resources: dict[str, float] | None = None,
    validator: dict | None = None,
    bots: int | None = None,
    home_resources: dict[str, float] | None = None,
    wait: bool = True,
    wire: WireConfig | None = None,
) -> LocalSubnet:
    """Start miners, `bots` benchmark bots (None: one per rank of a benchmark) and a ValidatorActor; starts a
    local Ray if none is connected.
    With `wait`, returns once the validator has benchmarked every miner.

    `miners`: how many MinerActors, pinned by `miner_resources` (custom Ray resources) to
    the nodes that offer them, or one MinerPlan per miner. `home_resources` pins the validator
    and the bots the same way (None: anywhere). Registers development wallets
    for the validator, the miners, the bots and ranks 1..`peers` on the embedded `chain`
    (default: ChainConfig()). `validator` overrides ValidatorConfig settings, e.g.
    {"benchmark": {"size_mib": 8}}. `wire`: every endpoint's limits (None: WireConfig()).
    """
    chain = chain or ChainConfig()
    plans = [MinerPlan(resources=miner_resources)] * miners if isinstance(miners, int) else list(miners)
    settings = {"namespace": namespace, "chunk_bytes": int(chunk_mib * MIB), "timeout_s": timeout_s}
    settings.update(validator or {})
    ranks = ValidatorConfig.from_dict(settings).benchmark.peers
    bots = ranks if bots is None else bots
    if not plans or bots < ranks:
        raise ValueError(
            f"need at least one miner and a bot for each of a benchmark's {ranks} ranks, got {len(plans)} miners "
            f"and {bots} bots"
        )
    if chain.backend != "embedded":
        raise ValueError("a local subnet runs on the embedded chain; on bittensor start jobs.miner and jobs.validator")
    if not ray.is_initialized():
        init_local_ray()
    client = chain.open()
    validator_wallet = dev_wallet(chain.state_path, "dev-validator", "default")
    register_dev_wallet(client, validator_wallet, DEV_VALIDATOR_STAKE)  # uid 0 on a fresh subnet
    try:
        miner_actors = [
            start_miner(chain, namespace, dev_wallet(chain.state_path, "dev-miner", f"miner-{i}"), plan, wire)
            for i, plan in enumerate(plans)
        ]
        ray.get([m.status.remote() for m in miner_actors], timeout=READY_TIMEOUT_S)  # announced before jobs
        started = [
            start_bot(chain, namespace, dev_wallet(chain.state_path, "dev-bench", f"bot-{i}"), home_resources, wire)
            for i in range(bots)
        ]
        for rank in range(1, peers + 1):
            register_dev_wallet(client, dev_peer_wallet(chain.state_path, rank))
        settings["benchmark"] = {**settings.get("benchmark", {}), "bots": [hotkey for _, hotkey in started]}
        config = ValidatorConfig.from_dict(settings)
        uid, validator_actor = start_validator(chain, config, validator_wallet, home_resources, wire)
    except ValueError as e:
        raise RuntimeError(
            f"a subnet already runs in Ray namespace {namespace!r} ({e}); shut it down or pass another namespace"
        ) from None
    subnet = LocalSubnet(namespace, chain, uid, validator_actor, miner_actors, [bot for bot, _ in started], config)
    if wait:
        subnet.wait_benchmarked(READY_TIMEOUT_S)
    return subnet


def start_miner(
    chain: ChainConfig, namespace: str, wallet: WalletConfig, plan: MinerPlan, wire: WireConfig | None = None
):
    """Register a development miner wallet and start the miner `plan` describes, serving on loopback."""
    uid = register_dev_wallet(chain.open(), wallet)
    return _start(
        MinerActor,
        miner_name(uid),
        namespace,
        wallet,
        chain,
        plan.listen,
        wire=wire,
        relay_class=plan.relay_class,
        relay_options=plan.options,
        reducers=plan.reducers,
        reducer_resources=plan.reducer_resources,
        max_concurrency=MAX_CONCURRENCY,
        resources=plan.resources,
    )


def start_bot(
    chain: ChainConfig,
    namespace: str,
    wallet: WalletConfig,
    resources: dict[str, float] | None = None,
    wire: WireConfig | None = None,
):
    """Register a development benchmark bot wallet and start its actor; (handle, hotkey)."""
    uid = register_dev_wallet(chain.open(), wallet)
    bot = _start(BenchmarkActor, benchmark_name(uid), namespace, wallet, chain, wire, resources=resources)
    return bot, load_identity(wallet).hotkey


def start_validator(
    chain: ChainConfig,
    config: ValidatorConfig,
    wallet: WalletConfig | None = None,
    resources: dict[str, float] | None = None,
    wire: WireConfig | None = None,
    listen: str = LOOPBACK,
):
    """Register (with stake) and start a validator, the development one by default, on a node offering
    `resources` (None: anywhere), its endpoint on `listen`; (uid, handle)."""
    wallet = wallet or dev_wallet(chain.state_path, "dev-validator", "default")
    uid = register_dev_wallet(chain.open(), wallet, DEV_VALIDATOR_STAKE)
    handle = _start(
        ValidatorActor,
        validator_name(uid),
        config.namespace,
        wallet,
        chain,
        config,
        listen,
        wire=wire,
        max_concurrency=VALIDATOR_CONCURRENCY,
        resources=resources,
    )
    ray.get(handle.status.remote(), timeout=READY_TIMEOUT_S)
    return uid, handle


def register_dev_wallet(chain: Chain, wallet: WalletConfig, stake: float = 0.0) -> int:
    """Create a development wallet if missing and register it on the embedded chain; its uid."""
    ensure_dev_wallet(wallet)
    return chain.register(load_identity(wallet).hotkey, coldkey_of(wallet), stake)


def _start(
    actor_class, name: str, namespace: str, *args, max_concurrency: int = 1, resources: dict | None = None, **kwargs
):
    remote_class = ray.remote(num_cpus=0)(actor_class)
    options = {"name": name, "namespace": namespace, "max_concurrency": max_concurrency, "resources": resources or {}}
    return remote_class.options(**options).remote(*args, **kwargs)
