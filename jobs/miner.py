"""Run a miner: python -m jobs.miner +wallet=NAME miner.listen=0.0.0.0:PORT miner.advertise=HOST:PORT

Registers the wallet's hotkey on the embedded chain if needed (on bittensor it
must be registered already), starts this operator's own Ray in the process (or
joins the operator's cluster with ray=cluster ray.address=...), starts the
detached actor miner-{uid} on this node, which serves the miner's Flight
endpoint on miner.listen and announces miner.advertise on chain (with
miner.reducers > 1, more reducers spread over the operator's nodes, listed in
its endpoint's `reducers` answer), and logs its status until Ctrl-C, which stops the
actor. Settings: conf/miner.yaml. It warns when this host lacks a TCP setting its wire
wants (mapreduce_ray/wire/tuning.py).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from actors.miner import MAX_CONCURRENCY, MinerActor, check_reducers
from actors.relay import Relay
from jobs.config import relay_settings, wire_config
from jobs.service import serve_role, user_errors
from mapreduce_ray.naming import miner_name
from mapreduce_ray.wire.tuning import advice, untuned


def show(status: dict) -> str:
    return (
        f"uid {status['uid']} {status['hotkey']}: {status['jobs']} job(s), {status['open_rounds']} open round(s), "
        f"{status['rounds_done']} rounds done, {status['bytes_in'] / 2**20:.1f} MiB reduced"
        + (f" by {len(status['reducers'])} reducers" if len(status["reducers"]) > 1 else "")
    )


@hydra.main(config_path="../conf", config_name="miner", version_base=None)
def main(cfg: DictConfig) -> None:
    # MinerActor's arguments after the wallet and chain: where it listens and what it announces, its
    # settings, the endpoint it serves (an honest Relay, no options), how many reducers
    with user_errors():
        check_reducers(cfg.miner.reducers)
        settings = (cfg.miner.listen, cfg.miner.advertise, wire_config(cfg), relay_settings(cfg), Relay, None)
    arguments = (*settings, cfg.miner.reducers)
    if lacking := untuned():
        print(f"warning: {advice(lacking)}", file=sys.stderr, flush=True)
    serve_role(cfg, MinerActor, miner_name, lambda wallet, chain: (wallet, chain, *arguments), show, MAX_CONCURRENCY)


if __name__ == "__main__":
    main()
