import numpy as np
import pyarrow as pa
import pytest
import torch

from mapreduce_ray.dtypes import SUPPORTED, dtype_of
from mapreduce_ray.errors import InvalidTensorError, UnsupportedDtypeError
from mapreduce_ray.shards import digest, flatten, from_buffer, new_tensor, to_buffer
from mapreduce_ray.types import TensorSpec


def sample(dtype: torch.dtype, shape=(3, 5)) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    if dtype in (torch.int32, torch.int64):
        return torch.randint(-(2**30), 2**30, shape, generator=g, dtype=dtype)
    return torch.randn(shape, generator=g, dtype=dtype)


@pytest.mark.parametrize("name", list(SUPPORTED))
def test_a_slice_round_trips_through_an_arrow_buffer_without_a_copy(name):
    tensor = sample(SUPPORTED[name].torch_dtype)
    flat = flatten(tensor)
    buffer = to_buffer(flat.flat[2:11])
    assert buffer.address == flat.flat[2:11].data_ptr()
    back = from_buffer(pa.py_buffer(buffer.to_pybytes()), SUPPORTED[name])
    assert back.dtype == tensor.dtype
    assert torch.equal(back, tensor.reshape(-1)[2:11])
    assert digest(back) == digest(tensor.reshape(-1)[2:11])


@pytest.mark.parametrize("name", ["float32", "int64", "complex64", "float16"])
def test_numpy_arrays_round_trip(name):
    array = sample(SUPPORTED[name].torch_dtype).numpy()
    buffer = pa.py_buffer(to_buffer(flatten(array).flat).to_pybytes())
    np.testing.assert_array_equal(from_buffer(buffer, SUPPORTED[name]).numpy(), array.reshape(-1))


def test_a_misaligned_buffer_is_read_through_a_copy():
    values = torch.arange(5, dtype=torch.float64)
    shifted = pa.py_buffer(b"x" + to_buffer(values).to_pybytes()).slice(1)
    assert shifted.address % 8
    assert torch.equal(from_buffer(shifted, SUPPORTED["float64"]), values)


@pytest.mark.parametrize(
    "tensor",
    [
        torch.zeros(3, dtype=torch.bool),
        torch.zeros(3, dtype=torch.uint8),
        torch.zeros(3, dtype=torch.int8),
        torch.zeros(3, dtype=torch.int16),
        np.zeros(3, dtype=np.uint32),
        np.zeros(3, dtype=np.bool_),
    ],
    ids=["torch-bool", "torch-uint8", "torch-int8", "torch-int16", "numpy-uint32", "numpy-bool"],
)
def test_other_dtypes_are_refused_with_the_supported_list(tensor):
    with pytest.raises(UnsupportedDtypeError, match=r"is not supported; use one of: float16, bfloat16, float32"):
        flatten(tensor)


def test_contiguous_tensor_is_viewed_in_place():
    tensor = torch.arange(12.0).reshape(3, 4)
    flat = flatten(tensor)
    assert flat.aliased and flat.flat.data_ptr() == tensor.data_ptr()


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.arange(12.0).reshape(3, 4).t(),
        lambda: torch.arange(6.0).to(torch.complex64).conj(),
        lambda: np.arange(12.0).reshape(3, 4)[:, ::2],
    ],
    ids=["transposed", "conjugate-view", "numpy-strided"],
)
def test_other_layouts_are_copied_and_committed_back(make):
    source = make()
    flat = flatten(source)
    assert not flat.aliased
    flat.flat.copy_(torch.arange(flat.flat.numel()).to(flat.flat.dtype))
    flat.commit()
    expected = np.arange(flat.flat.numel()).reshape(np.shape(source))
    got = source.resolve_conj().numpy() if isinstance(source, torch.Tensor) else source
    np.testing.assert_array_equal(got, expected)


def test_read_only_array_cannot_receive_a_result():
    array = np.zeros(4, np.float32)
    array.flags.writeable = False
    with pytest.raises(InvalidTensorError, match=r"array is read-only; pass np.array\(x\)"):
        flatten(array).require_writable("all_reduce")


def test_non_cpu_and_non_tensor_inputs_are_refused():
    with pytest.raises(InvalidTensorError, match=r"is on meta; move it to the CPU first"):
        flatten(torch.empty(3, device="meta"))
    with pytest.raises(InvalidTensorError, match="expected a torch.Tensor or numpy.ndarray, got list"):
        flatten([1.0, 2.0])


def test_non_native_byte_order_is_refused():
    with pytest.raises(InvalidTensorError, match="non-native byte order"):
        flatten(np.zeros(3, dtype=">f4"))


def test_digest_sees_every_bit():
    tensor = torch.randn(1000)
    changed = tensor.clone()
    changed.view(torch.int32)[500] ^= 1
    assert digest(tensor) == digest(tensor.clone())
    assert digest(tensor) != digest(changed)


def test_new_tensor_has_the_spec():
    t = new_tensor(TensorSpec("bfloat16", (2, 3)))
    assert t.dtype == torch.bfloat16 and t.shape == (2, 3)
    assert dtype_of(t).name == "bfloat16"
