"""Flight's DoExchange spoken by hand over gRPC, so tests can send what no Arrow library would: FlightData
messages built field by field from raw IPC headers, bodies and metadata, on either side of a stream."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator

import grpc
import pyarrow as pa

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


def exchange(address: str, headers: list[tuple[bytes, bytes]], messages: Iterable[bytes], timeout_s: float) -> Iterator:
    """The FlightData an endpoint answers to `messages` sent on a DoExchange with `headers` (raw bytes each);
    grpc.RpcError when it refuses the call."""
    channel = grpc.insecure_channel(address)
    call = channel.stream_stream(EXCHANGE, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    metadata = [(k.decode(), v.decode()) for k, v in headers]
    try:
        yield from call(iter(messages), metadata=metadata, timeout=timeout_s)
    finally:
        channel.close()
