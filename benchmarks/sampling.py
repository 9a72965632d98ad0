"""How many rounds per second one validator samples across 256 miners, and its scoring epoch over them.

    python benchmarks/sampling.py --miners 256 --output benchmarks/RESULTS.md

A whole subnet on loopback, on an embedded chain, in three processes: one serves `--miners` miner
endpoints (actors.relay.Relay, each its own Flight server and hotkey); one is the validator, made
of its real parts: its endpoint (actors.validator.ValidatorEndpoint) over its job book
(actors.validator.jobs), its auditor (actors.validator.audit) and its SQLite ledger, without its loop (benchmarks are
recorded in the ledger, so every miner is available); one runs the peers: jobs of 2 peers,
`--max-miners` miners each, cover every miner, and their peers join and report over the wire as
live peers do. Every round is sampled
(verify.fraction = 1, no bound on the queue): `verify.chunks` chunks of each of its segments are
fetched from their miner by ticket and recomputed, on the auditor's own check threads.

Reported: sampled rounds per second, over the whole run (peers and miners share the machine's cores
with the validator) and over the drain after the last round (the checks alone, with the miners
serving them); then one scoring and
weight-setting epoch over the ledger of every miner (mapreduce_ray.validator.epoch.run_epoch).
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import torch
from bittensor.sp_core import Keypair
from report import append_run, markdown_table

from actors.relay import Relay, RelaySettings
from actors.validator import ValidatorEndpoint
from actors.validator.audit import Auditor
from actors.validator.directory import MinerDirectory
from actors.validator.jobs import JobBook
from mapreduce_ray import Peer
from mapreduce_ray.chain import ChainConfig
from mapreduce_ray.naming import miner_name
from mapreduce_ray.protocol import MetagraphCache
from mapreduce_ray.reference import reference_reduce
from mapreduce_ray.validator.config import ValidatorConfig
from mapreduce_ray.validator.epoch import run_epoch
from mapreduce_ray.validator.ledger import MinerLedger
from mapreduce_ray.wallets import identity_of
from mapreduce_ray.wire.config import WireConfig

KIB = 1024
START_TIMEOUT_S = 300.0
DRAIN_TIMEOUT_S = 600.0
POLL_S = 0.05


def miner_keypair(i: int) -> Keypair:
    return Keypair.create_from_uri(f"//Miner{i}")


def peer_keypair(i: int) -> Keypair:
    return Keypair.create_from_uri(f"//Peer{i}")


def serve_miners(state: str, count: int, ready, stop) -> None:
    """The miners' process: `count` miner endpoints, announced on chain, served until `stop` is set."""
    chain, wire = ChainConfig(state_dir=state).open(), WireConfig()
    relays = []
    for i in range(count):
        keypair = miner_keypair(i)
        uid = chain.require_uid(keypair.ss58_address, None)
        relay = Relay(
            "127.0.0.1:0", identity_of(keypair), MetagraphCache(chain), miner_name(uid), wire, RelaySettings()
        )
        relay.locations = [relay.address]
        chain.serve(keypair, relay.address, None)
        relays.append(relay)
    ready.set()
    stop.wait(START_TIMEOUT_S + DRAIN_TIMEOUT_S)
    for relay in relays:
        relay.shutdown()


def run_peers(state: str, jobs: int, validator_uid: int, numel: int, rounds: int, events) -> None:
    """The peers' process: `jobs` jobs of 2 peers join through the validator, run `rounds` all_reduce rounds each
    (every result compared with the reference) and leave; `events` gets ("joined", miners covered) and then
    ("done", every result exact)."""
    torch.set_num_threads(1)
    members = [
        Peer(r, 2, wallet=peer_keypair(2 * j + r - 1), validator_uid=validator_uid, state_dir=state, job=f"job-{j}")
        for j in range(jobs)
        for r in (1, 2)
    ]

    def run(peer: Peer) -> bool:
        exact = True
        for k in range(rounds):
            inputs = [torch.randn(numel, generator=torch.Generator().manual_seed(k * 10 + r)) for r in (1, 2)]
            tensor = inputs[peer.rank - 1].clone()
            peer.all_reduce(tensor, "avg")
            exact &= torch.equal(tensor, reference_reduce(inputs, "avg"))
        return exact

    with ThreadPoolExecutor(len(members)) as pool:
        specs = list(pool.map(lambda peer: peer.init_process_group(), members))
        events.put(("joined", len({slot.uid for spec in specs for slot in spec.miners})))
        exact = all(pool.map(run, members))
        list(pool.map(lambda peer: peer.destroy_process_group(), members))
    events.put(("done", exact))


def expect(events, what: str):
    kind, value = events.get(timeout=START_TIMEOUT_S + DRAIN_TIMEOUT_S)
    assert kind == what, (kind, value)
    return value


def wait_drained(auditor: Auditor, deadline: float) -> None:
    """Until every round is closed and every queued check is done."""
    while (status := auditor.status())["rounds_open"] or status["checks_queued"]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the validator's checks did not drain: {status}")
        time.sleep(POLL_S)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--miners", type=int, default=256)
    parser.add_argument("--max-miners", type=int, default=8, help="miners per job")
    parser.add_argument("--rounds", type=int, default=5, help="all_reduce rounds per job")
    parser.add_argument("--chunk-kib", type=int, default=64)
    parser.add_argument("--chunks", type=int, default=2, help="chunks of each segment checked (verify.chunks)")
    parser.add_argument("--output", help="also append the result as markdown to this file")
    args = parser.parse_args()
    jobs = -(-args.miners // args.max_miners)
    spawn = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as state:
        chain_config = ChainConfig(state_dir=state, max_uids=args.miners + 2 * jobs + 1, weights_rate_limit=0)
        chain, wire = chain_config.open(), WireConfig()
        cold = Keypair.create_from_uri("//Cold").ss58_address
        validator = Keypair.create_from_uri("//Validator")
        chain.register(validator.ss58_address, cold, stake=1000.0)
        for keypair in [*map(miner_keypair, range(args.miners)), *map(peer_keypair, range(2 * jobs))]:
            chain.register(keypair.ss58_address, cold)
        ready, stop, events = spawn.Event(), spawn.Event(), spawn.Queue()
        miners = spawn.Process(target=serve_miners, args=(state, args.miners, ready, stop))
        miners.start()
        try:
            assert ready.wait(START_TIMEOUT_S), "the miners did not start"
            config = ValidatorConfig.from_dict(
                {
                    "chunk_bytes": args.chunk_kib * KIB,
                    "max_miners": args.max_miners,
                    "verify": {"fraction": 1.0, "chunks": args.chunks, "max_pending": 10**9},
                }
            )
            metagraph = MetagraphCache(chain)
            ledger = MinerLedger(Path(state) / "validator.sqlite")
            directory = MinerDirectory(metagraph, validator, wire)
            served = {uid: miner.hotkey for uid, miner in directory.refresh().items()}
            ledger.follow(served)
            for uid, miner in directory.miners.items():  # each passed a benchmark: 64 MiB at ~0.5 GB/s
                ledger.record_benchmark(uid, 64 * 1024 * KIB, 0.13, True, miner.host)
            book = JobBook(config, ledger, directory, chain.describe(), prove=lambda sizes: {})
            auditor = Auditor(
                config, ledger, book, directory, validator.ss58_address, chain_config.netuid, lambda: served
            )
            parts = SimpleNamespace(jobs=book, audit=auditor, count_call=lambda caller: None)
            endpoint = ValidatorEndpoint("127.0.0.1:0", validator, metagraph, wire, parts)
            chain.serve(validator, endpoint.address, None)
            numel = args.max_miners * args.chunks * args.chunk_kib * KIB // 4  # `chunks` chunks per segment
            vuid = metagraph.get(refresh=True).by_hotkey(validator.ss58_address).uid
            peers = spawn.Process(target=run_peers, args=(state, jobs, vuid, numel, args.rounds, events))
            peers.start()
            covered = expect(events, "joined")
            start = time.monotonic()
            exact = expect(events, "done")
            rounds_done = time.monotonic()
            checks_before = auditor.stats["checks"]
            wait_drained(auditor, rounds_done + DRAIN_TIMEOUT_S)
            drained = time.monotonic()
            peers.join(START_TIMEOUT_S)
            epoch_start = time.perf_counter()
            weights = run_epoch(ledger, chain, validator, config.scoring).weights
            epoch_s = time.perf_counter() - epoch_start
            endpoint.shutdown()
        finally:
            stop.set()
            miners.join(START_TIMEOUT_S)
    stats = auditor.stats
    rounds = jobs * args.rounds
    segments = rounds * args.max_miners  # one verdict per segment checked
    assert exact and covered == args.miners, "a result was wrong, or a miner got no job"
    assert (stats["checks"], stats["check_failures"], stats["checks_unverifiable"]) == (segments, 0, 0), stats
    total_rate = rounds / (drained - start)
    drain_rate = (segments - checks_before) / args.max_miners / (drained - rounds_done)
    header = (
        "miners",
        "jobs x peers",
        "rounds sampled",
        "chunks checked",
        "sampled rounds/s (whole run)",
        "sampled rounds/s (checks alone)",
        "epoch ms",
        "uids weighted",
    )
    row = (
        str(args.miners),
        f"{jobs} x 2",
        str(rounds),
        str(segments * args.chunks),
        f"{total_rate:.1f}",
        f"{drain_rate:.1f}",
        f"{epoch_s * 1e3:.1f}",
        str(len(weights)),
    )
    table = markdown_table(header, [row])
    print(table)
    if args.output:
        append_run(args.output, "rounds one validator samples across miners", table)


if __name__ == "__main__":
    main()
