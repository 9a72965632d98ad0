"""Print the incentive simulation's table: who earns what when a real validator measures them.

    python benchmarks/incentives.py                      # 64 MiB benchmarks
    python benchmarks/incentives.py --output benchmarks/RESULTS.md

Three loopback addresses emulate three hosts (actors.simulation explains the cast).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from actors import init_local_ray  # noqa: E402
from actors.simulation import simulate, table  # noqa: E402
from mapreduce_ray.chain import ChainConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=float, default=64, help="benchmark size per rank")
    parser.add_argument("--fast", type=float, default=128, help="MiB/s of honest-fast and the Sybils")
    parser.add_argument("--slow", type=float, default=32, help="MiB/s of honest-slow")
    parser.add_argument("--benchmarks", type=int, default=2, help="benchmarks per miner before the epoch")
    parser.add_argument("--output", help="append the table to this Markdown file")
    args = parser.parse_args()
    start = time.monotonic()
    init_local_ray(object_store_mib=800)
    with tempfile.TemporaryDirectory() as state:
        rows = simulate(
            ChainConfig(netuid=10, state_dir=state, weights_rate_limit=0),
            size_mib=args.size_mib,
            fast_mib_s=args.fast,
            slow_mib_s=args.slow,
            benchmarks=args.benchmarks,
            timeout_s=max(10.0, 4 * args.size_mib / args.slow),
        )
    report = (
        f"## Incentive simulation, {datetime.date.today().isoformat()}\n\n"
        f"`python benchmarks/incentives.py {' '.join(sys.argv[1:])}` ({args.size_mib:g} MiB benchmarks, "
        f"honest-fast and Sybils throttled to {args.fast:g} MiB/s, honest-slow to {args.slow:g} MiB/s; "
        f"{time.monotonic() - start:.0f} s)\n\n{table(rows)}\n"
    )
    print(report)
    if args.output:
        with open(args.output, "a") as out:
            out.write("\n" + report)


if __name__ == "__main__":
    main()
