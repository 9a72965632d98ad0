"""A model of relay vs ring all_reduce beyond this machine: 256 miners and 64 peers on internet links.

    python benchmarks/model.py                                  # the report, to stdout
    python benchmarks/model.py --output benchmarks/RESULTS.md   # and appended there

Analytic, fitted to the netns runs (bandwidth.py, RESULTS.md), with link speeds and delays drawn
from the distributions in ASSUMPTIONS. For every trial it draws the parties' links, lets the
validator give the job its miners (the fastest free ones, as matching ranks them by measured
throughput), and times one round each way:

relay: max(max_p D/B_p, n·D/ΣB_m) / WIRE       every peer sends and receives D; the miners'
       + 2·chunk·m / min_p B_p                  segments follow their bandwidth; the first chunk up
       + 2 · max over (peer, miner) RTT         and the last down overlap nothing; a chunk's round
       + RELAY_ROUND_S                          trip, then the verdicts' (checked results)
ring:  2(n-1) steps, each max over hops of     gloo's ring, paced by its slowest hop every step,
       (D/n / min(B_from, B_to) / WIRE          one round trip per step (gloo's handshake, measured)
        + RTT + RING_STEP_S)

Round trips as measured at 50 ms (RESULTS.md): a relay round of 4 KiB took 2.2 of them, a gloo
ring of 4 peers 6.1 (2(n-1) = 6 steps); at 1 MiB the relay took 0.213 s where this model says
0.217 s. Left out: TCP's window restart after idle time (it cost the 1 MiB relay round 7% at
50 ms), losses, and links that vary during a round.

The validator's load per round of a job: the peers' reports (every chunk's signed Reduced, whose
size grows with n), the checks (verify.fraction of rounds, verify.chunks tickets of n+1 chunks
per segment), and the benchmarks of all 256 miners (one per miner per benchmark.interval_s).
Chunk sizes come from the project's own planner and message sizes from its own sealing code.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass

import numpy as np
from report import append_run, markdown_table

from mapreduce_ray.messages import Reduced, seal_body
from mapreduce_ray.plan import plan_round
from mapreduce_ray.protocol import audience
from mapreduce_ray.types import JobSpec, MinerSlot, TensorSpec
from mapreduce_ray.validator.config import ValidatorConfig

MIB = 1024 * 1024
WIRE = 1448 / 1514  # payload share of a full Ethernet frame of TCP (what both methods reached on capped links)
# Fitted to the netns runs (RESULTS.md, 2026-12-04): a relay round's cost beyond its bytes and round trips,
# and a gloo ring step's, from 4 KiB all_reduces between 4 peers on links with no added delay (7.1 ms and
# 5.1 ms a round).
RELAY_ROUND_S = 0.007
RING_STEP_S = 0.00085


@dataclass(frozen=True)
class Assumptions:
    """Internet links: log-normal speeds (median Mbit/s, sigma of the log) and each host's one-way delay to
    the core (median ms, sigma): a round trip between two hosts is twice the sum of theirs."""

    miners: int = 256
    peers: int = 64
    peer_mbit: tuple[float, float] = (1000.0, 0.8)  # trainers in clouds and labs: p10 ~360, p90 ~2800
    miner_mbit: tuple[float, float] = (1000.0, 0.6)  # rented servers: p10 ~460, p90 ~2200
    delay_ms: tuple[float, float] = (15.0, 0.6)  # round trips: median ~60 ms, p90 ~130 ms


ASSUMPTIONS = Assumptions()


def draw(rng: np.random.Generator, median_sigma: tuple[float, float], count: int) -> np.ndarray:
    median, sigma = median_sigma
    return median * np.exp(sigma * rng.standard_normal(count))


@dataclass(frozen=True)
class Trial:
    """One draw of the parties: peers' and miners' bytes/s and one-way delays (s)."""

    peer_bps: np.ndarray
    peer_delay: np.ndarray
    miner_bps: np.ndarray
    miner_delay: np.ndarray


def trial(rng: np.random.Generator, a: Assumptions) -> Trial:
    return Trial(
        draw(rng, a.peer_mbit, a.peers) * 1e6 / 8,
        draw(rng, a.delay_ms, a.peers) / 1e3,
        draw(rng, a.miner_mbit, a.miners) * 1e6 / 8,
        draw(rng, a.delay_ms, a.miners) / 1e3,
    )


def chunk_sizes(n: int, m: int, nbytes: int) -> list[int]:
    """The planner's chunks, in bytes, of a segment of a float32 tensor of `nbytes` over m equal miners, for n
    peers: a ramp up from the floor, steady chunks, a ramp down."""
    slots = tuple(MinerSlot(i, f"m{i}", f"127.0.0.1:{i}", 1.0) for i in range(m))
    job = JobSpec("j", "j", n, slots, ValidatorConfig().chunk_bytes, 60.0, nbytes)
    first = next(s for s in plan_round(job, TensorSpec("float32", (nbytes // 4,))) if s.chunks)
    return [(b - a) * 4 for a, b in first.chunks]


def reduced_bytes(n: int) -> int:
    """The wire size of one signed Reduced naming n inputs (digests and sealed sketches as the code makes them)."""
    from bittensor.sp_core import Keypair

    keypair = Keypair.create_from_uri("//model")
    digest, proof = "0" * 64, "0" * 64
    body = Reduced("j" * 32, 1, 0, 0, TensorSpec("float32", (1 << 24,)), digest, (digest,) * n, (proof,) * n)
    return len(seal_body(keypair, body, audience("j" * 32), 10))


def relay_time(t: Trial, peers: np.ndarray, miners: np.ndarray, nbytes: int, chunk: int) -> float:
    n, m = len(peers), len(miners)
    slowest = t.peer_bps[peers].min()
    transfer = max(nbytes / slowest, n * nbytes / t.miner_bps[miners].sum()) / WIRE
    pipeline = 2 * min(chunk, nbytes / m) * m / slowest
    rtt = 2 * (t.peer_delay[peers].max() + t.miner_delay[miners].max())
    return transfer + pipeline + 2 * rtt + RELAY_ROUND_S


def ring_time(t: Trial, peers: np.ndarray, nbytes: int) -> float:
    n = len(peers)
    to = np.roll(peers, -1)
    hop_bps = np.minimum(t.peer_bps[peers], t.peer_bps[to])
    rtt = 2 * (t.peer_delay[peers] + t.peer_delay[to])
    step = (nbytes / n / hop_bps / WIRE + rtt + RING_STEP_S).max()
    return 2 * (n - 1) * step


def jobs_of(a: Assumptions, n: int, m: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The subnet's peers in jobs of n, each given m miners: the fastest first, dealt round the jobs."""
    count = a.peers // n
    return [(np.arange(j * n, (j + 1) * n), np.arange(j, count * m, count)) for j in range(count)]


def draws_of(a: Assumptions, trials: int, seed: int) -> list[Trial]:
    """`trials` draws of the parties, the miners in the order the validator ranks them (measured throughput)."""
    rng = np.random.default_rng(seed)
    ranked = []
    for t in (trial(rng, a) for _ in range(trials)):
        order = np.argsort(-t.miner_bps)
        ranked.append(Trial(t.peer_bps, t.peer_delay, t.miner_bps[order], t.miner_delay[order]))
    return ranked


def round_times(a: Assumptions, draws: list[Trial], n: int, m: int, nbytes: int) -> tuple[list[float], list[float]]:
    """Every job's relay round time in every draw, and the ring's time over it."""
    chunk = chunk_sizes(n, m, nbytes)[0]  # the first up and the last down overlap nothing
    relay, ratios = [], []
    for t in draws:
        for peers, miners in jobs_of(a, n, m):
            r = relay_time(t, peers, miners, nbytes, chunk)
            relay.append(r)
            ratios.append(ring_time(t, peers, nbytes) / r)
    return relay, ratios


def sweep(a: Assumptions, draws: list[Trial]) -> list[tuple]:
    rows = []
    for n, m in ((8, 8), (64, 8), (64, 32)):
        for nbytes in (4 * 1024, MIB, 64 * MIB, 1024 * MIB):
            relay, ratios = round_times(a, draws, n, m, nbytes)
            q = np.quantile(ratios, [0.1, 0.5, 0.9])
            rows.append(
                (
                    str(n),
                    str(m),
                    _size(nbytes),
                    _chunks(chunk_sizes(n, m, nbytes)),
                    f"{statistics.median(relay):.3g}",
                    f"{q[1]:.2f}",
                    f"{q[0]:.2f} - {q[2]:.2f}",
                    f"{np.mean(np.array(ratios) > 1):.0%}",
                )
            )
    return rows


def scarce_miners(a: Assumptions, n: int = 64, nbytes: int = 64 * MIB) -> list[tuple]:
    """Where the relay loses: equal peers at the assumptions' median, miners' total bandwidth a share of n·B_peer."""
    peer_bps = a.peer_mbit[0] * 1e6 / 8
    ring = 2 * (n - 1) / n * nbytes / peer_bps / WIRE
    rows = []
    for share in (0.25, 0.5, 0.57, 0.75, 1.0, 2.0):
        relay = max(nbytes / peer_bps, n * nbytes / (share * n * peer_bps)) / WIRE
        rows.append((f"{share:g}", f"{relay:.2f}", f"{ring:.2f}", f"{ring / relay:.2f}"))
    return rows


def validator_load(a: Assumptions, n: int, m: int, nbytes: int, round_s: float) -> list[tuple]:
    """Bytes/s the validator takes in, by cause, while every job of the subnet runs rounds back to back."""
    v = ValidatorConfig()
    chunks = len(chunk_sizes(n, m, nbytes))
    jobs = a.peers // n
    reports = jobs * n * m * chunks * reduced_bytes(n) / round_s
    checks = jobs * v.verify.fraction * m * v.verify.chunks * (n + 1) * (nbytes / m / chunks) / round_s
    bench = v.benchmark
    benchmarks = a.miners * bench.peers * bench.size_bytes * 2 / bench.interval_s  # bots send and receive
    return [
        ("peers' round reports", f"{reports / 1e6:.1f}"),
        (f"checks ({v.verify.fraction:g} of rounds, {v.verify.chunks} chunks per segment)", f"{checks / 1e6:.1f}"),
        (f"benchmarks ({a.miners} miners, one per {bench.interval_s:g} s)", f"{benchmarks / 1e6:.1f}"),
    ]


def _chunks(sizes: list[int]) -> str:
    """A segment's chunks: the first (the floor) and the steady size, when they differ."""
    first, steady = sizes[0] // 1024, max(sizes) // 1024
    return f"{first} KiB" if first == steady else f"{first} - {steady} KiB"


def _size(nbytes: int) -> str:
    return f"{nbytes // MIB} MiB" if nbytes >= MIB else f"{nbytes // 1024} KiB"


def report(trials: int, seed: int) -> str:
    a = ASSUMPTIONS
    draws = draws_of(a, trials, seed)
    header = ("peers n", "miners m", "tensor", "chunks", "relay s (median)", "ring / relay (median)", "p10 - p90")
    sweep_table = markdown_table((*header, "relay wins"), sweep(a, draws))
    scarce = markdown_table(("ΣB_miner / (n·B_peer)", "relay s", "ring s", "ring / relay"), scarce_miners(a))
    round_s = statistics.median(round_times(a, draws, 64, 8, 64 * MIB)[0])
    load = markdown_table(
        ("64 peers, 8 miners, 64 MiB, rounds back to back", "MB/s"), validator_load(a, 64, 8, 64 * MIB, round_s)
    )
    return "\n\n".join(
        [
            f"Assumptions: {a}; {trials} draws, seed {seed}; RELAY_ROUND_S {RELAY_ROUND_S}, RING_STEP_S {RING_STEP_S}.",
            sweep_table,
            "Where the relay loses (64 peers at the median link, 64 MiB):",
            scarce,
            "The validator's intake:",
            load,
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="also append the report to this markdown file")
    args = parser.parse_args()
    text = report(args.trials, args.seed)
    print(text)
    if args.output:
        append_run(args.output, "a model of 256 miners and 64 peers on internet links", text, command="python")


if __name__ == "__main__":
    main()
