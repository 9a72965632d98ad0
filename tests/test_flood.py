"""A flood at one miner: 50 hostile clients while 4 honest peers run 20 exact rounds through it.

The miner runs in a process of its own, so its resident memory can be read while it is flooded. The
hostile clients, 10 of each kind, go on until the honest rounds are done:
- unregistered: exchange calls signed by hotkeys the chain does not know;
- replaying: one peer's signed exchange call sent again and again, byte for byte;
- oversize: actions over wire.max_message_bytes from a registered hotkey;
- slow-drip: raw TCP that sends gRPC's connection preface a byte at a time, then junk;
- holding: a registered hotkey opening exchange calls it never sends a message on, and never closes.
Every honest round is exact, every hostile client gets an error (none hangs past its deadline), and the
miner's RSS stays within a bound; the figures are printed. No Ray.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass

import grpc
import pyarrow.flight as fl
import pytest
import torch
from flight_raw import descriptor, exchange
from wire_world import COLD, WireWorld, key, on_every_peer

from actors.relay import Relay, RelaySettings
from mapreduce_ray.chain import ChainConfig
from mapreduce_ray.errors import MapReduceError
from mapreduce_ray.messages import StreamOpen, encode
from mapreduce_ray.protocol import MetagraphCache
from mapreduce_ray.reference import reference_reduce
from mapreduce_ray.wallets import Identity
from mapreduce_ray.wire.auth import call_headers
from mapreduce_ray.wire.config import MIB, WireConfig
from mapreduce_ray.wire.endpoint import Remote
from mapreduce_ray.wire.tls import announce_address

PEERS, ROUNDS, NUMEL = 4, 20, 1 << 16
PER_KIND = 10
WIRE = WireConfig(max_message_bytes=4 * MIB, call_timeout_s=5.0)
OVERSIZE = 5 * MIB  # over WIRE.max_message_bytes
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


class Flood:
    """The hostile clients: one thread each, until `stop` is set; what each got, by client."""

    def __init__(self, world: WireWorld, miner: MinerProcess, job_id: str):
        self.world, self.miner, self.job_id = world, miner, job_id
        self.netuid = world.chain.netuid
        self.stop = threading.Event()
        self.outcomes: dict[str, Counter] = {}
        self.holder, self.sender = HOLDER, SENDER
        kinds = [self.unregistered, self.replaying, self.oversize, self.slow_drip, self.holding]
        self.threads = [
            threading.Thread(target=self._run, args=(kind, i), name=f"{kind.__name__}-{i}", daemon=True)
            for kind in kinds
            for i in range(PER_KIND)
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)
        assert not [t.name for t in self.threads if t.is_alive()], "a hostile client hung"

    def _run(self, kind, i: int) -> None:
        got = self.outcomes.setdefault(threading.current_thread().name, Counter())
        deadline = time.monotonic() + FLOOD_S
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                kind(i)
                if not self.stop.is_set():  # (a client cut short by the end of the flood returns early)
                    got["answered"] += 1
            except MapReduceError as e:
                got[type(e).__name__] += 1
            except grpc.RpcError as e:
                got[e.code().name] += 1
            except OSError as e:
                got[type(e).__name__] += 1
            time.sleep(0.01)

    def _headers(self, keypair, command: bytes) -> list:
        return call_headers(keypair, fl.FlightMethod.DO_EXCHANGE, "exchange", command, self.miner.hotkey, self.netuid)

    def unregistered(self, i: int) -> None:
        command = encode(StreamOpen(self.job_id, 1))
        headers = self._headers(key(f"Stranger{i}"), command)
        for _ in exchange(self.miner.address, headers, [descriptor(command)], WIRE.call_timeout_s):
            pass

    def replaying(self, i: int) -> None:
        if not hasattr(self, "_replayed"):
            command = encode(StreamOpen(self.job_id, 1))
            self._replayed = (command, self._headers(self.world.peers[0], command))
        command, headers = self._replayed
        for _ in exchange(self.miner.address, headers, [descriptor(command)], WIRE.call_timeout_s):
            pass

    def oversize(self, i: int) -> None:
        remote = Remote(self.miner.name, self.miner.address, self.miner.hotkey, self.sender, WIRE, netuid=self.netuid)
        try:
            remote.call("admit", bytes(OVERSIZE))
        finally:
            remote.close()

    def slow_drip(self, i: int) -> None:
        host, _, port = self.miner.address.rpartition(":")
        with socket.create_connection((host, int(port)), timeout=WIRE.call_timeout_s) as sock:
            for byte in b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\xff" * 64:
                if self.stop.is_set():
                    return
                sock.sendall(bytes([byte]))
                time.sleep(0.05)
            while sock.recv(4096):  # the miner's settings and GOAWAY, then the end of the connection
                pass
            raise ConnectionAbortedError("the miner closed the connection")

    def holding(self, i: int) -> None:
        """An exchange call whose first message never comes, held until the flood ends."""
        command = encode(StreamOpen(self.job_id, 1))

        def nothing():
            self.stop.wait(FLOOD_S)
            return
            yield

        calls = exchange(self.miner.address, self._headers(self.holder, command), nothing(), FLOOD_S)
        for _ in calls:
            pass


def test_fifty_hostile_clients_do_not_disturb_four_honest_peers_and_the_miners_memory_stays_bounded(world, capsys):
    world, miner = world
    spec = world.job([miner], PEERS, chunk_bytes=64 * 1024, timeout_s=30.0)
    peers = world.attached(spec, WIRE)
    rss = [miner.rss_mib()]
    flood = Flood(world, miner, spec.job_id)
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
        flood.finish()
        sampling.set()
        sampler.join()
        for peer in peers:
            peer.destroy_process_group()
    outcomes = flood.outcomes
    assert len(outcomes) == 5 * PER_KIND
    for client, got in sorted(outcomes.items()):
        errors = sum(n for outcome, n in got.items() if outcome != "answered")
        assert errors, f"{client} got no error: {dict(got)}"
        assert not got["answered"], f"{client} was answered: {dict(got)}"
    by_kind = Counter()
    for client, got in outcomes.items():
        for outcome, n in got.items():
            by_kind[(client.rsplit("-", 1)[0], outcome)] += n
    peak = max(rss)
    with capsys.disabled():
        print(f"\n{ROUNDS} honest rounds of {PEERS} peers exact in {honest_s:.1f} s under a flood of {len(outcomes)}")
        for (kind, outcome), n in sorted(by_kind.items()):
            print(f"  {kind:13} {outcome:28} {n}")
        print(f"  miner RSS: {rss[0]:.0f} MiB before, {peak:.0f} MiB at most, {rss[-1]:.0f} MiB at the end")
    assert peak - rss[0] < RSS_GROWTH_MIB, f"the miner's RSS rose from {rss[0]:.0f} MiB to {peak:.0f} MiB"
    assert os.path.exists(f"/proc/{miner.pid}")  # it is still serving
