"""Soak: hundreds of rounds on one job, then process memory and object-store bytes against the start.

    python benchmarks/soak.py --rounds 600 --warmup 100 --size-mib 16 --output benchmarks/RESULTS.md

A local subnet (validator checking its default share of rounds) and P peer actors
run `--rounds` all_reduce rounds of S MiB per rank after `--warmup` rounds. Every
round's result is checked bit for bit on every peer (integer-valued float32, so the
sum is exact). The baseline is taken after the warm-up and the end after the last
round, each once the validator has closed and checked every round it was told
about: the node's object-store bytes in use, each miner's and the validator's
resident memory (VmRSS, and its private part RssAnon: VmRSS also counts the
object-store pages a process has read), and the miners' open rounds. Then the peers leave and the
store is read once more. A miner keeps finished rounds for checks (relay.retention_s, within
relay.retention_mib), so its memory grows until the retention is full: warm up past that
(--warmup 100 at 16 MiB) to see its level.

With --abuse N, N hostile clients of each kind (actors.hostile: unregistered, replaying, oversize,
slow-drip, holding calls open) hit every miner's endpoint from before the warm-up to the end, and
what they got is counted.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time

import ray
import torch
from allreduce import wait_until_validator_idle
from bittensor.sp_core import Keypair
from ray._private.internal_api import node_stats

from actors import PeerActor, init_local_ray, start_local_subnet
from actors.hostile import Flood, Target
from mapreduce_ray.wire.config import WireConfig

MIB = 1024 * 1024
SETTLE_S = 1.0  # Ray frees an object shortly after its last ref goes


def memory(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) of a process: resident memory, and its private part (without the object
    store's shared pages the process has read)."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return tuple(int(fields[name].split()[0]) * 1024 for name in ("VmRSS", "RssAnon"))


def store_bytes() -> int:
    node = ray.nodes()[0]
    stats = node_stats(node["NodeManagerAddress"], node["NodeManagerPort"], include_memory_info=False)
    return stats.store_stats.object_store_bytes_used


def exact_round(peer, numel: int, k: int) -> bool:
    """Rank r hands in r * (k % 7 + 1) everywhere; every peer must get the exact sum."""
    factor = k % 7 + 1
    tensor = torch.full((numel,), float(peer.rank * factor))
    peer.all_reduce(tensor, "sum")
    return torch.equal(tensor, torch.full((numel,), float(factor * peer.peer_count * (peer.peer_count + 1) // 2)))


def snapshot(subnet) -> dict:
    wait_until_validator_idle(subnet.validator)
    time.sleep(SETTLE_S)
    statuses = ray.get([m.status.remote() for m in subnet.miners], timeout=60)
    validator_pid = ray.get(subnet.validator.status.remote(), timeout=60)["pid"]
    return {
        "store": store_bytes(),
        "miners": [memory(s["pid"]) for s in statuses],
        "open_rounds": [s["open_rounds"] for s in statuses],
        "validator": memory(validator_pid),
    }


def resident(subnet) -> list[float]:
    """Each miner's resident memory now, then the validator's, in MiB."""
    statuses = ray.get([*(m.status.remote() for m in subnet.miners), subnet.validator.status.remote()], timeout=60)
    return [memory(s["pid"])[0] / MIB for s in statuses]


def mib(n: int | tuple[int, int]) -> str:
    """MiB, or "resident MiB (private MiB)" for a process."""
    if isinstance(n, tuple):
        return f"{n[0] / MIB:.1f} MiB ({n[1] / MIB:.1f} MiB)"
    return f"{n / MIB:.1f} MiB"


def abuse(subnet, per_kind: int) -> Flood:
    """`per_kind` hostile clients of each kind at every miner's endpoint, started."""
    chain = subnet.chain.open()
    holder, sender = Keypair.create_from_uri("//SoakHolder"), Keypair.create_from_uri("//SoakOversize")
    cold = Keypair.create_from_uri("//SoakCold").ss58_address
    for keypair in (holder, sender):
        chain.register(keypair.ss58_address, cold)
    statuses = ray.get([m.status.remote() for m in subnet.miners], timeout=60)
    targets = [Target(s["name"], s["hotkey"], s["endpoint"]) for s in statuses]
    strangers = [Keypair.create_from_uri(f"//SoakStranger{i}") for i in range(per_kind)]
    flood = Flood(targets, chain.netuid, holder, holder, sender, strangers, WireConfig(), per_kind, 24 * 3600)
    flood.start()
    return flood


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--miners", type=int, default=2)
    parser.add_argument("--size-mib", type=float, default=16)
    parser.add_argument("--abuse", type=int, default=0, help="hostile clients of each kind at every miner")
    parser.add_argument("--output", help="also append the result as markdown to this file")
    args = parser.parse_args()
    init_local_ray(object_store_mib=2048)
    subnet = start_local_subnet(args.miners, chunk_mib=4, validator={"benchmark": {"size_mib": 64}})
    numel = int(args.size_mib * MIB) // 4
    peers = [
        ray.remote(PeerActor).remote(r, args.peers, job="soak", **subnet.peer_options) for r in range(1, args.peers + 1)
    ]
    ray.get([p.init_process_group.remote() for p in peers], timeout=120)
    flood = abuse(subnet, args.abuse) if args.abuse else None
    wrong = 0
    for k in range(args.warmup):
        wrong += not all(ray.get([p.run.remote(exact_round, numel, k) for p in peers], timeout=120))
    start = snapshot(subnet)
    began = time.perf_counter()
    levels = []  # (round, each miner's RSS and the validator's), every 100 rounds
    for k in range(args.rounds):
        wrong += not all(ray.get([p.run.remote(exact_round, numel, k) for p in peers], timeout=120))
        if (k + 1) % 100 == 0:
            levels.append((k + 1, resident(subnet)))
            print(f"round {k + 1}: store {mib(store_bytes())}, RSS (miners, validator) {levels[-1][1]}", flush=True)
    seconds = time.perf_counter() - began
    end = snapshot(subnet)
    hung = flood.finish() if flood else []
    ray.get([p.destroy_process_group.remote() for p in peers], timeout=120)
    time.sleep(SETTLE_S)
    after_leave = store_bytes()
    status = ray.get(subnet.validator.status.remote(), timeout=60)
    rows = [
        ("object store in use", mib(start["store"]), mib(end["store"])),
        *[
            (f"miner {i} RSS (private)", mib(a), mib(b))
            for i, (a, b) in enumerate(zip(start["miners"], end["miners"], strict=True))
        ],
        ("validator RSS (private)", mib(start["validator"]), mib(end["validator"])),
        ("miners' open rounds", str(start["open_rounds"]), str(end["open_rounds"])),
    ]
    lines = [
        f"### Soak: {args.rounds} rounds ({datetime.date.today().isoformat()})",
        "",
        f"`python benchmarks/soak.py --rounds {args.rounds} --warmup {args.warmup} --peers {args.peers} "
        f"--miners {args.miners} --abuse {args.abuse} "
        f"--size-mib {args.size_mib:g}`: {args.peers} peers, {args.miners} miners, {args.size_mib:g} MiB per rank, "
        f"{args.rounds} rounds in {seconds:.1f} s after {args.warmup} warm-up rounds; rounds with a wrong result "
        f"on any peer: {wrong}; checks {status['checks']} (failed {status['check_failures']}, skipped "
        f"{status['checks_skipped']}).",
        "",
        f"| | after warm-up | after round {args.rounds} |",
        "|---|---|---|",
        *[f"| {name} | {a} | {b} |" for name, a, b in rows],
        "",
        f"After the peers left: object store in use {mib(after_leave)}.",
        "",
        "RSS every 100 rounds, miners / validator (MiB): "
        + "; ".join(f"{k}: {' / '.join(f'{v:.0f}' for v in rss)}" for k, rss in levels)
        + ".",
        "",
        *(abused(flood, args.abuse, hung) if flood else []),
    ]
    print("\n".join(lines))
    if args.output:
        with open(args.output, "a") as f:
            f.write("\n" + "\n".join(lines))
    subnet.shutdown()
    sys.exit(1 if wrong or (flood and hung) else 0)


def abused(flood: Flood, per_kind: int, hung: list[str]) -> list[str]:
    """Markdown lines: what the hostile clients got, by kind."""
    by_kind = flood.by_kind()
    answered = sum(n for (_, outcome), n in by_kind.items() if outcome == "answered")
    return [
        f"Background abuse (`--abuse {per_kind}`): {len(flood.outcomes)} hostile clients for the whole run; calls "
        f"answered: {answered}; clients hung at the end: {len(hung)}.",
        "",
        "| client | what it got | times |",
        "|---|---|---|",
        *[f"| {kind} | {outcome} | {n} |" for (kind, outcome), n in sorted(by_kind.items())],
        "",
    ]


if __name__ == "__main__":
    main()
