"""Reduce kernels: combine peers' contributions to one chunk, in rank order.

The sum runs left to right over ranks, (x1 + x2) + x3 + ..., in the DType's
accumulation type, then `avg` divides by the number of contributions. The order is
fixed, so every run gives the same bits, equal to a reference summed in rank order.
Complex values are reduced as their real and imaginary parts, so `avg` divides each
part exactly. Work goes block by block so the running sum stays in cache: each input
byte is read from memory once and each output byte written once. Half types are
widened to float32 in a preallocated block buffer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mapreduce_ray.types import ReduceOp

BLOCK_ELEMS = 256 * 1024


def block_accumulator(block_elems: int = BLOCK_ELEMS) -> torch.Tensor:
    """The float32 block `reduce_chunk` widens half types into; allocate once, reuse."""
    return torch.empty(block_elems, dtype=torch.float32)


def reduce_chunk(
    inputs: Sequence[torch.Tensor], op: ReduceOp, out: torch.Tensor, accumulator: torch.Tensor
) -> torch.Tensor:
    """Write op(inputs) into `out` and return it; inputs are only read.

    All tensors are 1-D and of one dtype; `accumulator` comes from `block_accumulator`
    and its length sets the block size.
    """
    if not inputs:
        raise ValueError("reduce_chunk needs at least one input")
    if any(x.shape != out.shape or x.dtype != out.dtype for x in inputs):
        raise ValueError(f"inputs must all be {out.dtype} of shape {tuple(out.shape)}")
    is_integer = not (out.dtype.is_floating_point or out.dtype.is_complex)
    if op is ReduceOp.AVG and is_integer:
        raise ValueError(f"avg of {out.dtype} would truncate; use op='sum'")
    if len(inputs) == 1:
        return out.copy_(inputs[0])
    divisor = len(inputs) if op is ReduceOp.AVG else None
    if out.dtype in (torch.float16, torch.bfloat16):
        _sum_widened(inputs, out, divisor, accumulator)
    else:
        _sum_in_place([_real(x) for x in inputs], _real(out), divisor, len(accumulator))
    return out


def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t).view(-1) if t.is_complex() else t


def _sum_in_place(xs: Sequence[torch.Tensor], out: torch.Tensor, divisor: int | None, block: int) -> None:
    for a in range(0, len(out), block):
        b = a + block
        acc = out[a:b]
        torch.add(xs[0][a:b], xs[1][a:b], out=acc)
        for x in xs[2:]:
            acc.add_(x[a:b])
        if divisor is not None:
            acc.div_(divisor)


def _sum_widened(xs: Sequence[torch.Tensor], out: torch.Tensor, divisor: int | None, buffer: torch.Tensor) -> None:
    block = len(buffer)
    for a in range(0, len(out), block):
        b = a + block
        acc = buffer[: len(out[a:b])]
        acc.copy_(xs[0][a:b])
        for x in xs[1:]:
            acc.add_(x[a:b])
        if divisor is not None:
            acc.div_(divisor)
        out[a:b].copy_(acc)
