"""The subnet a job's peers use: the one whose validator answers at its endpoint, or a local one for the job."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from actors import start_local_subnet
from actors.subnet import register_dev_wallet
from mapreduce_ray.chain import ChainConfig
from mapreduce_ray.chain.base import Neuron
from mapreduce_ray.errors import MapReduceError
from mapreduce_ray.wallets import dev_peer_wallet, load_identity
from mapreduce_ray.wire.config import WireConfig
from mapreduce_ray.wire.endpoint import Remote

PROBE_TIMEOUT_S = 5.0  # how long a validator that announced an endpoint has to answer there


@dataclass(frozen=True)
class Subnet:
    """Where peers find their validator (Peer(rank, peer_count, **peer_options)), and a client of its endpoint
    (signed with rank 1's development wallet) to read its miners' table."""

    peer_options: dict
    validator: Remote

    def miners(self, timeout_s: float) -> dict:
        """The validator's ledger rows ("miners") and the weights it last set ("weights", by uid)."""
        return json.loads(self.validator.call("miners", b"{}", timeout_s))


@contextmanager
def subnet_for(cfg: DictConfig, wire: WireConfig) -> Iterator[Subnet]:
    """Join the subnet whose validator `subnet.validator_uid` answers at the endpoint it announced on chain,
    registering the development peer wallets of ranks 1..topology.peers; or, when no validator answers,
    start a local one in this job's Ray (`topology`, `validator` settings) and stop it afterwards."""
    chain = ChainConfig(**cfg.subnet.chain)
    if chain.backend != "embedded":
        raise ValueError("this job signs with development peer wallets, so it runs on the embedded chain only")
    client = chain.open()
    uid = cfg.subnet.validator_uid
    validators = {n.uid: n for n in client.metagraph().validators if n.endpoint}
    if validators:  # a subnet may be running: its validator answers only registered peers
        for rank in range(1, cfg.topology.peers + 1):
            register_dev_wallet(client, dev_peer_wallet(chain.state_path, rank))
    keypair = load_identity(dev_peer_wallet(chain.state_path, 1)).keypair if validators else None
    answering = {u: r for u, n in validators.items() if (r := _answering(n, keypair, wire, chain.netuid))}
    if uid in answering:
        options = {"validator_uid": uid, "netuid": chain.netuid, "state_dir": str(chain.state_path)}
        yield Subnet(options, answering[uid])
        return
    if answering:
        raise ValueError(
            f"validator uid {uid} does not answer on {client.describe()}, but uid(s) {sorted(answering)} do: "
            "pass subnet.validator_uid=UID (the uid jobs.validator printed)"
        )
    local = start_local_subnet(
        cfg.topology.miners,
        peers=cfg.topology.peers,
        chunk_mib=cfg.topology.chunk_mib,
        timeout_s=cfg.subnet.timeout_s,
        namespace=cfg.subnet.namespace,
        chain=chain,
        validator=validator_settings(cfg),
        wire=wire,
    )
    try:
        neuron = chain.open().metagraph().neuron(local.validator_uid)
        keypair = load_identity(dev_peer_wallet(chain.state_path, 1)).keypair
        yield Subnet(local.peer_options, _validator_remote(neuron, keypair, wire, chain.netuid))
    finally:
        local.shutdown()


def _answering(neuron: Neuron, keypair, wire: WireConfig, netuid: int) -> Remote | None:
    """A client of the validator's endpoint if it answers there."""
    remote = _validator_remote(neuron, keypair, wire, netuid)
    try:
        remote.call("miners", b"{}", PROBE_TIMEOUT_S)
    except MapReduceError:
        remote.close()
        return None
    return remote


def validator_settings(cfg: DictConfig) -> dict:
    """The settings of a local validator started for the job (ValidatorConfig fields)."""
    return OmegaConf.to_container(cfg.validator, resolve=True)


def _validator_remote(neuron: Neuron, keypair, wire: WireConfig, netuid: int) -> Remote:
    """A client of the endpoint the validator `neuron` of subnet `netuid` announced on chain."""
    who = f"validator uid {neuron.uid}"
    return Remote(who, neuron.endpoint, neuron.hotkey, keypair, wire, neuron.certificate, netuid=netuid)
