"""Checks of a reduced chunk that its miner cannot predict: keyed random-sign sketches.

The peers of a job share a secret that miners never see (the validator hands it to each peer
with its admission). The secret keys a vector r of random signs, one per real component of a
chunk; every chunk of the job uses it (a miner never sees a sketch in clear, so it learns nothing
of r, and a miner caught once is struck and left out). A peer sketches its own contribution x as it sends
it: a = r·x and its squared norm x·x, in float64, sealed with the secret (encrypted and
authenticated, so the miner relays the sketch but can neither read nor forge it). Beside the
reduced chunk y the miner relays every peer's sealed sketch, and each peer checks y before keeping
it:

- integers: r·y = Σ a_p exactly, mod 2^bits (sums wrap in the dtype, and so do sketches);
- floats: |k·r·y − Σ a_p| ≤ t (k = peer count for avg, else 1). The miner's honest rounding
  errors δ (rank-order sum in the accumulate type, then the division and the cast) do not
  depend on r, which the miner never learns, so r·δ is a sum of independent ±δ_i and, by Hoeffding's inequality,
  P(|r·δ| ≥ t) ≤ 2·exp(−t²/(2·V)) with V ≥ Σδ_i². V comes from the sketches' norms:
  Σδ_i² ≤ 2·γ²·n·Σ_p |x_p|² + 2·(2·k·u_out)²·|y|² with γ = (n−1)u_acc/(1−(n−1)u_acc), and |y|
  bounded by Σ_p |x_p|/k, which no honest result exceeds (so the miner's y cannot widen t). With t set
  for FALSE_ALARM, an honest chunk fails at most once in 2^40 checks, and an error e in y is
  caught (with the same odds) once k·|r·e| > 2t: for one wrong element, once k·|e_i| > 2t. The
  peers' own float64 arithmetic adds at most `_compute_error` on top.

A broadcast is the same with one contribution, the source's, and nothing rounded.

A peer's verdict on a segment is a tag under the same secret over the digests it kept (`vouch`):
the miner relays every peer's to every peer, which keeps the segment only if all vouch for what it
kept itself, so a miner that sends one peer a right sum and another a wrong one loses the segment
at every peer.
"""

from __future__ import annotations

import hmac
import math
import struct
import threading
from dataclasses import dataclass

import blake3
import numpy as np
import torch

from mapreduce_ray.dtypes import DType
from mapreduce_ray.types import ReduceOp

FALSE_ALARM = 2.0**-40  # the most often an honest chunk may fail its check
SECRET_BYTES = 32
SEALED_HEX = 2 * (16 + 16)  # the ciphertext of a sketch and its tag, in hex
_Z2 = 2 * math.log(2 / FALSE_ALARM)  # t² = _Z2 · V


class SketchError(ValueError):
    """A sealed sketch that does not open, or a reduced chunk whose sketch is off."""


@dataclass(frozen=True)
class Sketch:
    """r·x (for integers: mod 2^64, as an int) and x·x of one chunk."""

    value: float | int
    norm2: float


class Sketcher:
    """The signs and seals of one job's rounds, keyed by the job's secret (SECRET_BYTES)."""

    def __init__(self, secret: bytes, job_id: str):
        if len(secret) != SECRET_BYTES:
            raise ValueError(f"a job secret is {SECRET_BYTES} bytes, got {len(secret)}")
        self._secret, self._job = secret, job_id
        self._signs = np.empty(0, np.int8)  # the longest run of signs made so far
        self._lock = threading.Lock()

    def signs(self, n: int) -> np.ndarray:
        """The job's first n random signs (±1, int8; never write to them)."""
        with self._lock:
            if len(self._signs) < n:
                stream = self._prf(b"signs", "", (n + 7) // 8)  # a longer stream starts with the shorter one
                bits = np.unpackbits(np.frombuffer(stream, np.uint8)).view(np.int8)
                self._signs = bits * np.int8(2) - np.int8(1)
            return self._signs[:n]

    def seal(self, sketch: Sketch, seq: int, segment: int, chunk: int, rank: int) -> str:
        """The sketch of `rank`'s chunk, encrypted and tagged for the job's peers (hex)."""
        where = f"{seq}|{segment}|{chunk}|{rank}"
        if isinstance(sketch.value, int):
            plain = struct.pack("<Qd", sketch.value, sketch.norm2)
        else:
            plain = struct.pack("<dd", sketch.value, sketch.norm2)
        cipher = bytes(a ^ b for a, b in zip(plain, self._prf(b"mask", where, 16), strict=True))
        return (cipher + self._prf(b"tag", where + "|" + cipher.hex(), 16)).hex()

    def open(self, sealed: str, integer: bool, seq: int, segment: int, chunk: int, rank: int) -> Sketch:
        """The sketch `rank` sealed; SketchError if it was not sealed with this job's secret for this place."""
        where = f"{seq}|{segment}|{chunk}|{rank}"
        try:
            raw = bytes.fromhex(sealed)
        except ValueError:
            raise SketchError(f"rank {rank}'s sketch is not hex") from None
        cipher, tag = raw[:16], raw[16:]
        if len(raw) != 32 or tag != self._prf(b"tag", where + "|" + cipher.hex(), 16):
            raise SketchError(f"rank {rank}'s sketch is missing or forged")
        plain = bytes(a ^ b for a, b in zip(cipher, self._prf(b"mask", where, 16), strict=True))
        value, norm2 = struct.unpack("<Qd" if integer else "<dd", plain)
        return Sketch(value, norm2)

    def vouch(self, seq: int, segment: int, rank: int, digests: tuple[str, ...], struck: tuple[int, ...]) -> str:
        """`rank`'s tag (hex) saying it kept segment `segment` of round `seq` as the chunks of `digests`, and was
        told the miners `struck` are struck."""
        where = f"{seq}|{segment}|{rank}|{','.join(digests)}|{','.join(map(str, struck))}"
        return self._prf(b"verdict", where, 16).hex()

    def vouches(self, tag: str, seq: int, segment: int, rank: int, digests: tuple[str, ...], struck) -> bool:
        """Whether `tag` is `rank`'s word that it kept exactly the chunks of `digests` and was told of `struck`."""
        return hmac.compare_digest(tag, self.vouch(seq, segment, rank, digests, tuple(struck)))

    def _prf(self, purpose: bytes, where: str, length: int) -> bytes:
        return blake3.blake3(purpose + b"|" + f"{self._job}|{where}".encode(), key=self._secret).digest(length)


def sketch(values: torch.Tensor, dtype: DType, signs: np.ndarray) -> Sketch:
    """The sketch of a peer's own flat chunk of `dtype` under `signs` (`Sketcher.signs`): r·x and x·x."""
    value, norm2 = _sketch(_reals(values), dtype, signs, norm=not dtype.is_integer)
    return Sketch(value, norm2)


def signed_sum(values: torch.Tensor, dtype: DType, signs: np.ndarray) -> float | int:
    """r·x of a flat chunk: in float64, or for integers mod 2^64."""
    return _sketch(_reals(values), dtype, signs, norm=False)[0]


def _sketch(reals: np.ndarray, dtype: DType, signs: np.ndarray, norm: bool) -> tuple[float | int, float]:
    """(r·x, x·x if `norm`): numpy widens each element to 64 bits as it goes, with no wide copy of the chunk
    (integer sums wrap mod 2^64, as they should)."""
    wide = np.int64 if dtype.is_integer else np.float64
    value = np.einsum("i,i->", reals, signs, dtype=wide, casting="unsafe")
    norm2 = float(np.einsum("i,i->", reals, reals, dtype=np.float64)) if norm else 0.0
    return (int(value) & (2**64 - 1) if dtype.is_integer else float(value)), norm2


def real_count(dtype: DType, numel: int) -> int:
    """How many signs a chunk of `numel` elements needs: one per real component."""
    return 2 * numel if dtype.torch_dtype.is_complex else numel


def check(result: float | int, parts: list[Sketch], dtype: DType, op: ReduceOp | None, numel: int) -> None:
    """Raise SketchError unless `result`, r·y of a reduced chunk y of `numel` elements (`signed_sum`), fits the
    sketches of the contributions it reduced (in rank order; one for a broadcast) under `op` (None: a copy)."""
    if dtype.is_integer:
        bits = 8 * dtype.itemsize
        if (result - sum(p.value for p in parts)) % 2**bits:
            raise SketchError("its sketch differs from the sum of the contributions' sketches (exact for integers)")
        return
    n = len(parts)
    k = n if op is ReduceOp.AVG else 1
    if not all(math.isfinite(v) for p in parts for v in (p.value, p.norm2)):
        return  # a contribution holds NaN or Inf, which propagate as in torch.distributed
    if not math.isfinite(result):
        largest = math.fsum(math.sqrt(p.norm2) for p in parts)  # no element of the sum can be larger
        if largest < torch.finfo(dtype.accumulate).max / 2 and largest / k < torch.finfo(dtype.torch_dtype).max / 2:
            raise SketchError("it holds NaN or Inf, which no contribution holds and no sum of them reaches")
        return
    total = math.fsum(p.value for p in parts)
    off = abs(k * result - total)
    limit = bound(dtype, [p.norm2 for p in parts], k, real_count(dtype, numel))
    if off > limit:
        raise SketchError(f"its sketch is off the contributions' by {off:.6g}, over the {limit:.6g} rounding allows")


def bound(dtype: DType, norms2: list[float], k: int, reals: int) -> float:
    """The most an honest chunk's sketch may be off (see the module docstring), from the contributions' squared
    norms: |y| ≤ Σ_p |x_p|/k for an honest result y."""
    n = len(norms2)
    result_norm2 = (math.fsum(math.sqrt(v) for v in norms2) / k) ** 2
    u_acc = torch.finfo(dtype.accumulate).eps / 2
    u_out = torch.finfo(dtype.torch_dtype).eps / 2
    gamma = (n - 1) * u_acc / (1 - (n - 1) * u_acc)
    rounding = 0.0 if n == 1 and k == 1 else 2 * u_out  # per element, of |y_i|: the division and the cast
    variance = 2 * gamma**2 * n * math.fsum(norms2) + 2 * (k * rounding) ** 2 * result_norm2
    return math.sqrt(_Z2 * variance) + _compute_error(norms2, result_norm2, k, reals)


def smallest_caught(dtype: DType, norms2: list[float], k: int, reals: int) -> float:
    """The smallest error in one element of a reduced chunk that its check catches (but for FALSE_ALARM odds):
    k·|e| must exceed twice the bound."""
    return 2 * bound(dtype, norms2, k, reals) / k


def _compute_error(norms2: list[float], result_norm2: float, k: int, reals: int) -> float:
    """A bound on what float64 arithmetic adds to the sketches: each is a sum of `reals` terms ±x_i, off by at
    most γ_reals·Σ|x_i| ≤ γ_reals·√reals·|x|, then k times the result's and the sum of the parts."""
    u = 2.0**-53
    gamma = reals * u / (1 - reals * u)
    return 2 * gamma * math.sqrt(reals) * (k * math.sqrt(result_norm2) + math.fsum(math.sqrt(v) for v in norms2))


def _reals(values: torch.Tensor) -> np.ndarray:
    """The real components of a flat chunk (bfloat16, which numpy lacks, widened to float32 exactly)."""
    values = values.detach()
    reals = torch.view_as_real(values).reshape(-1) if values.is_complex() else values.reshape(-1)
    return (reals.float() if reals.dtype == torch.bfloat16 else reals).numpy()
