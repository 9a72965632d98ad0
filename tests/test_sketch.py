"""Keyed sketches: sealed so only the job's peers read them, exact for integers, and for floats a bound that
honest rounding stays within and wrong sums do not."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mapreduce_ray.dtypes import SUPPORTED, dtype_named
from mapreduce_ray.reference import reference_reduce
from mapreduce_ray.sketch import (
    SECRET_BYTES,
    Sketch,
    Sketcher,
    SketchError,
    bound,
    check,
    real_count,
    signed_sum,
    sketch,
    smallest_caught,
)
from mapreduce_ray.types import ReduceOp

SECRET = bytes(range(SECRET_BYTES))
SKETCHER = Sketcher(SECRET, "job-1")
NAMES = sorted(SUPPORTED)
FLOATS = [name for name in NAMES if not dtype_named(name).is_integer]
INTEGERS = [name for name in NAMES if dtype_named(name).is_integer]


def contributions(name: str, peers: int, numel: int, seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    dtype = dtype_named(name)
    generator = torch.Generator().manual_seed(seed)
    if dtype.is_integer:
        info = torch.iinfo(dtype.torch_dtype)
        return [
            torch.randint(info.min, info.max, (numel,), generator=generator, dtype=dtype.torch_dtype)
            for _ in range(peers)
        ]
    shape = (numel, 2) if dtype.torch_dtype.is_complex else (numel,)
    values = [torch.randn(shape, generator=generator, dtype=torch.float64) * scale for _ in range(peers)]
    if dtype.torch_dtype.is_complex:
        values = [torch.view_as_complex(v.contiguous()) for v in values]
    return [v.to(dtype.torch_dtype) for v in values]


def sketches(name: str, tensors: list[torch.Tensor], result: torch.Tensor, seq: int = 1):
    """(r·y of the result, the parts' sketches as they come out of their seals)."""
    dtype = dtype_named(name)
    signs = SKETCHER.signs(real_count(dtype, result.numel()))
    sealed = [SKETCHER.seal(sketch(t, dtype, signs), seq, 0, 0, rank) for rank, t in enumerate(tensors, 1)]
    parts = [SKETCHER.open(s, dtype.is_integer, seq, 0, 0, rank) for rank, s in enumerate(sealed, 1)]
    return signed_sum(result, dtype, signs), parts


def verdict(name: str, tensors: list[torch.Tensor], result: torch.Tensor, op: ReduceOp | None) -> str | None:
    """None if the result passes, else the check's message."""
    mine, parts = sketches(name, tensors, result)
    try:
        check(mine, parts, dtype_named(name), op, result.numel())
    except SketchError as e:
        return str(e)
    return None


def ops_for(name: str) -> list[ReduceOp]:
    return [ReduceOp.SUM] if dtype_named(name).is_integer else [ReduceOp.SUM, ReduceOp.AVG]


# --- seals --------------------------------------------------------------------------------------------------------


def test_a_sealed_sketch_opens_to_itself_and_hides_its_value():
    sealed = SKETCHER.seal(Sketch(1.25, 9.0), 3, 1, 2, 4)
    assert SKETCHER.open(sealed, False, 3, 1, 2, 4) == Sketch(1.25, 9.0)
    assert SKETCHER.open(SKETCHER.seal(Sketch(2**64 - 1, 0.0), 3, 1, 2, 4), True, 3, 1, 2, 4).value == 2**64 - 1
    assert len(sealed) == 64 and sealed != SKETCHER.seal(Sketch(1.25, 9.0), 4, 1, 2, 4)  # another round: other bytes


@pytest.mark.parametrize(
    ("sealed", "match"),
    [
        (
            Sketcher(bytes(SECRET_BYTES), "job-1").seal(Sketch(1.0, 1.0), 3, 1, 2, 4),
            "is missing or forged",
        ),  # other key
        (SKETCHER.seal(Sketch(1.0, 1.0), 3, 1, 2, 5), "is missing or forged"),  # another rank's
        (SKETCHER.seal(Sketch(1.0, 1.0), 3, 1, 2, 4)[:-2] + "00", "is missing or forged"),
        ("", "is missing or forged"),
        ("zz" * 32, "is not hex"),
    ],
)
def test_a_sketch_not_sealed_by_the_jobs_peer_for_that_place_does_not_open(sealed, match):
    with pytest.raises(SketchError, match=rf"^rank 4's sketch {match}"):
        SKETCHER.open(sealed, False, 3, 1, 2, 4)


def test_a_job_secret_has_its_size():
    with pytest.raises(ValueError, match=rf"^a job secret is {SECRET_BYTES} bytes, got 3$"):
        Sketcher(b"abc", "job-1")


def test_signs_are_the_jobs_random_signs_however_many_are_asked_for():
    signs = SKETCHER.signs(10_000)
    assert signs.dtype == np.int8 and set(np.unique(signs).tolist()) == {-1, 1} and abs(signs.mean()) < 0.05
    assert np.array_equal(SKETCHER.signs(30_000)[:10_000], signs)  # longer: the same ones first
    assert np.array_equal(SKETCHER.signs(5), signs[:5])
    assert not np.array_equal(Sketcher(bytes(SECRET_BYTES), "job-1").signs(10_000), signs)
    assert not np.array_equal(Sketcher(SECRET, "job-2").signs(10_000), signs)


# --- honest rounding passes ----------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(NAMES),
    st.integers(1, 8),
    st.integers(1, 3000),
    st.integers(0, 2**32),
    st.sampled_from([1e-3, 1.0, 1e3]),
)
def test_an_honest_reduction_passes_for_every_dtype_and_op(name, peers, numel, seed, scale):
    tensors = contributions(name, peers, numel, seed, scale)
    for op in ops_for(name):
        assert verdict(name, tensors, reference_reduce(tensors, op), op) is None
    assert verdict(name, tensors[:1], tensors[0].clone(), None) is None  # a broadcast: a copy


@pytest.mark.parametrize("name", NAMES)
def test_a_thousand_honest_chunks_raise_no_false_alarm(name):
    for seed in range(1000 // len(ops_for(name))):
        tensors = contributions(name, 4, 257, seed, scale=10.0)
        for op in ops_for(name):
            assert verdict(name, tensors, reference_reduce(tensors, op), op) is None, (seed, op)


def test_nan_and_inf_handed_in_propagate_unchecked_but_a_miner_cannot_add_them():
    tensors = contributions("float32", 3, 100, 7)
    tensors[1][5] = float("nan")
    assert verdict("float32", tensors, reference_reduce(tensors, "sum"), ReduceOp.SUM) is None
    clean = contributions("float32", 3, 100, 7)
    result = reference_reduce(clean, "sum")
    result[5] = float("inf")
    assert "holds NaN or Inf, which no contribution holds" in verdict("float32", clean, result, ReduceOp.SUM)


# --- wrong sums fail -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FLOATS)
@pytest.mark.parametrize("op", [ReduceOp.SUM, ReduceOp.AVG])
def test_one_element_off_by_twice_the_bound_is_caught(name, op):
    """The smallest error the bound claims to catch: one element off by 2t, t the bound for these sketches."""
    dtype = dtype_named(name)
    for seed in range(20):
        tensors = contributions(name, 4, 4096, seed)
        result = reference_reduce(tensors, op)
        mine, parts = sketches(name, tensors, result)
        k = 4 if op is ReduceOp.AVG else 1
        step = smallest_caught(dtype, [p.norm2 for p in parts], k, real_count(dtype, result.numel())) * 1.01
        wrong = result.clone()
        wrong[seed] = (wrong[seed].to(torch.complex128 if dtype.torch_dtype.is_complex else torch.float64) + step).to(
            dtype.torch_dtype
        )
        assert wrong[seed] != result[seed]
        assert "over the" in verdict(name, tensors, wrong, op), seed


@pytest.mark.parametrize("name", INTEGERS)
def test_integers_are_exact_one_off_in_one_element_is_caught(name):
    tensors = contributions(name, 4, 1000, 3)
    result = reference_reduce(tensors, "sum")
    assert verdict(name, tensors, result, ReduceOp.SUM) is None
    wrong = result.clone()
    wrong[999] += 1
    assert "exact for integers" in verdict(name, tensors, wrong, ReduceOp.SUM)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("cheat", ["times 1.01", "zeros", "another round's", "one rank left out"])
def test_the_live_cheats_fail_the_check(name, cheat):
    tensors = contributions(name, 4, 5000, 11, scale=1.0)
    op = ops_for(name)[-1]
    result = reference_reduce(tensors, op)
    if cheat == "times 1.01":  # half types round coarsely: a chunk catches only larger scalings
        factor = {"float16": 1.1, "bfloat16": 2.0}.get(name, 1.01)
        wrong = result * 2 if dtype_named(name).is_integer else result * factor
    elif cheat == "zeros":
        wrong = torch.zeros_like(result)
    elif cheat == "another round's":
        wrong = reference_reduce(contributions(name, 4, 5000, 12), op)
    else:
        wrong = reference_reduce(tensors[1:], "sum")
    assert verdict(name, tensors, wrong, op) is not None


def test_the_bound_grows_with_the_data_and_vanishes_for_a_copy_of_exact_data():
    dtype = dtype_named("float32")
    small = bound(dtype, [1.0] * 4, 4, 1000)
    assert bound(dtype, [100.0] * 4, 4, 1000) == pytest.approx(10 * small)
    assert bound(dtype, [1.0], 1, 1000) < 1e-9  # a broadcast: only float64 arithmetic
    assert math.isfinite(small) and small > 0
