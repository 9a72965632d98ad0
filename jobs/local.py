"""Broadcast once and all_reduce K rounds across P peer actors, on a local subnet or a running one.

    python -m jobs.local
    python -m jobs.local topology.peers=2 topology.miners=3 size_mib=100 rounds=10 dtype=bfloat16
    python -m jobs.local subnet.validator_uid=3   # the subnet whose validator uid 3 answers (see jobs.subnet)

Every peer's result is checked bit for bit against mapreduce_ray.reference, and a
table of times, algbw and busbw is printed. Settings: conf/local.yaml.
"""

from __future__ import annotations

import logging
import statistics
import sys
import time

import hydra
import ray
import torch
from omegaconf import DictConfig

from actors import PeerActor
from jobs.config import wire_config
from jobs.service import connect, describe_ray
from jobs.subnet import subnet_for, validator_settings
from mapreduce_ray.dtypes import dtype_named
from mapreduce_ray.errors import MapReduceError
from mapreduce_ray.reference import reference_reduce
from mapreduce_ray.shards import digest
from mapreduce_ray.types import ReduceOp
from mapreduce_ray.validator.config import ValidatorConfig

log = logging.getLogger(__name__)
MIB = 1024 * 1024
START_DELAY_S = 0.5


def random_tensor(seed: int, numel: int, dtype: str) -> torch.Tensor:
    """The same tensor for the same arguments, on any process."""
    generator = torch.Generator().manual_seed(seed)
    info = dtype_named(dtype)
    if info.is_integer:
        return torch.randint(-1000, 1000, (numel,), generator=generator, dtype=info.torch_dtype)
    return torch.randn(numel, generator=generator, dtype=info.torch_dtype)


def broadcast_round(peer, seed: int, numel: int, dtype: str, start_at: float) -> tuple[float, float, str]:
    tensor = random_tensor(seed, numel, dtype) if peer.rank == 1 else None
    _sleep_until(start_at)
    start = time.time()
    tensor = peer.broadcast(tensor, src=1)
    return start, time.time(), digest(tensor)


def all_reduce_round(peer, seed: int, numel: int, dtype: str, op: str, start_at: float) -> tuple[float, float, str]:
    tensor = random_tensor(seed + peer.rank, numel, dtype)
    _sleep_until(start_at)
    start = time.time()
    peer.all_reduce(tensor, op)
    return start, time.time(), digest(tensor)


def _sleep_until(wall_time: float) -> None:
    time.sleep(max(wall_time - time.time(), 0))


def check_config(cfg: DictConfig) -> None:
    """Refuse settings that cannot work before anything starts."""
    dtype = dtype_named(cfg.dtype)
    op = ReduceOp.parse(cfg.op)
    if op is ReduceOp.AVG and dtype.is_integer:
        raise ValueError(f"op=avg of {cfg.dtype} would truncate; pass op=sum")
    ValidatorConfig.from_dict(validator_settings(cfg))


def run(cfg: DictConfig) -> list[dict]:
    """Run the job; return one table row per collective."""
    check_config(cfg)
    connect(cfg.ray)
    print(describe_ray(), flush=True)
    p = cfg.topology.peers
    with subnet_for(cfg, wire_config(cfg)) as subnet:
        peer_actor = ray.remote(num_cpus=0)(PeerActor)
        options = {
            "job": "jobs.local",
            "redundancy": cfg.topology.redundancy,
            "reject_nonfinite": cfg.topology.reject_nonfinite,
            "wire": wire_config(cfg),
            **subnet.peer_options,
        }
        peers = [peer_actor.remote(r, p, **options) for r in range(1, p + 1)]
        try:
            spec = ray.get([a.init_process_group.remote() for a in peers], timeout=cfg.subnet.timeout_s)[0]
            numel = max(1, int(cfg.size_mib * MIB) // dtype_named(cfg.dtype).itemsize)
            miners = len(spec.miners)
            rows = [_broadcast_row(cfg, peers, numel, miners), _all_reduce_row(cfg, peers, numel, miners)]
            ray.get([a.destroy_process_group.remote() for a in peers], timeout=cfg.subnet.timeout_s)
            return rows
        finally:
            for actor in peers:
                ray.kill(actor)


def _broadcast_row(cfg: DictConfig, peers: list, numel: int, miners: int) -> dict:
    expected = digest(random_tensor(cfg.seed, numel, cfg.dtype))
    spans = ray.get(
        [a.run.remote(broadcast_round, cfg.seed, numel, cfg.dtype, time.time() + START_DELAY_S) for a in peers]
    )
    return _row(cfg, "broadcast", numel, miners, [spans], [expected], bus_factor=1.0)


def _all_reduce_row(cfg: DictConfig, peers: list, numel: int, miners: int) -> dict:
    p = len(peers)
    rounds, expected = [], []
    for k in range(cfg.rounds):
        seed = cfg.seed + 1000 * (k + 1)
        start_at = time.time() + START_DELAY_S
        rounds.append(
            ray.get([a.run.remote(all_reduce_round, seed, numel, cfg.dtype, cfg.op, start_at) for a in peers])
        )
        inputs = [random_tensor(seed + r, numel, cfg.dtype) for r in range(1, p + 1)]
        expected.append(digest(reference_reduce(inputs, cfg.op)))
    return _row(cfg, f"all_reduce {cfg.op}", numel, miners, rounds, expected, bus_factor=2 * (p - 1) / p)


def _row(
    cfg: DictConfig, name: str, numel: int, miners: int, rounds: list, expected: list[str], bus_factor: float
) -> dict:
    nbytes = numel * dtype_named(cfg.dtype).itemsize
    times = [max(end for _, end, _ in spans) - min(start for start, _, _ in spans) for spans in rounds]
    exact = all(d == want for spans, want in zip(rounds, expected, strict=True) for _, _, d in spans)
    t = statistics.median(times)
    return {
        "collective": name,
        "size": f"{nbytes / MIB:g} MiB {cfg.dtype}",
        "peers": len(rounds[0]),
        "miners": miners,
        "rounds": len(rounds),
        "median ms": f"{t * 1e3:.1f}",
        "algbw GB/s": f"{nbytes / t / 1e9:.3f}",
        "busbw GB/s": f"{nbytes / t / 1e9 * bus_factor:.3f}",
        "check": "exact" if exact else "MISMATCH",
    }


def format_table(rows: list[dict]) -> str:
    keys = list(rows[0])
    widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in keys]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True))]
    lines += ["  ".join(str(r[k]).ljust(w) for k, w in zip(keys, widths, strict=True)) for r in rows]
    return "\n".join(lines)


@hydra.main(config_path="../conf", config_name="local", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        rows = run(cfg)
    except (MapReduceError, ValueError) as e:
        print(f"error: {getattr(e, 'cause', e)}", file=sys.stderr)
        sys.exit(2)
    print(format_table(rows))
    if any(r["check"] != "exact" for r in rows):
        print("error: a result differs from the reference", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
