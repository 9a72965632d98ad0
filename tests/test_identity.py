"""Identity through Ray: peers and miners refuse every party the chain does not vouch for."""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pytest
import ray
import torch
from bittensor.sp_core import Keypair
from ray.exceptions import RayTaskError

from mapreduce_ray import Peer
from mapreduce_ray.chain import ChainConfig
from mapreduce_ray.errors import (
    BadSignatureError,
    JobError,
    MalformedMessageError,
    NotRegisteredError,
    NoValidatorPermitError,
    ReplayedMessageError,
    RoundMismatchError,
    WrongReceiverError,
)
from mapreduce_ray.messages import Contribution, JobLeave, seal_body
from mapreduce_ray.protocol import canonical
from mapreduce_ray.types import ReduceOp, RoundKind, TensorSpec
from mapreduce_ray.wallets import dev_peer_wallet, dev_wallet, ensure_dev_wallet, load_identity

TIMEOUT_S = 30.0
IMPOSTOR_NETUID = 171  # a netuid of its own on the session's chain, so its validators stay out of other tests
IMPOSTOR_NAMESPACE = "tests-impostor"


def key(name: str) -> Keypair:
    """A keypair of this module's own netuid."""
    return Keypair.create_from_uri(f"//Identity{name}")


def dev_peer_key(subnet, rank: int) -> Keypair:
    """The development keypair a local subnet registered for `rank`."""
    return load_identity(dev_peer_wallet(subnet.chain.state_path, rank)).keypair


def chain_file(subnet) -> str:
    return re.escape(str(subnet.chain.state_path / "chain.sqlite"))


# Who may join.


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


# A job spec signed by the wrong key, from an impostor answering as the validator.


def impostor_class():
    """An actor that answers `join` like a validator, signing as whichever key it is told to.

    Built inside a function so that Ray pickles the class by value: its workers cannot
    import this test module. Its methods use only importable names.
    """

    class Impostor:
        def __init__(self):
            self.signer, self.rank_shift = "", 0

        def act(self, signer_uri: str, rank_shift: int = 0) -> None:
            self.signer, self.rank_shift = signer_uri, rank_shift

        def join(self, wire: bytes) -> bytes:
            from bittensor.sp_core import Keypair

            from mapreduce_ray.messages import JobAdmission, seal_body
            from mapreduce_ray.types import JobSpec

            inner = json.loads(json.loads(wire)["message"])
            request, peer = inner["body"], inner["sender"]
            spec = JobSpec("impostorjob01", request["job"], "nowhere", request["peer_count"], (), 1024, 30.0, 1 << 20)
            admission = JobAdmission(spec, request["rank"] + self.rank_shift, peer)
            return seal_body(Keypair.create_from_uri(self.signer), admission, peer)

        def leave(self, wire: bytes) -> None:
            return None

    return Impostor


@dataclasses.dataclass
class ImpostorWorld:
    chain: ChainConfig
    uids: dict[str, int]
    actor: ray.actor.ActorHandle

    def peer(self) -> Peer:
        return Peer(
            1,
            2,
            wallet=key("Peer"),
            validator_uid=self.uids["Validator"],
            netuid=self.chain.netuid,
            state_dir=self.chain.state_path,
            namespace=IMPOSTOR_NAMESPACE,
            job="impostor",
            connect_timeout_s=TIMEOUT_S,
        )

    def answer_as(self, name: str, rank_shift: int = 0) -> None:
        ray.get(self.actor.act.remote(f"//Identity{name}", rank_shift), timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def impostor(subnets):
    """On its own netuid: a validator (uid asked by the peer), another permitted validator, a miner, a
    peer; the actor named after the validator's uid is an impostor that signs as it is told."""
    chain = ChainConfig(netuid=IMPOSTOR_NETUID, state_dir=str(subnets[1].chain.state_path))
    client, cold = chain.open(), key("Cold").ss58_address
    stakes = {"Validator": 100.0, "OtherValidator": 50.0, "Miner": 0.0, "Peer": 0.0}
    uids = {name: client.register(key(name).ss58_address, cold, stake) for name, stake in stakes.items()}
    permitted = {n.uid for n in client.metagraph().validators}
    assert {uids["Validator"], uids["OtherValidator"]} <= permitted and uids["Miner"] not in permitted
    name = f"validator-{uids['Validator']}"
    actor = ray.remote(num_cpus=0)(impostor_class()).options(name=name, namespace=IMPOSTOR_NAMESPACE).remote()
    try:
        yield ImpostorWorld(chain, uids, actor)
    finally:
        ray.kill(actor)


def test_the_impostor_harness_admits_when_it_signs_as_the_validator(impostor):
    """The control: signed by the validator's own key, the same answer is accepted."""
    impostor.answer_as("Validator")
    peer = impostor.peer()
    try:
        spec = peer.init_process_group()
        assert (spec.job_id, spec.name, spec.peer_count) == ("impostorjob01", "impostor", 2)
    finally:
        peer.destroy_process_group()


def test_a_job_spec_signed_by_a_hotkey_without_a_permit_is_refused(impostor):
    impostor.answer_as("Miner")
    peer = impostor.peer()
    try:
        with pytest.raises(
            NoValidatorPermitError,
            match=rf"^job_spec message from uid {impostor.uids['Miner']} \({key('Miner').ss58_address}\), "
            rf"which has no validator permit on netuid {IMPOSTOR_NETUID} on the embedded chain at ",
        ):
            peer.init_process_group()
        assert peer.spec is None
    finally:
        peer.destroy_process_group()


def test_a_job_spec_signed_by_another_permitted_validator_is_refused(impostor):
    impostor.answer_as("OtherValidator")
    peer = impostor.peer()
    try:
        with pytest.raises(
            BadSignatureError,
            match=rf"^job_spec message signed by {key('OtherValidator').ss58_address}, "
            rf"expected {key('Validator').ss58_address}$",
        ):
            peer.init_process_group()
        assert peer.spec is None
    finally:
        peer.destroy_process_group()


def test_a_job_spec_signed_by_an_unregistered_hotkey_is_refused(impostor):
    impostor.answer_as("Stranger")
    peer = impostor.peer()
    try:
        with pytest.raises(
            NotRegisteredError,
            match=rf"^job_spec message from {key('Stranger').ss58_address}, which is not registered on "
            rf"netuid {IMPOSTOR_NETUID} on the embedded chain at ",
        ):
            peer.init_process_group()
        assert peer.spec is None
    finally:
        peer.destroy_process_group()


def test_a_job_spec_admitting_another_rank_is_refused(impostor):
    impostor.answer_as("Validator", rank_shift=1)
    peer = impostor.peer()
    try:
        with pytest.raises(
            JobError,
            match=rf"^validator uid {impostor.uids['Validator']} admitted someone else; refusing its job spec$",
        ):
            peer.init_process_group()
        assert peer.spec is None
    finally:
        peer.destroy_process_group()


# What a miner refuses.


def refusal(miner, wire: bytes, chunks: list | None = None) -> Exception:
    """The error `miner` answers a contribution with, as the first item of its result stream."""
    stream = miner.reduce.options(num_returns="streaming").remote(wire, chunks)
    with pytest.raises(RayTaskError) as caught:
        ray.get(next(stream), timeout=TIMEOUT_S)
    return caught.value.cause


def contribution(job_id: str, rank: int = 1, miner: int = 0) -> Contribution:
    return Contribution(
        job_id, 1, RoundKind.ALL_REDUCE, ReduceOp.SUM, None, TensorSpec("float32", (4,)), miner, rank, (), miner
    )


@pytest.fixture
def joined(subnets):
    """Rank 1 of a 2-peer job on the 1-miner subnet: (peer, miner handle, miner hotkey)."""
    subnet = subnets[1]
    peer = Peer(1, 2, job=f"identity-{uuid.uuid4().hex}", **subnet.peer_options)
    peer.init_process_group()
    try:
        yield peer, subnet.miners[0], peer.spec.miners[0].hotkey
    finally:
        peer.destroy_process_group()


def test_a_miner_refuses_a_hotkey_not_admitted_at_that_rank(subnets, joined):
    peer, miner, miner_hotkey = joined
    other = dev_peer_key(subnets[1], 2)  # registered on the subnet, but never joined this job
    cause = refusal(miner, seal_body(other, contribution(peer.spec.job_id, rank=1), miner_hotkey))
    assert type(cause) is JobError
    assert str(cause) == f"hotkey {other.ss58_address} was not admitted as rank 1 of job {peer.spec.name!r}"
    own = dev_peer_key(subnets[1], 1)  # the admitted hotkey, claiming the rank nobody joined
    cause = refusal(miner, seal_body(own, contribution(peer.spec.job_id, rank=2), miner_hotkey))
    assert type(cause) is JobError
    assert str(cause) == f"hotkey {own.ss58_address} was not admitted as rank 2 of job {peer.spec.name!r}"


def test_a_miner_refuses_a_contribution_for_another_miners_segment(subnets, joined):
    peer, miner, miner_hotkey = joined
    cause = refusal(
        miner, seal_body(dev_peer_key(subnets[1], 1), contribution(peer.spec.job_id, miner=1), miner_hotkey)
    )
    assert type(cause) is JobError
    assert str(cause) == (f"contribution for miner #1 of job {peer.spec.name!r} sent to {peer.spec.miners[0].name!r}")


def test_a_miner_refuses_a_contribution_for_an_unknown_job(subnets):
    subnet = subnets[1]
    status = ray.get(subnet.miners[0].status.remote(), timeout=TIMEOUT_S)
    wire = seal_body(dev_peer_key(subnet, 1), contribution("feedbeeffeed"), status["hotkey"])
    cause = refusal(subnet.miners[0], wire)
    assert type(cause) is JobError
    assert str(cause) == (
        f"miner {status['name']!r} knows no job feedbeeffeed: it is unknown or finished; "
        "call init_process_group() again"
    )


def test_a_miner_refuses_a_tampered_contribution(subnets, joined):
    peer, miner, miner_hotkey = joined
    own = dev_peer_key(subnets[1], 1)
    wire = seal_body(own, contribution(peer.spec.job_id), miner_hotkey)
    outer = json.loads(wire)
    assert outer["message"].count('"seq":1') == 1
    outer["message"] = outer["message"].replace('"seq":1', '"seq":2')
    cause = refusal(miner, canonical(outer).encode())
    assert type(cause) is BadSignatureError
    assert str(cause) == f"contribution message from {own.ss58_address}: the signature does not match"


def test_a_miner_refuses_a_contribution_addressed_to_another_miner(subnets, joined):
    peer, miner, miner_hotkey = joined
    # dev-miner/miner-1: the second miner of the 2-miner subnet (the local subnets share dev wallets,
    # so miner-0 there has this miner's very hotkey)
    elsewhere = ray.get(subnets[2].miners[1].status.remote(), timeout=TIMEOUT_S)["hotkey"]
    assert elsewhere != miner_hotkey
    own = dev_peer_key(subnets[1], 1)
    cause = refusal(miner, seal_body(own, contribution(peer.spec.job_id), elsewhere))
    assert type(cause) is WrongReceiverError
    assert str(cause) == (
        f"contribution message from {own.ss58_address} is addressed to {elsewhere}, not {miner_hotkey}"
    )


def test_unsigned_replayed_and_unregistered_contributions_are_refused_and_leave_nothing_open(subnets, joined):
    peer, miner, miner_hotkey = joined
    cause = refusal(miner, b"just some bytes")
    assert type(cause) is MalformedMessageError
    assert str(cause) == "the message is not JSON of the mapreduce-ray/1 protocol"
    stranger = Keypair.create_from_uri(f"//Stranger{uuid.uuid4().hex}")
    cause = refusal(miner, seal_body(stranger, contribution(peer.spec.job_id), miner_hotkey))
    assert type(cause) is NotRegisteredError
    assert str(cause).startswith(f"contribution message from {stranger.ss58_address}, which is not registered on ")
    wire = seal_body(dev_peer_key(subnets[1], 1), contribution("feedbeeffeed"), miner_hotkey)
    assert type(refusal(miner, wire)) is JobError  # seen once: its nonce is spent
    cause = refusal(miner, wire)
    assert type(cause) is ReplayedMessageError
    sender = dev_peer_key(subnets[1], 1).ss58_address
    assert re.fullmatch(rf"contribution message from {sender} replayed \(nonce [0-9a-f]+\)", str(cause))
    assert ray.get(miner.status.remote(), timeout=TIMEOUT_S)["open_rounds"] == 0


# A refused round leaves the tensor as it was.


def test_a_miner_refuses_chunks_other_than_the_signed_ones(subnets, joined):
    peer, miner, hotkey = joined
    signed_for = ("blake3:" + "00" * 32,)
    wire = seal_body(
        peer._identity.keypair, dataclasses.replace(contribution(peer.spec.job_id), chunks=signed_for), hotkey
    )
    cause = refusal(miner, wire, [pa.py_buffer(b"\0" * 16)])
    assert type(cause) is RoundMismatchError
    assert str(cause).endswith("rank 1 shipped other chunks than it signed for")


def test_a_round_one_miner_refuses_leaves_every_tensor_untouched(subnets):
    """Both peers left the job at the second miner only (genuine signed JobLeaves), so it refuses the
    round while the first miner reduces its segment: no peer may write the first segment alone."""
    subnet = subnets[2]
    job = f"identity-refused-{uuid.uuid4().hex}"
    peers = [Peer(r, 2, job=job, **subnet.peer_options) for r in (1, 2)]
    try:
        for peer in peers:
            peer.init_process_group()
        spec = peers[0].spec
        second = spec.miners[1]
        leaves = [
            subnet.miners[1].release_job.remote(
                seal_body(dev_peer_key(subnet, r), JobLeave(spec.job_id, r), second.hotkey)
            )
            for r in (1, 2)
        ]
        ray.get(leaves, timeout=TIMEOUT_S)
        tensors = [torch.arange(1000, dtype=torch.float32) * r for r in (1, 2)]
        originals = [t.clone() for t in tensors]
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(p.all_reduce, t, "sum") for p, t in zip(peers, tensors, strict=True)]
            errors = [f.exception(timeout=2 * TIMEOUT_S) for f in futures]
        for error in errors:
            assert type(error) is JobError
            assert str(error) == (
                f"miner {second.name!r} knows no job {spec.job_id}: it is unknown or finished; "
                "call init_process_group() again"
            )
        for tensor, original in zip(tensors, originals, strict=True):
            assert torch.equal(tensor, original)
    finally:
        for peer in peers:
            peer.destroy_process_group()
