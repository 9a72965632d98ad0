"""The incentive simulation: a real validator scores a cast of honest, slow, lazy, cheating and Sybil miners.

Three emulated hosts, each a loopback address of its own that miners serve on
(127.0.0.2, .3 and .4; the validator tells hosts apart by the address a miner
announces): host-a runs the honest-fast miner, the lazy one and the cheaters (who
earn nothing, so they share no score with it); host-b the honest-slow miner;
host-c a Sybil group of three uids throttled like honest-fast. The validator
benchmarks every miner through its bots until each has had `benchmarks`
benchmarks or is banned; then the bots stop, and the validator runs one scoring
epoch and sets weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import ray

from actors.behaviours import (
    LazyRelay,
    OneElementOffRelay,
    ReplayingRelay,
    ScalingRelay,
    ThrottledRelay,
    ZerosRelay,
)
from actors.subnet import MinerPlan, start_local_subnet
from mapreduce_ray.chain import ChainConfig

MIB = 1024 * 1024
HOSTS = {"host-a": "127.0.0.2", "host-b": "127.0.0.3", "host-c": "127.0.0.4"}
POLL_S = 0.5


@dataclass(frozen=True)
class Row:
    role: str
    uid: int
    host: str
    throughput_mib_s: float
    rounds: int
    on_time: int
    strikes: int
    weight: float


def cast(fast_mib_s: float, slow_mib_s: float) -> list[tuple[str, MinerPlan]]:
    """(role, plan) of every miner in the simulation."""
    on = {host: f"{address}:0" for host, address in HOSTS.items()}
    return [
        ("honest-fast", MinerPlan(ThrottledRelay, {"mib_per_s": fast_mib_s}, listen=on["host-a"])),
        ("honest-slow", MinerPlan(ThrottledRelay, {"mib_per_s": slow_mib_s}, listen=on["host-b"])),
        ("lazy", MinerPlan(LazyRelay, listen=on["host-a"])),
        ("one-element-off", MinerPlan(OneElementOffRelay, listen=on["host-a"])),
        ("scaled", MinerPlan(ScalingRelay, listen=on["host-a"])),
        ("stale-replay", MinerPlan(ReplayingRelay, listen=on["host-a"])),
        ("zeros", MinerPlan(ZerosRelay, listen=on["host-a"])),
        *((f"sybil-{i}", MinerPlan(ThrottledRelay, {"mib_per_s": fast_mib_s}, listen=on["host-c"])) for i in (1, 2, 3)),
    ]


def simulate(
    chain: ChainConfig,
    *,
    size_mib: float = 16,
    fast_mib_s: float = 64,
    slow_mib_s: float = 16,
    benchmarks: int = 2,
    timeout_s: float = 10,
    deadline_s: float = 600,
) -> list[Row]:
    """Run the simulation on this process's Ray (started when none is connected); one Row per miner."""
    roles = cast(fast_mib_s, slow_mib_s)
    subnet = start_local_subnet(
        [plan for _, plan in roles],
        peers=0,
        chunk_mib=size_mib,
        timeout_s=timeout_s,
        namespace="incentives",
        chain=chain,
        bots=None,  # one benchmark's ranks: one benchmark at a time, as parallel ones would blur the speeds
        wait=False,
        validator={
            "epoch_blocks": 10**9,  # one epoch, run below, once every miner has been measured
            "tick_s": 0.2,
            "benchmark": {"size_mib": size_mib, "interval_s": 0},
            "verify": {"fraction": 0.0},
        },
    )
    try:
        uids = [ray.get(m.status.remote(), timeout=60)["uid"] for m in subnet.miners]
        role_of = dict(zip(uids, (role for role, _ in roles), strict=True))
        end = time.monotonic() + deadline_s
        while not _measured(rows := _ledger(subnet, role_of), benchmarks):
            if time.monotonic() > end:
                raise TimeoutError(f"miners were not benchmarked {benchmarks} times within {deadline_s:g} s: {rows}")
            time.sleep(POLL_S)
        for bot in subnet.bots:  # no more measurements: the epoch and the table see the same ones
            ray.kill(bot)
        while ray.get(subnet.validator.status.remote(), timeout=60)["benchmarks_running"]:
            time.sleep(POLL_S)
        weights = ray.get(subnet.validator.epoch.remote(), timeout=60)
        rows = _ledger(subnet, role_of)
        return [
            Row(
                role_of[r["uid"]],
                r["uid"],
                r["host"],
                r["throughput"] / MIB,
                r["rounds_assigned"],
                r["rounds_on_time"],
                r["strikes"],
                weights.get(r["uid"], 0.0),
            )
            for r in rows
        ]
    finally:
        subnet.shutdown()


def _ledger(subnet, role_of: dict[int, str]) -> list[dict]:
    return [r for r in ray.get(subnet.validator.miners.remote(), timeout=60) if r["uid"] in role_of]


def _measured(rows: list[dict], benchmarks: int) -> bool:
    return bool(rows) and all(r["rounds_assigned"] >= benchmarks or r["strikes"] > 0 for r in rows)


def table(rows: list[Row]) -> str:
    """The rows as a Markdown table, with the Sybil group's total."""
    lines = [
        "| role | uid | host | throughput MiB/s | benchmarks | on time | strikes | weight |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.role} | {r.uid} | {r.host} | {r.throughput_mib_s:.1f} | {r.rounds} | {r.on_time} | "
            f"{r.strikes} | {r.weight:.4f} |"
        )
    sybil = sum(r.weight for r in rows if r.role.startswith("sybil"))
    lines.append(f"| sybil group total | | | | | | | {sybil:.4f} |")
    return "\n".join(lines)
