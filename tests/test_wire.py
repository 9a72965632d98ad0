"""The wire between parties, without Ray: IPC frames, btauth on every Flight call, limits, and errors across it.

A real Flight endpoint serves on loopback, its callers checked against an embedded chain: a validator
(stake, so a permit), a plain registered hotkey, and a stranger that never registered.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pyarrow as pa
import pyarrow.flight as fl
import pytest
import torch
from bittensor import http_auth
from bittensor.sp_core import CRYPTO_ED25519, Keypair
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from wire_world import COLD, key

from mapreduce_ray import Peer
from mapreduce_ray.chain import ChainConfig
from mapreduce_ray.errors import (
    BadSignatureError,
    CertificateMismatchError,
    EndpointError,
    ExpiredMessageError,
    FrameRejectedError,
    IdentityError,
    JobError,
    LimitExceededError,
    MalformedMessageError,
    MapReduceError,
    MessageRejectedError,
    NotRegisteredError,
    NoValidatorPermitError,
    ReplayedMessageError,
    RoundTimeoutError,
    WrongReceiverError,
)
from mapreduce_ray.protocol import MetagraphCache
from mapreduce_ray.wire import Endpoint, Remote, WireConfig
from mapreduce_ray.wire.auth import CALL_HEADER, CALL_METHOD, Authenticator, Caller, Rule, call_headers, payload_digest
from mapreduce_ray.wire.errors import MAX_EXTRA_BYTES, MAX_MESSAGE_CHARS, refusal, stream_fault, translated
from mapreduce_ray.wire.frames import CHUNK_SCHEMA, check_schema, digest, frame, frame_buffer, unframe
from mapreduce_ray.wire.tls import (
    check_certificate,
    create_certificate,
    key_fingerprint,
    pinned_certificate,
    self_signed,
)

SERVER, VALIDATOR, PLAIN, STRANGER = (key(n) for n in ("Server", "Validator", "Plain", "Stranger"))
ED25519 = Keypair.create_from_uri("//Plain", crypto_type=CRYPTO_ED25519)
MAX_MESSAGE_BYTES = 4096
S = 10**9  # nanoseconds per second
NETUID = ChainConfig().netuid  # the test chain's


# --- frames -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.complex64])
def test_a_frame_wraps_the_tensor_bytes_in_place_and_unframes_to_exactly_them(dtype: torch.dtype):
    elements = (torch.arange(37, dtype=torch.float64) * 1.5 - 7).to(dtype)
    raw = elements.view(torch.uint8).numpy().tobytes()

    batch = frame(elements)

    assert batch.schema.equals(CHUNK_SCHEMA, check_metadata=True)
    assert batch.column(0).buffers()[1].address == elements.data_ptr()  # no copy on the send side
    data = unframe(batch, len(raw), "peer 1")
    assert data.to_pybytes() == raw
    assert torch.equal(torch.frombuffer(bytearray(data.to_pybytes()), dtype=dtype), elements)
    assert digest(data) == digest(raw)


def test_unframe_of_a_sliced_frame_returns_the_slice_bytes():
    raw = bytes(range(200))
    batch = frame_buffer(pa.py_buffer(raw)).slice(17, 50)
    assert unframe(batch, 50, "peer 1").to_pybytes() == raw[17:67]


def _schema(field: pa.Field, metadata: dict | None = None) -> pa.Schema:
    return pa.schema([field], metadata=metadata)


class _Tagged(pa.ExtensionType):
    """An extension type over uint8, as a hostile peer could declare."""

    def __init__(self):
        super().__init__(pa.uint8(), "test.tagged")

    def __arrow_ext_serialize__(self) -> bytes:
        return b""

    @classmethod
    def __arrow_ext_deserialize__(cls, storage_type, serialized) -> _Tagged:
        return cls()


WRONG_SCHEMAS = {
    "float32": _schema(pa.field("chunk", pa.float32(), nullable=False)),
    "nullable uint8": _schema(pa.field("chunk", pa.uint8(), nullable=True)),
    "schema metadata": _schema(pa.field("chunk", pa.uint8(), nullable=False), {"k": "v"}),
    "field metadata": _schema(pa.field("chunk", pa.uint8(), nullable=False, metadata={"k": "v"})),
    "uuid extension": _schema(pa.field("chunk", pa.uuid(), nullable=False)),
    "uint8 extension": _schema(pa.field("chunk", _Tagged(), nullable=False)),
    "renamed": _schema(pa.field("bytes", pa.uint8(), nullable=False)),
    "two columns": pa.schema([pa.field("chunk", pa.uint8(), nullable=False), pa.field("x", pa.uint8(), False)]),
    "no columns": pa.schema([]),
    "none": None,
}


@pytest.mark.parametrize("name", list(WRONG_SCHEMAS))
def test_check_schema_refuses_anything_but_the_chunk_schema_naming_the_sender(name: str):
    with pytest.raises(FrameRejectedError, match=r"^peer 3 sent a stream of schema .*, not \(chunk: uint8 not null\)$"):
        check_schema(WRONG_SCHEMAS[name], "peer 3")


def test_check_schema_accepts_the_chunk_schema():
    check_schema(pa.schema([pa.field("chunk", pa.uint8(), nullable=False)]), "peer 3")


def test_check_schema_describes_what_it_refuses():
    with pytest.raises(FrameRejectedError, match=r"schema \(chunk: uint8\) with metadata, not"):
        check_schema(_schema(pa.field("chunk", pa.uint8()), {"k": "v"}), "peer 3")


def test_unframe_refuses_a_frame_of_another_length():
    batch = frame_buffer(pa.py_buffer(b"0123456789"))
    with pytest.raises(FrameRejectedError, match=r"^miner 2 sent a frame of 10 bytes where 11 were due$"):
        unframe(batch, 11, "miner 2")
    with pytest.raises(FrameRejectedError, match=r"^miner 2 sent a frame of 10 bytes where 9 were due$"):
        unframe(batch, 9, "miner 2")


def test_unframe_refuses_a_frame_with_nulls():
    batch = pa.RecordBatch.from_arrays([pa.array([1, None, 3], pa.uint8())], schema=CHUNK_SCHEMA)
    with pytest.raises(FrameRejectedError, match=r"^miner 2 sent a frame with null bytes$"):
        unframe(batch, 3, "miner 2")


def test_unframe_refuses_a_message_without_its_frame():
    with pytest.raises(FrameRejectedError, match=r"^miner 2 sent a message without its frame$"):
        unframe(None, 3, "miner 2")


def _wrong_frame(kind: str, data: bytes) -> pa.RecordBatch:
    """A batch carrying `data` under a schema (or with contents) that is not a chunk frame's."""
    buffer = pa.py_buffer(data)
    uint8 = pa.Array.from_buffers(pa.uint8(), len(data), [None, buffer])
    if kind == "nullable":
        return pa.RecordBatch.from_arrays([uint8], schema=_schema(pa.field("chunk", pa.uint8())))
    if kind == "int8":
        int8 = pa.Array.from_buffers(pa.int8(), len(data), [None, buffer])
        return pa.RecordBatch.from_arrays([int8], schema=_schema(pa.field("chunk", pa.int8(), nullable=False)))
    if kind in ("schema metadata", "field metadata", "renamed", "uint8 extension"):
        schema = WRONG_SCHEMAS[kind]
        column = pa.ExtensionArray.from_storage(_Tagged(), uint8) if kind == "uint8 extension" else uint8
        return pa.RecordBatch.from_arrays([column], schema=schema)
    if kind == "uuid":
        whole = len(data) // 16
        storage = pa.Array.from_buffers(pa.binary(16), whole, [None, pa.py_buffer(data[: whole * 16])])
        column = pa.ExtensionArray.from_storage(pa.uuid(), storage)
        return pa.RecordBatch.from_arrays([column], schema=WRONG_SCHEMAS["uuid extension"])
    if kind == "binary":
        return pa.RecordBatch.from_arrays([pa.array([data], pa.binary())], names=["chunk"])
    if kind == "two columns":
        return pa.RecordBatch.from_arrays([uint8, uint8], schema=WRONG_SCHEMAS["two columns"])
    raise AssertionError(kind)


WRONG_FRAME_KINDS = [
    "nullable",
    "int8",
    "schema metadata",
    "field metadata",
    "renamed",
    "uint8 extension",
    "uuid",
    "binary",
    "two columns",
]


@settings(max_examples=150, deadline=None)
@given(
    data=st.binary(max_size=512),
    kind=st.sampled_from(WRONG_FRAME_KINDS),
    due=st.one_of(st.none(), st.integers(min_value=0, max_value=1024)),
)
def test_a_frame_of_another_schema_is_always_refused_as_a_frame(data: bytes, kind: str, due: int | None):
    batch = _wrong_frame(kind, data)
    with pytest.raises(FrameRejectedError, match=r"^peer 7 sent "):
        unframe(batch, len(data) if due is None else due, "peer 7")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.none(), st.integers(0, 255)), min_size=1, max_size=300).filter(lambda v: None in v))
def test_a_frame_with_any_null_is_refused(values: list[int | None]):
    batch = pa.RecordBatch.from_arrays([pa.array(values, pa.uint8())], schema=CHUNK_SCHEMA)
    with pytest.raises(FrameRejectedError, match=r"^peer 7 sent a frame with null bytes$"):
        unframe(batch, len(values), "peer 7")


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=2048), start=st.integers(0, 64))
def test_unframe_of_a_frame_of_any_bytes_returns_exactly_them(data: bytes, start: int):
    padded = bytes(start) + data
    batch = frame_buffer(pa.py_buffer(padded)).slice(start, len(data))
    received = unframe(batch, len(data), "peer 7")
    assert received.to_pybytes() == data
    assert digest(received) == digest(data)


# --- config -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"max_message_bytes": 0}, r"wire\.max_message_bytes must be at least 1, got 0"),
        ({"streams_per_hotkey": -1}, r"wire\.streams_per_hotkey must be at least 1, got -1"),
        ({"call_timeout_s": 0.0}, r"wire\.call_timeout_s must be positive"),
        ({"tls_cert": "cert.pem"}, r"wire\.tls_cert and wire\.tls_key go together"),
        ({"port_range": "9000"}, r"wire\.port_range must be FIRST:LAST with 1 <= FIRST <= LAST <= 65535, got '9000'"),
        ({"port_range": "9010:9000"}, r"wire\.port_range must be FIRST:LAST .*, got '9010:9000'"),
        ({"port_range": "0:10"}, r"wire\.port_range must be FIRST:LAST"),
    ],
)
def test_wire_config_refuses_settings_that_cannot_work(changes: dict, match: str):
    with pytest.raises(ValueError, match=match):
        WireConfig(**changes)


def test_endpoints_bind_the_first_free_ports_of_the_port_range(chain):
    start = free_port_run(3)
    config = WireConfig(port_range=f"{start}:{start + 2}")
    metagraph = MetagraphCache(chain)
    taken = socket.socket()
    taken.bind(("127.0.0.1", start))  # something else holds the first port
    taken.listen()
    first = Probe(metagraph, config)
    second = Probe(metagraph, config)
    try:
        assert (first.port, second.port) == (start + 1, start + 2)
        with pytest.raises(EndpointError, match=rf"^no port of wire\.port_range {start}:{start + 2} is free on 127"):
            Probe(metagraph, config)
        with pytest.raises(EndpointError, match=rf"^port 1 is outside wire\.port_range {start}:{start + 2}; listen"):
            Endpoint("127.0.0.1:1", SERVER, metagraph, RULES, config)
    finally:
        first.shutdown()
        second.shutdown()
        taken.close()


def test_a_peer_takes_the_seeds_port_range_and_checks_it():
    assert Peer(1, 1, None, None, 0, "embedded", "9000:9010").wire.ports == range(9000, 9011)
    with pytest.raises(ValueError, match=r"^wire\.port_range must be FIRST:LAST with 1 <= FIRST <= LAST <= 65535"):
        Peer(1, 1, port_range="9000-9010")


def free_port_run(count: int) -> int:
    """The first of `count` consecutive ports that are free now."""
    for start in range(20000, 60000, 97):
        with contextlib.ExitStack() as held:
            try:
                for port in range(start, start + count):
                    held.enter_context(socket.socket()).bind(("127.0.0.1", port))
            except OSError:
                continue
        return start
    raise RuntimeError("no free run of ports")


# --- a served endpoint --------------------------------------------------------------------------------------------

RULES = {
    "echo": Rule(),
    "secret": Rule(permit=True),
    "grow": Rule(),
    "job": Rule(),
    "fail": Rule(),
    "unhandled": Rule(),
    "stream": Rule(),
}


class Probe(Endpoint):
    """An endpoint with one action of each kind, and an exchange that acks then reads until the stream ends."""

    def __init__(self, metagraph: MetagraphCache, config: WireConfig, counted: list[str] | None = None):
        """`counted` gets the error of every refusal."""
        super().__init__(
            "127.0.0.1:0", SERVER, metagraph, RULES, config, (counted if counted is not None else []).append
        )

    def actions(self) -> dict[str, Callable[[Caller, bytes], bytes]]:
        return {
            "echo": lambda caller, payload: payload,
            "secret": lambda caller, payload: caller.hotkey.encode(),
            "grow": lambda caller, payload: b"x" * int(payload),
            "job": self._no_such_job,
            "fail": self._fail,
        }

    @staticmethod
    def _no_such_job(caller: Caller, payload: bytes) -> bytes:
        raise JobError("no such job")

    @staticmethod
    def _fail(caller: Caller, payload: bytes) -> bytes:
        raise RuntimeError("a bug in the handler")

    def streams(self):
        return {"stream": self._stream}

    @staticmethod
    def _stream(caller: Caller, payload: bytes, reader, writer) -> None:
        writer.begin(CHUNK_SCHEMA)
        writer.write_batch(frame_buffer(pa.py_buffer(b"ack")))
        for _ in reader:
            pass


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    chain = ChainConfig(state_dir=str(tmp_path_factory.mktemp("wire-chain"))).open()
    chain.register(VALIDATOR.ss58_address, COLD, stake=1000.0)
    chain.register(PLAIN.ss58_address, COLD)
    chain.register(ED25519.ss58_address, COLD)  # registered, so only its scheme can refuse it
    return chain


@pytest.fixture(scope="module")
def endpoint(chain) -> Iterator[Probe]:
    probe = Probe(MetagraphCache(chain), WireConfig(max_message_bytes=MAX_MESSAGE_BYTES))
    yield probe
    probe.shutdown()


@pytest.fixture
def remote(endpoint) -> Iterator[Callable[..., Remote]]:
    """remote(keypair, hotkey=the endpoint's, config=WireConfig()): a client of the endpoint, closed afterwards."""
    opened: list[Remote] = []

    def make(keypair: Keypair, hotkey: str | None = None, config: WireConfig | None = None) -> Remote:
        client = Remote(
            "endpoint", endpoint.address, hotkey or endpoint.hotkey, keypair, config or WireConfig(), netuid=NETUID
        )
        opened.append(client)
        return client

    yield make
    for client in opened:
        client.close()


@pytest.fixture(scope="module")
def raw_client(endpoint) -> Iterator[fl.FlightClient]:
    client = fl.FlightClient(f"grpc://{endpoint.address}")
    yield client
    client.close()


def raw_action(client: fl.FlightClient, payload: bytes, headers: list) -> list[bytes]:
    """A call of `payload` sent with exactly `headers` (which name the call); its answers; Flight errors
    translated to ours."""
    try:
        writer, reader = client.do_exchange(
            fl.FlightDescriptor.for_command(payload), fl.FlightCallOptions(headers=headers, timeout=10)
        )
        writer.done_writing()
        return [chunk.app_metadata.to_pybytes() for chunk in reader]
    except fl.FlightError as e:
        raise translated(e, "endpoint") from None


def hand_signed(keypair: Keypair, call: str, payload: bytes, receiver: str, nonce_ns: int) -> list:
    """The headers call_headers would make, with a nonce of our choosing."""
    target = f"/{NETUID}/{call}?sha256={payload_digest(payload)}"
    signed = http_auth.sign(keypair, method=CALL_METHOD.name, path=target, receiver_ss58=receiver, nonce_ns=nonce_ns)
    return [(k.lower().encode(), v.encode()) for k, v in signed.items()] + [(CALL_HEADER.encode(), target.encode())]


@contextmanager
def refused(cls: type, match: str):
    """Expect exactly `cls` (not a sibling or a subclass), its message matching `match`."""
    with pytest.raises(MapReduceError, match=match) as caught:
        yield caught
    assert type(caught.value) is cls, f"{type(caught.value).__name__}: {caught.value}"


def test_every_refusal_is_counted_by_its_error_and_an_answer_is_not(chain):
    counted: list[str] = []
    probe = Probe(MetagraphCache(chain), WireConfig(max_message_bytes=MAX_MESSAGE_BYTES), counted)
    clients = [
        Remote("endpoint", probe.address, probe.hotkey, k, WireConfig(), netuid=NETUID) for k in (PLAIN, STRANGER)
    ]
    try:
        assert clients[0].call("echo", b"hello") == b"hello"
        with refused(NotRegisteredError, r"is not registered on"):
            clients[1].call("echo", b"hello")
        with refused(LimitExceededError, r"over wire.max_message_bytes"):
            clients[0].call("echo", b"x" * (MAX_MESSAGE_BYTES + 1))
        with refused(JobError, r"no such job"):
            clients[0].call("job", b"")
        assert counted == ["NotRegisteredError", "LimitExceededError", "JobError"]
    finally:
        for client in clients:
            client.close()
        probe.shutdown()


def test_a_registered_caller_gets_its_echo(remote):
    assert remote(PLAIN).call("echo", b"hello") == b"hello"
    assert remote(VALIDATOR).call("echo", b"{}") == b"{}"


def test_a_permit_holder_makes_a_validator_only_call_as_itself(remote):
    assert remote(VALIDATOR).call("secret", b"?") == VALIDATOR.ss58_address.encode()


def test_a_validator_only_call_without_a_permit_is_refused(remote, chain):
    with refused(NoValidatorPermitError, r"^endpoint refused the call: secret is for validators") as caught:
        remote(PLAIN).call("secret", b"?")
    assert "validator permit" in str(caught.value)
    assert PLAIN.ss58_address in str(caught.value)
    assert chain.describe() in str(caught.value)


def test_an_unregistered_caller_is_refused(remote):
    with refused(NotRegisteredError, rf"^endpoint refused the call: hotkey {STRANGER.ss58_address} is not registered"):
        remote(STRANGER).call("echo", b"hello")


def test_a_call_signed_for_another_receiver_is_refused(remote):
    with refused(WrongReceiverError, r"^endpoint refused the call: btauth: .*different receiving hotkey"):
        remote(PLAIN, hotkey=VALIDATOR.ss58_address).call("echo", b"hello")


def test_an_ed25519_caller_is_refused_even_when_registered(remote):
    with refused(MalformedMessageError, r"only sr25519 hotkeys may call"):
        remote(ED25519).call("echo", b"hello")


def test_a_call_not_in_the_rules_is_refused(remote):
    with refused(
        MalformedMessageError, r"^endpoint refused the call: this endpoint serves no nope call as DO_EXCHANGE$"
    ):
        remote(PLAIN).call("nope", b"hello")


def test_a_call_made_with_another_verb_than_its_rule_is_refused(raw_client):
    headers = call_headers(PLAIN, fl.FlightMethod.DO_ACTION, "echo", b"hello", SERVER.ss58_address, NETUID)
    with refused(MalformedMessageError, r"serves no echo call as DO_ACTION"):
        try:
            list(raw_client.do_action(fl.Action("echo", b"hello"), fl.FlightCallOptions(headers=headers, timeout=10)))
        except fl.FlightError as e:
            raise translated(e, "endpoint") from None


def test_a_ruled_call_without_a_handler_is_answered_outside_the_protocol(remote):
    with refused(EndpointError, r"^endpoint answered outside the protocol: no action 'unhandled' here$"):
        remote(PLAIN).call("unhandled", b"hello")


def test_a_payload_other_than_the_signed_one_is_refused(raw_client):
    headers = call_headers(PLAIN, CALL_METHOD, "echo", b"signed payload", SERVER.ss58_address, NETUID)
    with refused(BadSignatureError, r"the echo payload of .* is not the one its signature covers"):
        raw_action(raw_client, b"another payload", headers)


def test_a_call_signed_for_another_subnet_is_refused_though_the_same_hotkeys_serve_both(raw_client):
    headers = call_headers(PLAIN, CALL_METHOD, "echo", b"hello", SERVER.ss58_address, NETUID + 1)
    with refused(
        WrongReceiverError,
        rf"^endpoint refused the call: the call was signed for netuid {NETUID + 1}, and this endpoint serves netuid "
        rf"{NETUID}$",
    ):
        raw_action(raw_client, b"hello", headers)
    assert raw_action(
        raw_client, b"hello", call_headers(PLAIN, CALL_METHOD, "echo", b"hello", SERVER.ss58_address, NETUID)
    ) == [b"hello"]


def test_replayed_headers_are_refused(raw_client):
    headers = call_headers(PLAIN, CALL_METHOD, "echo", b"once", SERVER.ss58_address, NETUID)
    assert raw_action(raw_client, b"once", headers) == [b"once"]
    with refused(ReplayedMessageError, r"^endpoint refused the call: btauth: this nonce was already accepted"):
        raw_action(raw_client, b"once", headers)


def test_a_restarted_endpoint_refuses_a_replay_of_what_it_accepted_before(chain):
    config = WireConfig(auth_skew_s=0.2)
    headers = signed_headers(PLAIN, "echo", b"once")
    Authenticator(SERVER.ss58_address, MetagraphCache(chain), RULES, config)._authenticate(CALL_METHOD, headers)
    time.sleep(0.3)  # the endpoint restarts, more than the skew after the call was signed
    restarted = Authenticator(SERVER.ss58_address, MetagraphCache(chain), RULES, config)
    with refused(ReplayedMessageError, r"^btauth: the call was signed before this endpoint started, so it may be"):
        restarted._authenticate(CALL_METHOD, headers)


@pytest.mark.parametrize("offset_s", [-60, 60])
def test_a_nonce_outside_the_freshness_window_is_refused(raw_client, offset_s: int):
    headers = hand_signed(PLAIN, "echo", b"hi", SERVER.ss58_address, time.time_ns() + offset_s * S)
    with refused(ExpiredMessageError, r"^endpoint refused the call: btauth: nonce is "):
        raw_action(raw_client, b"hi", headers)


def test_hand_signed_headers_with_a_fresh_nonce_are_accepted(raw_client):
    headers = hand_signed(PLAIN, "echo", b"hi", SERVER.ss58_address, time.time_ns())
    assert raw_action(raw_client, b"hi", headers) == [b"hi"]


def test_a_call_without_the_call_header_is_refused(raw_client):
    headers = call_headers(PLAIN, CALL_METHOD, "echo", b"hi", SERVER.ss58_address, NETUID)
    headers = [(k, v) for k, v in headers if k != CALL_HEADER.encode()]
    with refused(MalformedMessageError, rf"needs the {CALL_HEADER} header"):
        raw_action(raw_client, b"hi", headers)


def test_a_call_without_any_headers_is_refused(raw_client):
    with refused(MalformedMessageError, rf"needs the {CALL_HEADER} header"):
        raw_action(raw_client, b"hi", [])


def test_a_btauth_header_sent_twice_is_refused(raw_client):
    headers = call_headers(PLAIN, CALL_METHOD, "echo", b"hi", SERVER.ss58_address, NETUID)
    nonce = next(v for k, v in headers if k == b"x-bittensor-nonce")
    with refused(MalformedMessageError, r"header x-bittensor-nonce sent 2 times"):
        raw_action(raw_client, b"hi", [*headers, (b"x-bittensor-nonce", nonce)])


def test_a_handler_raising_our_error_reaches_the_caller_as_that_error(remote):
    with refused(JobError, r"^no such job$"):
        remote(PLAIN).call("job", b"")


def test_a_handler_failing_otherwise_is_logged_and_reported_only_as_a_failure(remote, caplog):
    outside = r"^endpoint answered outside the protocol: .*failed to answer"
    with (
        caplog.at_level(logging.ERROR, logger="mapreduce_ray.wire.endpoint"),
        refused(EndpointError, outside) as caught,
    ):
        remote(PLAIN).call("fail", b"")
    assert "a bug in the handler" not in str(caught.value)  # the caller learns nothing of the server's insides
    failures = [r for r in caplog.records if r.name == "mapreduce_ray.wire.endpoint" and r.exc_info]
    assert failures and isinstance(failures[0].exc_info[1], RuntimeError)


def test_an_action_over_max_message_bytes_is_refused(remote):
    assert remote(PLAIN).call("echo", bytes(MAX_MESSAGE_BYTES)) == bytes(MAX_MESSAGE_BYTES)
    with refused(
        LimitExceededError, rf"the echo call's payload of {MAX_MESSAGE_BYTES + 1} bytes is over wire.max_message_bytes"
    ):
        remote(PLAIN).call("echo", bytes(MAX_MESSAGE_BYTES + 1))


def test_an_answer_over_the_callers_max_message_bytes_is_refused_by_the_caller(remote):
    small = remote(PLAIN, config=WireConfig(max_message_bytes=1000))
    assert small.call("grow", b"1000") == b"x" * 1000
    with refused(LimitExceededError, r"^endpoint answered grow with 1500 bytes, over wire.max_message_bytes$"):
        small.call("grow", b"1500")


def test_an_answer_over_twice_the_callers_limit_is_cut_by_grpc(remote):
    with refused(EndpointError, r"the call was cancelled"):
        remote(PLAIN, config=WireConfig(max_message_bytes=1000)).call("grow", b"3000")


@pytest.fixture
def one_stream_each(chain) -> Iterator[Probe]:
    probe = Probe(MetagraphCache(chain), WireConfig(streams_per_hotkey=1))
    yield probe
    probe.shutdown()


def test_a_hotkey_may_hold_only_streams_per_hotkey_calls_open(one_stream_each):
    def client(keypair: Keypair) -> Remote:
        return Remote("endpoint", one_stream_each.address, one_stream_each.hotkey, keypair, WireConfig(), netuid=NETUID)

    plain, validator = client(PLAIN), client(VALIDATOR)
    try:
        writer, reader = plain.exchange("stream", b"open")
        assert reader.read_chunk().data.column(0).to_pylist() == list(b"ack")  # the endpoint holds the stream
        with refused(LimitExceededError, rf"hotkey {PLAIN.ss58_address} already holds 1 open calls here"):
            plain.call("echo", b"second")
        assert validator.call("echo", b"another hotkey") == b"another hotkey"
        writer.done_writing()
        writer.close()
        assert plain.call("echo", b"after") == b"after"
    finally:
        plain.close()
        validator.close()


def test_callers_together_may_hold_only_calls_per_endpoint_calls_open(chain):
    probe = Probe(MetagraphCache(chain), WireConfig(calls_per_endpoint=1))
    plain, validator = (
        Remote("endpoint", probe.address, probe.hotkey, keypair, WireConfig(), netuid=NETUID)
        for keypair in (PLAIN, VALIDATOR)
    )
    try:
        writer, reader = plain.exchange("stream", b"open")
        assert reader.read_chunk().data.column(0).to_pylist() == list(b"ack")  # the endpoint holds the stream
        with refused(LimitExceededError, r"^endpoint refused the call: this endpoint already holds 1 open calls "):
            validator.call("echo", b"another hotkey")
        writer.done_writing()
        writer.close()
        assert validator.call("echo", b"after") == b"after"
    finally:
        plain.close()
        validator.close()
        probe.shutdown()


# --- TLS ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_endpoint(chain, tmp_path_factory) -> Iterator[tuple[Probe, str]]:
    """The probe endpoint serving grpc+tls with a new certificate, and that certificate's key digest."""
    folder = tmp_path_factory.mktemp("tls")
    cert, secret = str(folder / "endpoint.pem"), str(folder / "endpoint.key")
    fingerprint = create_certificate(cert, secret)
    probe = Probe(MetagraphCache(chain), WireConfig(tls_cert=cert, tls_key=secret))
    yield probe, fingerprint
    probe.shutdown()


def test_over_tls_a_caller_pinning_the_announced_key_digest_is_answered(tls_endpoint):
    probe, fingerprint = tls_endpoint
    client = Remote("endpoint", probe.address, probe.hotkey, PLAIN, WireConfig(), fingerprint, netuid=NETUID)
    try:
        assert client.call("echo", b"over tls") == b"over tls"
    finally:
        client.close()


def test_over_tls_an_endpoint_whose_key_is_not_the_announced_one_is_refused_before_any_call(tls_endpoint):
    probe, fingerprint = tls_endpoint
    announced = "0" * 64
    client = Remote("miner 'miner-3'", probe.address, probe.hotkey, PLAIN, WireConfig(), announced, netuid=NETUID)
    with pytest.raises(CertificateMismatchError) as refused:
        client.call("echo", b"never sent")
    assert str(refused.value) == (
        f"miner 'miner-3' at {probe.address} serves a TLS key (sha256 {fingerprint[:16]}...) other than the one "
        f"its hotkey announced on chain (sha256 {announced[:16]}...): refusing to connect"
    )


def test_a_plain_caller_of_a_tls_endpoint_and_a_tls_caller_of_a_plain_one_cannot_connect(tls_endpoint, endpoint):
    probe, fingerprint = tls_endpoint
    plain = Remote("endpoint", probe.address, probe.hotkey, PLAIN, WireConfig(call_timeout_s=5.0), netuid=NETUID)
    with pytest.raises(EndpointError, match=r"^endpoint cannot be reached: "):
        plain.call("echo", b"x")
    pinning = Remote(
        "endpoint", endpoint.address, endpoint.hotkey, PLAIN, WireConfig(call_timeout_s=5.0), fingerprint, netuid=NETUID
    )
    with pytest.raises(EndpointError, match=rf"^endpoint cannot be reached over TLS at {endpoint.address}: "):
        pinning.call("echo", b"x")


def test_a_tls_endpoint_answering_its_handshake_slowly_is_cut_off_at_the_deadline():
    """A server that drips handshake bytes forever, each well within a socket timeout: the whole fetch still
    ends by the call's deadline."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def drip() -> None:
        connection, _ = listener.accept()
        with connection:
            for _ in range(50):  # bounded: at most 10 s
                if stop.wait(0.2):
                    return
                connection.sendall(b"\x16")

    threading.Thread(target=drip, daemon=True).start()
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    try:
        with pytest.raises(EndpointError) as cut:
            pinned_certificate("miner 'miner-5'", address, "0" * 64, timeout_s=1.0)
        assert str(cut.value) == f"miner 'miner-5' did not finish a TLS handshake at {address} within 1 s"
    finally:
        stop.set()
        listener.close()


def self_signed_files(folder, name: str, dns: str = "mapreduce-ray", days: tuple[int, int] = (-1, 30)):
    """(certificate, key) files of a self-signed certificate naming `dns`, valid `days` around today."""
    now = datetime.datetime.now(datetime.timezone.utc)
    pem, secret = self_signed(dns, now + datetime.timedelta(days=days[0]), now + datetime.timedelta(days=days[1]))
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    cert.write_bytes(pem)
    key.write_bytes(secret)
    return str(cert), str(key)


def test_a_certificate_callers_cannot_pin_is_refused_in_one_line_naming_the_fix(tmp_path):
    fix = "make one with python -m jobs.certificate cert=PATH key=PATH"
    good = self_signed_files(tmp_path, "good")
    check_certificate(*good)
    expired = self_signed_files(tmp_path, "expired", days=(-30, -1))
    with pytest.raises(
        ValueError, match=rf"^{expired[0]} is valid from \d{{4}}-\d\d-\d\d to \d{{4}}-\d\d-\d\d, not now; {fix}$"
    ):
        check_certificate(*expired)
    other_name = self_signed_files(tmp_path, "other", dns="miner.example")
    with pytest.raises(
        ValueError, match=rf"^{other_name[0]} does not name mapreduce-ray \(callers ask for that name\); {fix}$"
    ):
        check_certificate(*other_name)
    with pytest.raises(
        ValueError, match=rf"^{expired[1]} is not the private key of {good[0]}; pass the pair, or {fix}$"
    ):
        check_certificate(good[0], expired[1])
    with pytest.raises(ValueError, match=r"^wire\.tls_cert/wire\.tls_key: cannot read a certificate and its key \("):
        check_certificate(str(tmp_path / "missing.pem"), good[1])


def test_a_certificate_is_never_written_over(tmp_path):
    cert, secret = tmp_path / "endpoint.pem", tmp_path / "endpoint.key"
    fingerprint = create_certificate(str(cert), str(secret))
    assert key_fingerprint(cert.read_bytes()) == fingerprint
    assert secret.stat().st_mode & 0o777 == 0o600
    kept = cert.read_bytes()
    with pytest.raises(FileExistsError, match=rf"^{cert} exists; remove it, or pass other paths"):
        create_certificate(str(cert), str(tmp_path / "other.key"))
    assert cert.read_bytes() == kept and not (tmp_path / "other.key").exists()


# --- errors across the wire ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        b'{"error": "SystemExit"}',
        b'{"error": "PEER_FAULTS"}',
        b'{"error": ["JobError"]}',
        b'["JobError"]',
        b'{"error": "JobError"',
        b"\xff\xfe",
        b"",
        json.dumps({"error": "JobError", "pad": "x" * MAX_EXTRA_BYTES}).encode(),
    ],
)
def test_an_error_not_naming_one_of_ours_is_an_endpoint_error(extra: bytes):
    error = translated(fl.FlightServerError("something odd", extra_info=extra), "miner 3")
    assert type(error) is EndpointError
    assert str(error) == "miner 3 answered outside the protocol: something odd"


def test_an_unreachable_endpoint_is_an_endpoint_error():
    error = translated(fl.FlightUnavailableError("connection refused"), "miner 3")
    assert type(error) is EndpointError
    assert str(error).startswith("miner 3 cannot be reached: ")


def test_a_timed_out_call_is_a_round_timeout():
    error = translated(fl.FlightTimedOutError("deadline exceeded"), "miner 3")
    assert type(error) is RoundTimeoutError
    assert str(error) == "miner 3 did not answer in time"


def test_a_cancelled_call_is_an_endpoint_error():
    assert type(translated(fl.FlightCancelledError("cancelled"), "miner 3")) is EndpointError


def test_a_stream_broken_by_a_message_over_the_size_limit_says_so():
    grpc = OSError(
        "gRPC returned resource exhausted error, with message: CLIENT: Received message larger than max "
        "(197556 vs. 131072). gRPC client debug context: RESOURCE_EXHAUSTED"
    )
    assert stream_fault(grpc) == "sent a message over the size limit (197556 bytes, at most 131072)"
    assert stream_fault(ValueError("bad\n  batch")) == "broke off the job stream (bad batch)"


@pytest.mark.parametrize(
    ("error", "kind", "text"),
    [
        (JobError("no such\n   job"), fl.FlightServerError, "no such job"),
        (NotRegisteredError("hotkey x is not registered"), fl.FlightUnauthenticatedError, None),
    ],
)
def test_our_errors_travel_by_class_name_and_one_line_of_text(error: MapReduceError, kind: type, text: str | None):
    sent = refusal(error)
    assert type(sent) is kind
    received = translated(sent, "miner 3")
    assert type(received) is type(error)
    if isinstance(error, IdentityError):
        assert str(received) == f"miner 3 refused the call: {error}"
    else:
        assert str(received) == text


def test_a_long_error_message_is_cut_short():
    received = translated(refusal(JobError("y" * 10 * MAX_MESSAGE_CHARS)), "miner 3")
    assert type(received) is JobError
    assert len(str(received)) <= MAX_MESSAGE_CHARS


# --- fuzzing the authenticator ------------------------------------------------------------------------------------

HEADER_NAMES = [
    http_auth.HEADER_VERSION,
    http_auth.HEADER_HOTKEY,
    http_auth.HEADER_RECEIVER,
    http_auth.HEADER_NONCE,
    http_auth.HEADER_CRYPTO,
    http_auth.HEADER_SIGNATURE,
]
KEYS = st.one_of(
    st.sampled_from([n.lower() for n in HEADER_NAMES] + HEADER_NAMES + [CALL_HEADER, CALL_HEADER.upper()]),
    st.text(max_size=24),
)
VALUES = st.one_of(
    st.sampled_from(
        [
            "",
            "1",
            "2",
            "0",
            "sr25519",
            "ed25519",
            "ecdsa",
            "0x",
            "0x" + "00" * 64,
            "0x" + "ab" * 63,
            f"/{NETUID}/echo?sha256=" + "0" * 64,
            f"/{NETUID}/secret?sha256=" + "f" * 64,
            f"/{NETUID + 1}/echo?sha256=" + "0" * 64,
            f"/{NETUID}/nope?sha256=" + "1" * 64,
            "/echo?sha256=" + "0" * 64,
            PLAIN.ss58_address,
            STRANGER.ss58_address,
            SERVER.ss58_address,
            str(time.time_ns()),
            "-1",
            "9" * 5000,
            "1_000",
            "²",
        ]
    ),
    st.integers().map(str),
    st.text(max_size=80),
)
BTAUTH_KEYS = [n.lower() for n in HEADER_NAMES]
EDITS = st.lists(
    st.one_of(
        st.tuples(st.just("drop"), KEYS),
        st.tuples(st.just("set"), KEYS, VALUES),
        st.tuples(st.just("add"), KEYS, VALUES),
        st.tuples(st.just("graft"), st.sampled_from([*BTAUTH_KEYS, CALL_HEADER])),
    ),
    max_size=6,
)


@pytest.fixture(scope="module")
def authenticator(chain) -> Authenticator:
    return Authenticator(SERVER.ss58_address, MetagraphCache(chain), RULES, WireConfig())


def signed_headers(keypair: Keypair, call: str, payload: bytes) -> dict[str, list[str]]:
    """call_headers as the server middleware sees them."""
    return {
        k.decode(): [v.decode()]
        for k, v in call_headers(keypair, CALL_METHOD, call, payload, SERVER.ss58_address, NETUID)
    }


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(signer=st.sampled_from([None, PLAIN, VALIDATOR, ED25519]), call=st.sampled_from(list(RULES)), edits=EDITS)
def test_any_headers_are_accepted_or_refused_as_a_rejected_message(
    authenticator: Authenticator, signer: Keypair | None, call: str, edits: list[tuple]
):
    """Start from no headers or a valid signed set and edit it at random (junk, or values grafted from another
    valid call); sent twice: only a MessageRejectedError may come out, and an accepted set is refused as a replay."""
    headers = {} if signer is None else signed_headers(signer, call, b"payload")
    donor = signed_headers(VALIDATOR, "echo", b"another payload")
    for edit in edits:
        if edit[0] == "drop":
            headers.pop(edit[1], None)
        elif edit[0] == "set":
            headers[edit[1]] = [edit[2]]
        elif edit[0] == "add":
            headers.setdefault(edit[1], []).append(edit[2])
        else:
            headers[edit[1]] = donor.get(edit[1], ["grafted"])
    try:
        caller = authenticator._authenticate(CALL_METHOD, headers)
    except MessageRejectedError as e:
        event(type(e).__name__)
        with pytest.raises(MessageRejectedError):  # refused again, with no effect from the first attempt
            authenticator._authenticate(CALL_METHOD, headers)
        return
    except NoValidatorPermitError:  # only a signature that verifies gets this far: the signed call needs a permit
        event("NoValidatorPermitError")
        assert signer is PLAIN and headers[CALL_HEADER] == [f"/{NETUID}/secret?sha256={payload_digest(b'payload')}"]
        return
    event("accepted")
    caller.call_completed(None)
    assert caller.hotkey in (PLAIN.ss58_address, VALIDATOR.ss58_address)
    with refused(ReplayedMessageError, r"^btauth: this nonce was already accepted"):
        authenticator._authenticate(CALL_METHOD, headers)
