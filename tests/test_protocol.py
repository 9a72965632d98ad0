"""Signed messages (answers and what travels in job streams), and the typed bodies of calls, without Ray:
every check of Verifier.open fails with its own error and says why.

The receiver checks, in order: well-formed and of the expected kind; sr25519; the
signature; the receiver; the timestamp window; the sender registered (with a
validator permit for validator-only kinds); the expected sender; the nonce.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from bittensor.sp_core import CRYPTO_ED25519, Keypair

from mapreduce_ray.chain import ChainConfig
from mapreduce_ray.chain.embedded import EmbeddedChain
from mapreduce_ray.errors import (
    BadSignatureError,
    ExpiredMessageError,
    IdentityError,
    MalformedMessageError,
    NotRegisteredError,
    NoValidatorPermitError,
    ReplayedMessageError,
    SignatureSchemeError,
    WrongReceiverError,
)
from mapreduce_ray.messages import (
    KINDS,
    Await,
    BenchmarkResult,
    Chunk,
    Excluded,
    JobAdmission,
    JobLeave,
    JobRequest,
    Measurements,
    MinerMeasurement,
    Outcome,
    Reduced,
    RoundFailed,
    Ruling,
    Settled,
    Verdict,
    open_body,
    parse,
    seal_body,
)
from mapreduce_ray.protocol import Kind, MetagraphCache, NonceStore, Verifier, attest, canonical, seal
from mapreduce_ray.types import JobSpec, MinerSlot, ReduceOp, RoundKind, TensorSpec


def key(name: str) -> Keypair:
    return Keypair.create_from_uri(f"//{name}")


COLD = key("Cold").ss58_address
VALIDATOR, MINER, OTHER_MINER, PEER, STRANGER = (key(n) for n in ("Validator", "Miner", "OtherMiner", "Peer", "Nobody"))
ED25519 = Keypair.create_from_uri("//Alice", crypto_type=CRYPTO_ED25519)
S = 10**9  # nanoseconds per second
NETUID = ChainConfig().netuid  # the test chain's, on which every message here is sealed

SPEC = JobSpec(
    job_id="0123456789ab",
    name="default",
    peer_count=2,
    miners=(
        MinerSlot(1, MINER.ss58_address, "127.0.0.1:8091", 1.0),
        MinerSlot(2, OTHER_MINER.ss58_address, "[::1]:8092", 0.5),
    ),
    chunk_bytes=1024,
    timeout_s=30.0,
    max_bytes=1 << 20,
)
TENSOR = TensorSpec("float32", (4, 5))
REQUEST = Chunk(SPEC.job_id, 3, RoundKind.ALL_REDUCE, ReduceOp.AVG, None, TENSOR, 0, 1, 0, "aa" * 32)


class FakeClock:
    """Wall-clock seconds that move only when told; starts at a whole second near now."""

    def __init__(self):
        self.now = float(int(time.time()))

    def __call__(self) -> float:
        return self.now

    @property
    def ns(self) -> int:
        return int(self.now) * S


@dataclass
class World:
    """An embedded chain with a validator (permit), two miners and a peer; one clock for all."""

    chain: EmbeddedChain
    clock: FakeClock
    metagraph: MetagraphCache
    uids: dict[str, int]

    def verifier(self, receiver: Keypair, **kwargs) -> Verifier:
        return Verifier(receiver.ss58_address, self.metagraph, clock=self.clock, **kwargs)

    @property
    def where(self) -> str:
        return re.escape(self.chain.describe())


@pytest.fixture
def world(tmp_path) -> World:
    clock = FakeClock()
    chain = EmbeddedChain(tmp_path / "chain.sqlite", ChainConfig(block_time_s=1.0, max_validators=1), clock=clock)
    uids = {
        "validator": chain.register(VALIDATOR.ss58_address, COLD, stake=100.0),
        "miner": chain.register(MINER.ss58_address, COLD),
        "other_miner": chain.register(OTHER_MINER.ss58_address, COLD),
        "peer": chain.register(PEER.ss58_address, COLD),
    }
    return World(chain, clock, MetagraphCache(chain, clock=clock), uids)


@contextmanager
def refused(cls: type, match: str):
    """Expect exactly `cls` (not a sibling or a subclass), its message matching `match`."""
    with pytest.raises(IdentityError, match=match) as caught:
        yield caught
    assert type(caught.value) is cls, f"{type(caught.value).__name__}: {caught.value}"


def sign_raw(keypair: Keypair, inner: dict, scheme: str = "sr25519") -> bytes:
    """A wire whose signed part is `inner`, exactly as given (possibly not of our protocol)."""
    message = canonical(inner)
    signature = "0x" + keypair.sign(message.encode()).hex()
    return canonical({"scheme": scheme, "signature": signature, "message": message}).encode()


def rewrap(wire: bytes, **outer_changes) -> bytes:
    outer = json.loads(wire)
    outer.update(outer_changes)
    return canonical(outer).encode()


def edit_message(wire: bytes, old: str, new: str) -> bytes:
    """The wire with `old` replaced by `new` inside the signed message, the signature left as it was."""
    message = json.loads(wire)["message"]
    assert message.count(old) == 1, message
    return rewrap(wire, message=message.replace(old, new))


def inner_of(keypair: Keypair, kind: Kind, body: dict, receiver: Keypair, timestamp_ns: int) -> dict:
    return {
        "protocol": "mapreduce-ray/1",
        "kind": kind.value,
        "netuid": NETUID,
        "sender": keypair.ss58_address,
        "receiver": receiver.ss58_address,
        "timestamp_ns": timestamp_ns,
        "nonce": "00" * 16,
        "body": body,
    }


# Every kind round-trips.

ROUND_TRIPS = {
    "job_spec": (JobAdmission(SPEC, 2, PEER.ss58_address), VALIDATOR, PEER),
    "ruling": (Ruling(SPEC.job_id, 3, 1, None, "miner-2: differs"), VALIDATOR, PEER),
    "excluded": (Excluded(SPEC.job_id, (1, 3)), VALIDATOR, PEER),
    "measurements": (
        Measurements(SPEC.job_id, (MinerMeasurement(2, MINER.ss58_address, Outcome.EXACT, 1 << 20, 5e8, 1 << 26),)),
        VALIDATOR,
        PEER,
    ),
    "chunk": (REQUEST, PEER, MINER),
    "chunk of a broadcast": (
        Chunk(SPEC.job_id, 4, RoundKind.BROADCAST, None, 2, TensorSpec("int64", ()), 1, 2, 0, "bb" * 32),
        PEER,
        OTHER_MINER,
    ),
    "await": (Await(SPEC.job_id, 4, 2, 1, 1), PEER, OTHER_MINER),
    "reduced": (Reduced(SPEC.job_id, 3, 0, 2, TENSOR, "cc" * 32, ("aa" * 32, "dd" * 32)), MINER, PEER),
    "round_failed": (RoundFailed(SPEC.job_id, 3, 0, "PeerLostError", "rank 2 left"), MINER, PEER),
    "verdict": (Verdict(SPEC.job_id, 3, 0, 2, "ee" * 16, (1,)), PEER, MINER),
    "settled": (Settled(SPEC.job_id, 3, 0, ("ee" * 16, ""), ((1,), ())), MINER, PEER),
}


def test_the_round_trips_cover_every_kind():
    assert {KINDS[type(body)] for body, _, _ in ROUND_TRIPS.values()} == set(Kind)


@pytest.mark.parametrize(("body", "sender", "receiver"), list(ROUND_TRIPS.values()), ids=list(ROUND_TRIPS))
def test_every_kind_round_trips_to_an_equal_body(world, body, sender, receiver):
    opened, envelope = open_body(
        world.verifier(receiver), seal_body(sender, body, receiver.ss58_address, NETUID), type(body)
    )
    assert type(opened) is type(body)
    assert opened == body  # tuples stay tuples, enums stay enums, nested dataclasses are rebuilt
    assert (envelope.kind, envelope.sender, envelope.receiver) == (
        KINDS[type(body)],
        sender.ss58_address,
        receiver.ss58_address,
    )
    assert re.fullmatch(r"[0-9a-f]{32}", envelope.nonce)


def test_the_expected_sender_opens(world):
    wire = seal_body(VALIDATOR, JobAdmission(SPEC, 2, PEER.ss58_address), PEER.ss58_address, NETUID)
    admission, envelope = open_body(world.verifier(PEER), wire, JobAdmission, sender=VALIDATOR.ss58_address)
    assert admission.spec == SPEC and envelope.sender == VALIDATOR.ss58_address


# Signatures.


def test_a_tampered_body_fails_the_signature(world):
    wire = edit_message(seal_body(PEER, REQUEST, VALIDATOR.ss58_address, NETUID), '"rank":1', '"rank":2')
    with refused(BadSignatureError, rf"^chunk message from {PEER.ss58_address}: the signature does not match$"):
        world.verifier(VALIDATOR).open(wire, Kind.CHUNK)


def test_a_readdressed_message_fails_the_signature_not_the_receiver(world):
    """Rewriting the receiver inside the signed part is tampering, found before the receiver check."""
    wire = seal_body(PEER, REQUEST, MINER.ss58_address, NETUID)
    wire = edit_message(wire, MINER.ss58_address, VALIDATOR.ss58_address)
    with refused(BadSignatureError, "the signature does not match") as caught:
        world.verifier(VALIDATOR).open(wire, Kind.CHUNK)
    assert not isinstance(caught.value, WrongReceiverError)


@pytest.mark.parametrize(
    "signature",
    ["flipped", "0x", "0xnothex"],
    ids=["one byte flipped", "empty", "not hex"],
)
def test_a_broken_signature_does_not_verify(world, signature):
    wire = seal_body(PEER, REQUEST, VALIDATOR.ss58_address, NETUID)
    outer = json.loads(wire)
    if signature == "flipped":
        raw = bytearray.fromhex(outer["signature"][2:])
        raw[10] ^= 0x01
        signature = "0x" + raw.hex()
    outer["signature"] = signature
    with refused(BadSignatureError, rf"chunk message from {PEER.ss58_address}: the signature does not match"):
        world.verifier(VALIDATOR).open(canonical(outer).encode(), Kind.CHUNK)


@pytest.mark.parametrize("edit", ["missing signature", "extra field"])
def test_a_signed_message_with_other_fields_than_its_three_is_malformed(world, edit):
    outer = json.loads(seal_body(PEER, REQUEST, VALIDATOR.ss58_address, NETUID))
    if edit == "missing signature":
        del outer["signature"]
    else:
        outer["note"] = "unsigned"
    with refused(MalformedMessageError, r"^a signed message has fields \[.*\], expected message, scheme, signature$"):
        world.verifier(VALIDATOR).open(canonical(outer).encode(), Kind.CHUNK)


def test_another_signer_than_the_sender_field_fails_the_signature(world):
    """A message claiming to be from the validator but signed by the peer's key."""
    body = dataclasses.asdict(JobAdmission(SPEC, 1, PEER.ss58_address))
    inner = inner_of(VALIDATOR, Kind.JOB_SPEC, body, PEER, world.clock.ns)
    with refused(BadSignatureError, rf"job_spec message from {VALIDATOR.ss58_address}: the signature does not match"):
        world.verifier(PEER).open(sign_raw(PEER, inner), Kind.JOB_SPEC)


def test_a_message_sealed_on_another_subnet_is_refused_as_signed_and_as_evidence(world):
    """The same hotkeys may serve several subnets: what one of them sealed on netuid N + 1 is refused on N."""
    wire = seal_body(PEER, REQUEST, VALIDATOR.ss58_address, NETUID + 1)
    why = rf"^chunk message from {PEER.ss58_address} was sealed for netuid {NETUID + 1}, not {NETUID}$"
    with refused(WrongReceiverError, why):
        world.verifier(VALIDATOR).open(wire, Kind.CHUNK)
    with refused(WrongReceiverError, why):
        attest(wire, Kind.CHUNK, PEER.ss58_address, VALIDATOR.ss58_address, NETUID)
    assert world.verifier(VALIDATOR).open(seal_body(PEER, REQUEST, VALIDATOR.ss58_address, NETUID), Kind.CHUNK)


def test_an_ed25519_signature_is_refused_by_scheme(world):
    world.chain.register(ED25519.ss58_address, COLD)  # registered, so only the scheme can refuse it
    wire = seal_body(ED25519, REQUEST, VALIDATOR.ss58_address, NETUID)
    assert json.loads(wire)["scheme"] == "ed25519"
    with refused(SignatureSchemeError, r"^chunk message signed with 'ed25519'; only sr25519 is accepted$"):
        world.verifier(VALIDATOR).open(wire, Kind.CHUNK)


def test_an_ed25519_signature_relabelled_sr25519_does_not_verify(world):
    world.chain.register(ED25519.ss58_address, COLD)
    wire = rewrap(seal_body(ED25519, REQUEST, VALIDATOR.ss58_address, NETUID), scheme="sr25519")
    with refused(BadSignatureError, rf"chunk message from {ED25519.ss58_address}: the signature does not match"):
        world.verifier(VALIDATOR).open(wire, Kind.CHUNK)


@pytest.mark.parametrize("scheme", [None, "ed25519", "SR25519"])
def test_any_other_scheme_label_is_refused(world, scheme):
    wire = seal_body(PEER, REQUEST, VALIDATOR.ss58_address, NETUID)
    outer = json.loads(wire)
    outer["scheme"] = scheme
    with refused(SignatureSchemeError, rf"^chunk message signed with {re.escape(repr(scheme))}; only sr25519"):
        world.verifier(VALIDATOR).open(canonical(outer).encode(), Kind.CHUNK)


# Receiver, time window, replays.


def test_a_message_for_another_receiver_is_refused(world):
    wire = seal_body(PEER, REQUEST, MINER.ss58_address, NETUID)
    with refused(
        WrongReceiverError,
        rf"^chunk message from {PEER.ss58_address} is addressed to {MINER.ss58_address}, "
        rf"not {VALIDATOR.ss58_address}$",
    ):
        world.verifier(VALIDATOR).open(wire, Kind.CHUNK)


@pytest.mark.parametrize(
    ("offset_s", "shown"),
    [
        (-61, "61.0 s old"),
        (-3600, "3600.0 s old"),
        (6, "6.0 s ahead of this clock"),
        (3600, "3600.0 s ahead of this clock"),
    ],
    ids=["61 s old", "an hour old", "6 s ahead", "an hour ahead"],
)
def test_a_message_outside_the_time_window_is_expired(world, offset_s, shown):
    wire = seal(
        PEER, Kind.CHUNK, dataclasses.asdict(REQUEST), VALIDATOR.ss58_address, NETUID, world.clock.ns + offset_s * S
    )
    with refused(
        ExpiredMessageError,
        rf"^chunk message from {PEER.ss58_address} is {re.escape(shown)}; "
        r"accepted: up to 60 s old and 5 s ahead \(check the clocks\)$",
    ):
        world.verifier(VALIDATOR).open(wire, Kind.CHUNK)


@pytest.mark.parametrize("offset_s", [-59, 4], ids=["59 s old", "4 s ahead"])
def test_a_message_inside_the_time_window_opens(world, offset_s):
    verifier = world.verifier(VALIDATOR)
    world.clock.now += 60  # a receiver that has run for a minute
    wire = seal(
        PEER, Kind.CHUNK, dataclasses.asdict(REQUEST), VALIDATOR.ss58_address, NETUID, world.clock.ns + offset_s * S
    )
    assert verifier.open(wire, Kind.CHUNK).body == json.loads(canonical(dataclasses.asdict(REQUEST)))


def test_a_restarted_receiver_refuses_a_replay_of_what_it_accepted_before(world):
    before = world.verifier(VALIDATOR)
    wire = seal(PEER, Kind.CHUNK, dataclasses.asdict(REQUEST), VALIDATOR.ss58_address, NETUID, world.clock.ns)
    before.open(wire, Kind.CHUNK)
    world.clock.now += 6  # the receiver restarts, more than the 5 s skew later, well inside the 60 s window
    with refused(
        ReplayedMessageError,
        rf"^chunk message from {PEER.ss58_address} was signed before this receiver started, so it may be a replay; "
        "send it anew$",
    ):
        world.verifier(VALIDATOR).open(wire, Kind.CHUNK)


def test_the_window_follows_the_verifier_clock_and_settings(world):
    wire = seal(PEER, Kind.CHUNK, dataclasses.asdict(REQUEST), VALIDATOR.ss58_address, NETUID, world.clock.ns)
    strict = world.verifier(VALIDATOR, max_age_s=10.0, skew_s=1.0)
    world.clock.now += 11
    with refused(ExpiredMessageError, r"is 11\.0 s old; accepted: up to 10 s old and 1 s ahead"):
        strict.open(wire, Kind.CHUNK)


def test_the_same_wire_twice_is_a_replay(world):
    verifier = world.verifier(VALIDATOR)
    wire = seal_body(PEER, REQUEST, VALIDATOR.ss58_address, NETUID)
    nonce = verifier.open(wire, Kind.CHUNK).nonce
    with refused(ReplayedMessageError, rf"^chunk message from {PEER.ss58_address} replayed \(nonce {nonce}\)$"):
        verifier.open(wire, Kind.CHUNK)


def test_a_replay_is_refused_for_as_long_as_the_message_is_fresh(world):
    """Inside the window the nonce store refuses it; past the window the timestamp does."""
    verifier = world.verifier(VALIDATOR)
    wire = seal(PEER, Kind.CHUNK, dataclasses.asdict(REQUEST), VALIDATOR.ss58_address, NETUID, world.clock.ns)
    verifier.open(wire, Kind.CHUNK)
    for step_s in (1, 30, 29):  # 1, 31 and 60 s after it was sent
        world.clock.now += step_s
        with refused(ReplayedMessageError, "replayed"):
            verifier.open(wire, Kind.CHUNK)
    world.clock.now += 1
    with refused(ExpiredMessageError, r"is 61\.0 s old"):
        verifier.open(wire, Kind.CHUNK)


def test_the_nonce_store_forgets_after_its_retention_and_stays_bounded():
    store = NonceStore(retention_s=10.0)
    assert store.check_and_store("alice", "n1", 100.0)
    assert not store.check_and_store("alice", "n1", 105.0)
    assert not store.check_and_store("alice", "n1", 110.0)  # still inside the window
    assert store.check_and_store("bob", "n1", 110.0)  # nonces are per sender
    assert store.check_and_store("alice", "n1", 110.5)  # forgotten once older than the window
    for i in range(1000):  # one message a second for 1000 s
        assert store.check_and_store("alice", f"m{i}", 200.0 + i)
    assert not store.check_and_store("alice", "m999", 1199.5)
    assert len(store._seen) <= 16  # pruned every half window: at most 1.5 windows of nonces are kept


def test_a_verifier_remembers_nonces_for_longer_than_it_accepts_messages(world):
    verifier = world.verifier(VALIDATOR, max_age_s=10.0, skew_s=1.0)
    assert verifier._nonces.retention_s >= verifier.max_age_s + verifier.skew_s


# Registration and permits.


def test_a_message_from_an_unregistered_hotkey_is_refused(world):
    wire = seal_body(STRANGER, REQUEST, VALIDATOR.ss58_address, NETUID)
    with refused(
        NotRegisteredError,
        rf"^chunk message from {STRANGER.ss58_address}, which is not registered on {world.where}$",
    ):
        world.verifier(VALIDATOR).open(wire, Kind.CHUNK)


def test_a_job_spec_needs_a_validator_permit(world):
    admission = JobAdmission(SPEC, 1, PEER.ss58_address)
    with refused(
        NoValidatorPermitError,
        rf"^job_spec message from uid {world.uids['miner']} \({MINER.ss58_address}\), which has no validator "
        rf"permit on {world.where}$",
    ):
        open_body(world.verifier(PEER), seal_body(MINER, admission, PEER.ss58_address, NETUID), JobAdmission)
    opened, _ = open_body(
        world.verifier(PEER), seal_body(VALIDATOR, admission, PEER.ss58_address, NETUID), JobAdmission
    )
    assert opened == admission


def test_other_kinds_need_no_permit(world):
    wire = seal_body(MINER, Reduced(SPEC.job_id, 1, 0, 0, TENSOR, "cc" * 32, ("aa" * 32,)), PEER.ss58_address, NETUID)
    assert open_body(world.verifier(PEER), wire, Reduced)[1].sender == MINER.ss58_address


def test_a_job_spec_from_a_non_permit_hotkey_is_refused_for_its_permit_before_its_sender(world):
    """What a peer expecting the validator sees when someone else's key signed the admission."""
    wire = seal_body(MINER, JobAdmission(SPEC, 1, PEER.ss58_address), PEER.ss58_address, NETUID)
    with refused(NoValidatorPermitError, "which has no validator permit"):
        open_body(world.verifier(PEER), wire, JobAdmission, sender=VALIDATOR.ss58_address)


def test_another_registered_sender_than_expected_is_refused_by_name(world):
    wire = seal_body(MINER, Reduced(SPEC.job_id, 1, 0, 0, TENSOR, "cc" * 32, ("aa" * 32,)), PEER.ss58_address, NETUID)
    with refused(
        BadSignatureError,
        rf"^reduced message signed by {MINER.ss58_address}, expected {OTHER_MINER.ss58_address}$",
    ):
        open_body(world.verifier(PEER), wire, Reduced, sender=OTHER_MINER.ss58_address)


def test_an_unknown_sender_refreshes_the_metagraph_at_most_once_a_second(world):
    verifier = world.verifier(VALIDATOR)
    verifier.open(seal_body(PEER, REQUEST, VALIDATOR.ss58_address, NETUID), Kind.CHUNK)  # the metagraph is now cached
    world.chain.register(STRANGER.ss58_address, COLD)
    wire = seal_body(STRANGER, REQUEST, VALIDATOR.ss58_address, NETUID)
    with refused(NotRegisteredError, "which is not registered on"):
        verifier.open(wire, Kind.CHUNK)  # fetched less than a second ago: not fetched again
    world.clock.now += 1.5
    envelope = verifier.open(wire, Kind.CHUNK)  # refreshed on the miss; a refused wire used no nonce
    assert envelope.sender == STRANGER.ss58_address


def test_a_peer_a_validator_vouched_for_is_known_at_once_though_it_registered_after_the_last_read(world):
    """A miner admitting a peer that registered a moment ago reads the chain again for it, where a stranger's
    miss within the second after a read does not."""
    verifier = world.verifier(VALIDATOR)
    verifier.open(seal_body(PEER, REQUEST, VALIDATOR.ss58_address, NETUID), Kind.CHUNK)  # the metagraph is read now
    world.chain.register(STRANGER.ss58_address, COLD)
    wire = seal_body(STRANGER, REQUEST, VALIDATOR.ss58_address, NETUID)
    with refused(NotRegisteredError, "which is not registered on"):
        verifier.open(wire, Kind.CHUNK)
    world.metagraph.vouched(STRANGER.ss58_address)
    assert verifier.open(wire, Kind.CHUNK).sender == STRANGER.ss58_address


def test_a_deregistered_sender_is_refused_once_the_metagraph_expires(tmp_path):
    clock = FakeClock()
    chain = EmbeddedChain(tmp_path / "chain.sqlite", ChainConfig(block_time_s=1.0, max_uids=2), clock=clock)
    chain.register(VALIDATOR.ss58_address, COLD, stake=100.0)
    chain.register(PEER.ss58_address, COLD)
    verifier = Verifier(VALIDATOR.ss58_address, MetagraphCache(chain, ttl_s=12.0, clock=clock), clock=clock)
    verifier.open(seal_body(PEER, REQUEST, VALIDATOR.ss58_address, NETUID), Kind.CHUNK)
    chain.register(STRANGER.ss58_address, COLD)  # the subnet is full: the stranger takes the peer's uid
    clock.now += 13
    with refused(NotRegisteredError, rf"from {PEER.ss58_address}, which is not registered"):
        verifier.open(seal_body(PEER, REQUEST, VALIDATOR.ss58_address, NETUID), Kind.CHUNK)


# Malformed wires: refused before any signature or chain check.

MALFORMED_WIRES = {
    "not JSON": (b"\x00not json", r"^the message is not JSON of the mapreduce-ray/1 protocol$"),
    "not UTF-8": (b"\xc3\x28", r"^the message is not JSON of the mapreduce-ray/1 protocol$"),
    "a JSON list": (b"[1, 2]", r"^the message is not a JSON object of the mapreduce-ray/1 protocol$"),
    "a JSON string": (b'"hello"', r"^the message is not a JSON object of the mapreduce-ray/1 protocol$"),
    "no signed part": (
        b'{"scheme": "sr25519", "signature": "0x00"}',
        r"^a signed message has fields \['scheme', 'signature'\]",
    ),
    "a signed part that is no string": (
        b'{"scheme": "sr25519", "signature": "0x00", "message": {"kind": "chunk"}}',
        r"^the signed part is not UTF-8 JSON of the mapreduce-ray/1 protocol$",
    ),
    "a lone surrogate in the signed part": (
        b'{"scheme": "sr25519", "signature": "0x", "message": "\\ud800"}',
        r"^the signed part is not UTF-8 JSON of the mapreduce-ray/1 protocol$",
    ),
    "a signed part that is a JSON list": (
        b'{"scheme": "sr25519", "signature": "0x00", "message": "[]"}',
        r"^the signed part is not a JSON object of the mapreduce-ray/1 protocol$",
    ),
}


@pytest.mark.parametrize(("wire", "match"), list(MALFORMED_WIRES.values()), ids=list(MALFORMED_WIRES))
def test_a_wire_that_is_not_our_json_is_malformed(world, wire, match):
    with refused(MalformedMessageError, match):
        world.verifier(VALIDATOR).open(wire, Kind.CHUNK)


def test_another_protocol_version_is_malformed(world):
    inner = inner_of(PEER, Kind.CHUNK, dataclasses.asdict(REQUEST), VALIDATOR, world.clock.ns)
    inner["protocol"] = "mapreduce-ray/2"
    with refused(MalformedMessageError, r"^protocol 'mapreduce-ray/2' is not mapreduce-ray/1; upgrade the sender$"):
        world.verifier(VALIDATOR).open(sign_raw(PEER, inner), Kind.CHUNK)
    del inner["protocol"]
    with refused(MalformedMessageError, r"^protocol None is not mapreduce-ray/1; upgrade the sender$"):
        world.verifier(VALIDATOR).open(sign_raw(PEER, inner), Kind.CHUNK)


def test_another_kind_than_expected_is_malformed(world):
    wire = seal_body(PEER, REQUEST, VALIDATOR.ss58_address, NETUID)
    with refused(MalformedMessageError, r"^expected a await or reduced message, got 'chunk'$"):
        open_body(world.verifier(VALIDATOR), wire, (Await, Reduced))
    request, _ = open_body(world.verifier(VALIDATOR), wire, (Chunk, Await))  # the refusal used no nonce
    assert request == REQUEST


@pytest.mark.parametrize("field", ["sender", "receiver", "timestamp_ns", "nonce", "body"])
def test_an_envelope_without_a_field_is_malformed(world, field):
    inner = inner_of(PEER, Kind.CHUNK, dataclasses.asdict(REQUEST), VALIDATOR, world.clock.ns)
    del inner[field]
    with refused(MalformedMessageError, rf"^chunk message: field '{field}' missing or not (str|int|dict)$"):
        world.verifier(VALIDATOR).open(sign_raw(PEER, inner), Kind.CHUNK)


def chunk(**changes) -> dict:
    return {**json.loads(canonical(dataclasses.asdict(REQUEST))), **changes}


REQUEST_FIELDS = {
    "job": "default",
    "rank": 1,
    "peer_count": 2,
    "max_bytes": None,
    "redundancy": 1,
    "benchmark_max_bytes": None,
    "verify_results": True,
}

# A call's body (JSON authenticated by btauth): (body class, the JSON, the error's message)
MALFORMED_CALLS = {
    "a missing field": (
        JobRequest,
        {k: v for k, v in REQUEST_FIELDS.items() if k != "rank"} | {"reject_nonfinite": False},
        r"^JobRequest has fields \['benchmark_max_bytes', 'job', 'max_bytes', 'peer_count', 'redundancy', "
        r"'reject_nonfinite', 'verify_results'\], expected \['benchmark_max_bytes', 'job', 'max_bytes', "
        r"'peer_count', 'rank', 'redundancy', 'reject_nonfinite', 'verify_results'\]$",
    ),
    "an extra field": (
        JobRequest,
        {**REQUEST_FIELDS, "reject_nonfinite": False, "priority": 9},
        r"^JobRequest has fields \['benchmark_max_bytes', 'job', 'max_bytes', 'peer_count', 'priority', 'rank', "
        r"'redundancy', 'reject_nonfinite', 'verify_results'\], expected \['benchmark_max_bytes', 'job', "
        r"'max_bytes', 'peer_count', 'rank', 'redundancy', 'reject_nonfinite', 'verify_results'\]$",
    ),
    "a string for an int": (
        JobRequest,
        {**REQUEST_FIELDS, "rank": "1", "reject_nonfinite": False},
        r"^JobRequest.rank is '1', not int$",
    ),
    "a bool for an int": (
        JobRequest,
        {**REQUEST_FIELDS, "rank": True, "reject_nonfinite": False},
        r"^JobRequest.rank is True, not int$",
    ),
    "a float for an int": (
        JobRequest,
        {**REQUEST_FIELDS, "rank": 1.0, "reject_nonfinite": False},
        r"^JobRequest.rank is 1.0, not int$",
    ),
    "null for a str": (
        JobRequest,
        {**REQUEST_FIELDS, "job": None, "reject_nonfinite": False},
        r"^JobRequest.job is None, not str$",
    ),
    "an int for a str": (JobLeave, {"job_id": 7, "rank": 1}, r"^JobLeave.job_id is 7, not str$"),
    "a bool for a float": (
        BenchmarkResult,
        {
            "miner_uid": 1,
            "miner_hotkey": "x",
            "size_bytes": 1,
            "seconds": True,
            "outcome": "exact",
            "detail": "",
            "started_at": 0.0,
        },
        r"^BenchmarkResult.seconds is True, not float$",
    ),
    "an unknown outcome": (
        BenchmarkResult,
        {
            "miner_uid": 1,
            "miner_hotkey": "x",
            "size_bytes": 1,
            "seconds": 1,
            "outcome": "great",
            "detail": "",
            "started_at": 0.0,
        },
        r"^BenchmarkResult.outcome is 'great', not a Outcome$",
    ),
    "a list, not an object": (JobLeave, ["job_id", 7], r"^a JobLeave is not a JSON object"),
}


@pytest.mark.parametrize(("cls", "body", "match"), list(MALFORMED_CALLS.values()), ids=list(MALFORMED_CALLS))
def test_a_call_body_that_does_not_fit_its_type_is_malformed(cls, body, match):
    with refused(MalformedMessageError, match):
        parse(cls, json.dumps(body).encode())


@pytest.mark.parametrize("payload", [b"", b"\xff", b"[" * 100_000, b'{"job_id": NaN, "rank": 1}'])
def test_a_call_body_that_is_not_json_is_malformed(payload):
    with refused(MalformedMessageError, r"^a JobLeave is not"):
        parse(JobLeave, payload)


# A signed body: (body class, body as signed, the error's message)
MALFORMED_BODIES = {
    "an unknown round kind": (Chunk, chunk(kind="all_gather"), r"^Chunk.kind is 'all_gather', not a RoundKind$"),
    "an unknown op": (Chunk, chunk(op="max"), r"^Chunk.op is 'max', not a ReduceOp$"),
    "a string for a tuple": (
        Reduced,
        {**json.loads(canonical(dataclasses.asdict(ROUND_TRIPS["reduced"][0]))), "inputs": "aa"},
        r"^Reduced.inputs is 'aa', not tuple$",
    ),
    "a bad tuple item": (
        Reduced,
        {**json.loads(canonical(dataclasses.asdict(ROUND_TRIPS["reduced"][0]))), "inputs": ["aa", 3]},
        r"^Reduced.inputs is 3, not str$",
    ),
    "a bad nested field": (
        Chunk,
        chunk(tensor={"dtype": "float32", "shape": ["4"]}),
        r"^Chunk.tensor.shape is '4', not int$",
    ),
    "a nested record missing a field": (
        Chunk,
        chunk(tensor={"dtype": "float32"}),
        r"^Chunk.tensor has fields \['dtype'\], expected \['dtype', 'shape'\]$",
    ),
    "a list for a nested record": (
        Chunk,
        chunk(tensor=["float32", [4]]),
        r"^Chunk.tensor is \['float32', \[4\]\], not TensorSpec$",
    ),
    "an unsupported dtype": (
        Chunk,
        chunk(tensor={"dtype": "bool", "shape": [4]}),
        r"^Chunk.tensor does not hold: dtype bool is not supported",
    ),
    "a negative dimension": (
        Chunk,
        chunk(tensor={"dtype": "float32", "shape": [4, -1]}),
        r"^Chunk.tensor does not hold: a tensor shape is up to 64 non-negative ints",
    ),
}


@pytest.mark.parametrize(("cls", "body", "match"), list(MALFORMED_BODIES.values()), ids=list(MALFORMED_BODIES))
def test_a_signed_body_that_does_not_fit_its_type_is_malformed(world, cls, body, match):
    wire = seal(PEER, KINDS[cls], body, MINER.ss58_address, NETUID, world.clock.ns)
    with refused(MalformedMessageError, match):
        open_body(world.verifier(MINER), wire, cls)


def test_a_job_spec_with_a_malformed_miner_slot_is_malformed(world):
    body = json.loads(canonical(dataclasses.asdict(JobAdmission(SPEC, 1, PEER.ss58_address))))
    del body["spec"]["miners"][1]["weight"]
    wire = seal(VALIDATOR, Kind.JOB_SPEC, body, PEER.ss58_address, NETUID, world.clock.ns)
    with refused(
        MalformedMessageError,
        r"^JobAdmission.spec.miners has fields \['capacity', 'certificate', 'endpoint', 'hotkey', 'throughput', "
        r"'uid'\], expected \['capacity', 'certificate', 'endpoint', 'hotkey', 'throughput', 'uid', 'weight'\]$",
    ):
        open_body(world.verifier(PEER), wire, JobAdmission)


def test_non_numbers_are_malformed(world):
    inner = inner_of(PEER, Kind.CHUNK, dataclasses.asdict(REQUEST), VALIDATOR, world.clock.ns)
    message = json.dumps({**inner, "timestamp_ns": float("inf")})  # JSON's Infinity extension
    wire = canonical({"scheme": "sr25519", "signature": "0x00", "message": message}).encode()
    with refused(MalformedMessageError, r"^the signed part is not JSON of the mapreduce-ray/1 protocol$"):
        world.verifier(VALIDATOR).open(wire, Kind.CHUNK)


def test_a_body_that_is_not_an_object_is_malformed(world):
    inner = inner_of(PEER, Kind.CHUNK, [["job", "x"]], VALIDATOR, world.clock.ns)
    with refused(MalformedMessageError, r"^chunk message: field 'body' missing or not dict$"):
        world.verifier(VALIDATOR).open(sign_raw(PEER, inner), Kind.CHUNK)
