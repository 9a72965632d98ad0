"""The validator at work on a local subnet: benchmarks, checks of live rounds, matching, restarts."""

import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pyarrow.flight as fl
import pytest
import ray
import torch
from bittensor.sp_core import Keypair

from actors import MinerPlan, start_local_subnet
from actors.behaviours import (
    BlamingRelay,
    CuriousRelay,
    OneElementOffRelay,
    ReplayingRelay,
    ScalingRelay,
    SketchDroppingRelay,
    TwoFacedRelay,
    ZerosRelay,
)
from actors.subnet import start_validator
from mapreduce_ray import Peer
from mapreduce_ray.chain import ChainConfig
from mapreduce_ray.errors import JobError, PeerLostError, ReplayedMessageError
from mapreduce_ray.messages import Reports, RoundReport, encode
from mapreduce_ray.protocol import METAGRAPH_MISS_REFRESH_S
from mapreduce_ray.reference import reference_reduce
from mapreduce_ray.validator.config import ValidatorConfig
from mapreduce_ray.wire.auth import CALL_METHOD, call_headers
from mapreduce_ray.wire.config import WireConfig
from mapreduce_ray.wire.endpoint import Remote

MIB = 1024 * 1024
ROUNDS = 3
BENCHMARKS = ValidatorConfig().benchmark.best_of  # a new miner's benchmarks, back to back: a cheater's honest jobs
WAIT_S = 120


def wait_for(condition, what: str, timeout_s: float = WAIT_S):
    """Poll `condition()` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout_s:g} s")
        time.sleep(0.2)
    return value


def ledger(subnet) -> dict[int, dict]:
    return {row["uid"]: row for row in ray.get(subnet.validator.miners.remote(), timeout=60)}


def uids_of(subnet) -> list[int]:
    return [ray.get(m.status.remote(), timeout=60)["uid"] for m in subnet.miners]


@pytest.fixture(scope="module")
def benchmarked(local_ray):
    """An honest miner benchmarked `BENCHMARKS` times with 64 MiB, and one that returns zeros, struck at its
    first."""
    subnet = start_local_subnet(
        [MinerPlan(), MinerPlan(ZerosRelay)],
        peers=0,
        namespace="tests-benchmarks",
        chain=ChainConfig(netuid=111, weights_rate_limit=0),
        wait=False,
        validator={"epoch_blocks": 10**9, "benchmark": {"size_mib": 64, "interval_s": 3600}},
    )
    honest, zeros = uids_of(subnet)

    def ready() -> bool:
        rows = ledger(subnet)
        return rows.get(honest, {}).get("measured") == BENCHMARKS and rows.get(zeros, {}).get("rounds_assigned")

    wait_for(ready, "benchmarks")
    yield subnet, honest, zeros
    subnet.shutdown()


def test_a_64_mib_benchmark_is_timed_verified_and_feeds_the_score(benchmarked):
    subnet, honest, _ = benchmarked
    row = ledger(subnet)[honest]
    assert (row["state"], row["capacity"], row["rounds_on_time"], row["strikes"]) == (
        "available",
        64 * MIB,
        BENCHMARKS,
        0,
    )
    history = ray.get(subnet.validator.history.remote(honest))
    assert [(event, d["bytes"], d["passed"]) for event, d in history] == [("benchmark", 64 * MIB, True)] * BENCHMARKS
    assert row["throughput"] == max(64 * MIB / d["seconds"] for _, d in history) > 0  # the best of them
    weights = ray.get(subnet.validator.epoch.remote())
    assert weights[honest] == 1.0 and ledger(subnet)[honest]["score"] > 0


def test_a_wrong_benchmark_result_earns_nothing_and_is_a_strike(benchmarked):
    subnet, _, zeros = benchmarked
    row = ledger(subnet)[zeros]
    assert (row["state"], row["throughput"], row["capacity"], row["strikes"]) == ("banned", 0.0, 0, 1)
    history = ray.get(subnet.validator.history.remote(zeros))
    assert [event for event, _ in history] == ["benchmark", "strike"]
    assert history[0][1]["passed"] is False
    assert re.match(  # the bot's peers check the chunks as live peers do: the first wrong one ends the round
        r"^all_reduce #1 of job '[0-9a-f]{12}': no miner delivered segment\(s\) \[0\] exactly: miner "
        r"'miner-\d+' sent chunk \d+ of segment 0 that fails its check: its sketch is off the contributions' by ",
        history[1][1]["benchmark"],
    ), history[1][1]["benchmark"]
    assert ray.get(subnet.validator.epoch.remote()).get(zeros, 0.0) == 0.0


def test_a_restarted_validator_resumes_miner_state_scores_and_weights(benchmarked):
    subnet, honest, zeros = benchmarked
    ray.get(subnet.validator.epoch.remote())
    before = (ledger(subnet), ray.get(subnet.validator.status.remote()))
    ray.kill(subnet.validator)
    wait_for(lambda: _gone(subnet), "the old validator gone")
    _, subnet.validator = start_validator(subnet.chain, subnet.config)
    after = (ledger(subnet), ray.get(subnet.validator.status.remote()))
    assert after[0] == before[0]  # states, measurements, strikes, bans and scores
    assert after[0][honest]["score"] > 0 and after[0][zeros]["state"] == "banned"
    assert (after[1]["weights"], after[1]["weights_set_at"]) == (before[1]["weights"], before[1]["weights_set_at"])
    assert after[1]["weights"][honest] > 0


def test_a_call_replayed_to_a_restarted_validator_is_refused_and_moves_no_record(benchmarked):
    """A registered hotkey's signed report call, taken once, is replayed byte for byte after the validator
    restarted (its nonces gone with it): refused as a replay before its payload is read; no record moves."""
    subnet, honest, _ = benchmarked
    chain = subnet.chain.open()
    reporter = Keypair.create_from_uri("//replayed-reporter")
    chain.register(reporter.ss58_address, Keypair.create_from_uri("//replayed-cold").ss58_address)
    time.sleep(METAGRAPH_MISS_REFRESH_S)  # the validator reads the chain again on an unknown hotkey by then
    validator = chain.metagraph().neuron(subnet.validator_uid)
    payload = encode(Reports((RoundReport("feedbeeffeed", 1, 1, (), (0,)),)))
    signed_at = time.time()
    headers = call_headers(reporter, CALL_METHOD, "report", payload, validator.hotkey, chain.netuid)

    def send(endpoint: str) -> None:
        remote = Remote("validator", endpoint, validator.hotkey, reporter, WireConfig(), netuid=chain.netuid)
        options = fl.FlightCallOptions(headers=headers, timeout=30)
        with remote.errors():
            writer, reader = remote.client.do_exchange(fl.FlightDescriptor.for_command(payload), options)
            writer.done_writing()
            list(reader)
        remote.close()

    with pytest.raises(JobError, match=r"holds no rank 1 in a job feedbeeffeed"):
        send(validator.endpoint)  # taken as a call (its nonce now seen), refused as a report: no such job
    before = ledger(subnet)
    time.sleep(max(signed_at + WireConfig().auth_skew_s + 0.5 - time.time(), 0))  # a restart takes longer
    ray.kill(subnet.validator)
    wait_for(lambda: _gone(subnet), "the old validator gone")
    _, subnet.validator = start_validator(subnet.chain, subnet.config)
    with pytest.raises(ReplayedMessageError, match=r"signed before this endpoint started, so it may be a replay"):
        send(chain.metagraph().neuron(subnet.validator_uid).endpoint)
    assert ledger(subnet) == before


def _gone(subnet) -> bool:
    try:
        ray.get_actor(f"validator-{subnet.validator_uid}", namespace=subnet.namespace)
        return False
    except ValueError:
        return True


def test_jobs_get_free_miners_only_and_impossible_requests_get_a_reason(subnets):
    subnet = subnets[1]  # one miner, benchmarked with 8 MiB
    options = {**subnet.peer_options, "job": "holds-the-miner"}
    holder = Peer(1, 1, **options)
    holder.init_process_group()
    try:
        with pytest.raises(JobError, match=r"^none of the 1 miner\(s\) .* is free: states \{\d+: 'busy'\}"):
            Peer(1, 1, **{**options, "job": "second"}).init_process_group()
    finally:
        holder.destroy_process_group()
    with pytest.raises(JobError, match=r"^a 16777216 byte tensor exceeds the verified capacity of the 1 available"):
        Peer(1, 1, 16 * MIB, benchmark_max_size=0, **{**options, "job": "too-big"}).init_process_group()
    with Peer(1, 1, **{**options, "job": "after"}) as peer:
        assert peer.spec.max_bytes == 8 * MIB
        with pytest.raises(Exception, match=r"verified capacity for 8388608 bytes"):
            peer.all_reduce(torch.ones(2 * MIB + 1))


def test_forged_late_reports_leave_the_miners_reliability_unchanged(subnets, run_peers):
    subnet = subnets[1]
    [uid] = uids_of(subnet)
    before = ledger(subnet)[uid]

    def run_then_forge(peer):
        peer.all_reduce(torch.ones(1024))
        if peer.rank == 1:
            wait_for(lambda: ledger(subnet)[uid]["rounds_assigned"] > before["rounds_assigned"], "round 1 counted")
        honest = ledger(subnet)[uid]
        # Every peer of the job (each its own hotkey) says the miner missed round 1, which it made and which
        # closed, and 60 rounds that never ran: no miner signed anything of those.
        peer._send_reports(tuple(RoundReport(peer.spec.job_id, seq, peer.rank, (), (0,)) for seq in range(1, 62)))
        return honest

    honest = run_peers(subnet, 2, run_then_forge)[0]
    assert (honest["rounds_assigned"], honest["rounds_on_time"]) == (
        before["rounds_assigned"] + 1,
        before["rounds_on_time"] + 1,
    )
    after = ledger(subnet)[uid]
    assert (after["rounds_assigned"], after["rounds_on_time"], after["score"]) == (
        honest["rounds_assigned"],
        honest["rounds_on_time"],
        honest["score"],
    )


def test_when_nothing_fails_the_validator_hears_at_most_one_call_per_party_per_round(subnets, run_peers):
    """A job of 2 peers on 2 miners runs 20 rounds: each peer joins once, leaves at most once, and reports its
    rounds in batches, at most one call a round (its counter at the validator); the miners call nothing."""
    subnet, rounds = subnets[2], 20
    before = ray.get(subnet.validator.calls.remote(), timeout=60)

    def run(peer):
        for k in range(rounds):
            peer.all_reduce(torch.full((4096,), float(k)))
        return peer._load_identity().hotkey, {slot.hotkey for slot in peer.spec.miners}

    (first, miners), (second, _) = run_peers(subnet, 2, run)
    after = ray.get(subnet.validator.calls.remote(), timeout=60)
    made = {  # the calls of this test's window (these dev hotkeys made others earlier)
        (call, hotkey): n - before.get(call, {}).get(hotkey, 0)
        for call, by_hotkey in after.items()
        for hotkey, n in by_hotkey.items()
        if n > before.get(call, {}).get(hotkey, 0)
    }
    for peer in (first, second):
        assert made[("join", peer)] == 1 and made.get(("leave", peer), 0) <= 1
        assert 1 <= made[("report", peer)] <= rounds
        assert not {call for call, hotkey in made if hotkey == peer} - {"join", "report", "leave"}
    assert len(miners) == 2 and not [key for key in made if key[1] in miners]


def test_reports_from_outside_the_job_or_without_a_signature_are_refused_and_move_no_record(subnets, run_peers):
    """While a job runs, a registered hotkey that holds no rank in it reports 32 forged misses of its miner for
    each rank (64 in one call), signed, and then unsigned: both are refused before anything is counted, and the
    miner's record moves only by the round the job ran."""
    subnet = subnets[1]
    [uid] = uids_of(subnet)
    chain = subnet.chain.open()
    outsider = Keypair.create_from_uri("//outsider-reporter")
    chain.register(outsider.ss58_address, Keypair.create_from_uri("//outsider-cold").ss58_address)
    time.sleep(METAGRAPH_MISS_REFRESH_S)  # the validator reads the chain again on an unknown hotkey by then
    validator = chain.metagraph().neuron(subnet.validator_uid)
    remote = Remote("validator", validator.endpoint, validator.hotkey, outsider, WireConfig(), netuid=chain.netuid)
    before = ledger(subnet)[uid]

    def run_then_forge(peer):
        peer.all_reduce(torch.ones(1024))
        if peer.rank == 1:
            job_id = peer.spec.job_id
            forged = encode(
                Reports(tuple(RoundReport(job_id, seq, rank, (), (0,)) for seq in range(1, 33) for rank in (1, 2)))
            )
            with pytest.raises(JobError, match=rf"hotkey {outsider.ss58_address} holds no rank 1 in a job {job_id}"):
                remote.call("report", forged)
            unsigned = fl.FlightClient(f"grpc://{validator.endpoint}")
            with pytest.raises(fl.FlightError, match="a call needs the x-mapreduce-call header"):
                list(unsigned.do_action(fl.Action("report", forged)))
            unsigned.close()

    run_peers(subnet, 2, run_then_forge)
    remote.close()
    wait_for(lambda: ledger(subnet)[uid]["rounds_assigned"] > before["rounds_assigned"], "the round counted")
    after = ledger(subnet)[uid]
    assert (after["rounds_assigned"], after["rounds_on_time"], after["strikes"]) == (
        before["rounds_assigned"] + 1,
        before["rounds_on_time"] + 1,
        before["strikes"],
    )


WRONG_SUMS = {
    "one-element-off": OneElementOffRelay,  # by the smallest error the peers' check claims to catch
    "scaled": ScalingRelay,
    "stale-replay": ReplayingRelay,
    "zeros": ZerosRelay,
}
LIVE_CHEATERS = {
    **WRONG_SUMS,
    "two-faced": TwoFacedRelay,  # right for rank 1, wrong for rank 2
    "sketch-dropping": SketchDroppingRelay,  # the right sum, without rank 2's sketches
}


BAN_S = 20  # long enough to leave a struck cheater out of a job's later rounds, short enough to wait out


@pytest.fixture(scope="module")
def cheaters(local_ray):
    """An honest miner and one of each cheater (in LIVE_CHEATERS' order), honest in benchmarks and cheating in
    real jobs."""
    plans = [MinerPlan()] + [MinerPlan(cls, {"honest_jobs": BENCHMARKS}) for cls in LIVE_CHEATERS.values()]
    subnet = start_local_subnet(
        plans,
        peers=2,
        chunk_mib=0.25,
        timeout_s=30,
        namespace="tests-cheaters",
        chain=ChainConfig(netuid=112),
        validator={
            "benchmark": {"size_mib": 2, "interval_s": 3600},
            "verify": {"fraction": 1.0, "chunks": 0, "max_pending": 5 * ROUNDS, "ban_s": BAN_S},
        },
    )
    yield subnet
    subnet.shutdown()


def round_inputs(k: int) -> list[torch.Tensor]:
    """Round k's 1M float32 contributions of ranks 1 and 2."""
    return [torch.randn(1_000_000, generator=torch.Generator().manual_seed(10 * k + r)) for r in (1, 2)]


def strikes_of(subnet, uid: int) -> list[dict]:
    return [d for e, d in ray.get(subnet.validator.history.remote(uid)) if e == "strike"]


def test_without_the_peers_checks_the_validators_checks_strike_every_cheater(cheaters, run_peers):
    """verify_results=False: the cheaters' wrong sums reach the peers, and the validator's checks of every round
    strike them (then their peers leave them out, as soon as the validator's answer says so)."""
    subnet = cheaters
    honest, *cheating = uids_of(subnet)

    def rounds(peer):
        assert len(peer.spec.miners) == 1 + len(LIVE_CHEATERS)
        for k in range(ROUNDS):
            peer.all_reduce(round_inputs(k)[peer.rank - 1])

    run_peers(subnet, 2, rounds, verify_results=False)
    for uid, role in zip(cheating, WRONG_SUMS, strict=False):
        first = 2 if role == "stale-replay" else 1  # its first round is the one it replays
        wait_for(  # checks of rounds run side by side, so a later round's strike may land first
            lambda uid=uid, first=first: any(s["seq"] == first for s in strikes_of(subnet, uid)),
            f"the {role} cheater's strike for round {first}",
        )
        assert min(s["seq"] for s in strikes_of(subnet, uid)) == first, role
        for evidence in strikes_of(subnet, uid):
            assert re.match(r"^chunk \d+: \d+ of \d+ elements differ; first at element \d+", evidence["reason"])
    assert not strikes_of(subnet, honest)


def test_peers_check_every_chunk_never_apply_a_wrong_sum_and_the_cheater_is_struck_and_left_out(cheaters):
    """With the checks on (the default) every result is the reference's: a cheater's chunks fail the peers'
    checks, its segments go to the next miner, the peers' evidence has it struck in that round, and it gets no
    segment of the job's later rounds. (After the test above: the replaying cheater now replays in every round.)"""
    subnet = cheaters
    honest, *cheating = uids_of(subnet)
    wait_for(lambda: max(r["banned_until"] for r in ledger(subnet).values()) < time.time(), "the bans to run out")
    job = uuid.uuid4().hex
    peers = [Peer(rank, 2, job=job, **subnet.peer_options) for rank in (1, 2)]
    for peer in peers:
        peer.init_process_group()
    try:
        assert len(peers[0].spec.miners) == 1 + len(LIVE_CHEATERS)
        job_id = peers[0].spec.job_id
        took_in = []
        for k in range(ROUNDS):
            inputs = round_inputs(k)
            with ThreadPoolExecutor(2) as pool:
                results = list(pool.map(lambda p, x=inputs: p.all_reduce(x[p.rank - 1].clone()), peers))
            assert all(torch.equal(r, reference_reduce(inputs, "avg")) for r in results), k
            took_in.append({uid: s["bytes_in"] for uid, s in zip(uids_of(subnet), statuses(subnet), strict=True)})
    finally:
        for peer in peers:
            peer.destroy_process_group()
    for uid, role in zip(cheating, LIVE_CHEATERS, strict=True):
        mine = [s for s in strikes_of(subnet, uid) if s["job"] == job_id]
        assert {s["seq"] for s in mine} == {1}, role  # struck in the round it cheated (per segment it failed)
        assert took_in[0][uid] == took_in[-1][uid], role  # nothing of rounds 2 and 3 reached it
    assert not strikes_of(subnet, honest)
    assert took_in[-1][honest] > took_in[0][honest]


@pytest.fixture(scope="module")
def curious(local_ray):
    """One miner that notes what every job it serves looks like."""
    subnet = start_local_subnet(
        [MinerPlan(CuriousRelay)],
        peers=2,
        chunk_mib=0.25,
        namespace="tests-curious",
        chain=ChainConfig(netuid=113),
        validator={"benchmark": {"size_mib": 2, "interval_s": 3600}},
    )
    yield subnet
    subnet.shutdown()


def test_a_miner_cannot_tell_a_benchmark_from_a_live_job(curious, run_peers):
    """The miner's first jobs are the validator's benchmarks of it; then a live job of two trainers, one of which
    asks the validator to benchmark the job's miner again meanwhile. What the miner sees of that benchmark
    is what it sees of the live job: a spec alike but for the id, a name that is the id, a hotkey of its own at
    every rank, all_reduce rounds (avg, float32, as a gradient average) with every chunk's sketch sealed."""

    def rounds(peer):
        peer.all_reduce(torch.randn(300_000))
        return peer.request_benchmark() if peer.rank == 1 else None

    measured = run_peers(curious, 2, rounds)[0]
    assert [m.outcome.value for m in measured] == ["exact"]
    *benchmarks, live, again = statuses(curious)[0]["reducers"][0]["seen"]
    assert len(benchmarks) == BENCHMARKS
    first = benchmarks[0]
    for note in (*benchmarks, live, again):
        assert note["named_by_id"] and note["sketched"]
        assert note["rounds"] == [("all_reduce", "avg", "float32")]
        assert len(set(note["hotkeys"])) == 2
    assert again["spec"] == live["spec"]
    assert not set(live["hotkeys"]) & set(first["hotkeys"] + again["hotkeys"])  # the bots are not the trainers


def statuses(subnet) -> list[dict]:
    return ray.get([m.status.remote() for m in subnet.miners], timeout=60)


@pytest.fixture(scope="module")
def blamer(local_ray):
    """An honest miner and one that, after its benchmarks, gives up every segment blaming rank 2 for leaving."""
    subnet = start_local_subnet(
        [MinerPlan(), MinerPlan(BlamingRelay, {"honest_jobs": BENCHMARKS})],
        peers=2,
        chunk_mib=0.25,
        timeout_s=30,
        namespace="tests-blamer",
        chain=ChainConfig(netuid=114),
        validator={"benchmark": {"size_mib": 2, "interval_s": 3600}, "verify": {"fraction": 1.0, "chunks": 0}},
    )
    yield subnet
    subnet.shutdown()


def test_a_miner_blaming_a_peer_moves_no_other_miners_reliability_and_no_tensor(blamer, run_peers):
    """The blamer fails ROUNDS rounds, each time blaming rank 2 (who sent its part) after the honest miner of the
    same job delivered its segment. Every peer's tensor stays as it was handed in; the honest miner is counted on
    time in every round, and the blamer late in every one: the honest miner's signed results show the round ran."""
    honest, lying = uids_of(blamer)
    before = ledger(blamer)

    def rounds(peer):
        errors = []
        for k in range(ROUNDS):
            tensor = torch.full((600_000,), float(k + peer.rank))
            with pytest.raises(PeerLostError, match=r"rank 2 left the job") as caught:
                peer.all_reduce(tensor)
            assert torch.equal(tensor, torch.full((600_000,), float(k + peer.rank)))
            errors.append(str(caught.value))
        return {slot.uid for slot in peer.spec.miners}, errors

    for miners, _ in run_peers(blamer, 2, rounds):
        assert miners == {honest, lying}
    wait_for(lambda: ray.get(blamer.validator.status.remote())["rounds_open"] == 0, "the rounds closed")
    after = ledger(blamer)
    moved = {
        uid: tuple(after[uid][key] - before[uid][key] for key in ("rounds_assigned", "rounds_on_time"))
        for uid in (honest, lying)
    }
    assert moved == {honest: (ROUNDS, ROUNDS), lying: (ROUNDS, 0)}
    assert (after[honest]["strikes"], after[honest]["state"]) == (0, "available")
    assert [event for event, _ in ray.get(blamer.validator.history.remote(honest))].count("late") == 0
