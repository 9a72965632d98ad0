"""Hypothesis against every parser that reads another party's bytes, and against a live miner's endpoint.

Parsers: the JSON of every call body and signed message (`parse`, `Verifier.open`), and Arrow IPC on a
job stream (schema, record batch headers and bodies, the signed metadata beside them). The endpoint:
any bytes as the payload of a validator's call (admit, ticket, reducers), or the messages of an admitted
peer's stream.
Whatever comes, a parser answers a value of its type or a MessageRejectedError, and the endpoint
answers one of our errors: none ends in its catch-all ("a call failed"), and it serves an exact round
afterwards. Btauth headers and frames are fuzzed in test_wire. No Ray.
"""

from __future__ import annotations

import dataclasses
import json
import time
import types
import typing
from enum import Enum

import grpc
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from wire_world import exact_round, world_fixture

from actors.hostile import descriptor, exchange, flight_data, ipc
from mapreduce_ray.errors import EndpointError, IdentityError, MalformedMessageError, MapReduceError
from mapreduce_ray.messages import (
    Await,
    BenchmarkRequest,
    Chunk,
    Dispute,
    Excluded,
    JobAdmission,
    JobLeave,
    JobRequest,
    Measurements,
    Reduced,
    Reports,
    RoundFailed,
    Ruling,
    Settled,
    StreamOpen,
    Ticket,
    Verdict,
    encode,
    parse,
    seal_body,
)
from mapreduce_ray.protocol import Kind, MetagraphCache, Verifier
from mapreduce_ray.types import ReduceOp, RoundKind, TensorSpec
from mapreduce_ray.wire.auth import CALL_METHOD, call_headers
from mapreduce_ray.wire.frames import CHUNK_SCHEMA, digest, frame

MESSAGES = (
    JobRequest,
    JobAdmission,
    JobLeave,
    StreamOpen,
    Chunk,
    Await,
    Reduced,
    RoundFailed,
    Verdict,
    Settled,
    Reports,
    Excluded,
    Dispute,
    Ruling,
    Ticket,
    Measurements,
    BenchmarkRequest,
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def shaped(hint) -> st.SearchStrategy:
    """JSON values of roughly the shape of type `hint`, often wrong in one place (a field of another type,
    one missing or one too many, a number out of range)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(st.none() if a is type(None) else shaped(a) for a in args))
    if origin is tuple:
        return st.lists(shaped(args[0]), max_size=3)
    if dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint)
        record = st.fixed_dictionaries({f.name: shaped(hints[f.name]) | JSON for f in dataclasses.fields(hint)})
        return st.one_of(
            record,
            record.map(lambda d: {**d, "extra": 1}),
            record.flatmap(lambda d: st.sampled_from(sorted(d)).map(lambda k: {n: v for n, v in d.items() if n != k})),
        )
    if isinstance(hint, type) and issubclass(hint, Enum):
        return st.sampled_from([m.value for m in hint]) | st.text(max_size=6)
    if hint is bool:
        return st.booleans()
    if hint is int:
        return st.integers(-(2**64), 2**64) | st.integers(0, 8)
    if hint is float:
        return st.floats(allow_nan=False, allow_infinity=False)
    if hint is str:
        return st.text(max_size=24) | st.sampled_from(["float32", "bfloat16", "sum", "avg"])
    return JSON


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_json_parses_as_its_message_or_is_refused_as_malformed(data):
    cls = data.draw(st.sampled_from(MESSAGES))
    payload = json.dumps(data.draw(shaped(cls) | JSON)).encode()
    try:
        body = parse(cls, payload)
    except MalformedMessageError as e:
        event("refused")
        assert str(e)
        return
    event("parsed")
    assert type(body) is cls
    assert parse(cls, encode(body)) == body


@settings(max_examples=200, deadline=None)
@given(cls=st.sampled_from(MESSAGES), payload=st.binary(max_size=256))
def test_any_bytes_parse_as_a_message_or_are_refused_as_malformed(cls, payload: bytes):
    try:
        body = parse(cls, payload)
    except MalformedMessageError:
        event("refused")
        return
    assert type(body) is cls


world = world_fixture("fuzz", 2)


@pytest.fixture(scope="module")
def sealed(world) -> dict:
    """A valid signed Chunk from peer 1 to peer 2, as parsed JSON."""
    body = Chunk("job", 1, RoundKind.ALL_REDUCE, ReduceOp.SUM, None, TensorSpec("float32", (4,)), 0, 1, 0, "00" * 32)
    return json.loads(seal_body(world.peers[0], body, world.peers[1].ss58_address, world.chain.netuid))


OUTER = ["message", "scheme", "signature", "extra"]
INNER = ["protocol", "kind", "netuid", "sender", "receiver", "timestamp_ns", "nonce", "body", "extra"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    edits=st.lists(st.tuples(st.sampled_from(OUTER), JSON) | st.tuples(st.sampled_from(INNER), JSON), max_size=3),
    raw=st.none() | st.binary(max_size=128),
)
def test_any_signed_message_is_opened_or_refused_as_an_identity_error(world, sealed, edits, raw):
    """A valid signed message edited at random, outside or inside its signed part (or any bytes), opens only if
    unchanged; anything else is an IdentityError (malformed, bad signature, wrong receiver, ...)."""
    outer, inner = dict(sealed), json.loads(sealed["message"])
    for name, value in edits:
        if name in INNER:
            inner[name] = value
            outer["message"] = json.dumps(inner)
        else:
            outer[name] = value
    wire = raw if raw is not None else json.dumps(outer).encode()
    verifier = Verifier(world.peers[1].ss58_address, MetagraphCache(world.chain))
    try:
        verifier.open(wire, frozenset(Kind))
    except IdentityError as e:
        event(type(e).__name__)
        return
    assert (
        raw is None
        and outer["signature"] == sealed["signature"]
        and json.loads(outer["message"]) == json.loads(sealed["message"])
    )


# --- a live endpoint ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def target(world):
    """A miner, and a two-peer job on it in which peer 1 (fuzzing) is admitted and peer 2 never streams."""
    relay = world.relay("fuzzed")
    return relay, world.job([relay], 2)


@pytest.fixture(autouse=True)
def no_catch_all(caplog):
    """Every refusal must be one of our errors: the endpoint's catch-all log fails the test."""
    yield
    failed = [r for r in caplog.records if r.getMessage() == "a call failed"]
    assert not failed, failed[0].exc_text


def refused_as_ours(call) -> None:
    """`call()` succeeds or raises one of our errors, never the answer of an endpoint that failed."""
    try:
        call()
    except MapReduceError as e:
        event(type(e).__name__)
        assert not (type(e) is EndpointError and "outside the protocol" in str(e)), e


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    verb=st.sampled_from(["admit", "ticket", "reducers"]),
    payload=st.binary(max_size=512) | JSON.map(lambda v: json.dumps(v).encode()),
)
def test_any_payload_of_a_validators_call_is_answered_with_one_of_our_errors(world, target, verb, payload):
    relay, _ = target
    remote = world.remote(relay, world.validator)
    try:
        if verb == "admit":
            refused_as_ours(lambda: remote.call("admit", payload))
        elif verb == "ticket":
            refused_as_ours(lambda: remote.fetch("ticket", payload, 5.0).read_all())
        else:
            refused_as_ours(lambda: remote.locations("reducers", payload))
    finally:
        remote.close()


def _batch_header() -> bytes:
    return ipc(frame(torch.zeros(4)).serialize())[0]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    schema=st.sampled_from(["ours", "ours", "ours", "random", "none"]),
    frames=st.lists(
        st.tuples(
            st.one_of(*[st.just(b"batch")] * 3, st.binary(max_size=256)),  # mostly a real record batch's header
            st.just(bytes(16)) | st.binary(max_size=512),  # the body (16 bytes is a whole frame's)
            st.one_of(*[st.just(b"sealed")] * 3, st.binary(max_size=256)),  # mostly a real signed Chunk
        ),
        max_size=4,
    ),
    random_schema=st.binary(max_size=128),
)
def test_any_messages_on_an_admitted_peers_stream_are_answered_with_one_of_our_errors(
    world, target, schema, frames, random_schema
):
    relay, spec = target
    peer = world.peers[0]
    command = encode(StreamOpen(spec.job_id, 1))
    headers = call_headers(peer, CALL_METHOD, "exchange", command, relay.hotkey, world.chain.netuid)
    tensor = TensorSpec("float32", (4,))
    messages = [descriptor(command)]
    if schema != "none":
        messages.append(flight_data(ipc(CHUNK_SCHEMA.serialize())[0] if schema == "ours" else random_schema))
    for header, body, metadata in frames:
        if metadata == b"sealed":
            chunk = Chunk(spec.job_id, 1, RoundKind.ALL_REDUCE, ReduceOp.SUM, None, tensor, 0, 1, 0, digest(body))
            metadata = seal_body(peer, chunk, relay.hotkey, world.chain.netuid)
        messages.append(flight_data(_batch_header() if header == b"batch" else header, body, metadata))
    try:
        for _ in exchange(relay.address, headers, messages, 10.0, world.certificate_pem(relay)):
            pass
        event("ended")
    except grpc.RpcError as e:
        event(f"{e.code().name}: {e.details()[:60]}")
        reached = e.code() is not grpc.StatusCode.UNAVAILABLE
        assert reached and e.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED), e.details()


def test_after_the_fuzzing_the_miner_still_reduces_exactly(world, target):
    relay, _ = target
    spec, tensors, expected = exact_round(world, [relay], 2, 3000)
    assert all(torch.equal(t, expected) for t in tensors)
    deadline = time.monotonic() + 2 * spec.timeout_s  # what the fuzzing opened ends by its rounds' deadlines
    while relay.status()["open_rounds"]:
        assert time.monotonic() < deadline, "the miner still holds rounds the fuzzing opened"
        time.sleep(0.1)
