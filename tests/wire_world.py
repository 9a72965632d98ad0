"""Parties on the wire without Ray: an embedded chain, miners' relays on loopback, peers attached to a job.

Used by the tests of checks, hostile miners and peers, limits and fuzzing: everything a round does between
parties, in one process, with no Ray anywhere. A HandPeer speaks a job stream by hand, to send what a Peer
would not.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from bittensor.sp_core import Keypair

from actors.relay import Relay, RelaySettings
from mapreduce_ray.chain import ChainConfig
from mapreduce_ray.chain.base import Chain
from mapreduce_ray.messages import Chunk, JobAdmission, StreamOpen, encode, seal_body
from mapreduce_ray.peer import Peer
from mapreduce_ray.plan import plan_round
from mapreduce_ray.protocol import MetagraphCache, Verifier
from mapreduce_ray.reference import reference_reduce
from mapreduce_ray.types import JobSpec, MinerSlot, ReduceOp, RoundKind, TensorSpec
from mapreduce_ray.wallets import Identity
from mapreduce_ray.wire.config import WireConfig
from mapreduce_ray.wire.endpoint import Remote
from mapreduce_ray.wire.frames import CHUNK_SCHEMA, digest, frame
from mapreduce_ray.wire.tls import announce_address, create_certificate

COLD = Keypair.create_from_uri("//WireCold").ss58_address


def key(name: str) -> Keypair:
    return Keypair.create_from_uri(f"//Wire{name}")


TRANSPORTS = ("grpc", "grpc+tls")  # what a suite runs over, each in a world of its own


def world_fixture(name: str, peers: int):
    """A module's `world` fixture: a WireWorld of `peers` peers, once over each of TRANSPORTS."""

    @pytest.fixture(scope="module", params=TRANSPORTS)
    def world(tmp_path_factory, request):
        world = WireWorld.create(str(tmp_path_factory.mktemp(name)), peers, request.param)
        yield world
        world.close()

    return world


@dataclass
class WireWorld:
    """A chain with a validator (permit) and peers; relays started on demand; all shut down by `close`. With
    `tls_dir`, every relay serves grpc+tls with a certificate of its own made there (announced on chain)."""

    chain: Chain
    validator: Keypair
    peers: list[Keypair]
    relays: list[Relay] = field(default_factory=list)
    tls_dir: Path | None = None

    @classmethod
    def create(cls, state_dir: str, peers: int, transport: str = "grpc") -> WireWorld:
        chain = ChainConfig(state_dir=state_dir).open()
        validator = key("Validator")
        chain.register(validator.ss58_address, COLD, 1000.0)
        keys = [key(f"Peer{r}") for r in range(1, peers + 1)]
        for k in keys:
            chain.register(k.ss58_address, COLD)
        tls_dir = None
        if transport == "grpc+tls":
            tls_dir = Path(state_dir) / "tls"
            tls_dir.mkdir()
        return cls(chain, validator, keys, tls_dir=tls_dir)

    def wire_of(self, name: str, wire: WireConfig | None) -> WireConfig:
        """The wire settings of relay `name`: `wire`, with a new certificate of its own in a TLS world."""
        wire = wire or WireConfig()
        if self.tls_dir is None or wire.tls:
            return wire
        cert, secret = self.tls_dir / f"{name}.pem", self.tls_dir / f"{name}.key"
        create_certificate(str(cert), str(secret))
        return replace(wire, tls_cert=str(cert), tls_key=str(secret))

    def remote(self, relay, keypair, wire: WireConfig | None = None) -> Remote:
        """A call to `relay` (anything with a name, hotkey and address) signed by `keypair`, its certificate
        pinned to what its hotkey announced on chain."""
        certificate = self.chain.metagraph().by_hotkey(relay.hotkey).certificate
        return Remote(
            relay.name,
            relay.address,
            relay.hotkey,
            keypair,
            wire or WireConfig(),
            certificate,
            netuid=self.chain.netuid,
        )

    def certificate_pem(self, relay) -> bytes | None:
        """The PEM certificate `relay` serves (None: it serves plain gRPC)."""
        path = self.tls_dir / f"{relay.name}.pem" if self.tls_dir else None
        return path.read_bytes() if path and path.exists() else None

    def relay(
        self,
        name: str,
        relay_class: type = Relay,
        wire: WireConfig | None = None,
        settings: RelaySettings | None = None,
        **options,
    ) -> Relay:
        """A miner's endpoint on loopback, its hotkey registered and its endpoint announced."""
        miner = key(name)
        self.chain.register(miner.ss58_address, COLD)
        wire = self.wire_of(name, wire)
        relay = relay_class(
            "127.0.0.1:0",
            Identity(miner, None),
            MetagraphCache(self.chain),
            name,
            wire,
            settings or RelaySettings(),
            lambda *_: None,
            **options,
        )
        announce_address(self.chain, miner, relay.address, wire)
        self.relays.append(relay)
        return relay

    def job(
        self,
        relays: list[Relay],
        peer_count: int,
        chunk_bytes: int = 1024,
        timeout_s: float = 10.0,
        first: tuple[tuple[str, str], ...] = (),
    ) -> JobSpec:
        """A job of `peer_count` peers over `relays` (equal shares), every rank admitted at every relay; `first`
        puts endpoints of other miners ((hotkey, host:port) each, admitting nobody) before the relays."""
        graph = self.chain.metagraph()
        endpoints = [*first, *((r.hotkey, r.address) for r in relays)]
        slots = tuple(
            MinerSlot(i + 1, hotkey, address, 1.0, certificate=graph.by_hotkey(hotkey).certificate or "")
            for i, (hotkey, address) in enumerate(endpoints)
        )
        spec = JobSpec(uuid.uuid4().hex[:12], "wire", peer_count, slots, chunk_bytes, timeout_s, 1 << 30)
        for rank in range(1, peer_count + 1):
            admission = encode(JobAdmission(spec, rank, self.peers[rank - 1].ss58_address))
            for relay in relays:
                remote = self.remote(relay, self.validator)
                remote.call("admit", admission)
                remote.close()
        return spec

    def attached(self, spec: JobSpec, wire: WireConfig | None = None, secret: bytes = b"") -> list[Peer]:
        """Peers 1..peer_count of `spec`, attached (no validator to report to), checking results with `secret`
        when given."""
        peers = []
        for rank in range(1, spec.peer_count + 1):
            peer = Peer(rank, spec.peer_count, job=spec.name, wire=wire)
            keypair = self.peers[rank - 1]
            verifier = Verifier(keypair.ss58_address, MetagraphCache(self.chain))
            peer.attach(spec, Identity(keypair, None), verifier, secret=secret)
            peers.append(peer)
        return peers

    def close(self) -> None:
        for relay in self.relays:
            relay.shutdown()


def on_every_peer(peers: list[Peer], fn) -> list:
    """fn(peer) on every peer at once, each in a thread of its own; the results (or exceptions) in rank order."""
    with ThreadPoolExecutor(len(peers)) as pool:
        futures = [pool.submit(fn, peer) for peer in peers]
        return [f.exception() or f.result() for f in futures]


NUMEL = 2000  # elements of the tensors a HandPeer's rounds carry
SPEC = TensorSpec("float32", (NUMEL,))
WAIT_S = 30.0


class HandPeer:
    """Rank `rank` of job `spec` on a stream of its own to `relay`, sending what the test says."""

    def __init__(self, world: WireWorld, spec, rank: int, relay):
        self.spec, self.rank, self.relay = spec, rank, relay
        self.keypair, self.netuid = world.peers[rank - 1], world.chain.netuid
        self.remote = world.remote(relay, self.keypair)
        self.writer, self.reader = self.remote.exchange("exchange", encode(StreamOpen(spec.job_id, rank)))
        self.writer.begin(CHUNK_SCHEMA)

    def send(
        self, tensor: torch.Tensor, index: int, as_rank: int | None = None, tensor_spec: TensorSpec = SPEC
    ) -> None:
        """Chunk `index` of round 1 (an all_reduce sum of a SPEC tensor), signed by this peer as rank `as_rank`
        (its own rank unless given) for a tensor of `tensor_spec`."""
        a, b = plan_round(self.spec, SPEC)[0].chunks[index]
        part = tensor[a:b].contiguous()
        body = Chunk(
            self.spec.job_id,
            1,
            RoundKind.ALL_REDUCE,
            ReduceOp.SUM,
            None,
            tensor_spec,
            0,
            as_rank or self.rank,
            index,
            digest(part.numpy().tobytes()),
        )
        sealed = seal_body(self.keypair, body, self.relay.hotkey, self.netuid)
        self.writer.write_with_metadata(frame(part), pa.py_buffer(sealed))

    def refusal(self) -> Exception:
        """What the miner ended this stream with."""
        with pytest.raises(Exception) as refused, self.remote.errors():
            while True:
                self.reader.read_chunk()
        return refused.value

    def close(self) -> None:
        with contextlib.suppress(Exception):  # the miner may have cut the stream already
            self.writer.close()
        self.remote.close()


def honest_round_fails(world, hand: HandPeer, hostile, error: type) -> list:
    """Ranks 1 and 3 of `hand`'s job run round 1 while `hostile(tensor)` plays rank 2 (through `hand`); both must
    fail with `error`, their tensors untouched and `hand`'s miner holding no round; their messages, then what
    `hostile` returned."""
    peers = world.attached(hand.spec)
    tensors = [torch.randn(NUMEL, generator=torch.Generator().manual_seed(r)) for r in (1, 2, 3)]
    before = [t.clone() for t in tensors]
    honest = [peers[0], peers[2]]
    try:
        results = on_every_peer(
            [*honest, None], lambda p: hostile(tensors[1]) if p is None else p.all_reduce(tensors[p.rank - 1], "sum")
        )
    finally:
        for peer in peers:
            peer.destroy_process_group()
    for result in results[:2]:
        assert type(result) is error, result
    assert all(torch.equal(t, b) for t, b in zip(tensors, before, strict=True))
    deadline = time.monotonic() + WAIT_S
    while hand.relay.status()["open_rounds"]:
        assert time.monotonic() < deadline, "the miner still holds the failed round"
        time.sleep(0.1)
    return [str(r) for r in results[:2]] + [results[2]]


def exact_round(world: WireWorld, relays: list, peers: int, numel: int) -> tuple:
    """One all_reduce (sum) of `peers` peers' random tensors over `relays`, each peer leaving after it; (spec, the
    peers' tensors, the expected result)."""
    spec = world.job(relays, peers)
    attached = world.attached(spec)
    tensors = [torch.randn(numel, generator=torch.Generator().manual_seed(r)) for r in range(peers)]
    expected = reference_reduce([t.clone() for t in tensors], "sum")
    try:
        on_every_peer(attached, lambda p: p.all_reduce(tensors[p.rank - 1], "sum"))
    finally:
        for peer in attached:
            peer.destroy_process_group()
    return spec, tensors, expected
