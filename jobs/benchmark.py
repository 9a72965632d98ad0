"""Run a benchmark bot: python -m jobs.benchmark +wallet=NAME

Registers the wallet's hotkey on the embedded chain if needed (on bittensor it
must be registered already), joins Ray, starts the detached actor benchmark-{uid}
on this node and logs its status until Ctrl-C. A validator orders it to benchmark
miners when its hotkey is in the validator's `validator.benchmark.bots`.
Settings: conf/benchmark.yaml.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from actors.benchmark import BenchmarkActor
from jobs.config import wire_config
from jobs.service import serve_role
from mapreduce_ray.naming import benchmark_name


def show(status: dict) -> str:
    return f"uid {status['uid']} {status['hotkey']}: {status['runs']} benchmark(s) run"


@hydra.main(config_path="../conf", config_name="benchmark", version_base=None)
def main(cfg: DictConfig) -> None:
    serve_role(cfg, BenchmarkActor, benchmark_name, lambda wallet, chain: (wallet, chain, wire_config(cfg)), show)


if __name__ == "__main__":
    main()
