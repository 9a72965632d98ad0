"""Run a validator: python -m jobs.validator +wallet=NAME

Registers the wallet's hotkey on the embedded chain if needed, with stake so it
holds a validator permit (on bittensor it must be registered and permitted
already), joins this validator's Ray cluster, starts the detached actor
validator-{uid} on this node, which serves the validator's Flight endpoint on
endpoint.listen and announces endpoint.advertise on chain, and logs its status
until Ctrl-C, which stops the actor. Peers ask it for jobs with
Peer(..., validator_uid=uid); it benchmarks miners with the bots whose hotkeys
`validator.benchmark.bots` lists (python -m jobs.benchmark, in the same Ray
cluster), checks rounds, scores miners and sets weights. Settings:
conf/validator.yaml, and validator.* as mapreduce_ray.validator.config.ValidatorConfig
documents them.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from actors.validator import MAX_CONCURRENCY, ValidatorActor
from jobs.config import wire_config
from jobs.service import serve_role, user_errors
from mapreduce_ray.naming import validator_name
from mapreduce_ray.validator.config import ValidatorConfig

MIB = 1024 * 1024


def show(status: dict) -> str:
    weights = ", ".join(f"{uid}: {w:.3f}" for uid, w in sorted(status["weights"].items())) or "none yet"
    return (
        f"uid {status['uid']} {status['hotkey']}: {status['jobs']} job(s) open, {status['benchmarks']} benchmark(s), "
        f"{status['checks']} check(s) ({status['check_failures']} failed), weights {weights}"
    )


def validator_config(cfg: DictConfig) -> ValidatorConfig:
    settings = OmegaConf.to_container(cfg.validator, resolve=True)
    settings.update(
        namespace=cfg.subnet.namespace, chunk_bytes=int(cfg.topology.chunk_mib * MIB), timeout_s=cfg.subnet.timeout_s
    )
    return ValidatorConfig.from_dict(settings)


@hydra.main(config_path="../conf", config_name="validator", version_base=None)
def main(cfg: DictConfig) -> None:
    with user_errors():
        settings = (validator_config(cfg), cfg.endpoint.listen, cfg.endpoint.advertise, wire_config(cfg))
    serve_role(
        cfg, ValidatorActor, validator_name, lambda wallet, chain: (wallet, chain, *settings), show, MAX_CONCURRENCY
    )


if __name__ == "__main__":
    main()
