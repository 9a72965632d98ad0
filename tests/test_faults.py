"""Faults: miners killed or late mid-round, a wrong replica outvoted, a peer killed mid-round.

These run on a subnet of their own (it loses miners on purpose), with a 10 s round
deadline: a miner waits 10/3 s for every peer, a peer waits 10/2 s for a miner.
"""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
import torch
from conftest import CHUNK_MIB, VALIDATOR

from actors import MinerPlan, PeerActor, start_local_subnet
from actors.behaviours import OneElementOffRelay, PausingRelay, ScalingRelay
from actors.subnet import start_miner
from mapreduce_ray import Peer
from mapreduce_ray.chain import ChainConfig
from mapreduce_ray.errors import PeerLostError
from mapreduce_ray.messages import Outcome
from mapreduce_ray.reference import reference_reduce
from mapreduce_ray.wallets import dev_wallet

FAULT_TIMEOUT_S = 10.0
WAIT_S = 60.0  # for anything a test waits on: benchmarks, a pause, a ledger entry


@pytest.fixture(scope="module")
def faulty(local_ray):
    subnet = start_local_subnet(
        2,
        chunk_mib=CHUNK_MIB,
        timeout_s=FAULT_TIMEOUT_S,
        namespace="tests-faults",
        chain=ChainConfig(netuid=110),
        validator=VALIDATOR,
    )
    yield subnet
    subnet.shutdown()


def benchmarks(subnet) -> int:
    """The jobs a new miner serves before any live one: the validator's benchmarks of it, back to back."""
    return subnet.config.benchmark.best_of


def add_miner(subnet, plan: MinerPlan) -> tuple:
    """Start one more miner on `subnet` and wait for its benchmark; (handle, uid)."""
    wallet = dev_wallet(subnet.chain.state_path, "dev-miner", f"extra-{uuid.uuid4().hex[:8]}")
    handle = start_miner(subnet.chain, subnet.namespace, wallet, plan)
    subnet.miners.append(handle)
    subnet.wait_benchmarked(WAIT_S, [handle])
    return handle, ray.get(handle.status.remote(), timeout=WAIT_S)["uid"]


def joined_peers(subnet, peer_count: int, job: str | None = None, **kwargs) -> list[Peer]:
    """Peers 1..peer_count of job `job` (default: a new name), joined."""
    job = job or uuid.uuid4().hex
    peers = [Peer(r, peer_count, job=job, **subnet.peer_options, **kwargs) for r in range(1, peer_count + 1)]
    for peer in peers:
        peer.init_process_group()
    return peers


def history_shows(subnet, uid: int, event: str) -> list:
    """The validator's history entries `event` of `uid`, waited for (they follow the round's reports)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        entries = [d for e, d in ray.get(subnet.validator.history.remote(uid), timeout=WAIT_S) if e == event]
        if entries or time.monotonic() > deadline:
            return entries
        time.sleep(0.2)


def sum_on_every_peer(peers: list[Peer], tensors: list[torch.Tensor]) -> None:
    """all_reduce(sum) of each peer's tensor, the peers in threads of their own."""
    with ThreadPoolExecutor(len(peers)) as pool:
        list(pool.map(lambda pt: pt[0].all_reduce(pt[1], "sum"), zip(peers, tensors, strict=True)))


def wait_until_paused(miner) -> None:
    deadline = time.monotonic() + WAIT_S
    while not ray.get(miner.status.remote(), timeout=WAIT_S)["paused"]:
        assert time.monotonic() < deadline, "the miner never got to its pause"
        time.sleep(0.05)


def tensors_for(peer_count: int, numel: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(numel, generator=generator) for _ in range(peer_count)]


@pytest.mark.parametrize("point", ["before", *PausingRelay.POINTS, "late"])
def test_a_miner_killed_or_late_in_a_round_is_replaced_and_every_peer_gets_the_exact_result(faulty, point):
    """Killed before the round, at a point of its reduce, or (late) stalled there past its deadline, alive."""
    pause_at = point if point in PausingRelay.POINTS else "received"
    miner, uid = add_miner(faulty, MinerPlan(PausingRelay, {"point": pause_at, "after_jobs": benchmarks(faulty)}))
    peers = joined_peers(faulty, 3)
    assert uid in [slot.uid for slot in peers[0].spec.miners]
    tensors = tensors_for(3, 1 << 20, seed=len(point))  # 4 MiB: every segment travels in several chunks
    expected = reference_reduce(tensors, "sum")
    try:
        if point == "before":
            ray.kill(miner)
        with ThreadPoolExecutor(3) as pool:
            rounds = [pool.submit(p.all_reduce, t, "sum") for p, t in zip(peers, tensors, strict=True)]
            if point in PausingRelay.POINTS:
                wait_until_paused(miner)
                ray.kill(miner)
            for r in rounds:
                r.result(timeout=WAIT_S)
        assert all(torch.equal(t, expected) for t in tensors)
        again = tensors_for(3, 1000, seed=7)  # the job goes on
        expected = reference_reduce(again, "sum")
        sum_on_every_peer(peers, again)
        assert all(torch.equal(t, expected) for t in again)
    finally:
        for peer in peers:
            peer.destroy_process_group()
    assert history_shows(faulty, uid, "late")  # the validator counts the missed round against it


def test_with_redundancy_2_a_wrong_miner_is_outvoted_and_struck(faulty):
    cheater, uid = add_miner(faulty, MinerPlan(OneElementOffRelay, {"honest_jobs": benchmarks(faulty)}))
    peers = joined_peers(faulty, 2, redundancy=2)
    spec = peers[0].spec
    assert spec.redundancy == 2 and uid in [slot.uid for slot in spec.miners]
    tensors = tensors_for(2, 100_000, seed=11)
    expected = reference_reduce(tensors, "sum")
    try:
        sum_on_every_peer(peers, tensors)
    finally:
        for peer in peers:
            peer.destroy_process_group()
    assert all(torch.equal(t, expected) for t in tensors)
    strikes = history_shows(faulty, uid, "strike")
    assert strikes and "elements differ" in strikes[0]["reason"]
    rows = {row["uid"]: row for row in ray.get(faulty.validator.miners.remote(), timeout=WAIT_S)}
    assert rows[uid]["strikes"] >= 1 and rows[uid]["state"] == "banned"
    honest = [slot.uid for slot in spec.miners if slot.uid != uid]
    assert all(rows[u]["strikes"] == 0 for u in honest)


def test_a_miner_struck_during_a_job_leaves_it_at_the_same_round_at_every_peer(faulty):
    """A miner honest in its benchmarks and a job is caught by a benchmark a peer asks for meanwhile (its next
    job, where it scales its sums). The peers tell each other of the strike in their verdicts, and from the round
    after all of them told of it every peer leaves the miner out alike: no round fails, none takes it anything."""
    cheater, uid = add_miner(faulty, MinerPlan(ScalingRelay, {"honest_jobs": benchmarks(faulty) + 1}))
    peers = joined_peers(faulty, 2)
    assert uid in [slot.uid for slot in peers[0].spec.miners]
    took_in = []
    try:
        for k in range(5):
            tensors = tensors_for(2, 100_000, seed=20 + k)
            expected = reference_reduce(tensors, "sum")
            sum_on_every_peer(peers, tensors)
            assert all(torch.equal(t, expected) for t in tensors), k
            took_in.append(ray.get(cheater.status.remote(), timeout=WAIT_S)["bytes_in"])
            if k == 0:
                assert {m.uid: m.outcome for m in peers[0].request_benchmark()}[uid] is Outcome.WRONG
    finally:
        for peer in peers:
            peer.destroy_process_group()
    assert took_in[0] > 0 and took_in[3] == took_in[4]


def test_a_peer_killed_in_a_round_fails_it_for_the_others_naming_its_rank(faulty):
    job = uuid.uuid4().hex
    survivors = [Peer(r, 3, job=job, **faulty.peer_options) for r in (1, 2)]
    doomed = ray.remote(PeerActor).remote(3, 3, job=job, **faulty.peer_options)
    for peer in survivors:
        peer.init_process_group()
    ray.get(doomed.init_process_group.remote(), timeout=WAIT_S)
    tensors = tensors_for(2, 100_000, seed=5)
    before = [t.clone() for t in tensors]

    def attempt(peer: Peer) -> str:
        with pytest.raises(PeerLostError) as caught:
            peer.all_reduce(tensors[peer.rank - 1], "sum")
        return str(caught.value)

    with ThreadPoolExecutor(2) as pool:
        errors = pool.map(attempt, survivors)
        ray.kill(doomed)
        errors = list(errors)
    for message in errors:
        assert "rank(s) [3] sent nothing to miner" in message
        assert message.endswith("start the job again: destroy_process_group(), then init_process_group()")
    assert all(torch.equal(t, b) for t, b in zip(tensors, before, strict=True))
    deadline = time.monotonic() + WAIT_S  # the miners let go of the failed round
    while any(s["open_rounds"] for s in ray.get([m.status.remote() for m in live_miners(faulty)])):
        assert time.monotonic() < deadline, "a miner still holds the failed round"
        time.sleep(0.2)
    for peer in survivors:
        peer.destroy_process_group()
    peers = joined_peers(faulty, 3, job)  # a new rank 3 and the survivors start the job again
    try:
        expected = reference_reduce(tensors + [torch.ones(100_000)], "sum")
        everything = [*tensors, torch.ones(100_000)]
        sum_on_every_peer(peers, everything)
        assert all(torch.equal(t, expected) for t in everything)
    finally:
        for peer in peers:
            peer.destroy_process_group()


def live_miners(subnet) -> list:
    alive = []
    for miner in subnet.miners:
        try:
            ray.get(miner.status.remote(), timeout=5)
            alive.append(miner)
        except ray.exceptions.RayActorError:
            continue
    return alive
