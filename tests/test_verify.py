"""The validator's exact check: a recomputation in rank order, compared bit for bit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mapreduce_ray.dtypes import SUPPORTED
from mapreduce_ray.reduce import block_accumulator, reduce_chunk
from mapreduce_ray.types import ReduceOp
from mapreduce_ray.validator.verify import check_exact

INTS = [name for name, d in SUPPORTED.items() if d.is_integer]
CASES = [(name, op) for name in SUPPORTED for op in ("sum", "avg") if not (op == "avg" and name in INTS)]


def contributions(name: str, peers: int, n: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    dtype = SUPPORTED[name].torch_dtype
    if name in INTS:
        info = torch.iinfo(dtype)
        return [torch.randint(info.min, info.max, (n,), generator=generator, dtype=dtype) for _ in range(peers)]
    return [torch.randn(n, generator=generator, dtype=dtype) * 1000 for _ in range(peers)]


def miner_result(xs: list[torch.Tensor], op: str) -> torch.Tensor:
    """What an honest miner returns: the blocked kernel."""
    out = torch.empty_like(xs[0])
    return reduce_chunk(xs, ReduceOp.parse(op), out, block_accumulator(64))


@pytest.mark.parametrize(("name", "op"), CASES)
@settings(max_examples=10, deadline=None)
@given(peers=st.integers(1, 6), n=st.integers(1, 300), seed=st.integers(0, 2**32))
def test_an_honest_result_passes(name, op, peers, n, seed):
    xs = contributions(name, peers, n, seed)
    assert check_exact(xs, miner_result(xs, op), name, op).ok


@pytest.mark.parametrize(("name", "op"), CASES)
def test_one_element_one_bit_off_fails_naming_it(name, op):
    xs = contributions(name, 3, 100, 7)
    y = miner_result(xs, op).clone()
    bits = y.view(torch.uint8)
    bits[41 * y.element_size()] ^= 1  # the lowest bit of element 41
    verdict = check_exact(xs, y, name, op)
    assert not verdict.ok
    assert verdict.reason.startswith("1 of 100 elements differ; first at element 41")


def test_integer_sums_wrap_like_torch_and_pass():
    big = torch.full((4,), 2**31 - 1, dtype=torch.int32)
    y = miner_result([big, big], "sum")
    assert y[0].item() == -2
    assert check_exact([big, big], y, "int32", "sum").ok


def test_any_nan_matches_any_nan_but_signed_zeros_differ():
    x = torch.tensor([1.0, -0.0, math.nan, math.inf])
    zeros = torch.zeros(4)
    y = miner_result([x, zeros], "sum")
    other_nan = y.clone()
    other_nan.view(torch.int32)[2] = 0x7FC01234  # a quiet NaN with another payload
    assert check_exact([x, zeros], other_nan, "float32", "sum").ok
    negative_zero = y.clone()
    negative_zero[1] = -0.0  # honest -0.0 + 0.0 is +0.0
    assert not check_exact([x, zeros], negative_zero, "float32", "sum").ok


def test_numpy_inputs_are_checked_too():
    xs = [np.arange(6, dtype=np.float64), np.ones(6)]
    assert check_exact(xs, xs[0] + xs[1], "float64", "sum").ok


def test_what_cannot_be_checked_is_refused():
    y = torch.zeros(4)
    with pytest.raises(ValueError, match="at least one contribution"):
        check_exact([], y, "float32", "sum")
    with pytest.raises(ValueError, match="as long as the result"):
        check_exact([torch.zeros(3)], y, "float32", "sum")
    with pytest.raises(ValueError, match="expected torch.float32"):
        check_exact([y.double()], y, "float32", "sum")
    with pytest.raises(ValueError, match="avg of int64"):
        check_exact([torch.zeros(4, dtype=torch.int64)], torch.zeros(4, dtype=torch.int64), "int64", "avg")
