"""Hostile clients of a party's endpoint: the flood test's and the soak's background abuse.

Like the misbehaving miners of actors.behaviours, nothing in the product starts these. `Flood` runs
clients of five kinds against miners' endpoints, one thread each, until stopped:
- unregistered: exchange calls signed by hotkeys the chain does not know;
- replaying: one signed exchange call sent again and again, byte for byte;
- oversize: `admit` calls over wire.max_message_bytes from a registered hotkey without a permit;
- slow-drip: raw TCP sending gRPC's connection preface a byte at a time, then junk;
- holding: a registered hotkey opening exchange calls it never sends a message on, held until the end.
Each client counts what it got. Flight's DoExchange is spoken by hand over gRPC (FlightData built field
by field from raw IPC headers, bodies and metadata), so they can send what no Arrow library would.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import grpc
import pyarrow as pa

from mapreduce_ray.errors import MapReduceError
from mapreduce_ray.messages import StreamOpen, encode
from mapreduce_ray.wire.auth import CALL_METHOD, call_headers
from mapreduce_ray.wire.config import WireConfig
from mapreduce_ray.wire.endpoint import Remote
from mapreduce_ray.wire.tls import TLS_NAME

EXCHANGE = "/arrow.flight.protocol.FlightService/DoExchange"


def _field(number: int, data: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _varint(n: int) -> bytes:
    out = b""
    while True:
        out += bytes([n & 0x7F | (0x80 if n > 0x7F else 0)])
        n >>= 7
        if not n:
            return out


def fields(message: bytes) -> dict[int, bytes]:
    """The length-delimited fields of a protobuf message (all FlightData's are)."""
    fields, i = {}, 0
    while i < len(message):
        tag, i = _read_varint(message, i)
        size, i = _read_varint(message, i)
        fields[tag >> 3], i = message[i : i + size], i + size
    return fields


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    n, shift = 0, 0
    while True:
        byte = data[i]
        n, shift, i = n | (byte & 0x7F) << shift, shift + 7, i + 1
        if not byte & 0x80:
            return n, i


def ipc(message: pa.Buffer) -> tuple[bytes, bytes]:
    """(flatbuffer header, body) of an encapsulated IPC message."""
    raw = message.to_pybytes()
    size = struct.unpack("<i", raw[4:8])[0]
    return raw[8 : 8 + size], raw[8 + size :]


def flight_data(header: bytes, body: bytes = b"", metadata: bytes = b"") -> bytes:
    return _field(2, header) + (_field(3, metadata) if metadata else b"") + (_field(1000, body) if body else b"")


def descriptor(command: bytes) -> bytes:
    """The first FlightData of an exchange: a command descriptor."""
    return _field(1, b"\x08\x02" + _field(2, command))  # FlightDescriptor{type: CMD, cmd: command}


def exchange(
    address: str,
    headers: list[tuple[bytes, bytes]],
    messages: Iterable[bytes],
    timeout_s: float,
    certificate: bytes | None = None,
) -> Iterator:
    """The FlightData an endpoint answers to `messages` sent on a DoExchange with `headers` (raw bytes each),
    over TLS trusting only `certificate` (PEM) when given; grpc.RpcError when it refuses the call."""
    if certificate is None:
        channel = grpc.insecure_channel(address)
    else:
        credentials = grpc.ssl_channel_credentials(root_certificates=certificate)
        channel = grpc.secure_channel(address, credentials, [("grpc.ssl_target_name_override", TLS_NAME)])
    call = channel.stream_stream(EXCHANGE, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    metadata = [(k.decode(), v.decode()) for k, v in headers]
    try:
        yield from call(iter(messages), metadata=metadata, timeout=timeout_s)
    finally:
        channel.close()


@dataclass(frozen=True)
class Target:
    """A miner's endpoint: its name, hotkey and host:port."""

    name: str
    hotkey: str
    address: str


KINDS = ("unregistered", "replaying", "oversize", "slow_drip", "holding")
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class Flood:
    """`per_kind` clients of each kind against `targets` (in turn), on subnet `netuid`, until `finish()` or
    `duration_s`. `replayed` signs the call the replaying clients repeat, `holder` and `sender` are registered
    hotkeys (of the holding and oversize clients), `strangers` unregistered ones; `wire` gives the miners'
    message limit and the clients' deadlines. `outcomes`: client name -> Counter of what it got ("answered"
    when a call went through)."""

    def __init__(
        self,
        targets: list[Target],
        netuid: int,
        replayed,
        holder,
        sender,
        strangers: list,
        wire: WireConfig,
        per_kind: int,
        duration_s: float,
    ):
        self.targets, self.netuid, self.wire = targets, netuid, wire
        self.replayed, self.holder, self.sender, self.strangers = replayed, holder, sender, strangers
        self.duration_s = duration_s
        self.stop = threading.Event()
        self.outcomes: dict[str, Counter] = {}
        self._replays: dict[str, tuple[bytes, list]] = {}
        self.threads = [
            threading.Thread(target=self._run, args=(kind, i), name=f"{kind}-{i}", daemon=True)
            for kind in KINDS
            for i in range(per_kind)
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def finish(self, timeout_s: float = 30.0) -> list[str]:
        """Stop every client; the names of those still running `timeout_s` later (hung)."""
        self.stop.set()
        deadline = time.monotonic() + timeout_s
        for thread in self.threads:
            thread.join(max(deadline - time.monotonic(), 0))
        return [t.name for t in self.threads if t.is_alive()]

    def by_kind(self) -> Counter[tuple[str, str]]:
        """What the clients got, summed by (kind, outcome)."""
        totals: Counter[tuple[str, str]] = Counter()
        for client, got in self.outcomes.items():
            for outcome, n in got.items():
                totals[(client.rsplit("-", 1)[0], outcome)] += n
        return totals

    def _run(self, kind: str, i: int) -> None:
        got = self.outcomes.setdefault(threading.current_thread().name, Counter())
        target = self.targets[i % len(self.targets)]
        deadline = time.monotonic() + self.duration_s
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                getattr(self, kind)(target, i)
                if not self.stop.is_set():  # (a client cut short by the end of the flood returns early)
                    got["answered"] += 1
            except MapReduceError as e:
                got[type(e).__name__] += 1
            except grpc.RpcError as e:
                got[e.code().name] += 1
            except OSError as e:
                got[type(e).__name__] += 1
            time.sleep(0.01)

    def _headers(self, keypair, target: Target, command: bytes) -> list:
        return call_headers(keypair, CALL_METHOD, "exchange", command, target.hotkey, self.netuid)

    def unregistered(self, target: Target, i: int) -> None:
        command = encode(StreamOpen("flood", 1))
        stranger = self.strangers[i % len(self.strangers)]
        for _ in exchange(target.address, self._headers(stranger, target, command), [descriptor(command)], 5.0):
            pass

    def replaying(self, target: Target, i: int) -> None:
        if target.name not in self._replays:
            command = encode(StreamOpen("flood", 1))
            self._replays.setdefault(target.name, (command, self._headers(self.replayed, target, command)))
        command, headers = self._replays[target.name]
        for _ in exchange(target.address, headers, [descriptor(command)], 5.0):
            pass

    def oversize(self, target: Target, i: int) -> None:
        remote = Remote(target.name, target.address, target.hotkey, self.sender, self.wire, netuid=self.netuid)
        try:
            remote.call("admit", bytes(self.wire.max_message_bytes + 1))
        finally:
            remote.close()

    def slow_drip(self, target: Target, i: int) -> None:
        host, _, port = target.address.rpartition(":")
        with socket.create_connection((host, int(port)), timeout=self.wire.call_timeout_s) as sock:
            for byte in PREFACE + b"\xff" * 64:
                if self.stop.is_set():
                    return
                sock.sendall(bytes([byte]))
                time.sleep(0.05)
            while sock.recv(4096):  # the miner's settings and GOAWAY, then the end of the connection
                pass
            raise ConnectionAbortedError("the miner closed the connection")

    def holding(self, target: Target, i: int) -> None:
        """An exchange call whose first message never comes, held until the flood ends."""
        command = encode(StreamOpen("flood", 1))

        def nothing():
            self.stop.wait(self.duration_s)
            return
            yield

        for _ in exchange(target.address, self._headers(self.holder, target, command), nothing(), self.duration_s):
            pass
