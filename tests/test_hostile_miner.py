"""A hostile miner on the wire: nothing it sends is unpickled, and a round goes on without it.

The hostile miner is a bare gRPC server speaking Flight's DoExchange by hand, so it can send what
no Arrow library would: a pickle where the signed message belongs (whose __reduce__ would write a
file), an IPC stream whose batch body is cut short, a stream of another schema, a frame over the
size limit, and bytes that do not match the digest it signs. Each time the peer refuses it with
one line naming the miner, hands its segment to the next miner of the job, and ends with the
exact result; with no other miner, the round fails and the tensor is as it was. No Ray.
"""

from __future__ import annotations

import logging
import pickle
import re
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pytest
import torch
from wire_world import COLD, WireWorld, key, on_every_peer, world_fixture

from actors.behaviours import SketchDroppingRelay
from actors.hostile import fields, flight_data, ipc
from mapreduce_ray.errors import EndpointError, JobError, NoValidatorPermitError, RoundTimeoutError
from mapreduce_ray.messages import Chunk, JobAdmission, Reduced, decode, encode, seal_body
from mapreduce_ray.protocol import Kind, attest, audience
from mapreduce_ray.reference import reference_reduce
from mapreduce_ray.sketch import SECRET_BYTES
from mapreduce_ray.wire.config import WireConfig
from mapreduce_ray.wire.endpoint import address_of
from mapreduce_ray.wire.frames import CHUNK_SCHEMA, digest
from mapreduce_ray.wire.tls import announce_address

LIMIT = 64 * 1024  # the peers' largest message
WIRE = WireConfig(max_message_bytes=LIMIT)
MODES = ("pickle", "malformed ipc", "wrong dtype", "over the size limit", "wrong digest")
REFUSALS = {
    "pickle": "sent a message that fails its check: the message is not JSON of the mapreduce-ray/1 protocol",
    "malformed ipc": "broke off the job stream (",
    "wrong dtype": "sent a stream of schema (chunk: double not null), not (chunk: uint8 not null)",
    "over the size limit": "over the size limit",  # gRPC refuses it while reading, or cancels the call
    "wrong digest": "whose bytes do not match its signed digest",
}


class Planted:
    """Unpickling this writes a file."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "unpickled"))


class HostileMiner:
    """A Flight DoExchange endpoint by hand: answers each chunk a peer streams with what `mode` says."""

    def __init__(self, world: WireWorld, mode: str, planted: Path):
        self.keypair, self.mode, self.planted = key("Hostile"), mode, planted
        self.netuid = world.chain.netuid
        world.chain.register(self.keypair.ss58_address, COLD)
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        handler = grpc.method_handlers_generic_handler(
            "arrow.flight.protocol.FlightService", {"DoExchange": grpc.stream_stream_rpc_method_handler(self._exchange)}
        )
        self.server.add_generic_rpc_handlers((handler,))
        wire = world.wire_of(f"hostile {planted.parent.name}", None)  # in a TLS world, a certificate of its own
        if wire.tls:
            pem = (Path(wire.tls_key).read_bytes(), Path(wire.tls_cert).read_bytes())
            port = self.server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([pem]))
        else:
            port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{port}"
        self.server.start()
        announce_address(world.chain, self.keypair, self.address, wire)

    def _exchange(self, requests, context):
        next(requests)  # the descriptor
        schema = pa.schema([pa.field("chunk", pa.float64(), nullable=False)]) if self.mode == "wrong dtype" else None
        yield flight_data(ipc((schema or CHUNK_SCHEMA).serialize())[0])
        for request in requests:
            sent = fields(request)
            if 3 not in sent:
                continue  # the peer's schema message
            envelope = attest(sent[3], Kind.CHUNK, None, self.keypair.ss58_address, self.netuid)
            yield self._answer(decode(Chunk, envelope.body, "Chunk"), envelope.sender, sent.get(1000, b""))

    def _answer(self, chunk: Chunk, peer: str, data: bytes) -> bytes:
        """A reduced chunk (the peer's own bytes sent back) as `mode` spoils it."""
        payload = bytes(3 * LIMIT) if self.mode == "over the size limit" else data
        header, body = ipc(
            pa.record_batch([pa.array(np.frombuffer(payload, np.uint8))], schema=CHUNK_SCHEMA).serialize()
        )
        signed = digest(payload + b"!" if self.mode == "wrong digest" else payload)
        inputs = tuple(chunk.digest if r == chunk.rank else "00" * 32 for r in (1, 2))
        reduced = Reduced(chunk.job_id, chunk.seq, chunk.segment, chunk.chunk, chunk.tensor, signed, inputs)
        metadata = seal_body(self.keypair, reduced, audience(chunk.job_id), self.netuid)
        if self.mode == "pickle":
            metadata = pickle.dumps(Planted(self.planted))
        if self.mode == "malformed ipc":
            body = body[: len(body) // 2]
        return flight_data(header, body, metadata)

    def close(self) -> None:
        self.server.stop(grace=None)


world = world_fixture("hostile", 2)


def exact_sum_with_failovers(peers, caplog, cleanup=lambda: None) -> list[str]:
    """Sum two peers' random tensors, check that both got the exact sum, and return what their rounds logged when
    they handed a segment on (then `cleanup()`)."""
    tensors = [torch.randn(2000, generator=torch.Generator().manual_seed(r)) for r in (1, 2)]
    expected = reference_reduce([t.clone() for t in tensors], "sum")
    try:
        with caplog.at_level(logging.WARNING):
            on_every_peer(peers, lambda p: p.all_reduce(tensors[p.rank - 1], "sum"))
    finally:
        for peer in peers:
            peer.destroy_process_group()
        cleanup()
    assert all(torch.equal(t, expected) for t in tensors)
    return sorted(r.getMessage() for r in caplog.records if r.name == "mapreduce_ray.rounds")


@pytest.mark.parametrize("mode", MODES)
def test_what_a_hostile_miner_sends_is_refused_and_the_next_miner_takes_its_segment(world, mode, tmp_path, caplog):
    hostile = HostileMiner(world, mode, tmp_path / "planted")
    honest = world.relay(f"honest-{MODES.index(mode)}")
    spec = world.job([honest], 2, first=((hostile.keypair.ss58_address, hostile.address),))
    failovers = exact_sum_with_failovers(world.attached(spec, WIRE), caplog, hostile.close)
    assert failovers, "no peer handed the segment on"
    for message in failovers:
        assert message.startswith("all_reduce #1 of job 'wire': miner 'miner-1' "), message
        assert REFUSALS[mode] in message and message.endswith("; segment 0 goes to the next miner"), message
    assert not (tmp_path / "planted").exists()


def test_a_miner_that_drops_a_peers_sketch_fails_the_check_and_the_next_miner_takes_its_segment(world, caplog):
    dropping = world.relay("sketch-dropping", SketchDroppingRelay)
    honest = world.relay("honest-after-sketch-dropping")
    spec = world.job([dropping, honest], 2)
    failovers = exact_sum_with_failovers(world.attached(spec, WIRE, secret=bytes(range(SECRET_BYTES))), caplog)
    assert len(failovers) == 2  # each peer, on the first chunk it got (chunks are reduced side by side)
    for message in failovers:
        assert re.fullmatch(
            r"all_reduce #1 of job 'wire': miner 'miner-1' sent chunk \d+ of segment 0 that fails its check: "
            r"rank 2's sketch is missing or forged; segment 0 goes to the next miner",
            message,
        ), message


def test_with_no_other_miner_the_round_fails_and_the_tensor_is_as_it_was(world, tmp_path):
    hostile = HostileMiner(world, "pickle", tmp_path / "planted")
    spec = world.job([], 2, timeout_s=3.0, first=((hostile.keypair.ss58_address, hostile.address),))
    peers = world.attached(spec, WIRE)
    tensors = [torch.randn(2000, generator=torch.Generator().manual_seed(r)) for r in (1, 2)]
    before = [t.clone() for t in tensors]
    try:
        errors = on_every_peer(peers, lambda p: p.all_reduce(tensors[p.rank - 1], "sum"))
    finally:
        for peer in peers:
            peer.destroy_process_group()
        hostile.close()
    for error in errors:
        assert isinstance(error, RoundTimeoutError)
        assert str(error).endswith("no miner delivered segment(s) [0] within 3 s; miners that failed: ['miner-1']")
    assert all(torch.equal(t, b) for t, b in zip(tensors, before, strict=True))
    assert not (tmp_path / "planted").exists()


def test_only_a_validator_may_admit_peers_at_a_miner(world):
    relay = world.relay("admits")
    spec = world.job([relay], 1)
    admission = encode(JobAdmission(spec, 1, world.peers[0].ss58_address))
    as_peer = world.remote(relay, world.peers[0])
    with pytest.raises(NoValidatorPermitError, match=r"^admits refused the call: admit is for validators"):
        as_peer.call("admit", admission)


def test_a_miner_lists_its_reducers_to_validators_only(world):
    relay = world.relay("lists")
    as_validator = world.remote(relay, world.validator)
    with pytest.raises(JobError, match=r"^miner 'lists' is still starting its reducers; ask again$"):
        as_validator.locations("reducers", b"reducers")
    relay.locations = [relay.address, "10.0.0.7:9000"]
    assert as_validator.locations("reducers", b"reducers") == [relay.address, "10.0.0.7:9000"]
    as_peer = world.remote(relay, world.peers[0])
    with pytest.raises(NoValidatorPermitError, match=r"^lists refused the call: reducers is for validators"):
        as_peer.locations("reducers", b"reducers")


@pytest.mark.parametrize(
    "uri",
    [
        b"file:///etc/passwd",
        b"grpc://host",
        b"grpc://host:1/more",
        b"grpc+unix:///tmp/s",
        b"grpc://" + b"h" * 300,
        b"grpc://1.2.3.4:99999",
        b"grpc://1.2.3.4:0",
    ],
)
def test_a_listed_location_other_than_a_flight_host_and_port_is_refused(uri: bytes):
    with pytest.raises(EndpointError, match=r"^miner 'miner-4' listed a location outside the protocol: "):
        address_of(uri, "miner 'miner-4'")


def test_listed_locations_are_host_and_port():
    assert address_of(b"grpc://10.0.0.1:8091", "m") == "10.0.0.1:8091"
    assert address_of(b"grpc+tls://[2001:db8::1]:443", "m") == "[2001:db8::1]:443"
    assert address_of(b"grpc://miner.example:8091", "m") == "miner.example:8091"
