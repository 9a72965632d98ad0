"""The math a validator uses to check a miner's reduced segment: no Ray, no I/O.

Peers 1..P contributed flat segments x_1..x_P (one dtype, n elements each) and the
miner returned y. After the round, when nobody can adapt to it, the validator
draws a random vector z from a seed. Small tasks next to each object reduce it to
a `Projection` (a couple of scalars), and the validator compares scalars only:

    | sum_i <z, x_i> (/ P for avg) - <z, y> |  <=  bound

Plus `check_samples`, which recomputes a few sampled elements exactly and compares
their bits.

Floats. z is Rademacher (+-1) over the real view of the segment (complex values
are checked as their float pairs). The projections are float64 dot products.
Every input is exactly representable in float64 and every product z_j x_j is
exact. An honest y differs from the exact op(x) only by rounding, so its
projection can be off by at most the following (u is unit roundoff, eta the
smallest subnormal, gamma_k(u) = k u / (1 - k u), A = sum_i abs_sum_i,
Y = abs_sum of y, m = number of real components):

* Sum in rank order: P - 1 additions in the accumulate dtype (float32 for
  f16/bf16/f32/complex64, float64 for f64/complex128). The inputs widen exactly,
  and additions are exact in the subnormal range. So element-wise the error is
  at most gamma_{P-1}(u_acc) sum_i |x_ij|; summed over j with |z_j| = 1, that
  gives gamma_{P-1}(u_acc) A.
* avg (P > 1): the error above scaled by 1/P, plus one division rounding,
  u_acc (1 + gamma_{P-1}) A / P + m eta_acc / 2.
* Half types round the float32 result once to the output dtype:
  |fl(t) - t| <= u_out |fl(t)| + eta_out / 2, which sums to u_out Y + m eta_out / 2.
  (With P = 1 the result is the contribution itself, and this term is 0.)
* The validator's own float64 arithmetic: the P + 1 dot products and the sum of
  the contributions' dots form summation trees of height <= m + P. Together they
  are off by at most gamma_{m+P}(u_64) (A + Y).

`bound` returns twice that sum. The factor of 2 covers second-order terms (the
computed abs sums are themselves rounded, as is the bound's own arithmetic) with
a wide margin. An honest result therefore always passes; no luck is involved.

What the projection can see. A cheat that changes y by e shifts <z, y> by
<z, e>. A single element changed by d moves the projection by exactly |d|. It is
certainly caught once |d| > 2 * bound, and certainly missed when
|d| + (honest difference) <= bound. For float32 randn data with n = 2^20 and
P = 4 the bound is about 1.2, or 7e-7 of sum |y|, so +2 on one element is caught.
The honest difference is about 1e-5; the bound is a worst case. Errors spread
over many elements (scaling, zeros, a replayed or wrong-op result) move the
projection by about ||e||_2, far above the bound for f32/f64/complex.

Half types are weak here. For f16/bf16 with P > 1 the bound is dominated by
u_out * Y, the worst case of rounding every element to 11 (f16) or 8 (bf16)
bits. It grows like n while a spread cheat's <z, e> grows like sqrt(n). At
n = 2^20 (randn, P = 4) the bf16 bound is about 1.3e4, so a replayed result,
the wrong op, scaling by 1.01 and +1e3 on one element all pass. Zeros are still
caught, because the bound shrinks with sum |y|. On small segments (about n = 256)
the gross cheats are caught. For half types `check_samples` is the real check.

Smaller errors. An error well below the bound, such as one element moved by an
ulp, is visible only to `check_samples`, and only when its index is sampled.
With k of n indices sampled, a single bad element is found with probability k/n.

Integers. Sums wrap in the dtype, so the check is exact: z is uniform uint64 and
sum_i <z, x_i> - <z, y> must vanish modulo 2^(8 * itemsize). The dots are
computed with wrapping uint64 arithmetic (elements are sign-extended to int64
and then reinterpreted). An error vector e whose smallest 2-adic valuation is v
survives with probability 2^-(8 * itemsize - v). So an element off by +1 escapes
with probability 2^-32 (int32) or 2^-64 (int64); one off by 2^31 in int32
escapes with probability 1/2.

Non-finite values (inf/nan) make float projections meaningless. Then
`check_projection` reports the check as inconclusive: ok, bound = inf. The one
exception is a non-finite result from finite contributions too small to
overflow, which is a failure.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mapreduce_ray.dtypes import DType, dtype_named, dtype_of
from mapreduce_ray.reference import reference_reduce
from mapreduce_ray.types import ReduceOp

BLOCK_ELEMS = 1 << 20  # elements converted to float64 at a time, bounding temporary memory
SAFETY = 2.0  # factor applied to the first-order error bound
_U64 = 2.0**-53  # unit roundoff of float64, the validator's arithmetic
_MASK64 = (1 << 64) - 1

Elements = torch.Tensor | np.ndarray


@dataclass(frozen=True)
class Projection:
    """An object's scalars for the check.

    Floats: float64 <z, x> and sum |x|. Ints: <z, x> mod 2^64 as an int, abs_sum 0.
    """

    dot: float | int
    abs_sum: float


@dataclass(frozen=True)
class Verdict:
    """Outcome of a check; `reason` is one line ("ok" when it passed)."""

    ok: bool
    difference: float
    bound: float
    reason: str


def projection_vector(seed: int, n: int, dtype_name: str) -> np.ndarray:
    """The random vector z for an n-element segment of `dtype_name`, derived from `seed`.

    Floats: float64 +-1, one entry per real component (2n for complex). Ints: uniform
    uint64. Built from raw PCG64 output, which is stable across numpy versions.
    """
    dtype = dtype_named(dtype_name)
    bits = np.random.PCG64(seed)
    if dtype.is_integer:
        return bits.random_raw(n).astype(np.uint64, copy=False)
    m = _real_count(dtype, n)
    words = bits.random_raw((m + 63) // 64).astype("<u8", copy=False)
    signs = np.unpackbits(words.view(np.uint8), bitorder="little")[:m]
    return 1.0 - 2.0 * signs.astype(np.float64)


def project(elements: Elements, dtype_name: str, z: np.ndarray) -> Projection:
    """The Projection of a flat tensor or array of `dtype_name` onto z, block by block."""
    dtype = dtype_named(dtype_name)
    if dtype_of(elements).name != dtype.name:
        raise ValueError(f"elements are {dtype_of(elements).name}, expected {dtype.name}")
    if elements.ndim != 1:
        raise ValueError(f"elements must be flat (1-D), got shape {tuple(elements.shape)}")
    n = elements.shape[0]
    if dtype.is_integer:
        if z.dtype != np.uint64 or z.shape != (n,):
            raise ValueError(f"z must be {n} uint64 values for {dtype.name}")
        return _project_int(_as_numpy(elements), z)
    if z.dtype != np.float64 or z.shape != (_real_count(dtype, n),):
        raise ValueError(f"z must be {_real_count(dtype, n)} float64 values for {n} {dtype.name} elements")
    dot = 0.0
    abs_sum = 0.0
    for a in range(0, n, BLOCK_ELEMS):
        x = _block_as_float64(elements, a, min(n, a + BLOCK_ELEMS))
        r = _real_count(dtype, a)
        with np.errstate(invalid="ignore", over="ignore"):  # inf/nan elements: check_projection handles them
            dot += float(np.dot(x, z[r : r + len(x)]))
            abs_sum += float(np.abs(x).sum())
    return Projection(dot=dot, abs_sum=abs_sum)


def chunk_seed(seed: int, chunk: int) -> int:
    """The seed of chunk `chunk`'s part of z: a segment's z is the concatenation of its chunks' parts."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{chunk}".encode(), digest_size=8).digest(), "little")


def combine(parts: Sequence[Projection], dtype_name: str) -> Projection:
    """The Projection of a segment from those of its chunks (each onto its part of z)."""
    if dtype_named(dtype_name).is_integer:
        return Projection(sum(int(p.dot) for p in parts) % (1 << 64), 0.0)
    return Projection(math.fsum(p.dot for p in parts), math.fsum(p.abs_sum for p in parts))


@dataclass(frozen=True)
class Reduction:
    """What was reduced: `peer_count` segments of `n` elements of `dtype`, combined with `op`."""

    dtype: str
    op: str | ReduceOp
    peer_count: int
    n: int


def bound(contributions: Sequence[Projection], result: Projection, reduction: Reduction) -> float:
    """Worst-case |sum_i <z,x_i> (/P) - <z,y>| for an honest y (module docstring); 0 for ints."""
    dtype, peer_count, n = dtype_named(reduction.dtype), reduction.peer_count, reduction.n
    op = _check_op(dtype, reduction.op)
    if len(contributions) != peer_count or peer_count < 1:
        raise ValueError(f"expected {peer_count} contributions, got {len(contributions)}")
    if dtype.is_integer:
        return 0.0
    m = _real_count(dtype, n)
    acc = torch.finfo(_real_torch(dtype.accumulate))
    u_acc = acc.eps / 2
    total_abs = math.fsum(c.abs_sum for c in contributions)
    g = _gamma(peer_count - 1, u_acc)
    if op is ReduceOp.AVG and peer_count > 1:
        err = (g + u_acc * (1 + g)) * total_abs / peer_count + m * _subnormal(acc) / 2
    else:
        err = g * total_abs
    if dtype.widens and peer_count > 1:  # one contribution is passed through unrounded
        out = torch.finfo(dtype.torch_dtype)
        err += out.eps / 2 * result.abs_sum + m * _subnormal(out) / 2
    err += _gamma(m + peer_count, _U64) * (total_abs + result.abs_sum)
    return SAFETY * err


def check_projection(contributions: Sequence[Projection], result: Projection, reduction: Reduction) -> Verdict:
    """Whether the result's projection matches the contributions' within `bound` (exactly, for ints)."""
    dtype = dtype_named(reduction.dtype)
    op = _check_op(dtype, reduction.op)
    limit = bound(contributions, result, reduction)
    if dtype.is_integer:
        bits = 8 * dtype.itemsize
        residue = (sum(int(c.dot) for c in contributions) - int(result.dot)) % (1 << bits)
        if residue >= 1 << (bits - 1):
            residue -= 1 << bits
        if residue == 0:
            return Verdict(True, 0.0, 0.0, "ok")
        return Verdict(False, float(abs(residue)), 0.0, f"projection off by {residue} mod 2^{bits}")
    inputs_finite = all(math.isfinite(c.dot) and math.isfinite(c.abs_sum) for c in contributions)
    result_finite = math.isfinite(result.dot) and math.isfinite(result.abs_sum)
    if not (inputs_finite and result_finite):
        total_abs = math.fsum(c.abs_sum for c in contributions) if inputs_finite else math.inf
        if inputs_finite and SAFETY * total_abs < torch.finfo(_real_torch(dtype.torch_dtype)).max:
            return Verdict(False, math.inf, limit, "result holds inf/nan, but the contributions are finite and small")
        return Verdict(True, math.nan, math.inf, "inconclusive: inf/nan values; rely on samples")
    expected = math.fsum(c.dot for c in contributions)
    if op is ReduceOp.AVG:
        expected /= reduction.peer_count
    difference = abs(expected - result.dot)
    if difference <= limit:
        return Verdict(True, difference, limit, "ok")
    return Verdict(False, difference, limit, f"projection off by {difference:.1e}, bound {limit:.1e}")


def sample_indices(seed: int, n: int, k: int) -> np.ndarray:
    """k distinct indices in [0, n), sorted, derived from `seed`."""
    if not 0 <= k <= n:
        raise ValueError(f"cannot sample {k} distinct indices out of {n}")
    rng = np.random.Generator(np.random.PCG64(seed))
    return np.sort(rng.choice(n, size=k, replace=False, shuffle=False)).astype(np.int64, copy=False)


def check_samples(
    contribution_samples: Sequence[Elements],
    result_sample: Elements,
    dtype_name: str,
    op: str | ReduceOp,
) -> Verdict:
    """Recompute the sampled elements with `reference_reduce` and compare bits.

    Any NaN matches any NaN. A NaN's sign and payload depend on the platform (x86's
    default NaN has the sign bit set, ARM's does not), and they carry no value.
    """
    dtype = dtype_named(dtype_name)
    op = _check_op(dtype, op)
    inputs = [_as_torch(x, dtype) for x in contribution_samples]
    got = _as_torch(result_sample, dtype)
    if not inputs or any(x.shape != got.shape for x in inputs) or got.ndim != 1:
        raise ValueError("need at least one contribution sample, all flat and as long as the result sample")
    if len(got) == 0:
        return Verdict(True, 0.0, 0.0, "ok")
    expected = reference_reduce(inputs, op)
    bad = _mismatches(expected, got)
    if not bad.any():
        return Verdict(True, 0.0, 0.0, "ok")
    first = int(np.flatnonzero(bad)[0])
    return Verdict(
        False,
        float(bad.sum()),
        0.0,
        f"{int(bad.sum())} of {len(got)} sampled elements differ; "
        f"first at sample {first}: expected {expected[first].item()}, got {got[first].item()}",
    )


def _check_op(dtype: DType, op: str | ReduceOp) -> ReduceOp:
    op = ReduceOp.parse(op)
    if op is ReduceOp.AVG and dtype.is_integer:
        raise ValueError(f"avg of {dtype.name} is not supported; use op='sum'")
    return op


def _real_count(dtype: DType, n: int) -> int:
    return 2 * n if dtype.torch_dtype.is_complex else n


def _real_torch(t: torch.dtype) -> torch.dtype:
    return t.to_real() if t.is_complex else t


def _subnormal(info: torch.finfo) -> float:
    return info.tiny * info.eps


def _gamma(k: int, u: float) -> float:
    return math.inf if k * u >= 1 else k * u / (1 - k * u)


def _as_numpy(elements: Elements) -> np.ndarray:
    if isinstance(elements, np.ndarray):
        return elements
    return elements.detach().cpu().resolve_conj().resolve_neg().numpy()


def _block_as_float64(elements: Elements, a: int, b: int) -> np.ndarray:
    """Elements [a, b) as float64 real components; copies only that block, and only if needed."""
    if isinstance(elements, torch.Tensor) and elements.dtype == torch.bfloat16:
        return elements[a:b].detach().cpu().to(torch.float32).numpy().astype(np.float64)
    x = _as_numpy(elements)[a:b]
    if np.iscomplexobj(x):
        x = np.ascontiguousarray(x).view(x.real.dtype)
    return x.astype(np.float64, copy=False)


def _project_int(x: np.ndarray, z: np.ndarray) -> Projection:
    dot = 0
    for a in range(0, len(x), BLOCK_ELEMS):
        block = x[a : a + BLOCK_ELEMS].astype(np.int64, copy=False).view(np.uint64)
        dot = (dot + int(np.dot(block, z[a : a + BLOCK_ELEMS]))) & _MASK64  # numpy's uint64 dot wraps mod 2^64
    return Projection(dot=dot, abs_sum=0.0)


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


def chunk_sample_indices(seed: int, chunk: int, length: int, k: int) -> np.ndarray:
    """The sampled indices within chunk `chunk` (of `length` elements): min(k, length) of them."""
    return sample_indices(chunk_seed(seed, -1 - chunk), length, min(k, length))
