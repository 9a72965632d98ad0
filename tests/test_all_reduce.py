import numpy as np
import pytest
import torch

from mapreduce_ray import InvalidTensorError, RoundMismatchError, UnsupportedDtypeError
from mapreduce_ray.dtypes import SUPPORTED
from mapreduce_ray.reference import reference_reduce

SHAPES = {
    "0-d": (),
    "1 element": (1,),
    "fewer elements than miners": (2,),
    "3-D": (4, 5, 6),
    "1 MiB, several chunks": (256 * 1024,),
}


def inputs_for(peers: int, shape, dtype=torch.float32, seed=0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if dtype in (torch.int32, torch.int64):
        return [torch.randint(-1000, 1000, shape, generator=g, dtype=dtype) for _ in range(peers)]
    return [torch.randn(shape, generator=g, dtype=dtype) for _ in range(peers)]


def transposed(peers: int) -> list[torch.Tensor]:
    """Non-contiguous views: every other column of a transposed 6 x 11 tensor."""
    return [t.t()[::2] for t in inputs_for(peers, (6, 11))]


INPUTS = {name: (lambda peers, shape=shape: inputs_for(peers, shape)) for name, shape in SHAPES.items()}
INPUTS["non-contiguous"] = transposed


@pytest.fixture
def all_reduce_everywhere(run_peers):
    """all_reduce_everywhere(subnet, tensors, op): peer r reduces tensors[r - 1]; returns what each got back."""

    def run(subnet, tensors: list, op: str) -> list:
        return run_peers(subnet, len(tensors), lambda peer: peer.all_reduce(tensors[peer.rank - 1], op))

    return run


@pytest.mark.parametrize("make", list(INPUTS.values()), ids=list(INPUTS))
@pytest.mark.parametrize("miners", [1, 2, 3])
@pytest.mark.parametrize("peers", [1, 2, 4])
def test_all_reduce_equals_the_reference_on_every_peer(subnets, peers, miners, make, all_reduce_everywhere):
    tensors = make(peers)
    expected = reference_reduce([t.clone() for t in tensors], "avg")
    results = all_reduce_everywhere(subnets[miners], tensors, "avg")
    for tensor, result in zip(tensors, results, strict=True):
        assert result is tensor  # in place, and returned
        assert tensor.shape == expected.shape
        assert torch.equal(tensor, expected)  # bit for bit, so identical on every peer


@pytest.mark.parametrize("name", list(SUPPORTED))
def test_every_dtype_sums_exactly(subnets, name, all_reduce_everywhere):
    tensors = inputs_for(3, (1000,), SUPPORTED[name].torch_dtype, seed=1)
    expected = reference_reduce([t.clone() for t in tensors], "sum")
    all_reduce_everywhere(subnets[2], tensors, "sum")
    assert all(torch.equal(t, expected) for t in tensors)


@pytest.mark.parametrize("name", ["float16", "bfloat16", "float64", "complex64"])
def test_every_float_dtype_averages_exactly(subnets, name, all_reduce_everywhere):
    tensors = inputs_for(4, (50_000,), SUPPORTED[name].torch_dtype, seed=2)
    expected = reference_reduce([t.clone() for t in tensors], "avg")
    all_reduce_everywhere(subnets[3], tensors, "avg")
    assert all(torch.equal(t, expected) for t in tensors)


def test_non_contiguous_inputs_are_reduced_and_written_back(subnets, all_reduce_everywhere):
    bases = inputs_for(2, (30, 40))
    views = [b.t()[::2] for b in bases]  # strided views into each peer's storage
    expected = reference_reduce([v.clone() for v in views], "sum")
    untouched = [b.t()[1::2].clone() for b in bases]
    all_reduce_everywhere(subnets[2], views, "sum")
    for base, view, rest in zip(bases, views, untouched, strict=True):
        assert torch.equal(view, expected)
        assert torch.equal(base.t()[1::2], rest)  # only the view's elements were written


def test_numpy_arrays_are_reduced_in_place(subnets, all_reduce_everywhere):
    arrays = [t.numpy() for t in inputs_for(3, (7, 9), torch.float64, seed=3)]
    expected = reference_reduce([torch.from_numpy(a.copy()) for a in arrays], "avg").numpy()
    results = all_reduce_everywhere(subnets[2], arrays, "avg")
    for array, result in zip(arrays, results, strict=True):
        assert result is array
        np.testing.assert_array_equal(array, expected)


def test_peers_sharing_memory_still_get_the_exact_result(subnets, all_reduce_everywhere):
    shared = torch.arange(1000, dtype=torch.float32)
    expected = reference_reduce([shared.clone(), shared.clone()], "sum")
    all_reduce_everywhere(subnets[2], [shared, shared], "sum")  # nobody writes before all contributed
    assert torch.equal(shared, expected)


def test_a_failed_round_leaves_every_tensor_unchanged(subnets, run_peers):
    tensors = [torch.ones(10), torch.ones(12)]
    before = [t.clone() for t in tensors]

    def attempt(peer):
        with pytest.raises(
            RoundMismatchError,
            match=r"all_reduce #1 of job .*: rank \d passed float32 \(1[02],\), another rank float32 \(1[02],\)",
        ):
            peer.all_reduce(tensors[peer.rank - 1], "sum")

    run_peers(subnets[1], 2, attempt)
    assert all(torch.equal(t, b) for t, b in zip(tensors, before, strict=True))


def test_avg_of_integers_is_a_clear_error(subnets, run_peers):
    def attempt(peer):
        with pytest.raises(
            UnsupportedDtypeError, match=r"avg of int64 tensors would truncate; use all_reduce\(t, op='sum'\)"
        ):
            peer.all_reduce(torch.ones(3, dtype=torch.int64))

    run_peers(subnets[1], 1, attempt)


@pytest.mark.parametrize(
    ("tensor", "kwargs", "error", "message"),
    [
        (torch.ones(3), {"op": "max"}, ValueError, "unknown op 'max'; use one of: avg, sum"),
        (torch.ones(0), {}, InvalidTensorError, "all_reduce of an empty tensor"),
        (torch.ones(1000), {}, InvalidTensorError, "tensor is 4000 bytes but this peer's bandwidth is 100 bytes"),
        (torch.ones(3, dtype=torch.bool), {}, UnsupportedDtypeError, "dtype bool is not supported"),
    ],
    ids=["unknown-op", "empty", "over-bandwidth", "bool"],
)
def test_bad_input_is_refused_before_anything_is_sent(subnets, tensor, kwargs, error, message, run_peers):
    def attempt(peer):
        with pytest.raises(error, match=message):
            peer.all_reduce(tensor, **kwargs)
        return peer._seq

    assert run_peers(subnets[1], 1, attempt, bandwidth=100) == [0]
