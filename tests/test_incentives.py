"""The incentive simulation on three emulated hosts: weights reward measured, honest work only."""

import pytest

from actors.simulation import simulate, table
from mapreduce_ray.chain import ChainConfig


def test_weights_order_honest_fast_over_slow_over_lazy_cheaters_and_sybils(local_ray):
    rows = simulate(ChainConfig(netuid=300, weights_rate_limit=0), size_mib=8, fast_mib_s=16, slow_mib_s=4, timeout_s=6)
    print(table(rows))
    weight = {r.role: r.weight for r in rows}
    strikes = {r.role: r.strikes for r in rows}
    hosts = {r.role: r.host for r in rows}
    assert (hosts["honest-fast"], hosts["honest-slow"], hosts["sybil-1"]) == ("127.0.0.2", "127.0.0.3", "127.0.0.4")
    assert weight["honest-fast"] > weight["honest-slow"] > 0
    for role in ("lazy", "one-element-off", "scaled", "stale-replay", "zeros"):
        assert weight[role] == 0.0, role
    for role in ("one-element-off", "scaled", "stale-replay", "zeros"):
        assert strikes[role] == 1, role  # struck by the benchmark that caught it, then banned
    assert strikes["lazy"] == strikes["honest-fast"] == strikes["honest-slow"] == 0
    sybil = [r for r in rows if r.role.startswith("sybil")]
    assert len({r.weight for r in sybil}) == 1  # one host, one score, split evenly
    # Weight is proportional to measured speed here (one epoch, full capacity credit, every
    # round on time), so "no more than one honest miner of the same speed" means: the group
    # earns per MiB/s of its fastest member exactly what honest-fast earns per MiB/s of its own.
    fast = next(r for r in rows if r.role == "honest-fast")
    best = max(r.throughput_mib_s for r in sybil)
    assert sum(r.weight for r in sybil) / best == pytest.approx(fast.weight / fast.throughput_mib_s, rel=1e-9)
    assert sum(weight.values()) == pytest.approx(1.0)
