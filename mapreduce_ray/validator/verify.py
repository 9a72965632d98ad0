"""A validator's exact check of a reduced chunk: recompute it in rank order and compare bits. No Ray, no I/O.

The result must equal `reference_reduce` of the inputs bit for bit: contributions summed in rank
order in the dtype's accumulation type, `avg` dividing by their count, rounded back once. Any NaN
matches any NaN: a NaN's sign and payload depend on the platform (x86's default NaN has the sign
bit set, ARM's does not) and carry no value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mapreduce_ray.dtypes import DType, dtype_named
from mapreduce_ray.reference import reference_reduce
from mapreduce_ray.types import ReduceOp

Elements = torch.Tensor | np.ndarray


@dataclass(frozen=True)
class Verdict:
    """Outcome of a check; `reason` is one line ("ok" when it passed)."""

    ok: bool
    reason: str


def check_exact(contributions: Sequence[Elements], result: Elements, dtype_name: str, op: str | ReduceOp) -> Verdict:
    """Recompute `result` from the contributions (rank order) with `reference_reduce`; compare bits."""
    dtype = dtype_named(dtype_name)
    op = _check_op(dtype, op)
    inputs = [_as_torch(x, dtype) for x in contributions]
    got = _as_torch(result, dtype)
    if not inputs or any(x.shape != got.shape for x in inputs) or got.ndim != 1:
        raise ValueError("need at least one contribution, all flat and as long as the result")
    if len(got) == 0:
        return Verdict(True, "ok")
    expected = reference_reduce(inputs, op)
    bad = _mismatches(expected, got)
    if not bad.any():
        return Verdict(True, "ok")
    first = int(np.flatnonzero(bad)[0])
    return Verdict(
        False,
        f"{int(bad.sum())} of {len(got)} elements differ; first at element {first}: "
        f"expected {expected[first].item()}, got {got[first].item()}",
    )


def _check_op(dtype: DType, op: str | ReduceOp) -> ReduceOp:
    op = ReduceOp.parse(op)
    if op is ReduceOp.AVG and dtype.is_integer:
        raise ValueError(f"avg of {dtype.name} is not supported; use op='sum'")
    return op


def _as_torch(x: Elements, dtype: DType) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(x)) if isinstance(x, np.ndarray) else x.detach().cpu()
    if t.dtype != dtype.torch_dtype:
        raise ValueError(f"sample is {t.dtype}, expected {dtype.torch_dtype}")
    return t.resolve_conj().resolve_neg().contiguous()


def _mismatches(expected: torch.Tensor, got: torch.Tensor) -> np.ndarray:
    """Per element: bits differ, unless both are NaN (complex: per part)."""
    if expected.is_complex():
        e, g = torch.view_as_real(expected), torch.view_as_real(got)
    else:
        e, g = expected.unsqueeze(-1), got.unsqueeze(-1)
    eb = e.contiguous().view(torch.uint8).reshape(*e.shape, -1)
    gb = g.contiguous().view(torch.uint8).reshape(*g.shape, -1)
    part_differs = (eb != gb).any(dim=-1)
    if e.dtype.is_floating_point:
        part_differs &= ~(torch.isnan(e) & torch.isnan(g))
    return part_differs.any(dim=-1).numpy()
