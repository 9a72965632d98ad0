"""The Chain interface, the same tests against both backends; then what only the embedded chain does."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap

import pytest
from bittensor.sp_core import Keypair

from mapreduce_ray.chain import ChainConfig
from mapreduce_ray.chain.embedded import EmbeddedChain
from mapreduce_ray.errors import ChainError, NotRegisteredError, NoValidatorPermitError, RateLimitedError
from mapreduce_ray.wallets import WalletConfig

RATE_LIMIT = 5
COLD = Keypair.create_from_uri("//Cold").ss58_address


def key(name: str) -> Keypair:
    return Keypair.create_from_uri(f"//{name}")


class FakeClock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class EmbeddedUnderTest:
    """The embedded chain with a hand-driven clock, one block per second."""

    def __init__(self, path, rate_limit: int = RATE_LIMIT, max_validators: int = 1, **config):
        self.clock = FakeClock()
        self.rate_limit = rate_limit
        self.config = ChainConfig(
            block_time_s=1.0, weights_rate_limit=rate_limit, max_validators=max_validators, **config
        )
        self.chain = EmbeddedChain(path / "chain.sqlite", self.config, clock=self.clock)

    def enroll(self, hotkey: str, coldkey: str, stake: float = 0.0) -> int:
        return self.chain.register(hotkey, coldkey, stake)

    def advance(self, blocks: int) -> None:
        self.clock.now += blocks * self.config.block_time_s


@pytest.fixture(params=["embedded", "bittensor"])
def subnet(request, tmp_path):
    if request.param == "embedded":
        return EmbeddedUnderTest(tmp_path)
    from fake_substrate import SubtensorUnderTest

    return SubtensorUnderTest(rate_limit=RATE_LIMIT, max_validators=1)


@pytest.fixture
def three(subnet):
    """A validator (staked) and two miners; returns their uids."""
    return [
        subnet.enroll(key("Validator").ss58_address, COLD, stake=100.0),
        subnet.enroll(key("Miner1").ss58_address, COLD),
        subnet.enroll(key("Miner2").ss58_address, COLD),
    ]


def test_uids_of_registered_hotkeys(subnet, three):
    chain = subnet.chain
    assert [chain.uid_of(key(n).ss58_address) for n in ("Validator", "Miner1", "Miner2")] == three
    assert len(set(three)) == 3
    assert chain.uid_of(key("Stranger").ss58_address) is None


def test_metagraph_lists_every_neuron_and_permits_the_top_staker(subnet, three):
    graph = subnet.chain.metagraph()
    assert graph.netuid == subnet.chain.netuid
    rows = {(n.uid, n.hotkey, n.coldkey, n.stake, n.validator_permit, n.endpoint) for n in graph.neurons}
    assert rows == {
        (three[0], key("Validator").ss58_address, COLD, 100.0, True, None),
        (three[1], key("Miner1").ss58_address, COLD, 0.0, False, None),
        (three[2], key("Miner2").ss58_address, COLD, 0.0, False, None),
    }
    assert graph.by_hotkey(key("Miner2").ss58_address).uid == three[2]
    assert [n.uid for n in graph.validators] == [three[0]]


def test_a_served_endpoint_shows_in_the_metagraph(subnet, three):
    subnet.chain.serve(key("Miner1"), "10.0.0.1:8091")
    assert subnet.chain.metagraph().neuron(three[1]).endpoint == "10.0.0.1:8091"


def test_a_served_tls_key_digest_shows_beside_the_endpoint_until_served_without(subnet, three):
    first, second = "ab" * 32, "cd" * 32
    subnet.chain.serve(key("Miner1"), "10.0.0.1:8091", first)
    subnet.chain.serve(key("Miner2"), "10.0.0.2:8091")
    graph = subnet.chain.metagraph()
    assert (graph.neuron(three[1]).endpoint, graph.neuron(three[1]).certificate) == ("10.0.0.1:8091", first)
    assert (graph.neuron(three[2]).endpoint, graph.neuron(three[2]).certificate) == ("10.0.0.2:8091", None)
    subnet.chain.serve(key("Miner1"), "10.0.0.3:8091", second)
    assert subnet.chain.metagraph().neuron(three[1]).certificate == second
    subnet.chain.serve(key("Miner1"), "10.0.0.4:8091")  # plain gRPC from now on: the digest is retracted
    graph = subnet.chain.metagraph()
    assert (graph.neuron(three[1]).endpoint, graph.neuron(three[1]).certificate) == ("10.0.0.4:8091", None)


def test_weights_are_stored_as_the_chain_quantizes_them(subnet, three):
    validator, m1, m2 = three
    subnet.chain.set_weights(key("Validator"), {m1: 1.0, m2: 0.5})
    assert subnet.chain.weights()[validator] == pytest.approx({m1: 1.0, m2: 32768 / 65535}, abs=1e-4)


def test_weights_need_a_validator_permit(subnet, three):
    with pytest.raises(NoValidatorPermitError, match=r"has no validator permit"):
        subnet.chain.set_weights(key("Miner1"), {three[2]: 1.0})


def test_weights_from_an_unregistered_hotkey_are_refused(subnet, three):
    with pytest.raises(NotRegisteredError, match=key("Stranger").ss58_address):
        subnet.chain.set_weights(key("Stranger"), {three[1]: 1.0})


def test_weights_are_rate_limited(subnet, three):
    _, m1, m2 = three
    subnet.chain.set_weights(key("Validator"), {m1: 1.0})
    subnet.advance(subnet.rate_limit - 1)
    with pytest.raises(RateLimitedError):
        subnet.chain.set_weights(key("Validator"), {m2: 1.0})
    subnet.advance(1)
    subnet.chain.set_weights(key("Validator"), {m2: 1.0})
    assert subnet.chain.weights()[three[0]] == {m2: 1.0}


def test_unregistered_hotkeys_are_told_how_to_register(subnet):
    with pytest.raises(NotRegisteredError, match=r"is not registered on netuid 10 .*; register it: "):
        subnet.chain.require_uid(key("Stranger").ss58_address, WalletConfig("alice", "hot"))


# What only the embedded chain does: registration, pruning, many processes.


@pytest.fixture
def embedded(tmp_path):
    return EmbeddedUnderTest(tmp_path)


def test_registering_again_keeps_the_uid(embedded):
    first = embedded.enroll(key("A").ss58_address, COLD)
    assert embedded.enroll(key("B").ss58_address, COLD) == first + 1
    assert embedded.enroll(key("A").ss58_address, COLD) == first


def test_a_full_subnet_replaces_the_neuron_with_the_least_incentive(tmp_path):
    under = EmbeddedUnderTest(tmp_path, max_uids=3, immunity_period=10)
    validator = under.enroll(key("V").ss58_address, COLD, stake=10.0)
    favoured = under.enroll(key("Favoured").ss58_address, COLD)
    ignored = under.enroll(key("Ignored").ss58_address, COLD)
    under.chain.set_weights(key("V"), {favoured: 1.0})
    with pytest.raises(ChainError, match=r"is full \(3 uids\) and every neuron is still immune"):
        under.enroll(key("Newcomer").ss58_address, COLD)
    under.advance(10)
    assert under.enroll(key("Newcomer").ss58_address, COLD) == ignored
    chain = under.chain
    assert chain.uid_of(key("Ignored").ss58_address) is None
    assert chain.metagraph().neuron(ignored).hotkey == key("Newcomer").ss58_address
    assert chain.uid_of(key("Favoured").ss58_address) == favoured and validator == 0


def test_replacing_a_uid_forgets_its_endpoint_and_weights(tmp_path):
    under = EmbeddedUnderTest(tmp_path, max_uids=2)
    validator = under.enroll(key("V").ss58_address, COLD, stake=10.0)
    old = under.enroll(key("Old").ss58_address, COLD)
    under.chain.serve(key("Old"), "10.0.0.2:1")
    under.chain.set_weights(key("V"), {old: 1.0})
    assert under.enroll(key("New").ss58_address, COLD) == old  # permit holders are kept
    neuron = under.chain.metagraph().neuron(old)
    assert (neuron.hotkey, neuron.endpoint) == (key("New").ss58_address, None)
    assert under.chain.weights() == {} and validator != old


def test_a_chain_file_of_the_first_release_gains_the_certificate_column(tmp_path):
    path = tmp_path / "chain.sqlite"
    first_release = """
    CREATE TABLE neurons (
        netuid INTEGER NOT NULL, uid INTEGER NOT NULL, hotkey TEXT NOT NULL, coldkey TEXT NOT NULL,
        stake REAL NOT NULL, endpoint TEXT, registered_at INTEGER NOT NULL, last_update INTEGER NOT NULL,
        weights_set_at INTEGER, PRIMARY KEY (netuid, uid), UNIQUE (netuid, hotkey));
    INSERT INTO neurons VALUES (10, 0, '{hotkey}', '{cold}', 0.0, '10.0.0.1:1', 0, 0, NULL);
    """.format(hotkey=key("Old").ss58_address, cold=COLD)
    with sqlite3.connect(path) as db:
        db.executescript(first_release)
    chain = EmbeddedChain(path, ChainConfig(netuid=10))
    assert chain.metagraph().neuron(0).endpoint == "10.0.0.1:1"
    chain.serve(key("Old"), "10.0.0.1:2", "ef" * 32)
    assert chain.metagraph().neuron(0).certificate == "ef" * 32


def test_permits_follow_stake(tmp_path):
    under = EmbeddedUnderTest(tmp_path, max_validators=2)
    uids = [under.enroll(key(f"S{i}").ss58_address, COLD, stake=s) for i, s in enumerate([5.0, 0.0, 7.0, 6.0])]
    assert {n.uid for n in under.chain.metagraph().validators} == {uids[2], uids[3]}


def test_writes_need_the_private_key(embedded):
    embedded.enroll(key("A").ss58_address, COLD)
    public_only = Keypair(ss58_address=key("A").ss58_address)
    with pytest.raises(ChainError, match="must be signed by a hotkey keypair with its private key"):
        embedded.chain.serve(public_only, "10.0.0.1:1")


def test_bad_addresses_and_stake_are_refused(embedded):
    with pytest.raises(ChainError, match=r"hotkey 'nope' is not an ss58 address"):
        embedded.enroll("nope", COLD)
    with pytest.raises(ChainError, match=r"stake must be a non-negative number of TAO, got -1.0"):
        embedded.enroll(key("A").ss58_address, COLD, stake=-1.0)


def test_two_processes_share_one_chain(tmp_path):
    """Each process registers 20 hotkeys at once; every hotkey gets its own uid, both see all 40."""
    script = textwrap.dedent(
        """
        import sys
        from bittensor.sp_core import Keypair
        from mapreduce_ray.chain import ChainConfig
        chain = ChainConfig(state_dir=sys.argv[1]).open()
        cold = Keypair.create_from_uri("//Cold").ss58_address
        for i in range(20):
            chain.register(Keypair.create_from_uri(f"//{sys.argv[2]}{i}").ss58_address, cold)
        print(len(chain.metagraph().neurons))
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(tmp_path), name], stdout=subprocess.PIPE, text=True)
        for name in ("left", "right")
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert max(int(o) for o in outputs) == 40
    graph = ChainConfig(state_dir=str(tmp_path)).open().metagraph()
    assert sorted(n.uid for n in graph.neurons) == list(range(40))
    assert len({n.hotkey for n in graph.neurons}) == 40


def test_another_process_sees_the_weights_their_rate_limit_and_the_chain_parameters(tmp_path):
    """Weights set here bind a validator process started later, with the parameters this process created."""
    chain = ChainConfig(state_dir=str(tmp_path), weights_rate_limit=1000, block_time_s=1.0).open()
    validator = chain.register(key("V").ss58_address, COLD, stake=10.0)
    miner = chain.register(key("M").ss58_address, COLD)
    chain.set_weights(key("V"), {miner: 1.0})
    script = textwrap.dedent(
        """
        import sys
        from bittensor.sp_core import Keypair
        from mapreduce_ray.chain import ChainConfig
        from mapreduce_ray.errors import RateLimitedError
        chain = ChainConfig(state_dir=sys.argv[1]).open()  # default parameters asked for, the file's are used
        print(chain.rate_limit, chain.weights())
        try:
            chain.set_weights(Keypair.create_from_uri("//V"), {1: 1.0})
        except RateLimitedError as e:
            print("refused:", e)
        """
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    first, second = done.stdout.splitlines()
    assert first == f"1000 {{{validator}: {{{miner}: 1.0}}}}"
    assert second.startswith(f"refused: uid {validator} set weights at block ")
