"""Run a validator: python -m jobs.validator +wallet=NAME

Registers the wallet's hotkey on the embedded chain if needed, with stake so it
holds a validator permit (on bittensor it must be registered and permitted
already), joins Ray, starts the detached actor validator-{uid} on this node and
logs its status until Ctrl-C, which stops the actor. Peers ask it for jobs with
Peer(..., validator_uid=uid). Settings: conf/validator.yaml.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from actors.validator import ValidatorActor
from jobs.service import serve_role
from mapreduce_ray.naming import validator_name

MIB = 1024 * 1024


def show(status: dict) -> str:
    return f"uid {status['uid']} {status['hotkey']}: {status['jobs']} job(s) open"


@hydra.main(config_path="../conf", config_name="validator", version_base=None)
def main(cfg: DictConfig) -> None:
    chunk_bytes, timeout_s = int(cfg.topology.chunk_mib * MIB), cfg.subnet.timeout_s

    def args_of(wallet, chain) -> tuple:
        return wallet, chain, cfg.subnet.namespace, chunk_bytes, timeout_s

    serve_role(cfg, ValidatorActor, validator_name, args_of, show)


if __name__ == "__main__":
    main()
