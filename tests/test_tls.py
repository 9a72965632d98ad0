"""Rounds over grpc+tls: peers and the validator pin each miner's certificate to the key digest its hotkey
announced on chain, and a miner serving another key is refused before anything is sent to it. A client
without the miner's certificate (plain gRPC, or trusting another one) fails with one clear error. The
suites of checks, hostile miners and peers, limits and fuzzing also run over grpc+tls (wire_world)."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from wire_world import WireWorld, key, on_every_peer

from mapreduce_ray.errors import CertificateMismatchError, EndpointError
from mapreduce_ray.messages import JobAdmission, encode
from mapreduce_ray.reference import reference_reduce
from mapreduce_ray.wire.config import WireConfig
from mapreduce_ray.wire.endpoint import Remote
from mapreduce_ray.wire.tls import create_certificate


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    world = WireWorld.create(str(tmp_path_factory.mktemp("tls")), 2)
    yield world
    world.close()


def tls_wire(folder, name: str) -> tuple[WireConfig, str]:
    """The wire settings of an endpoint serving a new certificate, and that certificate's key digest."""
    cert, secret = str(folder / f"{name}.pem"), str(folder / f"{name}.key")
    fingerprint = create_certificate(cert, secret)
    return WireConfig(tls_cert=cert, tls_key=secret), fingerprint


def test_a_round_over_tls_is_exact_and_an_impostors_certificate_sends_its_segment_on(world, tmp_path, caplog):
    impostor_wire, served_by_impostor = tls_wire(tmp_path, "impostor")
    impostor = world.relay("tls-impostor", wire=impostor_wire)
    _, announced = tls_wire(tmp_path, "stolen")  # the key the impostor's hotkey announces, not the one it serves
    world.chain.serve(key("tls-impostor"), impostor.address, announced)
    honest = world.relay("tls-honest", wire=tls_wire(tmp_path, "honest")[0])
    spec = world.job([honest], 2, first=((impostor.hotkey, impostor.address),))
    assert [slot.certificate != "" for slot in spec.miners] == [True, True]
    peers = world.attached(spec)
    tensors = [torch.randn(2000, generator=torch.Generator().manual_seed(r)) for r in (1, 2)]
    expected = reference_reduce([t.clone() for t in tensors], "sum")
    try:
        with caplog.at_level(logging.WARNING):
            on_every_peer(peers, lambda p: p.all_reduce(tensors[p.rank - 1], "sum"))
            second = [t * 2 for t in tensors]
            expected_second = reference_reduce([t.clone() for t in second], "sum")
            on_every_peer(peers, lambda p: p.all_reduce(second[p.rank - 1], "sum"))
    finally:
        for peer in peers:
            peer.destroy_process_group()
    assert all(torch.equal(t, expected) for t in tensors)
    assert all(torch.equal(t, expected_second) for t in second)
    failovers = [r.getMessage() for r in caplog.records if r.name == "mapreduce_ray.rounds"]
    assert failovers, "no peer handed the segment on"
    for message in failovers:
        assert re.match(r"all_reduce #[12] of job 'wire': miner 'miner-1' could not be reached: ", message), message
        assert (
            f"serves a TLS key (sha256 {served_by_impostor[:16]}...) other than the one its hotkey announced on "
            f"chain (sha256 {announced[:16]}...): refusing to connect" in message
        ), message
        assert message.endswith("; segment 0 goes to the next miner"), message


def test_a_client_without_the_miners_certificate_fails_cleanly_and_the_miner_serves_on(world, tmp_path):
    relay = world.relay("tls-serves-on", wire=tls_wire(tmp_path, "serves-on")[0])
    _, other = tls_wire(tmp_path, "other")
    plain = Remote(relay.name, relay.address, relay.hotkey, world.validator, WireConfig(), netuid=world.chain.netuid)
    pinned_wrong = Remote(
        relay.name, relay.address, relay.hotkey, world.validator, WireConfig(), other, netuid=world.chain.netuid
    )
    admission = encode(JobAdmission(world.job([], 2), 1, world.peers[0].ss58_address))
    try:
        with pytest.raises(EndpointError, match=r"^tls-serves-on cannot be reached: "):
            plain.call("admit", admission)  # plain gRPC to a grpc+tls endpoint
        with pytest.raises(
            CertificateMismatchError, match=r"serves a TLS key \(sha256 [0-9a-f]{16}\.\.\.\) other than"
        ):
            pinned_wrong.call("admit", admission)  # TLS trusting another certificate
    finally:
        plain.close()
        pinned_wrong.close()
    spec = world.job([relay], 2)  # the miner admits and reduces as before
    peers = world.attached(spec)
    tensors = [torch.full((300,), float(r)) for r in (1, 2)]
    try:
        on_every_peer(peers, lambda p: p.all_reduce(tensors[p.rank - 1], "sum"))
    finally:
        for peer in peers:
            peer.destroy_process_group()
    assert all(torch.equal(t, torch.full((300,), 3.0)) for t in tensors)
