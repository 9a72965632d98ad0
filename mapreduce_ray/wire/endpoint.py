"""A party's Flight endpoint, and its calls to another party's.

Every call is a Flight DoExchange, whose headers the server checks before it reads the call's
first message (for a unary call, gRPC would receive the whole request first): its payload is the
command of that message's descriptor. `Endpoint` is the server base: btauth middleware on every
call (`auth.Authenticator`), calls dispatched by their signed name to request/answer actions
(the answer rides as the metadata of one message) or to streams, each taking the authenticated
caller and the payload (checked against the signed digest first), our errors sent back by class
name. `Remote` is the client: one connection to one endpoint, every call signed for that
endpoint's hotkey, request/answer calls under a deadline, and the size limit applied to what
comes back. Locations are `host:port`; with a certificate the scheme is grpc+tls, and the
client pins the certificate whose key the endpoint's hotkey announced on chain (`tls`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pyarrow as pa
import pyarrow.flight as fl

from mapreduce_ray.errors import EndpointError, LimitExceededError, MapReduceError
from mapreduce_ray.protocol import MetagraphCache
from mapreduce_ray.wire.auth import CALL_METHOD, Authenticator, Caller, Rule, call_headers
from mapreduce_ray.wire.config import WireConfig
from mapreduce_ray.wire.errors import refusal, translated
from mapreduce_ray.wire.tls import TLS_NAME, pinned_certificate

log = logging.getLogger(__name__)

Action = Callable[[Caller, bytes], bytes]
Stream = Callable[[Caller, bytes, object, object], None]  # (caller, payload, reader, writer)
MAX_LOCATIONS = 64  # endpoints one `locations` answer may list
MAX_LOCATION_BYTES = 300
_LOCATION = re.compile(r"grpc(?:\+tls)?://((?:[\w.-]+|\[[0-9a-fA-F:.]+\]):(\d{1,5}))")


def location(address: str, tls: bool) -> str:
    """The Flight location of `host:port`."""
    return f"{'grpc+tls' if tls else 'grpc'}://{address}"


def address_of(uri: bytes, who: str) -> str:
    """The host:port of a Flight location `who` listed; EndpointError unless it is one `location` makes."""
    match = _LOCATION.fullmatch(uri.decode("ascii", "replace")) if len(uri) <= MAX_LOCATION_BYTES else None
    if match is None or not 0 < int(match[2]) < 65536:
        raise EndpointError(f"{who} listed a location outside the protocol: {uri[:MAX_LOCATION_BYTES]!r}")
    return match[1]


def _addresses(host: str, port: int, config: WireConfig) -> Iterator[str]:
    """Where an endpoint told to listen on host:port may bind: there, or with port 0 and a `port_range`, each port
    of the range that looks free."""
    ports = config.ports
    if ports is None or port != 0:
        if ports is not None and port not in ports:
            raise EndpointError(
                f"port {port} is outside wire.port_range {config.port_range}; listen on port 0 (the first free port "
                "of the range) or on one inside it"
            )
        yield f"{host}:{port}"
        return
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    for candidate in ports:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((bare, candidate))
            except OSError:
                continue
        yield f"{host}:{candidate}"


class Endpoint(fl.FlightServerBase):
    """A Flight server speaking for `keypair`'s hotkey on `listen` (host:port; port 0 picks a free one, within
    `config.port_range` when set).

    Subclasses list their calls in `rules` (each a DO_EXCHANGE), their request/answer calls in `actions()` and
    their streamed calls in `streams()`; a stream answers inside `answering()`.
    `on_refusal(error)` is told the class name of every error a call is refused with (for metrics).
    """

    def __init__(
        self,
        listen: str,
        keypair,
        metagraph: MetagraphCache,
        rules: dict[str, Rule],
        config: WireConfig,
        on_refusal: Callable[[str], None] = lambda error: None,
    ):
        self.hotkey = keypair.ss58_address
        self.config = config
        self.metagraph = metagraph
        self.netuid = metagraph.chain.netuid  # of every call it takes and every message it seals
        tls = None
        if config.tls:
            with open(config.tls_cert, "rb") as cert, open(config.tls_key, "rb") as key:
                tls = [fl.CertKeyPair(cert.read(), key.read())]
        self._on_refusal = on_refusal
        auth = Authenticator(self.hotkey, metagraph, rules, config, on_refusal)
        self.host, _, port = listen.rpartition(":")
        for address in _addresses(self.host, int(port), config):
            try:
                super().__init__(location(address, config.tls), tls_certificates=tls, middleware={"auth": auth})
                return
            except pa.ArrowException:
                if config.ports is None:
                    raise
        raise EndpointError(
            f"no port of wire.port_range {config.port_range} is free on {self.host}; widen the range, or stop what "
            "holds its ports"
        )

    @property
    def address(self) -> str:
        """host:port this endpoint listens on."""
        return f"{self.host}:{self.port}"

    def actions(self) -> dict[str, Action]:
        return {}

    def streams(self) -> dict[str, Stream]:
        return {}

    def do_exchange(self, context, descriptor, reader, writer):
        """A call: its payload (the descriptor's command) checked against its size limit and its signed digest,
        then handed to the stream or action of the name it signed."""
        caller: Caller = context.get_middleware("auth")
        payload = descriptor.command
        with self.answering():
            if len(payload) > self.config.max_message_bytes:
                raise LimitExceededError(
                    f"the {caller.call} call's payload of {len(payload)} bytes is over wire.max_message_bytes"
                )
            caller.check_payload(payload)
        stream = self.streams().get(caller.call)
        if stream is not None:
            stream(caller, payload, reader, writer)
            return
        handler = self.actions().get(caller.call)
        if handler is None:
            raise fl.FlightServerError(f"no action {caller.call!r} here")
        with self.answering():
            answer = handler(caller, payload)
        writer.write_metadata(pa.py_buffer(answer))

    @contextmanager
    def answering(self) -> Iterator[None]:
        """Send our errors back to the caller by class name, each counted; log anything else and say only that
        it failed."""
        try:
            yield
        except fl.FlightError:
            raise
        except MapReduceError as e:
            self._on_refusal(type(e).__name__)
            raise refusal(e) from None
        except Exception:
            log.exception("a call failed")
            raise fl.FlightInternalError("the endpoint failed to answer; see its log") from None


class Reply:
    """The messages an endpoint sends back on one call, read in turn (the call lives while this does); what the
    wire throws comes out through `errors` (Remote.errors) as our own errors."""

    def __init__(self, writer, reader, errors: Callable):
        self._writer, self._reader = writer, reader  # dropping the writer would end the call
        self._errors = errors

    @property
    def schema(self) -> pa.Schema:
        with self._errors():
            return self._reader.schema

    def read_chunk(self):
        with self._errors():
            return self._reader.read_chunk()

    def read_all(self) -> pa.Table:
        with self._errors():
            return self._reader.read_all()

    def close(self) -> None:
        """End the call (quietly: how it ended was read already, or does not matter any more)."""
        with contextlib.suppress(fl.FlightError, pa.ArrowException, OSError):
            self._writer.close()


class Remote:
    """Calls to one endpoint (`address`, speaking for `hotkey` on subnet `netuid`), signed by `keypair`. `who`
    names it in errors.

    `fingerprint`: the key digest the endpoint's hotkey announced on chain with its address; when given, the
    endpoint is reached over grpc+tls with its certificate pinned to it (None or "": plain gRPC). The connection,
    and the pinning, happen at the first call.
    """

    def __init__(
        self,
        who: str,
        address: str,
        hotkey: str,
        keypair,
        config: WireConfig,
        fingerprint: str | None = None,
        *,
        netuid: int,
    ):
        self.who, self.address, self.hotkey, self.netuid = who, address, hotkey, netuid
        self._keypair = keypair
        self.config = config
        self._fingerprint = fingerprint or None
        self._client: fl.FlightClient | None = None
        self._connect_lock = threading.Lock()

    @property
    def client(self) -> fl.FlightClient:
        """The Flight client of this endpoint, connected (and its certificate pinned) on first use."""
        with self._connect_lock:
            if self._client is None:
                # gRPC itself cuts a message twice over the limit; anything between reaches our own checks
                options = [("grpc.max_receive_message_length", 2 * self.config.max_message_bytes)]
                tls = {}
                if self._fingerprint is not None:
                    pem = pinned_certificate(self.who, self.address, self._fingerprint, self.config.call_timeout_s)
                    tls = {"tls_root_certs": pem, "override_hostname": TLS_NAME}
                where = location(self.address, self._fingerprint is not None)
                self._client = fl.FlightClient(where, generic_options=options, **tls)
            return self._client

    def call(self, name: str, payload: bytes, timeout_s: float | None = None) -> bytes:
        """The answer of action `name` with `payload` (answers are never empty)."""
        reply = self.fetch(name, payload, timeout_s or self.config.call_timeout_s)
        try:
            answer = reply.read_chunk().app_metadata or pa.py_buffer(b"")
        except StopIteration:
            raise EndpointError(f"{self.who} answered {name} with nothing") from None
        finally:
            reply.close()
        if answer.size > self.config.max_message_bytes:
            raise LimitExceededError(
                f"{self.who} answered {name} with {answer.size} bytes, over wire.max_message_bytes"
            )
        return answer.to_pybytes()

    def exchange(self, name: str, payload: bytes, timeout_s: float | None = None):
        """(writer, reader) of call `name` opened with `payload`, within `timeout_s` (None: no deadline, for a
        stream kept open)."""
        headers = call_headers(self._keypair, CALL_METHOD, name, payload, self.hotkey, self.netuid)
        options = fl.FlightCallOptions(headers=headers, timeout=timeout_s)
        with self.errors():
            return self.client.do_exchange(fl.FlightDescriptor.for_command(payload), options)

    def locations(self, name: str, command: bytes) -> list[str]:
        """The host:port of every endpoint the endpoint lists (Flight locations, a JSON list) for `command`."""
        answer = self.call(name, command)
        try:
            uris = json.loads(answer)
        except ValueError:
            uris = None
        if not isinstance(uris, list) or not 1 <= len(uris) <= MAX_LOCATIONS:
            raise EndpointError(f"{self.who} listed no list of 1 to {MAX_LOCATIONS} locations")
        return [address_of(uri.encode() if isinstance(uri, str) else b"", self.who) for uri in uris]

    def fetch(self, name: str, payload: bytes, timeout_s: float) -> Reply:
        """What the endpoint sends for call `name` with `payload` (nothing more is sent), within `timeout_s`."""
        writer, reader = self.exchange(name, payload, timeout_s)
        with self.errors():
            writer.done_writing()
        return Reply(writer, reader, self.errors)

    @contextmanager
    def errors(self) -> Iterator[None]:
        """Raise what the wire throws as our own errors, naming the endpoint."""
        try:
            yield
        except fl.FlightError as e:
            raise translated(e, self.who) from None
        except pa.ArrowException as e:  # e.g. a location pyarrow cannot dial, or a closed client
            raise EndpointError(f"{self.who} cannot be called at {self.address}: {e}") from None

    def close(self) -> None:
        with self._connect_lock:
            if self._client is not None:
                self._client.close()
