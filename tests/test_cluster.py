"""A miner operator's Ray of two nodes, the miners on the second: peers reach them over their endpoints."""

import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from actors import start_local_subnet
from mapreduce_ray.chain import ChainConfig
from mapreduce_ray.reference import reference_reduce

pytestmark = pytest.mark.cluster

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def two_nodes():
    ray.shutdown()  # the session's single-node Ray, if any
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 300 * MIB})
    cluster.add_node(num_cpus=1, object_store_memory=300 * MIB, resources={"miner_node": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    subnet = start_local_subnet(
        2,
        chunk_mib=0.25,
        timeout_s=60,
        namespace="tests-cluster",
        chain=ChainConfig(netuid=200),
        miner_resources={"miner_node": 0.01},
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
