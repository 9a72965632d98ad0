"""A miner operator's Ray of two nodes, the miners on the second: peers reach them over their endpoints. The
second miner runs a second reducer on the first node: validators place its jobs at each in turn."""

import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from actors import start_local_subnet
from actors.subnet import MinerPlan
from mapreduce_ray.chain import ChainConfig
from mapreduce_ray.reference import reference_reduce
from mapreduce_ray.wallets import dev_wallet, load_identity
from mapreduce_ray.wire.config import WireConfig
from mapreduce_ray.wire.endpoint import Remote

pytestmark = pytest.mark.cluster

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def two_nodes():
    ray.shutdown()  # the session's single-node Ray, if any
    head = {"num_cpus": 1, "object_store_memory": 300 * MIB, "resources": {"head_node": 1}}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    cluster.add_node(num_cpus=1, object_store_memory=300 * MIB, resources={"miner_node": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    on_miner_node = {"miner_node": 0.01}
    plans = [
        MinerPlan(resources=on_miner_node),
        MinerPlan(resources=on_miner_node, reducers=2, reducer_resources={"head_node": 0.01}),
    ]
    subnet = start_local_subnet(
        plans,
        chunk_mib=0.25,
        timeout_s=60,
        namespace="tests-cluster",
        chain=ChainConfig(netuid=200),
        validator={"benchmark": {"size_mib": 8, "interval_s": 3600}, "verify": {"fraction": 1.0}},
    )
    yield subnet
    subnet.shutdown()
    ray.shutdown()
    cluster.shutdown()


def test_miners_run_on_the_other_node(two_nodes):
    here = ray.get_runtime_context().get_node_id()
    miner_nodes = {s["node_id"] for s in ray.get([m.status.remote() for m in two_nodes.miners])}
    assert len(miner_nodes) == 1 and here not in miner_nodes


@pytest.mark.parametrize("shape", [(3,), (700_000,)], ids=["inline", "several-chunks"])
def test_all_reduce_across_nodes(two_nodes, shape, run_peers):
    tensors = [torch.randn(shape, generator=torch.Generator().manual_seed(r)) for r in range(3)]
    expected = reference_reduce([t.clone() for t in tensors], "avg")
    run_peers(two_nodes, 3, lambda peer: peer.all_reduce(tensors[peer.rank - 1]))
    assert all(torch.equal(t, expected) for t in tensors)


def test_broadcast_across_nodes(two_nodes, run_peers):
    source = torch.randn(500_000, dtype=torch.float64)
    results = run_peers(two_nodes, 3, lambda peer: peer.broadcast(source if peer.rank == 2 else None, src=2))
    assert all(torch.equal(r, source) for r in results)


def test_a_miner_lists_its_reducers_in_its_flight_info_and_they_run_on_their_nodes(two_nodes):
    status = ray.get(two_nodes.miners[1].status.remote())
    reducers = status["reducers"]
    here = ray.get_runtime_context().get_node_id()  # the head node, where reducer_resources put the second
    assert [r["node_id"] for r in reducers] == [status["node_id"], here] and status["node_id"] != here
    assert reducers[0]["endpoint"] == status["endpoint"] != reducers[1]["endpoint"]
    validator = load_identity(dev_wallet(two_nodes.chain.state_path, "dev-validator", "default")).keypair
    remote = Remote("miner 2", status["endpoint"], status["hotkey"], validator, WireConfig(), netuid=status["netuid"])
    try:
        assert remote.locations("reducers", b"reducers") == [r["endpoint"] for r in reducers]
    finally:
        remote.close()


def test_jobs_go_to_each_reducer_in_turn_and_come_out_exact(two_nodes, run_peers):
    def rounds_by_reducer() -> list[int]:
        return [r["rounds_done"] for r in ray.get(two_nodes.miners[1].status.remote())["reducers"]]

    before = rounds_by_reducer()
    for job in range(2):  # run_peers joins a job of its own each time
        tensors = [torch.randn(700_000, generator=torch.Generator().manual_seed(10 * job + r)) for r in range(3)]
        expected = reference_reduce([t.clone() for t in tensors], "sum")
        run_peers(two_nodes, 3, lambda peer, tensors=tensors: peer.all_reduce(tensors[peer.rank - 1], "sum"))
        assert all(torch.equal(t, expected) for t in tensors)
    after = rounds_by_reducer()
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)
