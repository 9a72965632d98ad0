"""Ray actors of the subnet: miners, validator, benchmark bots, peers, and a one-call local subnet."""

from actors.benchmark import BenchmarkActor
from actors.miner import MinerActor
from actors.peer import PeerActor
from actors.subnet import LocalSubnet, MinerPlan, connect_ray, init_local_ray, start_local_subnet
from actors.validator import ValidatorActor

__all__ = [
    "BenchmarkActor",
    "LocalSubnet",
    "MinerActor",
    "MinerPlan",
    "PeerActor",
    "ValidatorActor",
    "connect_ray",
    "init_local_ray",
    "start_local_subnet",
]
