"""Tensors as flat runs of elements, Arrow buffers over their bytes, digests.

A contiguous CPU tensor or numpy array is viewed in place (no copy); anything else
is copied once into a private contiguous tensor. Chunks travel as Arrow buffers
over the raw bytes of a slice (no copy); elements read back from a received buffer
share its memory and must never be written.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from blake3 import blake3

from mapreduce_ray.dtypes import DType, dtype_of
from mapreduce_ray.errors import InvalidTensorError
from mapreduce_ray.types import TensorSpec

Tensor = torch.Tensor | np.ndarray


@dataclass(frozen=True)
class FlatTensor:
    """A tensor seen as one flat, contiguous 1-D torch tensor.

    `flat` aliases `source` when `aliased`; otherwise it is a private copy whose
    contents `commit` writes back into `source`.
    """

    source: Tensor
    dtype: DType
    flat: torch.Tensor
    aliased: bool

    @property
    def spec(self) -> TensorSpec:
        return TensorSpec(self.dtype.name, tuple(self.source.shape))

    def require_writable(self, verb: str) -> None:
        if isinstance(self.source, np.ndarray) and not self.source.flags.writeable:
            raise InvalidTensorError(f"{verb} writes its result in place, but the array is read-only; pass np.array(x)")

    def commit(self) -> None:
        """Make `source` hold the contents of `flat` (a no-op when aliased)."""
        if self.aliased:
            return
        if isinstance(self.source, np.ndarray):
            np.copyto(self.source, self.flat.numpy().reshape(self.source.shape))
            return
        with torch.no_grad():
            self.source.copy_(self.flat.view(self.source.shape))


def flatten(tensor: Tensor) -> FlatTensor:
    """View a CPU torch tensor or numpy array as one flat tensor."""
    if isinstance(tensor, torch.Tensor):
        if tensor.device.type != "cpu":
            raise InvalidTensorError(f"tensor is on {tensor.device}; move it to the CPU first (tensor.cpu())")
        dtype = dtype_of(tensor)
        t = tensor.detach()
        aliased = t.is_contiguous() and not t.is_conj() and not t.is_neg()
        flat = t.reshape(-1) if aliased else torch.empty(t.shape, dtype=t.dtype).copy_(t).reshape(-1)
        return FlatTensor(tensor, dtype, flat, aliased)
    if isinstance(tensor, np.ndarray):
        dtype = dtype_of(tensor)
        if not tensor.dtype.isnative:
            raise InvalidTensorError(
                "array has non-native byte order; convert it with arr.astype(arr.dtype.newbyteorder('='))"
            )
        aliased = tensor.flags.c_contiguous
        array = tensor.reshape(-1) if aliased else np.array(tensor, order="C").reshape(-1)
        return FlatTensor(tensor, dtype, read_only_tensor(array), aliased)
    raise InvalidTensorError(f"expected a torch.Tensor or numpy.ndarray, got {type(tensor).__name__}")


def new_tensor(spec: TensorSpec) -> torch.Tensor:
    """An uninitialized CPU tensor of `spec`, to receive a broadcast."""
    return torch.empty(spec.shape, dtype=spec.dtype_info.torch_dtype)


def to_buffer(elements: torch.Tensor) -> pa.Buffer:
    """Wrap contiguous 1-D elements as an Arrow buffer over their bytes (no copy)."""
    return pa.py_buffer(_bytes(elements))


def from_buffer(buffer: pa.Buffer, dtype: DType) -> torch.Tensor:
    """The elements in a received buffer, zero-copy when the buffer is aligned for the dtype (else one copy).
    Never write to the result."""
    array = np.frombuffer(buffer, np.uint8)
    if buffer.address % dtype.itemsize:
        array = array.copy()
    return read_only_tensor(array).view(dtype.torch_dtype)


def read_only_tensor(array: np.ndarray) -> torch.Tensor:
    """A torch view of a numpy array, which may be read-only (torch cannot mark it so)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def digest(elements: torch.Tensor) -> str:
    """A 256-bit BLAKE3 digest of the elements' bytes; equal digests mean equal bits."""
    return blake3(_bytes(elements.detach().contiguous().reshape(-1))).hexdigest()


def _bytes(elements: torch.Tensor) -> np.ndarray:
    return elements.view(torch.uint8).numpy()
