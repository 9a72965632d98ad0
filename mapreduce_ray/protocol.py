"""Signed messages between roles: sealed by the sender's hotkey, opened by the receiver.

Wire format (bytes, JSON; nothing is ever unpickled):

    {"scheme": "sr25519", "signature": "0x…", "message": "<canonical JSON>"}

The signature covers the exact UTF-8 bytes of `message`, a JSON object with the
protocol version, kind, the subnet's netuid, sender and receiver hotkeys, timestamp
(ns), a random nonce and the typed body. `Verifier.open` checks, in this order, each
failure its own error: well-formed and of the expected kind; sr25519; the signature;
the netuid (a message sealed on one subnet is refused on every other); the receiver;
the timestamp window; the sender registered on the metagraph (and holding a
validator permit for validator-only kinds); the expected sender, when the receiver
knows it; the nonce not seen before. Nonces live in memory, so a
receiver also refuses what was signed more than the allowed skew before it started:
a restarted receiver takes no replay of what its previous life accepted (a
process restart takes longer than the skew).
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from bittensor.sp_core import CRYPTO_ED25519, CRYPTO_SR25519, verify

from mapreduce_ray.chain.base import Chain, Metagraph, Neuron
from mapreduce_ray.errors import (
    BadSignatureError,
    ExpiredMessageError,
    MalformedMessageError,
    NotRegisteredError,
    NoValidatorPermitError,
    ReplayedMessageError,
    SignatureSchemeError,
    WrongReceiverError,
)

PROTOCOL = "mapreduce-ray/1"
SCHEME = "sr25519"  # the only one accepted
SCHEMES = {CRYPTO_SR25519: SCHEME, CRYPTO_ED25519: "ed25519"}
DEFAULT_MAX_AGE_S = 60.0
DEFAULT_SKEW_S = 5.0
METAGRAPH_TTL_S = 12.0
METAGRAPH_MISS_REFRESH_S = 1.0


class Kind(str, Enum):
    """Messages that are signed in themselves: answers, and what travels inside job streams. Calls are
    signed with btauth (mapreduce_ray.wire.auth) instead."""

    JOB_SPEC = "job_spec"  # validator -> peer, the answer to a join
    RULING = "ruling"  # validator -> peer, the answer to a dispute
    MEASUREMENTS = "measurements"  # validator -> peer, the answer to a benchmark request
    EXCLUDED = "excluded"  # validator -> peer, the answer to its reports
    CHUNK = "chunk"  # peer -> miner, beside each frame of its contribution
    AWAIT = "await"  # peer -> miner, a broadcast receiver asks for a segment
    REDUCED = "reduced"  # miner -> peer, beside each reduced chunk (or alone, as a receipt)
    ROUND_FAILED = "round_failed"  # miner -> peer
    VERDICT = "verdict"  # peer -> miner, whether a segment it delivered passed the peer's checks
    SETTLED = "settled"  # miner -> peer, every peer's verdict on a segment


VALIDATOR_ONLY = frozenset({Kind.JOB_SPEC, Kind.RULING, Kind.MEASUREMENTS, Kind.EXCLUDED})


@dataclass(frozen=True)
class Envelope:
    """An opened message: who sent it to whom, when, and its body."""

    kind: Kind
    netuid: int
    sender: str
    receiver: str
    timestamp_ns: int
    nonce: str
    body: dict


def audience(job_id: str) -> str:
    """The receiver of a message sealed once for every peer of a job."""
    return f"job:{job_id}"


def canonical(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def seal(keypair, kind: Kind, body: dict, receiver: str, netuid: int, now_ns: int | None = None) -> bytes:
    """Sign `body` as a `kind` message from the keypair's hotkey to `receiver`, on subnet `netuid`."""
    message = canonical(
        {
            "protocol": PROTOCOL,
            "kind": kind.value,
            "netuid": netuid,
            "sender": keypair.ss58_address,
            "receiver": receiver,
            "timestamp_ns": time.time_ns() if now_ns is None else now_ns,
            "nonce": secrets.token_hex(16),
            "body": body,
        }
    )
    scheme = SCHEMES[keypair.crypto_type]
    signature = "0x" + keypair.sign(message.encode()).hex()
    return canonical({"scheme": scheme, "signature": signature, "message": message}).encode()


class NonceStore:
    """Nonces seen per sender, remembered for `retention_s` (longer than any accepted message age)."""

    def __init__(self, retention_s: float):
        self.retention_s = retention_s
        self._seen: dict[tuple[str, str], float] = {}
        self._next_prune = 0.0
        self._lock = threading.Lock()

    def check_and_store(self, sender: str, nonce: str, now: float) -> bool:
        """True the first time (sender, nonce) is seen within the retention window."""
        with self._lock:
            if now >= self._next_prune:  # forget expired nonces, at most twice per retention window
                self._seen = {k: t for k, t in self._seen.items() if now - t <= self.retention_s}
                self._next_prune = now + self.retention_s / 2
            seen_at = self._seen.get((sender, nonce))
            if seen_at is not None and now - seen_at <= self.retention_s:
                return False
            self._seen[(sender, nonce)] = now
            return True


class MetagraphCache:
    """The chain's metagraph, refreshed every `ttl_s`, and at most every second on an unknown hotkey."""

    def __init__(self, chain: Chain, ttl_s: float = METAGRAPH_TTL_S, clock: Callable[[], float] = time.monotonic):
        self.chain = chain
        self._ttl_s = ttl_s
        self._clock = clock
        self._graph: Metagraph | None = None
        self._fetched_at = 0.0
        self._lock = threading.Lock()

    def get(self, refresh: bool = False) -> Metagraph:
        with self._lock:
            age = self._clock() - self._fetched_at
            if self._graph is None or age > self._ttl_s or (refresh and age > METAGRAPH_MISS_REFRESH_S):
                self._graph, self._fetched_at = self.chain.metagraph(), self._clock()
            return self._graph

    def neuron(self, hotkey: str) -> Neuron | None:
        return self.get().by_hotkey(hotkey) or self.get(refresh=True).by_hotkey(hotkey)

    def vouched(self, hotkey: str) -> None:
        """A hotkey an authenticated validator vouched for (a peer it admitted) is known from now on, even if it
        registered after the last refresh: the metagraph is read again now unless it has the hotkey."""
        with self._lock:
            if self._graph is None or self._graph.by_hotkey(hotkey) is None:
                self._graph, self._fetched_at = self.chain.metagraph(), self._clock()


class Verifier:
    """Opens messages addressed to `hotkey`, checking them against the metagraph."""

    def __init__(
        self,
        hotkey: str,
        metagraph: MetagraphCache,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        skew_s: float = DEFAULT_SKEW_S,
        clock: Callable[[], float] = time.time,
    ):
        self.hotkey = hotkey
        self.metagraph = metagraph
        self.max_age_s = max_age_s
        self.skew_s = skew_s
        self._clock = clock
        self._nonces = NonceStore(max_age_s + 2 * skew_s)
        self._signed_after = clock() - skew_s  # what was signed before this receiver started may be a replay

    @property
    def netuid(self) -> int:
        """The subnet whose messages this verifier opens."""
        return self.metagraph.chain.netuid

    def open(
        self, wire: bytes, kinds: Kind | frozenset[Kind], sender: str | None = None, receiver: str | None = None
    ) -> Envelope:
        """The verified envelope of a message of one of `kinds` (from `sender` when given, to `receiver`: by
        default this verifier's hotkey), or a MessageRejectedError."""
        envelope = _signed(wire, kinds, self.netuid)
        kind, receiver = envelope.kind, receiver or self.hotkey
        if envelope.receiver != receiver:
            raise WrongReceiverError(
                f"{kind.value} message from {envelope.sender} is addressed to {envelope.receiver}, not {receiver}"
            )
        now = self._clock()
        age = now - envelope.timestamp_ns / 1e9
        if not -self.skew_s <= age <= self.max_age_s:
            when = f"{age:.1f} s old" if age > 0 else f"{-age:.1f} s ahead of this clock"
            raise ExpiredMessageError(
                f"{kind.value} message from {envelope.sender} is {when}; accepted: up to "
                f"{self.max_age_s:g} s old and {self.skew_s:g} s ahead (check the clocks)"
            )
        if envelope.timestamp_ns / 1e9 < self._signed_after:
            raise ReplayedMessageError(
                f"{kind.value} message from {envelope.sender} was signed before this receiver started, so it may be "
                "a replay; send it anew"
            )
        neuron = self.metagraph.neuron(envelope.sender)
        where = self.metagraph.chain.describe()
        if neuron is None:
            raise NotRegisteredError(f"{kind.value} message from {envelope.sender}, which is not registered on {where}")
        if kind in VALIDATOR_ONLY and not neuron.validator_permit:
            raise NoValidatorPermitError(
                f"{kind.value} message from uid {neuron.uid} ({envelope.sender}), which has no validator permit "
                f"on {where}"
            )
        if sender is not None and envelope.sender != sender:
            raise BadSignatureError(f"{kind.value} message signed by {envelope.sender}, expected {sender}")
        if not self._nonces.check_and_store(envelope.sender, envelope.nonce, now):
            raise ReplayedMessageError(f"{kind.value} message from {envelope.sender} replayed (nonce {envelope.nonce})")
        return envelope


def _signed(wire: bytes, kinds: Kind | frozenset[Kind], netuid: int) -> Envelope:
    """The envelope of a well-formed message of one of `kinds` whose sr25519 signature matches its sender, sealed
    on subnet `netuid`."""
    kinds = frozenset({kinds}) if isinstance(kinds, Kind) else kinds
    kind = min(kinds, key=lambda k: k.value)  # names the expected kind in errors before the real one is known
    outer = json_object(wire, "the message")
    if outer.keys() != {"scheme", "message", "signature"}:
        raise MalformedMessageError(
            f"a signed message has fields {sorted(outer)[:8]}, expected message, scheme, signature"
        )
    if outer.get("scheme") != SCHEME:
        raise SignatureSchemeError(
            f"{kind.value} message signed with {outer.get('scheme')!r}; only sr25519 is accepted"
        )
    try:
        signed = outer["message"].encode()
    except (KeyError, AttributeError, UnicodeEncodeError):
        raise MalformedMessageError(f"the signed part is not UTF-8 JSON of the {PROTOCOL} protocol") from None
    envelope = _envelope(json_object(signed, "the signed part"), kinds)
    kind = envelope.kind
    try:
        signature = bytes.fromhex(str(outer.get("signature", "")).removeprefix("0x"))
        valid = verify(signed, signature, envelope.sender, CRYPTO_SR25519)
    except Exception:
        valid = False
    if not valid:
        raise BadSignatureError(f"{kind.value} message from {envelope.sender}: the signature does not match")
    if envelope.netuid != netuid:
        raise WrongReceiverError(
            f"{kind.value} message from {envelope.sender} was sealed for netuid {envelope.netuid}, not {netuid}"
        )
    return envelope


def attest(wire: bytes, kind: Kind, sender: str | None, receiver: str, netuid: int) -> Envelope:
    """A forwarded message's envelope, if `sender` (None: whoever it names) signed it for `receiver` on subnet
    `netuid` (evidence; no time or replay check)."""
    envelope = _signed(wire, kind, netuid)
    if envelope.receiver != receiver or sender not in (None, envelope.sender):
        raise BadSignatureError(
            f"{kind.value} message from {envelope.sender} to {envelope.receiver}, expected {sender} to {receiver}"
        )
    return envelope


def json_object(data: bytes, what: str) -> dict:
    """`data` parsed as a JSON object (no NaN or Infinity); MalformedMessageError naming `what` otherwise."""
    try:
        value = _JSON.decode(data.decode() if isinstance(data, bytes | bytearray) else data)
    except (ValueError, TypeError, RecursionError, UnicodeDecodeError):
        raise MalformedMessageError(f"{what} is not JSON of the {PROTOCOL} protocol") from None
    if not isinstance(value, dict):
        raise MalformedMessageError(f"{what} is not a JSON object of the {PROTOCOL} protocol")
    return value


def _no_constants(name: str):
    raise ValueError(f"{name} is not a number")


_JSON = json.JSONDecoder(parse_constant=_no_constants)


def _envelope(inner: dict, kinds: frozenset[Kind]) -> Envelope:
    if inner.get("protocol") != PROTOCOL:
        raise MalformedMessageError(f"protocol {inner.get('protocol')!r} is not {PROTOCOL}; upgrade the sender")
    kind = next((k for k in kinds if k.value == inner.get("kind")), None)
    if kind is None:
        expected = " or ".join(sorted(k.value for k in kinds))
        raise MalformedMessageError(f"expected a {expected} message, got {str(inner.get('kind'))[:40]!r}")
    fields = {"netuid": int, "sender": str, "receiver": str, "timestamp_ns": int, "nonce": str, "body": dict}
    for name, type_ in fields.items():
        if type(inner.get(name)) is not type_:
            raise MalformedMessageError(f"{kind.value} message: field {name!r} missing or not {type_.__name__}")
    netuid, sender, receiver = inner["netuid"], inner["sender"], inner["receiver"]
    return Envelope(kind, netuid, sender, receiver, inner["timestamp_ns"], inner["nonce"], inner["body"])
