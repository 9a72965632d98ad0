"""Data-parallel training through miners: P trainers average their gradients every step.

    python -m jobs.train                                   # a local Ray and a whole local subnet
    python -m jobs.train topology.peers=2 train.steps=300 train.lr=0.05
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m jobs.train ray.address=auto

Trains an MLP on scikit-learn's handwritten digits with `topology.peers` TrainerActors. Each
step every trainer takes its share of one global batch and the trainers average their
gradients through the miners, so they step as one process on the whole batch would. The job
joins the subnet whose validator (`subnet.validator_uid`) answers at the endpoint it announced
on chain, or starts a local one in this job's Ray (embedded chain, miners, validator, benchmark
bot; every party on its own loopback endpoint) and stops it at the end.
Shows a progress bar, then a table of loss, accuracy and all_reduce times and bandwidths,
the held-out accuracy, and the miners' scores and weights. Settings: conf/train.yaml.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass

import hydra
import ray
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from actors.trainer import TrainerActor, TrainSettings
from jobs.config import wire_config
from jobs.local import format_table
from jobs.service import connect, user_errors
from jobs.subnet import Subnet, subnet_for
from mapreduce_ray.remote import get

MB = 1e6
PROGRESS_S = 1.0  # seconds between progress bar updates


@dataclass
class TrainReport:
    """What a training run printed, and the trainers' final parameters (rank 1's; `in_step` says
    whether every rank holds the same bits)."""

    rows: list[dict]
    test_loss: float
    test_accuracy: float
    miners: list[dict]
    parameters: torch.Tensor
    in_step: bool


def run(cfg: DictConfig) -> TrainReport:
    """Train; the report."""
    settings = TrainSettings(**cfg.train)
    if settings.batch_size % cfg.topology.peers:
        raise ValueError(
            f"train.batch_size={settings.batch_size} does not split evenly across topology.peers={cfg.topology.peers}"
        )
    connect(cfg.ray)
    with subnet_for(cfg, wire_config(cfg)) as subnet:
        return train(cfg, settings, subnet)


def train(cfg: DictConfig, settings: TrainSettings, subnet: Subnet) -> TrainReport:
    """Run `settings.steps` steps on `topology.peers` trainers of the subnet."""
    p, timeout = cfg.topology.peers, cfg.subnet.timeout_s
    options = {
        "job": cfg.job,
        "redundancy": cfg.topology.redundancy,
        "reject_nonfinite": cfg.topology.reject_nonfinite,
        "wire": wire_config(cfg),
        **subnet.peer_options,
    }
    trainer = ray.remote(num_cpus=0)(TrainerActor)
    trainers = [trainer.remote(rank, p, settings, **options) for rank in range(1, p + 1)]
    try:
        nbytes = get([t.init_process_group.remote() for t in trainers], timeout, "joining the job")[0]
        steps = []
        progress = tqdm(range(settings.steps), "training", unit="step", file=sys.stderr, mininterval=PROGRESS_S)
        for index in progress:
            steps.append(get([t.step.remote(index) for t in trainers], timeout, f"step {index}"))
            loss, accuracy = _loss(steps[-1]), _accuracy(steps[-1], settings)
            progress.set_postfix(loss=f"{loss:.3f}", acc=f"{accuracy:.2f}", refresh=False)
        test_loss, test_accuracy = get(trainers[0].evaluate.remote(), timeout, "evaluating")
        parameters = get([t.parameters.remote() for t in trainers], timeout, "reading the parameters")
        get([t.destroy_process_group.remote() for t in trainers], timeout, "leaving the job")
    finally:
        for actor in trainers:
            ray.kill(actor)
    return TrainReport(
        rows=step_rows(steps, settings, nbytes, p, cfg.log_every),
        test_loss=test_loss,
        test_accuracy=test_accuracy,
        miners=miner_rows(subnet, timeout),
        parameters=parameters[0],
        in_step=all(torch.equal(parameters[0], other) for other in parameters[1:]),
    )


def step_rows(steps: list[list[dict]], settings: TrainSettings, nbytes: int, peers: int, every: int) -> list[dict]:
    """One row per `every` steps (and the last): mean loss and accuracy, median all_reduce time and bandwidths."""
    rows = []
    for first in range(0, len(steps), every):
        window = steps[first : first + every]
        seconds = statistics.median(max(s["end"] for s in step) - min(s["start"] for s in step) for step in window)
        algbw = nbytes / seconds / MB
        rows.append(
            {
                "steps": f"{first + 1}-{first + len(window)}",
                "loss": f"{statistics.mean(_loss(step) for step in window):.4f}",
                "accuracy": f"{statistics.mean(_accuracy(step, settings) for step in window):.3f}",
                "all_reduce ms": f"{seconds * 1e3:.1f}",
                "algbw MB/s": f"{algbw:.3f}",
                "busbw MB/s": f"{algbw * 2 * (peers - 1) / peers:.3f}",
            }
        )
    return rows


def miner_rows(subnet: Subnet, timeout_s: float) -> list[dict]:
    """The validator's miners, as its endpoint tells: measured throughput, verified capacity, score, and their
    share of the weights the validator last set on chain."""
    table = subnet.miners(timeout_s)
    weights = {int(uid): w for uid, w in table["weights"].items()}
    total = sum(weights.values()) or 1.0
    return [
        {
            "miner": f"miner-{row['uid']}",
            "state": row["state"],
            "throughput MB/s": f"{row['throughput'] / 1e6:.1f}",
            "capacity MiB": f"{row['capacity'] / 2**20:g}",
            "score": f"{row['score']:.4g}",
            "weight": f"{weights.get(row['uid'], 0.0) / total:.3f}",
        }
        for row in table["miners"]
    ]


def _loss(step: list[dict]) -> float:
    return statistics.mean(s["loss"] for s in step)


def _accuracy(step: list[dict], settings: TrainSettings) -> float:
    return sum(s["hits"] for s in step) / settings.batch_size


def show(report: TrainReport) -> str:
    return "\n\n".join(
        [
            format_table(report.rows),
            f"held-out digits: loss {report.test_loss:.4f}, accuracy {report.test_accuracy:.3f}",
            format_table(report.miners),
        ]
    )


@hydra.main(config_path="../conf", config_name="train", version_base=None)
def main(cfg: DictConfig) -> None:
    with user_errors():
        report = run(cfg)
    print(show(report))


if __name__ == "__main__":
    main()
