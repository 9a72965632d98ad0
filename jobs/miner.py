"""Run a miner: python -m jobs.miner +wallet=NAME

Registers the wallet's hotkey on the embedded chain if needed (on bittensor it
must be registered already), joins Ray (ray.address=auto by default; ray=local
runs one in this process), starts the detached actor miner-{uid} on this node,
which announces its endpoint on the chain, and logs its status until Ctrl-C,
which stops the actor. Settings: conf/miner.yaml.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from actors.miner import MAX_CONCURRENCY, MinerActor
from jobs.service import serve_role
from mapreduce_ray.naming import miner_name


def show(status: dict) -> str:
    return (
        f"uid {status['uid']} {status['hotkey']}: {status['jobs']} job(s), {status['open_rounds']} open round(s), "
        f"{status['rounds_done']} rounds done, {status['bytes_in'] / 2**20:.1f} MiB reduced"
    )


@hydra.main(config_path="../conf", config_name="miner", version_base=None)
def main(cfg: DictConfig) -> None:
    serve_role(cfg, MinerActor, miner_name, lambda wallet, chain: (wallet, chain), show, MAX_CONCURRENCY)


if __name__ == "__main__":
    main()
