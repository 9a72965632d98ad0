"""A flood at one miner: 50 hostile clients while 4 honest peers run 20 exact rounds through it.

The miner runs in a process of its own, so its resident memory can be read while it is flooded. The
hostile clients (actors.hostile), 10 of each kind, go on until the honest rounds are done: unregistered,
replaying one peer's signed call, oversize, slow-drip, and holding calls open. Every honest round is exact,
every hostile client gets an error (none hangs past its deadline), and the miner's RSS stays within a
bound; the figures are printed. No Ray.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from dataclasses import dataclass

import pytest
import torch
from wire_world import COLD, WireWorld, key, on_every_peer

from actors.hostile import KINDS, Flood, Target
from actors.relay import Relay, RelaySettings
from mapreduce_ray.chain import ChainConfig
from mapreduce_ray.protocol import MetagraphCache
from mapreduce_ray.reference import reference_reduce
from mapreduce_ray.wallets import Identity
from mapreduce_ray.wire.config import MIB, WireConfig
from mapreduce_ray.wire.tls import announce_address

PEERS, ROUNDS, NUMEL = 4, 20, 1 << 16
PER_KIND = 10
WIRE = WireConfig(max_message_bytes=4 * MIB, call_timeout_s=5.0)
FLOOD_S = 50.0  # the hostile clients stop by then whatever happens
RSS_GROWTH_MIB = 384  # how far the miner's resident memory may rise above where it was before the flood
HOLDER, SENDER = key("Holder"), key("Oversize")  # registered hostile hotkeys


def serve_miner(state_dir: str, name: str, ready, stop) -> None:
    """A miner's relay in this process until `stop` is set (or two minutes pass)."""
    chain = ChainConfig(state_dir=state_dir).open()
    miner = key(name)
    relay = Relay("127.0.0.1:0", Identity(miner, None), MetagraphCache(chain), name, WIRE, RelaySettings())
    announce_address(chain, miner, relay.address, WIRE)
    ready.put(relay.address)
    stop.wait(120)
    relay.shutdown()


@dataclass(frozen=True)
class MinerProcess:
    name: str
    hotkey: str
    address: str
    pid: int

    def rss_mib(self) -> float:
        with open(f"/proc/{self.pid}/status") as status:
            kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
        return kib / 1024


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    state_dir = str(tmp_path_factory.mktemp("flood"))
    world = WireWorld.create(state_dir, PEERS)
    name = "flooded"
    for hotkey in (key(name), HOLDER, SENDER):  # before the miner first reads the chain
        world.chain.register(hotkey.ss58_address, COLD)
    spawn = multiprocessing.get_context("spawn")
    ready, stop = spawn.Queue(), spawn.Event()
    process = spawn.Process(target=serve_miner, args=(state_dir, name, ready, stop), daemon=True)
    process.start()
    miner = MinerProcess(name, key(name).ss58_address, ready.get(timeout=60), process.pid)
    yield world, miner
    stop.set()
    process.join(30)
    world.close()


def test_fifty_hostile_clients_do_not_disturb_four_honest_peers_and_the_miners_memory_stays_bounded(world, capsys):
    world, miner = world
    spec = world.job([miner], PEERS, chunk_bytes=64 * 1024, timeout_s=30.0)
    peers = world.attached(spec, WIRE)
    rss = [miner.rss_mib()]
    strangers = [key(f"Stranger{i}") for i in range(PER_KIND)]
    target = Target(miner.name, miner.hotkey, miner.address)
    flood = Flood([target], world.chain.netuid, world.peers[0], HOLDER, SENDER, strangers, WIRE, PER_KIND, FLOOD_S)
    flood.start()
    sampling = threading.Event()

    def sample():
        while not sampling.wait(0.1):
            rss.append(miner.rss_mib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    try:
        for seq in range(ROUNDS):
            tensors = [torch.randn(NUMEL, generator=torch.Generator().manual_seed(seq * 10 + r)) for r in range(PEERS)]
            expected = reference_reduce([t.clone() for t in tensors], "sum")
            results = on_every_peer(peers, lambda p, tensors=tensors: p.all_reduce(tensors[p.rank - 1], "sum"))
            assert not [r for r in results if isinstance(r, BaseException)], results
            assert all(torch.equal(t, expected) for t in tensors), f"round {seq + 1} is not exact"
    finally:
        honest_s = time.monotonic() - started
        hung = flood.finish()
        sampling.set()
        sampler.join()
        for peer in peers:
            peer.destroy_process_group()
    assert not hung, f"hostile clients hung: {hung}"
    outcomes = flood.outcomes
    assert len(outcomes) == len(KINDS) * PER_KIND
    for client, got in sorted(outcomes.items()):
        errors = sum(n for outcome, n in got.items() if outcome != "answered")
        assert errors, f"{client} got no error: {dict(got)}"
        assert not got["answered"], f"{client} was answered: {dict(got)}"
    peak = max(rss)
    with capsys.disabled():
        print(f"\n{ROUNDS} honest rounds of {PEERS} peers exact in {honest_s:.1f} s under a flood of {len(outcomes)}")
        for (kind, outcome), n in sorted(flood.by_kind().items()):
            print(f"  {kind:13} {outcome:28} {n}")
        print(f"  miner RSS: {rss[0]:.0f} MiB before, {peak:.0f} MiB at most, {rss[-1]:.0f} MiB at the end")
    assert peak - rss[0] < RSS_GROWTH_MIB, f"the miner's RSS rose from {rss[0]:.0f} MiB to {peak:.0f} MiB"
    assert os.path.exists(f"/proc/{miner.pid}")  # it is still serving
