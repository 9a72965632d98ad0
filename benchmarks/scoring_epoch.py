"""Time one scoring and weight-setting epoch of a validator with N miners.

    python benchmarks/scoring_epoch.py --miners 256 --output benchmarks/RESULTS.md

An embedded chain in a temporary directory holds a validator and N miners; the
validator's ledger (SQLite, as the validator keeps it) tracks them, every pair
of uids on one host. Between epochs each miner gets a fresh benchmark and a few
rounds (not timed; 2% of them a strike). The timed part is exactly the
validator's epoch (mapreduce_ray.validator.epoch.run_epoch): read the ledger, update and
save the EMA scores, share them per host, normalize, set the weights on the
chain (one signed write). The chain's rate limit is off so every epoch writes.
Reported: median and worst epoch.
"""

from __future__ import annotations

import argparse
import datetime
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bittensor.sp_core import Keypair

from mapreduce_ray.chain import ChainConfig
from mapreduce_ray.validator.epoch import run_epoch
from mapreduce_ray.validator.ledger import MinerLedger
from mapreduce_ray.validator.scoring import MIB, ScoringConfig


def measure(ledger: MinerLedger, uids: list[int], hosts: dict[int, str], rng: random.Random) -> None:
    """One epoch's worth of measurements for every miner."""
    for uid in uids:
        size = rng.choice([16, 64, 256]) * MIB
        ledger.record_benchmark(uid, size, size / rng.uniform(1e8, 1e9), passed=True, host=hosts[uid])
        for _ in range(4):
            ledger.record_rounds({uid: rng.random() < 0.97})
        if rng.random() < 0.02:
            ledger.strike(uid, ban_s=3600.0, evidence={"reason": "simulated"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--miners", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--output", help="also append the result as markdown to this file")
    args = parser.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as state:
        config = ChainConfig(state_dir=state, max_uids=args.miners + 1, weights_rate_limit=0)
        chain = config.open()
        validator = Keypair.create_from_uri("//Validator")
        cold = Keypair.create_from_uri("//Cold").ss58_address
        chain.register(validator.ss58_address, cold, stake=1000.0)
        miners = [Keypair.create_from_uri(f"//Miner{i}").ss58_address for i in range(args.miners)]
        uids = [chain.register(hotkey, cold) for hotkey in miners]
        hosts = {uid: f"10.0.{uid // 8}.{uid % 8 // 2}" for uid in uids}  # pairs of uids share a host
        ledger = MinerLedger(Path(state) / "validator.sqlite")
        ledger.follow(dict(zip(uids, miners, strict=True)))
        times = []
        for _ in range(args.epochs):
            measure(ledger, uids, hosts, rng)
            start = time.perf_counter()
            weights = run_epoch(ledger, chain, validator, ScoringConfig()).weights
            times.append(time.perf_counter() - start)
        stored = chain.weights()
    top = max(weights.values())
    assert set(stored[0]) == {uid for uid, w in weights.items() if round(w / top * 65535) > 0}  # as u16 on chain
    row = (
        f"| {args.miners} | {args.epochs} | {statistics.median(times) * 1e3:.1f} | {max(times) * 1e3:.1f} | "
        f"{len(stored[0])} |"
    )
    header = "| miners | epochs | median epoch ms | worst epoch ms | uids weighted |\n|---|---|---|---|---|"
    print(header, row, sep="\n")
    if args.output:
        command = "python " + " ".join(Path(a).as_posix() for a in sys.argv)
        with open(args.output, "a") as f:
            f.write(f"\n## {datetime.date.today()}: one scoring + weight-setting epoch\n\nCommand: `{command}`\n\n")
            f.write(f"{header}\n{row}\n")


if __name__ == "__main__":
    main()
