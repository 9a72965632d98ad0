"""The limits and deadlines of a party's endpoint and of its calls to others, defined once."""

from __future__ import annotations

from dataclasses import dataclass

KIB = 1024
MIB = 1024 * KIB


@dataclass(frozen=True)
class WireConfig:
    """Limits every endpoint enforces on what it receives, and deadlines of the calls it makes.

    max_message_bytes: the largest message sent or accepted (a chunk frame with its metadata); a job's
        chunks must fit. max_metadata_bytes: the largest signed message riding beside a frame.
    streams_per_hotkey: calls one hotkey may hold open at one endpoint at once.
    calls_per_endpoint: calls all callers together may hold open at one endpoint at once.
    window_bytes: bytes a job stream may have at a miner that are not yet reduced; it reads no further
        until they are (flow control by bytes in flight).
    call_timeout_s: deadline of one request/answer call (join, admit, report, ticket).
    auth_max_age_s, auth_skew_s: how old, and how far ahead of this clock, a call's btauth nonce may be.
    tls_cert, tls_key: PEM files of this party's endpoint certificate; when both are set it serves
        grpc+tls and announces the certificate's fingerprint on chain, so callers pin it.
    port_range: "first:last", the ports this party's endpoints may bind (the firewall rule to open): an
        endpoint told port 0 takes the first free one, one told another port must name one inside it.
        None: any port.
    """

    max_message_bytes: int = 16 * MIB
    max_metadata_bytes: int = 64 * KIB
    streams_per_hotkey: int = 64
    calls_per_endpoint: int = 1024
    window_bytes: int = 64 * MIB
    call_timeout_s: float = 30.0
    auth_max_age_s: float = 10.0
    auth_skew_s: float = 2.0
    tls_cert: str | None = None
    tls_key: str | None = None
    port_range: str | None = None

    def __post_init__(self):
        for name in (
            "max_message_bytes",
            "max_metadata_bytes",
            "streams_per_hotkey",
            "calls_per_endpoint",
            "window_bytes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"wire.{name} must be at least 1, got {getattr(self, name)!r}")
        for name in ("call_timeout_s", "auth_max_age_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"wire.{name} must be positive, got {getattr(self, name)!r}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("wire.tls_cert and wire.tls_key go together: set both (serve grpc+tls) or neither")
        _port_range(self.port_range)

    @property
    def ports(self) -> range | None:
        """The ports of `port_range` (None: any)."""
        return _port_range(self.port_range)

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


def _port_range(value: str | None) -> range | None:
    if value is None:
        return None
    first, sep, last = str(value).partition(":")
    if not (sep and first.isdigit() and last.isdigit() and 1 <= int(first) <= int(last) <= 65535):
        raise ValueError(f"wire.port_range must be FIRST:LAST with 1 <= FIRST <= LAST <= 65535, got {value!r}")
    return range(int(first), int(last) + 1)
