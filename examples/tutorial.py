r"""The seed project's tutorial: peers join a job, rank 1 broadcasts its weights, then every peer averages its
gradients with the others for two epochs. Each rank checks the results and exits non-zero on a mismatch
(tests/test_tutorial.py runs two ranks on the tests' local subnet).

On the embedded chain (offline), keep a local subnet standing in one terminal (Ctrl-D stops it); on a fresh chain
its validator is uid 0 on netuid 10, and it registers the development wallets of ranks 1..8:

    python -i -c "from actors import start_local_subnet; subnet = start_local_subnet(); print(subnet.peer_options)"

then run each rank in a terminal of its own:

    python examples/tutorial.py --rank 1 --count 2
    python examples/tutorial.py --rank 2 --count 2

With the parties started as README's "Running the parties" shows instead, register each rank's development
wallet first (python -m jobs.register +wallet=dev-peer wallet.hotkey=rank-2) and pass --validator.uid, the uid
jobs.validator printed. On Bittensor, each rank with its own wallet registered on the subnet:

    python examples/tutorial.py --subtensor.network finney --netuid 10 --wallet.name W --wallet.hotkey H \
        --validator.uid V --rank 1 --count 2
"""

from __future__ import annotations

import logging
import sys
import time
from argparse import ArgumentParser, RawDescriptionHelpFormatter

import torch

from mapreduce_ray import MapReduceError, Peer
from mapreduce_ray.chain import DEFAULT_NETUID
from mapreduce_ray.shards import digest

log = logging.getLogger("tutorial")
MIB = 1024 * 1024
EPOCHS = 2

parser = ArgumentParser(description=__doc__, formatter_class=RawDescriptionHelpFormatter)
parser.add_argument("--validator.uid", dest="validator_uid", metavar="UID", type=int, default=0, help="Validator UID")
parser.add_argument("--netuid", type=int, default=DEFAULT_NETUID, help="Map Reduce Subnet NetUID")
parser.add_argument("--rank", type=int, default=1, help="Rank of the peer")
parser.add_argument("--count", type=int, default=1, help="Number of peers")
parser.add_argument(
    "--subtensor.network", dest="network", default="embedded", help="embedded, finney, test, local or a ws:// URL"
)
parser.add_argument("--wallet.name", dest="wallet_name", help="Wallet name (default: the dev-peer wallet of the rank)")
parser.add_argument("--wallet.hotkey", dest="wallet_hotkey", default="default", help="Hotkey name of the wallet")
parser.add_argument("--size_mib", type=float, default=100, help="Size of the weights and gradients, in MiB")
parser.add_argument("--step_seconds", type=float, default=5, help="Stand-in for an epoch's training time")
parser.add_argument("--job", default="default", help="Peers with the same job name form one job")


def train(rank, peer_count, bandwidth, wallet, validator_uid, netuid, network, *, step_seconds, job):
    log.info(f"rank {rank} netuid: {netuid}")
    numel = bandwidth // 4  # float32 elements
    with Peer(rank, peer_count, bandwidth, wallet, validator_uid, network, netuid=netuid, job=job) as peer:
        weights = torch.rand((numel, 1), dtype=torch.float32) if rank == 1 else None
        weights = peer.broadcast(weights)
        print(f"rank {rank} broadcast: weights digest {digest(weights)[:16]}")
        expected = torch.tensor(3 + (peer_count - 1), dtype=torch.float32) / peer_count  # rank 1 adds 3, others 1
        log.info(f"Peer {rank} is training...")
        for i in range(EPOCHS):
            log.info(f"epoch {i}")
            time.sleep(step_seconds)  # Replace this with actual training code
            gradients = torch.ones((numel, 1), dtype=torch.float32) * (3 if rank == 1 else 1)
            gradients = peer.all_reduce(gradients)
            print(f"rank {rank} epoch {i}: all_reduce gave {gradients[0, 0].item()} (expected {expected.item()})")
            if not torch.equal(gradients, expected.expand_as(gradients)):
                sys.exit(f"rank {rank} epoch {i}: all_reduce is not {expected.item()} everywhere")
    print(f"Peer {rank} has finished training.")


if __name__ == "__main__":
    config = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    wallet = None
    if config.network != "embedded" and config.wallet_name is None:
        parser.error(f"--wallet.name is required on {config.network}: a wallet registered on netuid {config.netuid}")
    if config.wallet_name is not None:
        import bittensor

        wallet = bittensor.Wallet(name=config.wallet_name, hotkey=config.wallet_hotkey)
    try:
        train(
            config.rank,
            config.count,
            int(config.size_mib * MIB),
            wallet,
            config.validator_uid,
            config.netuid,
            config.network,
            step_seconds=config.step_seconds,
            job=config.job,
        )
    except MapReduceError as error:
        sys.exit(f"rank {config.rank}: {type(error).__name__}: {error}")
