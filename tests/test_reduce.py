import numpy as np
import pytest
import torch

from mapreduce_ray.dtypes import SUPPORTED
from mapreduce_ray.reduce import block_accumulator, reduce_chunk
from mapreduce_ray.reference import reference_reduce
from mapreduce_ray.types import ReduceOp


def contributions(name: str, peers: int, numel: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(peers * 1000 + numel)
    dtype = SUPPORTED[name].torch_dtype
    if name.startswith("int"):
        return [torch.randint(-(2**20), 2**20, (numel,), generator=g, dtype=dtype) for _ in range(peers)]
    return [torch.randn(numel, generator=g, dtype=dtype) * 100 for _ in range(peers)]


CASES = [(name, op) for name in SUPPORTED for op in ReduceOp if not (op is ReduceOp.AVG and name.startswith("int"))]


@pytest.mark.parametrize("peers", [1, 2, 3, 4, 7])
@pytest.mark.parametrize(("name", "op"), CASES)
def test_kernel_equals_reference_bit_for_bit(name, op, peers):
    inputs = contributions(name, peers, 1000)
    before = [x.clone() for x in inputs]
    out = torch.empty_like(inputs[0])
    reduce_chunk(inputs, op, out, block_accumulator(block_elems=97))  # blocks that do not divide 1000
    assert torch.equal(out, reference_reduce(inputs, op))
    assert all(torch.equal(x, b) for x, b in zip(inputs, before, strict=True))


def test_sum_of_ints_is_exact_and_wraps_like_torch():
    big = torch.tensor([2**31 - 1, -(2**31), 5], dtype=torch.int32)
    out = torch.empty_like(big)
    reduce_chunk([big, torch.tensor([1, -1, 6], dtype=torch.int32)], ReduceOp.SUM, out, block_accumulator())
    assert out.tolist() == [-(2**31), 2**31 - 1, 11]


def test_reference_matches_a_plain_numpy_mean():
    inputs = contributions("float64", 4, 10_000)
    expected = np.mean(np.stack([x.numpy() for x in inputs]), axis=0)
    np.testing.assert_allclose(reference_reduce(inputs, "avg").numpy(), expected, rtol=1e-12, atol=1e-12)


def test_half_types_accumulate_in_float32():
    # 2048 + 1 + 1 is not representable step by step in float16 (2049 rounds to 2048)
    xs = [
        torch.tensor([2048.0], dtype=torch.float16),
        torch.tensor([1.0], dtype=torch.float16),
        torch.tensor([1.0], dtype=torch.float16),
    ]
    out = torch.empty_like(xs[0])
    reduce_chunk(xs, ReduceOp.SUM, out, block_accumulator())
    assert out.item() == 2050.0


def test_complex_avg_divides_each_part():
    xs = [
        torch.tensor([1 + 2j], dtype=torch.complex64),
        torch.tensor([2 + 2j], dtype=torch.complex64),
        torch.tensor([0 - 1j], dtype=torch.complex64),
    ]
    out = torch.empty_like(xs[0])
    reduce_chunk(xs, ReduceOp.AVG, out, block_accumulator())
    assert out.item() == complex(np.float32(3) / np.float32(3), np.float32(3) / np.float32(3))


@pytest.mark.parametrize("name", ["float16", "bfloat16", "float32"])
def test_nan_and_inf_propagate(name):
    dtype = SUPPORTED[name].torch_dtype
    xs = [
        torch.tensor([float("nan"), float("inf"), 1.0], dtype=dtype),
        torch.tensor([1.0, 1.0, float("-inf")], dtype=dtype),
    ]
    out = torch.empty_like(xs[0])
    reduce_chunk(xs, ReduceOp.AVG, out, block_accumulator())
    assert torch.isnan(out[0]) and out[1].item() == float("inf") and out[2].item() == float("-inf")


def test_avg_of_integers_is_refused():
    x = torch.ones(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="avg of torch.int64 would truncate; use op='sum'"):
        reduce_chunk([x, x], ReduceOp.AVG, torch.empty_like(x), block_accumulator())


def test_mismatched_inputs_are_refused():
    with pytest.raises(ValueError, match="inputs must all be torch.float32 of shape"):
        reduce_chunk([torch.ones(3), torch.ones(4)], ReduceOp.SUM, torch.empty(3), block_accumulator())
