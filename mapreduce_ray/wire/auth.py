"""Who is calling: bittensor's btauth/1 on every Flight call, checked before any payload is read.

A call signs the request target `/{netuid}/{call}?sha256={digest of its payload}` with btauth (method:
the Flight verb; receiver: the endpoint's hotkey; body: empty), so a call made on one subnet is
refused on any other, even by the same hotkey. The payload itself (the command of the first
message of the call's DoExchange) comes after the headers, so the signed target carries
its SHA-256: the server middleware checks the signature, receiver, freshness, replay, the caller's
registration on the subnet and, for validator-only calls, its permit, all from the headers; the
endpoint then refuses any payload whose digest differs from the signed one before parsing it. Nonces
live in memory, so an endpoint also refuses calls signed more than `wire.auth_skew_s` before it
started: a restarted endpoint takes no replay of what its previous life accepted.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow.flight as fl
from bittensor import http_auth
from bittensor.sp_core import CRYPTO_SR25519

from mapreduce_ray.errors import (
    BadSignatureError,
    ExpiredMessageError,
    IdentityError,
    LimitExceededError,
    MalformedMessageError,
    NotRegisteredError,
    NoValidatorPermitError,
    ReplayedMessageError,
    WrongReceiverError,
)
from mapreduce_ray.protocol import MetagraphCache
from mapreduce_ray.wire.config import WireConfig
from mapreduce_ray.wire.errors import refusal

CALL_HEADER = "x-mapreduce-call"
CALL_METHOD = fl.FlightMethod.DO_EXCHANGE  # every call's Flight verb: its headers are checked before it is read
_TARGET = re.compile(r"/(\d{1,5})/([a-z_]{1,32})\?sha256=([0-9a-f]{64})")
_AUTH_ERRORS = {
    http_auth.MalformedAuth: MalformedMessageError,
    http_auth.WrongReceiver: WrongReceiverError,
    http_auth.StaleRequest: ExpiredMessageError,
    http_auth.BadSignature: BadSignatureError,
    http_auth.ReplayedRequest: ReplayedMessageError,
}
_nonce_lock = threading.Lock()
_last_nonce = 0


def payload_digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def call_headers(keypair, method: fl.FlightMethod, call: str, payload: bytes, receiver: str, netuid: int) -> list:
    """The headers of a `call` (Flight verb `method`) with `payload`, signed by `keypair` for `receiver` on
    subnet `netuid`."""
    target = f"/{netuid}/{call}?sha256={payload_digest(payload)}"
    signed = http_auth.sign(keypair, method=method.name, path=target, receiver_ss58=receiver, nonce_ns=_fresh_nonce())
    return [(k.lower().encode(), v.encode()) for k, v in signed.items()] + [(CALL_HEADER.encode(), target.encode())]


def _fresh_nonce() -> int:
    """A nanosecond timestamp, strictly increasing in this process (two calls never share a nonce)."""
    global _last_nonce
    with _nonce_lock:
        _last_nonce = max(time.time_ns(), _last_nonce + 1)
        return _last_nonce


@dataclass(frozen=True)
class Rule:
    """Who may make a call (always a DoExchange, CALL_METHOD): anyone registered, or only validator permit
    holders."""

    permit: bool = False


class Caller(fl.ServerMiddleware):
    """The authenticated caller of one call: its hotkey and uid, the call it signed, and its payload digest."""

    def __init__(self, hotkey: str, uid: int, call: str, digest: str, release):
        self.hotkey, self.uid, self.call, self.digest = hotkey, uid, call, digest
        self._release = release

    def check_payload(self, payload: bytes) -> None:
        """Refuse a payload other than the one whose digest the caller signed."""
        if payload_digest(payload) != self.digest:
            raise BadSignatureError(f"the {self.call} payload of {self.hotkey} is not the one its signature covers")

    def call_completed(self, exception) -> None:
        self._release()


class Authenticator(fl.ServerMiddlewareFactory):
    """Checks every call's btauth headers against `hotkey` (the endpoint's) and the subnet's metagraph."""

    def __init__(
        self,
        hotkey: str,
        metagraph: MetagraphCache,
        rules: dict[str, Rule],
        config: WireConfig,
        on_refusal: Callable[[str], None] = lambda error: None,
    ):
        self.hotkey = hotkey
        self._on_refusal = on_refusal  # told the class name of every error a call is refused with
        self.metagraph = metagraph
        self.rules = rules
        self.config = config
        retention = config.auth_max_age_s + config.auth_skew_s + 1.0
        self._nonces = http_auth.InMemoryNonceStore(retention=retention)
        self._signed_after_ns = time.time_ns() - int(config.auth_skew_s * 1e9)  # earlier calls may be replays
        self._open: dict[str, int] = {}  # hotkey -> its calls open here
        self._lock = threading.Lock()

    def start_call(self, info, headers):
        try:
            return self._authenticate(info.method, headers)
        except IdentityError as e:
            self._on_refusal(type(e).__name__)
            raise refusal(e) from None

    def _authenticate(self, method: fl.FlightMethod, headers: dict) -> Caller:
        values = {}
        for key, value in headers.items():
            key = key.lower()
            if len(value) != 1 or key in values:
                raise MalformedMessageError(f"header {key[:64]} sent {len(value)} times, or under two spellings")
            values[key] = value[0]
        match = _TARGET.fullmatch(values.get(CALL_HEADER, ""))
        if match is None:
            raise MalformedMessageError(f"a call needs the {CALL_HEADER} header of the mapreduce-ray protocol")
        netuid, call, digest = match.groups()
        if int(netuid) != self.metagraph.chain.netuid:
            raise WrongReceiverError(
                f"the call was signed for netuid {int(netuid)}, and this endpoint serves netuid "
                f"{self.metagraph.chain.netuid}"
            )
        rule = self.rules.get(call)
        if rule is None or method != CALL_METHOD:
            raise MalformedMessageError(f"this endpoint serves no {call} call as {method.name}")
        try:
            caller = http_auth.verify(
                values,
                b"",
                method=method.name,
                path=match.group(0),
                self_hotkey_ss58=self.hotkey,
                max_age=self.config.auth_max_age_s,
                allowed_skew=self.config.auth_skew_s,
                nonce_store=self._nonces,
            )
        except http_auth.AuthError as e:
            raise _AUTH_ERRORS.get(type(e), MalformedMessageError)(f"btauth: {e}") from None
        if caller.crypto_type != CRYPTO_SR25519:
            raise MalformedMessageError("btauth: only sr25519 hotkeys may call")
        if caller.nonce_ns < self._signed_after_ns:
            raise ReplayedMessageError(
                "btauth: the call was signed before this endpoint started, so it may be a replay; sign it anew"
            )
        neuron = self.metagraph.neuron(caller.hotkey_ss58)
        where = self.metagraph.chain.describe()
        if neuron is None:
            raise NotRegisteredError(f"hotkey {caller.hotkey_ss58} is not registered on {where}")
        if rule.permit and not neuron.validator_permit:
            raise NoValidatorPermitError(
                f"{call} is for validators, and uid {neuron.uid} ({caller.hotkey_ss58}) holds no validator permit "
                f"on {where}"
            )
        return Caller(caller.hotkey_ss58, neuron.uid, call, digest, self._hold(caller.hotkey_ss58))

    def _hold(self, hotkey: str):
        """Count an open call of `hotkey`; the function that uncounts it."""
        with self._lock:
            if self._open.get(hotkey, 0) >= self.config.streams_per_hotkey:
                raise LimitExceededError(
                    f"hotkey {hotkey} already holds {self.config.streams_per_hotkey} open calls here "
                    "(wire.streams_per_hotkey)"
                )
            if sum(self._open.values()) >= self.config.calls_per_endpoint:
                raise LimitExceededError(
                    f"this endpoint already holds {self.config.calls_per_endpoint} open calls "
                    "(wire.calls_per_endpoint); call again later"
                )
            self._open[hotkey] = self._open.get(hotkey, 0) + 1
        released = threading.Event()

        def release() -> None:
            if released.is_set():
                return
            released.set()
            with self._lock:
                self._open[hotkey] -= 1
                if not self._open[hotkey]:
                    del self._open[hotkey]

        return release
