"""The internet model's round times and sizes (benchmarks/model.py) on cases worked by hand."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import model  # noqa: E402

MIB = 1024 * 1024


def equal_links(n: int, m: int, bps: float, delay_s: float) -> model.Trial:
    return model.Trial(np.full(n, bps), np.full(n, delay_s), np.full(m, bps), np.full(m, delay_s))


def test_equal_links_give_the_bounds_plus_the_fitted_costs_and_round_trips():
    n, m, d, bps, delay = 4, 2, 64 * MIB, 12.5e6, 0.0125
    t = equal_links(n, m, bps, delay)
    sizes = model.chunk_sizes(n, m, d)  # the planner's: 32 MiB segments in 128 chunks, ramps from 64 KiB
    assert sizes[:3] == [64 * 1024, 128 * 1024, 256 * 1024] and sum(sizes) == d // m
    chunk = sizes[0]
    relay = model.relay_time(t, np.arange(n), np.arange(m), d, chunk)
    transfer = max(d / bps, n * d / (m * bps)) / model.WIRE  # the miners' term rules: 2 miners for 4 peers
    assert relay == pytest.approx(transfer + 2 * chunk * m / bps + 2 * 0.05 + model.RELAY_ROUND_S)
    ring = model.ring_time(t, np.arange(n), d)
    assert ring == pytest.approx(2 * (n - 1) * (d / n / bps / model.WIRE + 0.05 + model.RING_STEP_S))


def test_the_relay_breaks_even_with_a_ring_when_miners_carry_half_the_peers_bandwidth():
    rows = {share: float(ratio) for share, _, _, ratio in model.scarce_miners(model.ASSUMPTIONS)}
    assert rows["0.5"] < 1 < rows["0.57"]  # n / (2(n-1)) = 0.508 at 64 peers
    assert rows["1"] == rows["2"] == pytest.approx(2 * 63 / 64, abs=0.01)  # the peers' term rules


def test_jobs_deal_the_fastest_miners_round_the_jobs_and_receipts_grow_with_peers():
    jobs = model.jobs_of(model.ASSUMPTIONS, 8, 8)
    assert len(jobs) == 8 and list(jobs[0][0]) == list(range(8)) and list(jobs[0][1]) == list(range(0, 64, 8))
    small, large = model.reduced_bytes(8), model.reduced_bytes(64)
    assert 130 * 56 < large - small < 200 * 56  # each peer adds its digest and sealed sketch


def test_a_tensor_smaller_than_a_chunk_per_miner_fills_the_pipeline_once():
    n, m, d, bps, delay = 4, 8, 4 * 1024, 12.5e6, 0.0125
    t = equal_links(n, m, bps, delay)
    chunk = model.chunk_sizes(n, m, d)[0]
    assert chunk == d  # one miner takes all of it
    relay = model.relay_time(t, np.arange(n), np.arange(m), d, chunk)
    transfer = max(d / bps, n * d / (m * bps)) / model.WIRE
    assert relay == pytest.approx(transfer + 2 * d / bps + 2 * 0.05 + model.RELAY_ROUND_S)
