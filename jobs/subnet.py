"""The subnet a job's peers use: the one running in the configured namespace, or a local one for the job."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import ray
from omegaconf import DictConfig, OmegaConf

from actors import start_local_subnet
from actors.subnet import register_dev_wallet
from mapreduce_ray.chain import ChainConfig
from mapreduce_ray.naming import validator_name
from mapreduce_ray.wallets import dev_peer_wallet


@dataclass(frozen=True)
class Subnet:
    """Where peers find their validator (Peer(rank, peer_count, **peer_options)), and a handle on it."""

    peer_options: dict
    validator: ray.actor.ActorHandle


@contextmanager
def subnet_for(cfg: DictConfig) -> Iterator[Subnet]:
    """Join the subnet whose validator `subnet.validator_uid` runs in `subnet.namespace`, registering the
    development peer wallets of ranks 1..topology.peers; or start a local one (`topology`, `validator`
    settings) and stop it afterwards."""
    chain = ChainConfig(**cfg.subnet.chain)
    if chain.backend != "embedded":
        raise ValueError("this job signs with development peer wallets, so it runs on the embedded chain only")
    namespace, uid = cfg.subnet.namespace, cfg.subnet.validator_uid
    try:
        validator = ray.get_actor(validator_name(uid), namespace=namespace)
    except ValueError:
        _require_empty(namespace, validator_name(uid))
        local = start_local_subnet(
            cfg.topology.miners,
            peers=cfg.topology.peers,
            chunk_mib=cfg.topology.chunk_mib,
            timeout_s=cfg.subnet.timeout_s,
            namespace=namespace,
            chain=chain,
            validator=validator_settings(cfg),
        )
        try:
            yield Subnet(local.peer_options, local.validator)
        finally:
            local.shutdown()
        return
    client = chain.open()
    for rank in range(1, cfg.topology.peers + 1):
        register_dev_wallet(client, dev_peer_wallet(chain.state_path, rank))
    options = {"validator_uid": uid, "netuid": chain.netuid, "state_dir": str(chain.state_path), "namespace": namespace}
    yield Subnet(options, validator)


def _require_empty(namespace: str, wanted: str) -> None:
    """A namespace where another subnet's actors run is not one to start a local subnet in."""
    running = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == namespace)
    if running:
        raise ValueError(
            f"{wanted} does not run in Ray namespace {namespace!r}, but {', '.join(running)} do: pass "
            "subnet.validator_uid=UID (the uid jobs.validator printed), or another subnet.namespace"
        )


def validator_settings(cfg: DictConfig) -> dict:
    """The settings of a local validator started for the job (ValidatorConfig fields)."""
    return OmegaConf.to_container(cfg.validator, resolve=True)
