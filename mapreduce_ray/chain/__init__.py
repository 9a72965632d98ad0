"""The subnet's chain: uids, hotkeys, stake, permits, endpoints and weights.

chain = ChainConfig().open()                                           # embedded, offline
chain = ChainConfig(backend="bittensor", network="finney").open()      # the real chain
"""

from mapreduce_ray.chain.base import DEFAULT_NETUID, Chain, Metagraph, Neuron
from mapreduce_ray.chain.config import ChainConfig, default_state_dir

__all__ = ["DEFAULT_NETUID", "Chain", "ChainConfig", "Metagraph", "Neuron", "default_state_dir"]
