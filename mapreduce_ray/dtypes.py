"""The element types a collective accepts, and how each is reduced.

Half types (float16, bfloat16) accumulate in float32; complex types reduce as
pairs of their component floats; integers sum exactly in their own type (wrapping
on overflow, like torch.distributed). Everything else is refused with a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mapreduce_ray.errors import UnsupportedDtypeError


@dataclass(frozen=True)
class DType:
    """One supported element type."""

    name: str  # torch's name, e.g. "bfloat16"
    torch_dtype: torch.dtype
    accumulate: torch.dtype  # the type sums run in

    @property
    def itemsize(self) -> int:
        return self.torch_dtype.itemsize

    @property
    def is_integer(self) -> bool:
        return not (self.torch_dtype.is_floating_point or self.torch_dtype.is_complex)

    @property
    def widens(self) -> bool:
        return self.accumulate != self.torch_dtype


SUPPORTED: dict[str, DType] = {
    d.name: d
    for d in (
        DType("float16", torch.float16, torch.float32),
        DType("bfloat16", torch.bfloat16, torch.float32),
        DType("float32", torch.float32, torch.float32),
        DType("float64", torch.float64, torch.float64),
        DType("int32", torch.int32, torch.int32),
        DType("int64", torch.int64, torch.int64),
        DType("complex64", torch.complex64, torch.complex64),
        DType("complex128", torch.complex128, torch.complex128),
    )
}


def dtype_named(name: str) -> DType:
    """The DType called `name`, or a clear error listing what is supported."""
    try:
        return SUPPORTED[name]
    except KeyError:
        raise UnsupportedDtypeError(f"dtype {name} is not supported; use one of: {', '.join(SUPPORTED)}") from None


def dtype_of(tensor: torch.Tensor | np.ndarray) -> DType:
    """The DType of a torch tensor or numpy array."""
    if isinstance(tensor, torch.Tensor):
        return dtype_named(str(tensor.dtype).removeprefix("torch."))
    return dtype_named(tensor.dtype.name)
