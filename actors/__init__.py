"""Ray actors of the subnet: miners, validator, peers, and a one-call local subnet."""

from actors.miner import MinerActor
from actors.peer import PeerActor
from actors.subnet import LocalSubnet, connect_ray, init_local_ray, start_local_subnet
from actors.validator import ValidatorActor

__all__ = [
    "LocalSubnet",
    "MinerActor",
    "PeerActor",
    "ValidatorActor",
    "connect_ray",
    "init_local_ray",
    "start_local_subnet",
]
