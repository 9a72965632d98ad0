"""What only the bittensor backend does: the extrinsics it submits, the btcli commands it gives, and how the
SDK's failures become our errors. It runs the real SDK against the in-memory chain of `fake_substrate`."""

from __future__ import annotations

import ipaddress
import logging
import re
import shlex
import threading
from pathlib import Path

import bittensor as bt
import pytest
import typer
from bittensor.cli.main import app as btcli
from bittensor.hyperparams import HYPERPARAMS
from bittensor.sp_core import Keypair
from fake_substrate import SubtensorUnderTest

from mapreduce_ray.chain.subtensor import SubtensorChain
from mapreduce_ray.errors import ChainError, NotRegisteredError, NoValidatorPermitError, RateLimitedError
from mapreduce_ray.validator.epoch import run_epoch
from mapreduce_ray.validator.ledger import MinerLedger
from mapreduce_ray.validator.scoring import ScoringConfig
from mapreduce_ray.wallets import WalletConfig

ALICE, BOB, EVE = (Keypair.create_from_uri(f"//{name}") for name in ("Alice", "Bob", "Eve"))
NO_PERMIT = "has no validator permit on netuid 10 on local, so it cannot set weights; permits go to the top stakers"

REGISTER = "btcli subnets register --netuid 10 --network local --wallet NAME --wallet-hotkey HOTKEY --wallet-path PATH"


def key(name: str) -> Keypair:
    return Keypair.create_from_uri(f"//{name}")


def exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


def btcli_params(command: str) -> dict:
    """The options the installed btcli parses from `command` (a `btcli subnets register ...` line)."""
    argv = shlex.split(command)
    assert argv[:3] == ["btcli", "subnets", "register"]
    register = typer.main.get_command(btcli).commands["subnets"].commands["register"]
    return register.make_context("register", argv[3:]).params


@pytest.fixture(autouse=True)
def token_symbols_in_tmp(monkeypatch, tmp_path):
    """The SDK caches token symbols on connect; keep the file in the test's tmp dir."""
    monkeypatch.setenv("BTCLI_TOKEN_SYMBOLS_CACHE", str(tmp_path / "btcli_token_symbols.json"))


@pytest.fixture
def sut() -> SubtensorUnderTest:
    """Alice (uid 0) validates with 100 TAO; Bob, Charlie and Dave (uids 1..3) mine. Eve is not registered."""
    under = SubtensorUnderTest(rate_limit=5, max_validators=1)
    for name, stake in [("Alice", 100.0), ("Bob", 0.0), ("Charlie", 0.0), ("Dave", 0.0)]:
        under.enroll(key(name).ss58_address, key(name).ss58_address, stake)
    return under


def test_how_to_register_is_the_btcli_command():
    chain = SubtensorChain()  # finney, netuid 10; building it contacts nothing
    assert chain.describe() == "netuid 10 on finney"
    command = chain.how_to_register(WalletConfig("cold", "hot", "/wallets"))
    assert command == (
        "btcli subnets register --netuid 10 --network finney --wallet cold --wallet-hotkey hot --wallet-path /wallets"
    )
    expected = {"netuid": 10, "network": "finney", "wallet": "cold", "wallet_hotkey": "hot"}
    assert btcli_params(command).items() >= expected.items()


def test_register_leaves_registration_to_the_operator(sut):
    eve, cold = EVE.ss58_address, key("EveCold").ss58_address
    with pytest.raises(ChainError) as refused:
        sut.chain.register(eve, cold)
    assert str(refused.value) == (
        f"hotkey {eve} is not registered on netuid 10 on local; registering costs TAO and is signed by its coldkey "
        f"{cold}, so the operator runs: btcli subnets register --netuid 10 --network local "
        f"--wallet <coldkey-wallet> --hotkey {eve}"
    )
    command = str(refused.value).partition("runs: ")[2].replace("<coldkey-wallet>", "evecold")
    expected = {"netuid": 10, "network": "local", "wallet": "evecold", "hotkey_ss58": eve}
    assert btcli_params(command).items() >= expected.items()
    assert sut.chain.register(BOB.ss58_address, BOB.ss58_address) == 1  # already registered: keeps its uid
    assert sut.substrate.submitted == []


def readme_btcli_lines() -> list[str]:
    """Every `btcli ...` command line of the README's code blocks."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.DOTALL)
    return [line.split("  #")[0] for block in blocks for line in block.splitlines() if line.startswith("btcli ")]


def test_every_btcli_line_of_the_readme_parses_with_the_installed_btcli():
    lines = readme_btcli_lines()
    assert any("sudo set" in line for line in lines) and any("stake add" in line for line in lines)
    for line in lines:
        group, command, *args = shlex.split(line)[1:]
        click = typer.main.get_command(btcli).commands[group].commands[command]
        params = click.make_context(command, args).params  # raises on an unknown option or a missing value
        if (group, command) == ("sudo", "set"):
            assert params["name"] in HYPERPARAMS, line


def test_an_unreachable_endpoint_is_one_chain_error():
    with pytest.raises(ChainError) as failed:
        SubtensorChain("ws://127.0.0.1:9", 10).block()  # nothing listens on the discard port
    assert type(failed.value) is ChainError
    assert re.fullmatch(  # one line
        r"could not reach ws://127\.0\.0\.1:9 \(netuid 10 on ws://127\.0\.0\.1:9\): .+", str(failed.value)
    )


def test_fallback_endpoints_are_tried_in_turn_and_named():
    chain = SubtensorChain("ws://127.0.0.1:9", 10, fallback_endpoints=("ws://127.0.0.1:7",))
    with pytest.raises(ChainError) as failed:
        chain.block()
    assert re.fullmatch(
        r"could not reach ws://127\.0\.0\.1:9 or ws://127\.0\.0\.1:7 \(netuid 10 on ws://127\.0\.0\.1:9\): "
        r".*\('127\.0\.0\.1', 7\)",  # the SDK's last try was the fallback
        str(failed.value),
    )
    with pytest.raises(
        ValueError, match=exactly("chain.fallback_endpoints holds '127.0.0.1:7'; give ws:// or wss:// URLs")
    ):
        SubtensorChain("local", 10, fallback_endpoints=("127.0.0.1:7",))


def test_an_unknown_network_is_refused_at_once():
    with pytest.raises(ValueError, match="Unknown network 'mock'"):
        SubtensorChain("mock")


def test_set_weights_submits_the_quantized_weights(sut):
    assert sut.chain.set_weights(ALICE, {1: 0.2, 2: 0.5, 3: 0.3}) is None  # held by the chain now
    call = bt.calls.SubtensorModule.set_mechanism_weights(
        netuid=10, mecid=0, dests=[1, 2, 3], weights=[26214, 65535, 39321], version_key=0
    )
    assert sut.substrate.submitted == [(ALICE.ss58_address, call)]
    assert sut.chain.weights() == {0: pytest.approx({1: 26214 / 65535, 2: 1.0, 3: 39321 / 65535})}
    assert sut.chain.metagraph().neuron(0).last_update == sut.chain.block() == 1


@pytest.mark.parametrize(("configured", "subnets", "sent"), [(7, 3, 7), (7, 9, 9), (0, 4, 4)])
def test_weights_carry_the_configured_version_key_or_the_subnets_when_higher(sut, configured, subnets, sent):
    sut.substrate.weights_version_key = subnets
    chain = SubtensorChain("local", 10, version_key=configured, substrate=sut.substrate)
    chain.set_weights(ALICE, {1: 1.0})
    assert [call.params["version_key"] for _, call in sut.substrate.submitted] == [sent]
    assert chain.weights() == {0: {1: 1.0}}


def test_on_a_commit_reveal_subnet_weights_are_committed_and_their_reveal_round_returned(sut):
    sut.substrate.commit_reveal = True
    sut.substrate.weights_version_key = 5
    chain = SubtensorChain("local", 10, version_key=2, substrate=sut.substrate)
    reveal_round = chain.set_weights(ALICE, {1: 0.25, 2: 1.0})
    [(signer, call)] = sut.substrate.submitted
    assert (signer, call.function) == (ALICE.ss58_address, "commit_timelocked_mechanism_weights")
    assert call.params["reveal_round"] == reveal_round > 0
    assert [(hotkey, round_) for hotkey, round_, _ in sut.substrate.commits] == [(ALICE.ss58_address, reveal_round)]
    assert chain.weights() == {}  # nothing revealed yet: the chain holds no weights of Alice's


@pytest.mark.parametrize("endpoint", ["10.0.0.1:8091", "[2001:db8::1]:8091"])
def test_serve_publishes_the_endpoint(sut, endpoint):
    ip = ipaddress.ip_address(endpoint.rpartition(":")[0].strip("[]"))
    sut.chain.serve(BOB, endpoint)
    call = bt.calls.SubtensorModule.serve_axon(
        netuid=10, version=1, ip=int(ip), port=8091, ip_type=ip.version, protocol=4, placeholder1=0, placeholder2=0
    )
    assert sut.substrate.submitted == [(BOB.ss58_address, call)]
    assert sut.chain.metagraph().neuron(1).endpoint == endpoint


def test_serve_with_a_tls_key_digest_publishes_it_as_the_neuron_certificate(sut):
    digest = bytes(range(32))
    sut.chain.serve(BOB, "10.0.0.1:8091", digest.hex())
    call = bt.calls.SubtensorModule.serve_axon_tls(
        netuid=10,
        version=1,
        ip=int(ipaddress.ip_address("10.0.0.1")),
        port=8091,
        ip_type=4,
        protocol=4,
        placeholder1=0,
        placeholder2=0,
        certificate=b"\x01" + digest,  # the algorithm byte of a key digest, then the digest
    )
    assert sut.substrate.submitted == [(BOB.ss58_address, call)]
    assert sut.chain.metagraph().neuron(1).certificate == digest.hex()
    sut.chain.serve(BOB, "10.0.0.1:8091")  # the chain keeps a certificate until the next one: retract it
    retract = call._replace(params={**call.params, "certificate": b"\x00"})  # algorithm 0, no key
    assert sut.substrate.submitted[1] == (BOB.ss58_address, retract)
    assert sut.chain.metagraph().neuron(1).certificate is None


@pytest.mark.parametrize("endpoint", ["10.0.0.1", "miner.example:8091", "10.0.0.1:0", "10.0.0.1:65536"])
def test_serve_refuses_a_malformed_endpoint(sut, endpoint):
    with pytest.raises(ValueError, match="endpoint must be ip:port"):
        sut.chain.serve(BOB, endpoint)
    assert sut.substrate.submitted == []


def test_weights_from_an_unregistered_hotkey_stop_before_signing(sut):
    message = f"hotkey {EVE.ss58_address} is not registered on netuid 10 on local; register it: {REGISTER}"
    with pytest.raises(NotRegisteredError, match=exactly(message)):
        sut.chain.set_weights(EVE, {1: 1.0})
    assert sut.substrate.submitted == []  # the SDK's preflight caught it


def test_weights_without_a_permit_are_refused_by_the_chain(sut):
    message = f"hotkey {BOB.ss58_address} {NO_PERMIT}"
    with pytest.raises(NoValidatorPermitError, match=exactly(message)):
        sut.chain.set_weights(BOB, {2: 1.0})
    assert [call.function for _, call in sut.substrate.submitted] == ["set_mechanism_weights"]  # dispatch refused it
    assert sut.chain.weights() == {}


def test_weights_without_a_permit_are_refused_by_the_sdk_on_a_null_subnet(sut):
    sut.substrate.consensus = "Null"  # the SDK checks the sole permit itself there
    message = f"hotkey {BOB.ss58_address} {NO_PERMIT}"
    with pytest.raises(NoValidatorPermitError, match=exactly(message)):
        sut.chain.set_weights(BOB, {2: 1.0})
    assert sut.substrate.submitted == []


def test_rate_limited_weights_say_how_many_blocks_to_wait(sut):
    sut.chain.set_weights(ALICE, {1: 1.0})
    prefix = f"setting weights by hotkey {ALICE.ss58_address} on netuid 10 on local is rate limited; "
    with pytest.raises(RateLimitedError, match=exactly(prefix + "retry in 5 blocks")):
        sut.chain.set_weights(ALICE, {2: 1.0})
    sut.advance(2)
    with pytest.raises(RateLimitedError, match=exactly(prefix + "retry in 3 blocks")):
        sut.chain.set_weights(ALICE, {2: 1.0})
    sut.advance(3)
    sut.chain.set_weights(ALICE, {2: 1.0})
    assert sut.chain.weights() == {0: {2: 1.0}}


def test_serving_from_an_unregistered_hotkey_is_refused_by_the_chain(sut):
    message = f"hotkey {EVE.ss58_address} is not registered on netuid 10 on local; register it: {REGISTER}"
    with pytest.raises(NotRegisteredError, match=exactly(message)):
        sut.chain.serve(EVE, "10.0.0.1:8091")
    assert len(sut.substrate.submitted) == 1  # no preflight for serving: the chain refused it


def test_serving_too_often_is_rate_limited_past_the_serve_timeout(sut):
    sut.substrate.serving_rate_limit = 50
    chain = SubtensorChain("local", 10, serve_timeout_s=60, substrate=sut.substrate)
    chain.serve(BOB, "10.0.0.1:8091")
    sut.advance(10)
    message = (
        f"serving 10.0.0.2:8091 by hotkey {BOB.ss58_address} on netuid 10 on local is rate limited; retry in "
        "40 blocks (~480 s), or let chain.serve_timeout_s wait that long"
    )
    with pytest.raises(RateLimitedError, match=exactly(message)):
        chain.serve(BOB, "10.0.0.2:8091")
    assert chain.metagraph().neuron(1).endpoint == "10.0.0.1:8091"


@pytest.mark.parametrize("endpoint", ["10.0.0.1:8091", "[2001:db8::1]:8091"])
@pytest.mark.parametrize("digest", [None, bytes(range(32)).hex()])
def test_a_restart_in_place_announces_nothing(sut, endpoint, digest):
    sut.chain.serve(BOB, endpoint, digest)
    sut.chain.serve(BOB, endpoint, digest)
    assert len(sut.substrate.submitted) == 1
    assert sut.chain.metagraph().neuron(1).endpoint == endpoint


def test_a_restart_in_place_announces_nothing_and_a_move_waits_out_the_serving_rate_limit(sut):
    sut.substrate.serving_rate_limit = 50
    sut.substrate.block_seconds = 0.01
    digest = bytes(range(32)).hex()
    sut.chain.serve(BOB, "10.0.0.1:8091", digest)
    sut.chain.serve(BOB, "10.0.0.1:8091", digest)  # restarted, same endpoint and key: nothing to announce
    assert len(sut.substrate.submitted) == 1
    sut.advance(49)
    mover = threading.Timer(0.3, sut.advance, [1])  # the block that lifts the limit comes while serve waits
    mover.start()
    sut.chain.serve(BOB, "10.0.0.2:8091", digest)
    mover.join()
    assert sut.chain.metagraph().neuron(1).endpoint == "10.0.0.2:8091"
    assert len(sut.substrate.submitted) > 2  # refused while the limit held, then announced


def test_other_chain_failures_are_chain_errors(sut):
    failed = f"setting weights by hotkey {ALICE.ss58_address} on netuid 10 on local failed: "
    with pytest.raises(ChainError) as unknown_uid:  # refused by the chain
        sut.chain.set_weights(ALICE, {1: 1.0, 9: 1.0})
    assert type(unknown_uid.value) is ChainError
    assert str(unknown_uid.value) == (
        failed + "The caller is attempting to set weight to at least one UID that does not exist in the metagraph."
    )
    with pytest.raises(ChainError, match=exactly(failed + "All weights are zero; nothing to set.")):  # by the SDK
        sut.chain.set_weights(ALICE, {1: 0.0})


def test_a_subnet_that_does_not_exist(sut):
    elsewhere = SubtensorChain("local", 11, substrate=sut.substrate)
    with pytest.raises(ChainError, match=exactly("netuid 11 on local does not exist")):
        elsewhere.metagraph()
    assert elsewhere.uid_of(ALICE.ss58_address) is None
    assert elsewhere.weights() == {}


def scored_ledger(path, uids: list[int]) -> MinerLedger:
    """A validator's ledger in which each of `uids` passed a benchmark, the later ones faster."""
    ledger = MinerLedger(path / "validator.sqlite")
    ledger.follow({uid: key(f"miner-{uid}").ss58_address for uid in uids})
    for rank, uid in enumerate(uids, start=1):
        ledger.record_benchmark(uid, 64 * 2**20, 1.0 / rank, passed=True, host=f"10.0.0.{uid}")
    return ledger


def test_an_epoch_on_a_commit_reveal_subnet_with_a_version_key_commits_and_tells_the_reveal_round(sut, tmp_path):
    sut.substrate.commit_reveal = True
    sut.substrate.weights_version_key = 3
    chain = SubtensorChain("local", 10, substrate=sut.substrate)
    done = run_epoch(scored_ledger(tmp_path, [1, 2, 3]), chain, ALICE, ScoringConfig())
    assert set(done.weights) == {1, 2, 3}
    [(_, call)] = sut.substrate.submitted
    assert call.function == "commit_timelocked_mechanism_weights"
    assert done.reveal_round == call.params["reveal_round"] > 0
    assert chain.weights() == {}  # the chain reveals them later


def test_too_few_scored_miners_get_the_smallest_weight_beside_them_up_to_the_subnets_minimum(sut, tmp_path, caplog):
    sut.substrate.min_allowed_weights = 3
    sut.substrate.weights_version_key = 2
    sut.chain.serve(key("Dave"), "10.0.0.3:8091")  # served uids come first
    with caplog.at_level(logging.WARNING, logger="mapreduce_ray.validator.epoch"):
        done = run_epoch(scored_ledger(tmp_path, [1]), sut.chain, ALICE, ScoringConfig())
    assert done.weights == {1: 1.0, 3: 1 / 65535, 2: 1 / 65535}
    assert sut.chain.weights() == {0: {1: 1.0, 2: 1 / 65535, 3: 1 / 65535}}
    assert caplog.messages == [
        "netuid 10 on local asks for weights on at least 3 uids and 1 miners are scored; 2 other uids get 1/65535 "
        "of the largest weight until more miners are benchmarked"
    ]


def test_a_subnet_with_too_few_uids_for_its_minimum_gets_the_validators_weight_on_itself(sut, tmp_path, caplog):
    sut.substrate.min_allowed_weights = 8
    with caplog.at_level(logging.WARNING, logger="mapreduce_ray.validator.epoch"):
        done = run_epoch(scored_ledger(tmp_path, [1, 2]), sut.chain, ALICE, ScoringConfig())
    assert done.weights == {0: 1.0}
    assert sut.chain.weights() == {0: {0: 1.0}}
    assert caplog.messages == [
        "netuid 10 on local asks for weights on at least 8 uids and has 3 besides this validator; it weighs itself "
        "alone until more miners register"
    ]
