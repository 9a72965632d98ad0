import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mapreduce_ray import verify
from mapreduce_ray.dtypes import SUPPORTED
from mapreduce_ray.reference import reference_reduce
from mapreduce_ray.verify import (
    Projection,
    Reduction,
    bound,
    check_projection,
    check_samples,
    project,
    projection_vector,
    sample_indices,
)

FLOATS = [name for name, d in SUPPORTED.items() if not d.is_integer]
INTS = [name for name, d in SUPPORTED.items() if d.is_integer]
CASES = [(name, op) for name in SUPPORTED for op in ("sum", "avg") if not (op == "avg" and name in INTS)]
MIB = 1 << 20
U64 = 2.0**-53


def make_inputs(name: str, peers: int, n: int, seed: int, cancel: bool = False, mixed: bool = True) -> list:
    """Contributions of `peers` peers: randn * 10^k (k in -3..6, or 0 unless `mixed`), full-range ints.

    With `cancel`, the last peer sends minus the sum of the others plus a little noise,
    so the result is tiny next to the contributions. float16 keeps its sums finite.
    """
    rng = np.random.default_rng(seed)
    dtype = SUPPORTED[name]
    if dtype.is_integer:
        info = np.iinfo(name)
        xs = [rng.integers(info.min, info.max, n, dtype=name, endpoint=True) for _ in range(peers)]
        if cancel and peers > 1:
            xs[-1] = -np.sum(xs[:-1], axis=0, dtype=name) + rng.integers(-9, 9, n, dtype=name)
        return [torch.from_numpy(x) for x in xs]
    m = 2 * n if dtype.torch_dtype.is_complex else n
    top = 3 if name == "float16" else 6
    xs = []
    for _ in range(peers):
        v = rng.standard_normal(m) * (10.0 ** rng.integers(-3, top + 1, m) if mixed else 1.0)
        xs.append(np.clip(v, -3e4 / peers, 3e4 / peers) if name == "float16" else v)
    if cancel and peers > 1:
        xs[-1] = -np.sum(xs[:-1], axis=0) + rng.standard_normal(m) * 1e-3
    return [_to_torch(v, name) for v in xs]


def _to_torch(values: np.ndarray, name: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(values))
    if SUPPORTED[name].torch_dtype.is_complex:
        t = torch.view_as_complex(t.reshape(-1, 2))
    return t.to(SUPPORTED[name].torch_dtype)


def projections(xs, y, name: str, seed: int = 12345) -> tuple[list[Projection], Projection]:
    z = projection_vector(seed, len(y), name)
    return [project(x, name, z) for x in xs], project(y, name, z)


def verdict_for(xs, y, name: str, op: str, seed: int = 12345):
    ps, py = projections(xs, y, name, seed)
    return check_projection(ps, py, Reduction(name, op, len(xs), len(y)))


def scaled(y: torch.Tensor, factor: float) -> torch.Tensor:
    return (y.to(torch.complex128 if y.is_complex() else torch.float64) * factor).to(y.dtype)


# --- the random choices -------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SUPPORTED))
def test_projection_vector_is_deterministic_per_seed_and_differs_across_seeds(name):
    n = 1000
    z = projection_vector(7, n, name)
    assert np.array_equal(z, projection_vector(7, n, name))
    assert not np.array_equal(z, projection_vector(8, n, name))
    if name in INTS:
        assert z.dtype == np.uint64 and z.shape == (n,)
        assert int(z.max()) > 2**63  # spread over the whole range
    else:
        m = 2 * n if "complex" in name else n
        assert z.dtype == np.float64 and z.shape == (m,)
        assert set(np.unique(z)) == {-1.0, 1.0}
        assert abs(z.sum()) < 0.2 * m


def test_projection_vector_prefix_is_stable():
    """The signs come from raw PCG64 words, so a shorter vector is a prefix of a longer one."""
    assert np.array_equal(projection_vector(3, 100, "float32"), projection_vector(3, 1000, "float32")[:100])


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**64 - 1), n=st.integers(1, 5000), data=st.data())
def test_sample_indices_are_distinct_sorted_and_deterministic(seed, n, data):
    k = data.draw(st.integers(0, n))
    idx = sample_indices(seed, n, k)
    assert len(idx) == k
    assert np.all(np.diff(idx) > 0)
    assert k == 0 or (idx[0] >= 0 and idx[-1] < n)
    assert np.array_equal(idx, sample_indices(seed, n, k))


def test_sample_indices_differ_across_seeds_and_cover_all_when_k_is_n():
    assert not np.array_equal(sample_indices(1, MIB, 64), sample_indices(2, MIB, 64))
    assert np.array_equal(sample_indices(5, 10, 10), np.arange(10))
    with pytest.raises(ValueError):
        sample_indices(1, 3, 4)


# --- projecting ---------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(INTS),
    values=st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=50),
    seed=st.integers(0, 2**32),
)
def test_integer_projection_is_the_dot_mod_2_64(name, values, seed):
    info = np.iinfo(name)
    x = np.array([min(max(v, info.min), info.max) for v in values], dtype=name)
    z = projection_vector(seed, len(x), name)
    exact = sum(int(a) * int(b) for a, b in zip(z, x.tolist(), strict=True)) % 2**64
    assert project(x, name, z) == Projection(dot=exact, abs_sum=0.0)
    assert project(torch.from_numpy(x), name, z) == Projection(dot=exact, abs_sum=0.0)


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(FLOATS), n=st.integers(1, 300), seed=st.integers(0, 2**32))
def test_float_projection_is_within_its_own_rounding_error(name, n, seed):
    x = make_inputs(name, 1, n, seed)[0]
    z = projection_vector(seed, n, name)
    p = project(x, name, z)
    real = (torch.view_as_real(x) if x.is_complex() else x).reshape(-1).to(torch.float64).tolist()
    exact_dot = math.fsum(a * b for a, b in zip(z.tolist(), real, strict=True))
    exact_abs = math.fsum(abs(a) for a in real)
    slack = len(real) * U64 / (1 - len(real) * U64) * exact_abs
    assert abs(p.dot - exact_dot) <= slack
    assert abs(p.abs_sum - exact_abs) <= slack
    if name != "bfloat16":  # bfloat16 exists in torch only
        assert project(x.numpy(), name, z) == p


@pytest.mark.parametrize("name", ["float16", "bfloat16", "float32", "complex64", "int32", "int64"])
def test_blocked_projection_equals_a_single_block(name, monkeypatch):
    xs = make_inputs(name, 1, 1000, seed=4)
    z = projection_vector(9, 1000, name)
    whole = project(xs[0], name, z)
    monkeypatch.setattr(verify, "BLOCK_ELEMS", 97)
    blocked = project(xs[0], name, z)
    if name in INTS:
        assert blocked == whole
    else:
        assert blocked.dot == pytest.approx(whole.dot, rel=1e-12, abs=1e-9 * whole.abs_sum)
        assert blocked.abs_sum == pytest.approx(whole.abs_sum, rel=1e-12)


def test_project_refuses_a_mismatched_dtype_or_vector():
    x = torch.zeros(10)
    with pytest.raises(ValueError):
        project(x, "float64", projection_vector(1, 10, "float64"))
    with pytest.raises(ValueError):
        project(x, "float32", projection_vector(1, 11, "float32"))
    with pytest.raises(ValueError):
        project(x, "float32", projection_vector(1, 10, "int64"))


# --- honest results pass ------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    case=st.sampled_from(CASES),
    peers=st.sampled_from([1, 2, 4, 8]),
    log_n=st.integers(0, 20),
    seed=st.integers(0, 2**32),
    cancel=st.booleans(),
    data=st.data(),
)
def test_honest_results_pass_both_checks(case, peers, log_n, seed, cancel, data):
    name, op = case
    n = data.draw(st.integers(1 << log_n >> 1 or 1, 1 << log_n))
    xs = make_inputs(name, peers, n, seed, cancel=cancel)
    y = reference_reduce(xs, op)
    verdict = verdict_for(xs, y, name, op, seed=seed + 1)
    assert verdict.ok, verdict.reason
    assert verdict.reason == "ok"
    assert verdict.difference <= verdict.bound
    idx = torch.from_numpy(sample_indices(seed, n, min(n, 32)))
    sampled = check_samples([x[idx] for x in xs], y[idx], name, op)
    assert sampled.ok, sampled.reason


@pytest.mark.parametrize("op", ["sum", "avg"])
def test_bound_is_tight_enough_to_be_useful_for_float32(op):
    xs = make_inputs("float32", 4, MIB, seed=1, mixed=False)
    y = reference_reduce(xs, op)
    ps, py = projections(xs, y, "float32")
    limit = bound(ps, py, Reduction("float32", op, 4, MIB))
    verdict = check_projection(ps, py, Reduction("float32", op, 4, MIB))
    assert limit < 1e-3 * py.abs_sum
    assert limit < 2e-6 * py.abs_sum  # in fact: the float32 sum's own worst case
    assert verdict.ok and verdict.difference < limit and verdict.bound == limit


def test_a_single_contribution_has_no_output_rounding():
    xs = make_inputs("bfloat16", 1, 1000, seed=2)
    ps, py = projections(xs, reference_reduce(xs, "avg"), "bfloat16")
    assert py == ps[0]
    assert bound(ps, py, Reduction("bfloat16", "avg", 1, 1000)) < 1e-12 * py.abs_sum


# --- cheats the projection catches --------------------------------------------------------------

ACCURATE = ["float32", "float64", "complex64", "complex128"]


def cheats(xs, y, name, op, peers, n):
    """Wrong results a miner might return instead of y."""
    other = make_inputs(name, peers, n, seed=99, mixed=False)
    big = y.clone()
    big[n // 3] += 1e3
    return {
        "scaled by 1.01": scaled(y, 1.01),
        "zeros": torch.zeros_like(y),
        "replayed from another round": reference_reduce(other, op),
        "other op": reference_reduce(xs, "sum" if op == "avg" else "avg"),
        "one element +1e3": big,
    }


@pytest.mark.parametrize("op", ["sum", "avg"])
@pytest.mark.parametrize("name", ACCURATE)
def test_projection_catches_cheats_on_a_large_segment(name, op):
    peers, n = 4, MIB
    xs = make_inputs(name, peers, n, seed=3, mixed=False)
    y = reference_reduce(xs, op)
    z = projection_vector(77, n, name)
    ps = [project(x, name, z) for x in xs]
    assert check_projection(ps, project(y, name, z), Reduction(name, op, peers, n)).ok
    for what, wrong in cheats(xs, y, name, op, peers, n).items():
        verdict = check_projection(ps, project(wrong, name, z), Reduction(name, op, peers, n))
        assert not verdict.ok, what
        assert verdict.reason.startswith("projection off by") and verdict.difference > verdict.bound


@pytest.mark.parametrize("op", ["sum", "avg"])
@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_half_types_projection_catches_gross_cheats_on_small_segments(name, op):
    """Output rounding of u_out * sum|y| dominates the half types' bound (see the module docstring)."""
    peers, n = 4, 256
    xs = make_inputs(name, peers, n, seed=3, mixed=False)
    y = reference_reduce(xs, op)
    assert verdict_for(xs, y, name, op).ok
    for what, wrong in cheats(xs, y, name, op, peers, n).items():
        if what != "scaled by 1.01":
            assert not verdict_for(xs, wrong, name, op).ok, what


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_half_types_small_spread_cheats_need_the_samples(name):
    peers, n = 4, MIB
    xs = make_inputs(name, peers, n, seed=3, mixed=False)
    y = reference_reduce(xs, "sum")
    wrong = scaled(y, 1.01)
    ps, py = projections(xs, wrong, name)
    verdict = check_projection(ps, py, Reduction(name, "sum", peers, n))
    # Within the worst case of rounding 2^20 results to 8 or 11 bits, so not caught here ...
    assert verdict.ok and verdict.bound > 0.5 * 2.0**-11 * py.abs_sum
    # (zeros still are: the bound shrinks with sum |y|)
    assert not verdict_for(xs, torch.zeros_like(y), name, "sum").ok
    # ... but it changes the bits of almost every element, so any sample finds it.
    idx = torch.from_numpy(sample_indices(5, n, 16))
    sampled = check_samples([x[idx] for x in xs], wrong[idx], name, "sum")
    assert not sampled.ok and sampled.difference >= 8


def test_integer_check_is_exact_even_when_the_sum_wraps():
    peers, n = 4, 1 << 16
    xs = make_inputs("int32", peers, n, seed=5)
    y = reference_reduce(xs, "sum")
    wide = torch.stack(xs).to(torch.int64).sum(dim=0)
    j = int(torch.nonzero(wide != y.to(torch.int64))[0])  # an element whose true sum wrapped
    assert verdict_for(xs, y, "int32", "sum") == verify.Verdict(True, 0.0, 0.0, "ok")
    for at in (0, j, n - 1):
        wrong = y.clone()
        wrong[at] += 1
        verdict = verdict_for(xs, wrong, "int32", "sum")
        assert not verdict.ok and verdict.difference > 0 and verdict.bound == 0.0
        assert "mod 2^32" in verdict.reason
    saturated = wide.clamp(-(2**31), 2**31 - 1).to(torch.int32)  # no wrapping
    assert not verdict_for(xs, saturated, "int32", "sum").ok


@pytest.mark.parametrize("name", INTS)
def test_integer_cheats_are_caught(name):
    peers, n = 8, 1 << 16
    xs = make_inputs(name, peers, n, seed=6)
    y = reference_reduce(xs, "sum")
    assert verdict_for(xs, y, name, "sum").ok
    plus_one = y.clone()
    plus_one[n // 2] += 1
    other = reference_reduce(make_inputs(name, peers, n, seed=7), "sum")
    for wrong in (plus_one, torch.zeros_like(y), other, y.flip(0)):
        assert not verdict_for(xs, wrong, name, "sum").ok


def test_integer_avg_is_refused():
    p = Projection(dot=0, abs_sum=0.0)
    with pytest.raises(ValueError, match="avg"):
        check_projection([p], p, Reduction("int64", "avg", 1, 1))
    with pytest.raises(ValueError, match="avg"):
        check_samples([np.zeros(1, dtype=np.int64)], np.zeros(1, dtype=np.int64), "int64", "avg")


# --- single small errors: the samples' job ------------------------------------------------------


@pytest.mark.parametrize("change", ["next float", "+1e-3"])
def test_a_small_single_element_error_is_caught_only_when_sampled(change):
    peers, n, j = 4, MIB, 123_457
    xs = make_inputs("float32", peers, n, seed=8, mixed=False)
    y = reference_reduce(xs, "avg")
    wrong = y.clone()
    if change == "next float":
        wrong[j] = torch.nextafter(y[j], torch.tensor(math.inf))
    else:
        wrong[j] += 1e-3
    delta = abs(float(wrong[j]) - float(y[j]))
    honest = verdict_for(xs, y, "float32", "avg")
    verdict = verdict_for(xs, wrong, "float32", "avg")
    # The projection moved by exactly delta, far inside the bound: it cannot tell.
    assert delta + honest.difference <= honest.bound
    assert verdict.ok
    with_j = torch.tensor(sorted({*sample_indices(9, n, 31).tolist(), j}))
    sampled = check_samples([x[with_j] for x in xs], wrong[with_j], "float32", "avg")
    assert not sampled.ok and sampled.difference == 1
    assert "1 of 32 sampled elements differ" in sampled.reason
    without_j = torch.from_numpy(sample_indices(9, n, 31))
    assert j not in without_j.tolist()
    assert check_samples([x[without_j] for x in xs], wrong[without_j], "float32", "avg").ok


def test_projection_detection_threshold_for_one_float32_element():
    """float32, n = 2^20, P = 4: one element moved by delta moves the projection by exactly delta."""
    peers, n, j = 4, MIB, 777
    xs = make_inputs("float32", peers, n, seed=10, mixed=False)
    y = reference_reduce(xs, "sum")
    z = projection_vector(11, n, "float32")
    ps = [project(x, "float32", z) for x in xs]
    honest = check_projection(ps, project(y, "float32", z), Reduction("float32", "sum", peers, n))
    assert 0.5 < honest.bound < 3  # about 1.2 here, ~7e-7 of sum |y| (about 1.7e6)
    caught = {}
    for delta in [2.0**k for k in range(-4, 11)]:
        wrong = y.clone()
        wrong[j] += delta
        moved = float(wrong[j]) - float(y[j])  # delta rounded to float32 near y[j]; exact in float64
        caught[delta] = not check_projection(ps, project(wrong, "float32", z), Reduction("float32", "sum", peers, n)).ok
        if moved > 2 * honest.bound:
            assert caught[delta]
        if moved + honest.difference <= honest.bound:
            assert not caught[delta]
    smallest = min(d for d, c in caught.items() if c)
    assert smallest == 2.0  # so the +1e3 cheat above is caught with a ~800x margin
    assert all(caught[d] for d in caught if d >= smallest)


# --- inf and nan --------------------------------------------------------------------------------


def test_non_finite_values_make_the_projection_inconclusive_unless_impossible():
    big = torch.full((8,), 40000.0, dtype=torch.float16)
    y = reference_reduce([big, big], "sum")  # overflows float16 honestly
    assert torch.isinf(y).all()
    verdict = verdict_for([big, big], y, "float16", "sum")
    assert verdict.ok and verdict.bound == math.inf and verdict.reason.startswith("inconclusive")
    small = torch.ones(8, dtype=torch.float16)
    wrong = torch.ones(8, dtype=torch.float16)
    wrong[3] = math.inf
    verdict = verdict_for([small, small], wrong, "float16", "sum")
    assert not verdict.ok and "inf/nan" in verdict.reason
    nan_input = torch.tensor([1.0, math.nan], dtype=torch.complex64)
    assert verdict_for([nan_input], nan_input, "complex64", "avg").ok


def test_samples_compare_bits_and_let_any_nan_match_any_nan():
    x = torch.tensor([1.0, -0.0, math.nan, math.inf])
    y = reference_reduce([x, torch.zeros(4)], "sum")
    other_nan = y.clone()
    other_nan.view(torch.int32)[2] = 0x7FC01234  # a quiet NaN with another payload
    assert torch.isnan(other_nan[2]) and not torch.equal(other_nan.view(torch.int32), y.view(torch.int32))
    zeros = torch.zeros(4)
    assert check_samples([x, zeros], y, "float32", "sum").ok
    assert check_samples([x, zeros], other_nan, "float32", "sum").ok
    negative_zero = y.clone()
    negative_zero[1] = -0.0  # honest -0.0 + 0.0 is +0.0
    assert not check_samples([x, zeros], negative_zero, "float32", "sum").ok
    not_nan = y.clone()
    not_nan[2] = 0.0
    assert not check_samples([x, zeros], not_nan, "float32", "sum").ok
    with pytest.raises(ValueError):
        check_samples([], y, "float32", "sum")
    with pytest.raises(ValueError):
        check_samples([x], y[:3], "float32", "sum")
    with pytest.raises(ValueError):
        check_samples([x.double()], y.double(), "float32", "sum")
