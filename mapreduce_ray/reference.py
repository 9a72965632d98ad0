"""The plain reduction every all_reduce result must equal, bit for bit.

Contributions are summed one rank after another in the DType's accumulation type;
`avg` then divides by their count (each part of a complex number separately); the
result is rounded back to the tensor's dtype. Deliberately simple and unblocked,
so it checks the kernels rather than repeating them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mapreduce_ray.dtypes import dtype_of
from mapreduce_ray.types import ReduceOp


def reference_reduce(tensors: Sequence[torch.Tensor], op: str | ReduceOp = "avg") -> torch.Tensor:
    """op over `tensors` in rank order, as all_reduce computes it."""
    op = ReduceOp.parse(op)
    dtype = dtype_of(tensors[0])
    total = tensors[0].to(dtype.accumulate)
    for t in tensors[1:]:
        total = total + t.to(dtype.accumulate)
    if op is ReduceOp.AVG and len(tensors) > 1:
        if total.is_complex():
            total = torch.view_as_complex(torch.view_as_real(total) / len(tensors))
        else:
            total = total / len(tensors)
    return total.to(dtype.torch_dtype)
