"""Identity on the wire: peers and miners refuse every party the chain does not vouch for."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pytest
import ray
import torch
from bittensor.sp_core import Keypair

from mapreduce_ray import Peer
from mapreduce_ray.chain import ChainConfig
from mapreduce_ray.errors import (
    BadSignatureError,
    JobError,
    MalformedMessageError,
    MapReduceError,
    NotRegisteredError,
    NoValidatorPermitError,
    ReplayedMessageError,
    WalletError,
    WrongReceiverError,
)
from mapreduce_ray.messages import (
    Chunk,
    JobAdmission,
    JobRequest,
    RoundFailed,
    StreamOpen,
    encode,
    open_body,
    parse,
    seal_body,
)
from mapreduce_ray.plan import MIN_SEGMENT_BYTES
from mapreduce_ray.protocol import MetagraphCache, Verifier, audience, canonical
from mapreduce_ray.types import JobSpec, ReduceOp, RoundKind, TensorSpec
from mapreduce_ray.wallets import dev_peer_wallet, dev_wallet, ensure_dev_wallet, load_identity
from mapreduce_ray.wire.auth import Rule
from mapreduce_ray.wire.config import WireConfig
from mapreduce_ray.wire.endpoint import Endpoint, Remote
from mapreduce_ray.wire.frames import CHUNK_SCHEMA, digest, frame_buffer

TIMEOUT_S = 30.0
IMPOSTOR_NETUID = 171  # a netuid of its own on the session's chain, so its validators stay out of other tests
WIRE = WireConfig()
BOTH_MINERS_NUMEL = MIN_SEGMENT_BYTES  # float32: 4 x 64 KiB, enough for a segment on each of two miners


def key(name: str) -> Keypair:
    """A keypair of this module's own netuid."""
    return Keypair.create_from_uri(f"//Identity{name}")


def dev_peer_key(subnet, rank: int) -> Keypair:
    """The development keypair a local subnet registered for `rank`."""
    return load_identity(dev_peer_wallet(subnet.chain.state_path, rank)).keypair


def chain_file(subnet) -> str:
    return re.escape(str(subnet.chain.state_path / "chain.sqlite"))


# Who may join.


def test_services_started_together_create_one_development_coldkey(tmp_path):
    """Miners started at once create the same development wallet's coldkey: one process at a time does."""
    create = (
        "import sys, time; from mapreduce_ray.wallets import WalletConfig, ensure_dev_wallet, load_identity; "
        "w = WalletConfig('dev-miner', sys.argv[1], sys.argv[2]); "
        "time.sleep(max(float(sys.argv[3]) - time.time(), 0)); ensure_dev_wallet(w); print(load_identity(w).hotkey)"
    )
    at = str(time.time() + 8)  # every process imported by then: they start creating together
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", create, f"miner-{i}", str(tmp_path), at], stdout=subprocess.PIPE, text=True
        )
        for i in range(4)
    ]
    hotkeys = [proc.communicate(timeout=TIMEOUT_S)[0].strip() for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 4
    assert len(set(hotkeys)) == 4
    coldkey = (tmp_path / "dev-miner" / "coldkeypub.txt").read_text()
    assert json.loads(coldkey)["ss58Address"]


def test_an_unregistered_wallet_is_told_in_one_line_how_to_register(subnets):
    subnet = subnets[1]
    wallet = dev_wallet(subnet.chain.state_path, "test-unregistered", "hot")
    ensure_dev_wallet(wallet)
    hotkey = load_identity(wallet).hotkey
    peer = Peer(1, 1, wallet=wallet, job="unregistered", **subnet.peer_options)
    with pytest.raises(NotRegisteredError) as caught:
        peer.init_process_group()
    assert str(caught.value) == (
        f"hotkey {hotkey} (wallet test-unregistered/hot) is not registered on netuid {subnet.chain.netuid} "
        f"on the embedded chain at {subnet.chain.state_path / 'chain.sqlite'}; "
        f"register it: python -m jobs.register +wallet.name=test-unregistered +wallet.hotkey=hot "
        f"+wallet.path={wallet.directory} subnet.chain.netuid={subnet.chain.netuid} "
        f"subnet.chain.state_dir={subnet.chain.state_path}"
    )
    assert "\n" not in str(caught.value)
    assert peer.spec is None


def test_a_validator_uid_without_a_permit_is_refused_naming_the_permitted_uids(subnets):
    subnet = subnets[1]
    miner_uid = ray.get(subnet.miners[0].status.remote(), timeout=TIMEOUT_S)["uid"]
    permitted = sorted(n.uid for n in subnet.chain.open().metagraph().validators)
    assert subnet.validator_uid in permitted and miner_uid not in permitted
    for uid in (miner_uid, 999):  # a miner's uid, and a uid nobody holds
        peer = Peer(1, 1, job="no-permit", **{**subnet.peer_options, "validator_uid": uid})
        with pytest.raises(
            NoValidatorPermitError,
            match=rf"^uid {uid} is no validator on netuid {subnet.chain.netuid} on the embedded chain at "
            rf"{chain_file(subnet)}; pass validator_uid= one of {re.escape(str(permitted))}$",
        ):
            peer.init_process_group()
        assert peer.spec is None


# A job spec signed by the wrong key, from an impostor endpoint answering as the validator.


class Impostor(Endpoint):
    """Serves `join` at the validator's announced endpoint, signing its answer as whichever key it is told."""

    def __init__(self, metagraph: MetagraphCache):
        super().__init__("127.0.0.1:0", key("Validator"), metagraph, {"join": Rule()}, WIRE)
        self.signer, self.rank_shift = key("Validator"), 0

    def actions(self):
        return {"join": self._join}

    def _join(self, caller, payload: bytes) -> bytes:
        request = parse(JobRequest, payload)
        spec = JobSpec("impostorjob01", request.job, request.peer_count, (), 1024, 30.0, 1 << 20)
        return seal_body(
            self.signer, JobAdmission(spec, request.rank + self.rank_shift, caller.hotkey), caller.hotkey, self.netuid
        )


@dataclasses.dataclass
class ImpostorWorld:
    chain: ChainConfig
    uids: dict[str, int]
    endpoint: Impostor

    def peer(self) -> Peer:
        return Peer(
            1,
            2,
            wallet=key("Peer"),
            validator_uid=self.uids["Validator"],
            netuid=self.chain.netuid,
            state_dir=self.chain.state_path,
            job="impostor",
            connect_timeout_s=TIMEOUT_S,
        )

    def answer_as(self, name: str, rank_shift: int = 0) -> None:
        self.endpoint.signer, self.endpoint.rank_shift = key(name), rank_shift


@pytest.fixture(scope="module")
def impostor(subnets):
    """On its own netuid: a validator (uid asked by the peer), another permitted validator, a miner, a
    peer; the endpoint the validator announced is an impostor that signs as it is told."""
    chain = ChainConfig(netuid=IMPOSTOR_NETUID, state_dir=str(subnets[1].chain.state_path))
    client, cold = chain.open(), key("Cold").ss58_address
    stakes = {"Validator": 100.0, "OtherValidator": 50.0, "Miner": 0.0, "Peer": 0.0}
    uids = {name: client.register(key(name).ss58_address, cold, stake) for name, stake in stakes.items()}
    permitted = {n.uid for n in client.metagraph().validators}
    assert {uids["Validator"], uids["OtherValidator"]} <= permitted and uids["Miner"] not in permitted
    endpoint = Impostor(MetagraphCache(client))
    client.serve(key("Validator"), endpoint.address)
    try:
        yield ImpostorWorld(chain, uids, endpoint)
    finally:
        endpoint.shutdown()


def test_the_impostor_harness_admits_when_it_signs_as_the_validator(impostor):
    """The control: signed by the validator's own key, the same answer is accepted."""
    impostor.answer_as("Validator")
    peer = impostor.peer()
    spec = peer.init_process_group()
    assert (spec.job_id, spec.name, spec.peer_count) == ("impostorjob01", "impostor", 2)


def refusal_of(impostor: ImpostorWorld, signer: str) -> tuple[type, str]:
    """The error (class and message pattern) a peer refuses a job spec `signer` signed with."""
    ss58 = {n: key(n).ss58_address for n in ("Miner", "OtherValidator", "Validator", "Stranger")}
    where = f"netuid {IMPOSTOR_NETUID} on the embedded chain at "
    return {
        "Miner": (
            NoValidatorPermitError,
            rf"^job_spec message from uid {impostor.uids['Miner']} \({ss58['Miner']}\), "
            f"which has no validator permit on {where}",
        ),
        "OtherValidator": (
            BadSignatureError,
            rf"^job_spec message signed by {ss58['OtherValidator']}, expected {ss58['Validator']}$",
        ),
        "Stranger": (
            NotRegisteredError,
            rf"^job_spec message from {ss58['Stranger']}, which is not registered on {where}",
        ),
    }[signer]


@pytest.mark.parametrize(
    "signer", ["Miner", "OtherValidator", "Stranger"], ids=["no permit", "another", "unregistered"]
)
def test_a_job_spec_signed_by_anyone_but_the_asked_validator_is_refused(impostor, signer):
    impostor.answer_as(signer)
    peer = impostor.peer()
    error, match = refusal_of(impostor, signer)
    with pytest.raises(error, match=match):
        peer.init_process_group()
    assert peer.spec is None


def test_a_job_spec_admitting_another_rank_is_refused(impostor):
    impostor.answer_as("Validator", rank_shift=1)
    peer = impostor.peer()
    with pytest.raises(
        JobError,
        match=rf"^validator uid {impostor.uids['Validator']} admitted someone else; refusing its job spec$",
    ):
        peer.init_process_group()
    assert peer.spec is None


# What a miner refuses on a job stream.


@dataclasses.dataclass
class Stream:
    """A raw job stream to a miner."""

    remote: Remote
    writer: object
    reader: object

    def send(self, wire: bytes, data: bytes | None = None) -> None:
        metadata = pa.py_buffer(wire)
        with self.remote.errors():
            if data is None:
                self.writer.write_metadata(metadata)
            else:
                self.writer.write_with_metadata(frame_buffer(pa.py_buffer(data)), metadata)

    def next_message(self) -> bytes:
        with self.remote.errors():
            return self.reader.read_chunk().app_metadata.to_pybytes()


def open_stream(status: dict, keypair: Keypair, job_id: str, rank: int) -> Stream:
    """A job stream to the miner of `status`, opened by `keypair` as `rank` of `job_id`."""
    remote = Remote("the miner", status["endpoint"], status["hotkey"], keypair, WIRE, netuid=status["netuid"])
    with remote.errors():
        writer, reader = remote.exchange("exchange", encode(StreamOpen(job_id, rank)))
        writer.begin(CHUNK_SCHEMA)
    return Stream(remote, writer, reader)


def refusal(status: dict, keypair: Keypair, job_id: str, rank: int, *messages: tuple[bytes, bytes]) -> Exception:
    """The error the miner ends a job stream with that sends `messages` ((wire, frame bytes) each)."""
    with pytest.raises(MapReduceError) as caught:
        stream = open_stream(status, keypair, job_id, rank)
        for wire, data in messages:
            stream.send(wire, data)
        while True:
            stream.next_message()
    return caught.value


def chunk(job_id: str, data: bytes = b"\0" * 16, rank: int = 1, seq: int = 1) -> Chunk:
    tensor = TensorSpec("float32", (len(data) // 4,))
    return Chunk(job_id, seq, RoundKind.ALL_REDUCE, ReduceOp.SUM, None, tensor, 0, rank, 0, digest(data))


@pytest.fixture
def joined(subnets):
    """Rank 1 of a 2-peer job on the 1-miner subnet (which has not streamed yet): (peer, miner status)."""
    subnet = subnets[1]
    peer = Peer(1, 2, job=f"identity-{uuid.uuid4().hex}", **subnet.peer_options)
    peer.init_process_group()
    try:
        yield peer, ray.get(subnet.miners[0].status.remote(), timeout=TIMEOUT_S)
    finally:
        peer.destroy_process_group()


def test_a_miner_refuses_a_hotkey_not_admitted_at_that_rank(subnets, joined):
    peer, status = joined
    other = dev_peer_key(subnets[1], 2)  # registered on the subnet, but never joined this job
    cause = refusal(status, other, peer.spec.job_id, 1)
    assert type(cause) is JobError
    assert str(cause) == f"hotkey {other.ss58_address} was not admitted as rank 1 of job {peer.spec.job_id!r}"
    own = dev_peer_key(subnets[1], 1)  # the admitted hotkey, claiming the rank nobody joined
    cause = refusal(status, own, peer.spec.job_id, 2)
    assert type(cause) is JobError
    assert str(cause) == f"hotkey {own.ss58_address} was not admitted as rank 2 of job {peer.spec.job_id!r}"


def test_a_miner_refuses_a_stream_for_an_unknown_job(subnets):
    status = ray.get(subnets[1].miners[0].status.remote(), timeout=TIMEOUT_S)
    cause = refusal(status, dev_peer_key(subnets[1], 1), "feedbeeffeed", 1)
    assert type(cause) is JobError
    assert str(cause) == (
        f"miner {status['name']!r} knows no job feedbeeffeed: it is unknown or finished; "
        "call init_process_group() again"
    )


def test_an_unregistered_hotkey_cannot_open_a_stream(joined):
    peer, status = joined
    stranger = Keypair.create_from_uri(f"//Stranger{uuid.uuid4().hex}")
    cause = refusal(status, stranger, peer.spec.job_id, 1)
    assert type(cause) is NotRegisteredError
    assert str(cause).startswith(f"the miner refused the call: hotkey {stranger.ss58_address} is not registered on ")


def test_a_miner_refuses_a_tampered_chunk(subnets, joined):
    peer, status = joined
    own = dev_peer_key(subnets[1], 1)
    outer = json.loads(seal_body(own, chunk(peer.spec.job_id), status["hotkey"], status["netuid"]))
    assert outer["message"].count('"seq":1') == 1
    outer["message"] = outer["message"].replace('"seq":1', '"seq":2')
    cause = refusal(status, own, peer.spec.job_id, 1, (canonical(outer).encode(), b"\0" * 16))
    assert type(cause) is BadSignatureError
    assert (
        str(cause) == f"the miner refused the call: chunk message from {own.ss58_address}: the signature does not match"
    )


def test_a_miner_refuses_a_chunk_addressed_to_another_miner(subnets, joined):
    peer, status = joined
    # dev-miner/miner-1: the second miner of the 2-miner subnet (the local subnets share dev wallets,
    # so miner-0 there has this miner's very hotkey)
    elsewhere = ray.get(subnets[2].miners[1].status.remote(), timeout=TIMEOUT_S)["hotkey"]
    assert elsewhere != status["hotkey"]
    own = dev_peer_key(subnets[1], 1)
    cause = refusal(
        status,
        own,
        peer.spec.job_id,
        1,
        (seal_body(own, chunk(peer.spec.job_id), elsewhere, status["netuid"]), b"\0" * 16),
    )
    assert type(cause) is WrongReceiverError
    assert str(cause) == (
        f"the miner refused the call: chunk message from {own.ss58_address} is addressed to {elsewhere}, "
        f"not {status['hotkey']}"
    )


def test_garbage_ends_the_stream(subnets, joined):
    peer, status = joined
    own = dev_peer_key(subnets[1], 1)
    cause = refusal(status, own, peer.spec.job_id, 1, (b"just some bytes", b"\0" * 16))
    assert type(cause) is MalformedMessageError
    assert str(cause) == "the miner refused the call: the message is not JSON of the mapreduce-ray/1 protocol"


def test_a_peer_opening_rounds_far_ahead_is_refused_past_the_rounds_a_job_may_hold_open(subnets, joined):
    """Rank 1 sends the first chunk of rounds 10, 11, 12, 13 (each then waits for rank 2) and of round 14: the
    miner holds 4 rounds of a job open at most (relay.rounds_per_job), and refuses the fifth, naming the limit."""
    peer, status = joined
    own = dev_peer_key(subnets[1], 1)
    sent = [
        (seal_body(own, chunk(peer.spec.job_id, seq=seq), status["hotkey"], status["netuid"]), b"\0" * 16)
        for seq in range(10, 15)
    ]
    cause = refusal(status, own, peer.spec.job_id, 1, *sent)
    assert type(cause) is JobError
    assert re.fullmatch(
        r"job '[0-9a-f]{12}' already has rounds \[10, 11, 12, 13\] open at miner "
        r"'miner-\d+' \(relay.rounds_per_job 4\); a peer runs one round at a time",
        str(cause),
    )


def test_a_replayed_chunk_ends_the_stream_and_leaves_nothing_open(subnets, joined):
    peer, status = joined
    own = dev_peer_key(subnets[1], 1)
    wire = seal_body(own, chunk(peer.spec.job_id, seq=7), status["hotkey"], status["netuid"])
    cause = refusal(status, own, peer.spec.job_id, 1, (wire, b"\0" * 16), (wire, b"\0" * 16))
    assert type(cause) is ReplayedMessageError
    assert re.fullmatch(
        rf"the miner refused the call: chunk message from {own.ss58_address} replayed \(nonce [0-9a-f]+\)", str(cause)
    )
    deadline = time.monotonic() + TIMEOUT_S
    while (
        ray.get(subnets[1].miners[0].status.remote(), timeout=TIMEOUT_S)["open_rounds"] and time.monotonic() < deadline
    ):
        time.sleep(0.1)
    assert ray.get(subnets[1].miners[0].status.remote(), timeout=TIMEOUT_S)["open_rounds"] == 0


def test_a_miner_fails_the_round_of_bytes_other_than_the_signed_ones(subnets, joined):
    peer, status = joined
    own = dev_peer_key(subnets[1], 1)
    stream = open_stream(status, own, peer.spec.job_id, 1)
    stream.send(
        seal_body(own, chunk(peer.spec.job_id, data=b"\1" * 16), status["hotkey"], status["netuid"]), b"\0" * 16
    )
    verifier = Verifier(own.ss58_address, MetagraphCache(subnets[1].chain.open()))
    failed, _ = open_body(verifier, stream.next_message(), RoundFailed, receiver=audience(peer.spec.job_id))
    assert failed.error == "RoundMismatchError"
    assert failed.message.endswith("rank 1 sent bytes that do not match the digest it signed")
    stream.writer.done_writing()


# A refused round leaves the tensor as it was.


def test_a_round_one_miner_refuses_leaves_every_tensor_untouched(subnets):
    """Both ranks opened and closed their streams at the second miner (so it counts them as gone and
    forgets the job): it refuses the job while the first miner reduces its segment, and no peer may
    write the first segment alone."""
    subnet = subnets[2]
    job = f"identity-refused-{uuid.uuid4().hex}"
    peers = [Peer(r, 2, job=job, **subnet.peer_options) for r in (1, 2)]
    try:
        for peer in peers:
            peer.init_process_group()
        spec = peers[0].spec
        statuses = ray.get([m.status.remote() for m in subnet.miners], timeout=TIMEOUT_S)
        second = next(s for s in statuses if s["hotkey"] == spec.miners[1].hotkey)  # the job's second miner
        for rank in (1, 2):
            stream = open_stream(second, dev_peer_key(subnet, rank), spec.job_id, rank)
            stream.writer.done_writing()
            with pytest.raises(StopIteration):
                stream.reader.read_chunk()
        tensors = [torch.arange(BOTH_MINERS_NUMEL, dtype=torch.float32) * r for r in (1, 2)]
        originals = [t.clone() for t in tensors]
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(p.all_reduce, t, "sum") for p, t in zip(peers, tensors, strict=True)]
            errors = [f.exception(timeout=2 * TIMEOUT_S) for f in futures]
        for error in errors:
            assert type(error) is JobError
            assert str(error) == (
                f"miner {spec.miners[1].name!r} knows no job {spec.job_id}: it is unknown or finished; "
                "call init_process_group() again"
            )
        for tensor, original in zip(tensors, originals, strict=True):
            assert torch.equal(tensor, original)
    finally:
        for peer in peers:
            peer.destroy_process_group()


def test_a_rank_without_its_development_wallet_is_told_how_to_make_one(tmp_path):
    peer = Peer(3, 4, state_dir=tmp_path)
    with pytest.raises(
        WalletError,
        match=rf"^no development wallet for rank 3 in {re.escape(str(tmp_path.resolve()))}: start the local subnet "
        r"with peers >= 3, or make and register one: python -m jobs.register \+wallet=dev-peer wallet.hotkey=rank-3$",
    ):
        peer.init_process_group()
