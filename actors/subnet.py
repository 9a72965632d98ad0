"""Start a whole subnet (miners + validator) on a local Ray, in one call.

from actors import start_local_subnet
subnet = start_local_subnet(miners=2)
...  # Peer(rank, peer_count).init_process_group() from any process on the cluster
subnet.shutdown()
"""

from __future__ import annotations

from dataclasses import dataclass

import ray

from actors.miner import MAX_CONCURRENCY, MinerActor
from actors.validator import ValidatorActor
from mapreduce_ray.naming import DEFAULT_NAMESPACE, miner_name, validator_name
from mapreduce_ray.types import MinerSlot

MIB = 1024 * 1024
READY_TIMEOUT_S = 120.0


@dataclass
class LocalSubnet:
    """Handles on a running subnet's actors."""

    namespace: str
    validator: ray.actor.ActorHandle
    miners: list[ray.actor.ActorHandle]

    def shutdown(self) -> None:
        """Kill the subnet's actors."""
        for actor in [self.validator, *self.miners]:
            ray.kill(actor)


def connect_ray(
    address: str = "local", object_store_mib: int = 2048, num_cpus: int | None = None, preallocate: bool = True
) -> None:
    """Start a local Ray (address "local") or join a running cluster ("auto", "ray://...", "host:port")."""
    if address == "local":
        init_local_ray(object_store_mib, num_cpus, preallocate)
    else:
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
    miner_weights: list[float] | None = None,
    chunk_mib: float = 64,
    timeout_s: float = 60.0,
    validator_uid: int = 0,
    namespace: str = DEFAULT_NAMESPACE,
    miner_resources: dict[str, float] | None = None,
) -> LocalSubnet:
    """Start `miners` MinerActors and a ValidatorActor; starts a local Ray if none is connected.

    Segments are sized by `miner_weights` (equal when None). `miner_resources`
    (custom Ray resources) pins the miners to the nodes that offer them.
    """
    weights = [1.0] * miners if miner_weights is None else list(miner_weights)
    if miners < 1 or len(weights) != miners:
        raise ValueError(f"need miners >= 1 and one weight per miner, got {miners} miners, weights {miner_weights}")
    if not ray.is_initialized():
        init_local_ray()
    names = [miner_name(uid) for uid in range(miners)]
    try:
        miner_actors = [
            _start(MinerActor, name, namespace, name, max_concurrency=MAX_CONCURRENCY, resources=miner_resources)
            for name in names
        ]
        validator = _start(
            ValidatorActor,
            validator_name(validator_uid),
            namespace,
            namespace,
            [MinerSlot(n, w) for n, w in zip(names, weights, strict=True)],
            int(chunk_mib * MIB),
            timeout_s,
        )
    except ValueError as e:
        raise RuntimeError(
            f"a subnet already runs in Ray namespace {namespace!r} ({e}); shut it down or pass another namespace"
        ) from None
    ray.get([m.status.remote() for m in miner_actors] + [validator.jobs.remote()], timeout=READY_TIMEOUT_S)
    return LocalSubnet(namespace, validator, miner_actors)


def _start(actor_class, name: str, namespace: str, *args, max_concurrency: int = 1, resources: dict | None = None):
    remote_class = ray.remote(num_cpus=0)(actor_class)
    options = {"name": name, "namespace": namespace, "max_concurrency": max_concurrency, "resources": resources or {}}
    return remote_class.options(**options).remote(*args)
