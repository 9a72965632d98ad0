"""Checks computed next to the objects: honest rounds pass, tampered results are caught, chunks add up."""

import re

import numpy as np
import pytest
import torch

from actors.checks import Stored, check_segment, inspect_segments
from mapreduce_ray.reference import reference_reduce
from mapreduce_ray.shards import flatten
from mapreduce_ray.transport import ship
from mapreduce_ray.verify import Reduction, check_projection, chunk_seed, combine, project, projection_vector

CHUNKS = [(0, 100_000), (100_000, 200_000), (200_000, 201_000)]  # the last one small enough to ride inline
N = CHUNKS[-1][1]
SEED = 20261122


def shipped(tensor: torch.Tensor) -> Stored:
    flat = flatten(tensor).flat
    return Stored([ship(flat[a:b], copy_inline=True) for a, b in CHUNKS])


def verdict(inputs: list[torch.Tensor], result: torch.Tensor, dtype: str, op: str):
    *contributions, projection = inspect_segments(
        [shipped(x) for x in [*inputs, result]], dtype, SEED, samples=0, timeout_s=60
    )
    return check_projection(
        [c.projection for c in contributions], projection.projection, Reduction(dtype, op, len(inputs), N)
    )


def checked(inputs: list[torch.Tensor], result: torch.Tensor, samples: int, exact: bool, op: str = "avg"):
    dtype = str(inputs[0].dtype).removeprefix("torch.")
    return check_segment(
        [shipped(x) for x in inputs], shipped(result), dtype, op, N, SEED, samples, exact, timeout_s=60
    )


@pytest.mark.parametrize(("dtype", "op"), [("float32", "avg"), ("float64", "sum"), ("complex64", "sum")])
def test_an_honest_round_passes_and_a_scaled_result_is_caught(local_ray, dtype, op):
    generator = torch.Generator().manual_seed(1)
    inputs = [torch.randn(N, generator=generator, dtype=getattr(torch, dtype)) for _ in range(3)]
    honest = reference_reduce([x.clone() for x in inputs], op)
    assert verdict(inputs, honest, dtype, op).ok
    caught = verdict(inputs, honest * 1.01, dtype, op)
    assert not caught.ok and caught.reason.startswith("projection off by")


def test_integer_rounds_are_checked_exactly_even_when_they_wrap(local_ray):
    inputs = [torch.full((N,), 2**62, dtype=torch.int64), torch.full((N,), 2**62, dtype=torch.int64)]
    honest = reference_reduce([x.clone() for x in inputs], "sum")  # wraps to -2**63
    assert verdict(inputs, honest, "int64", "sum").ok
    off_by_one = honest.clone()
    off_by_one[150_000] += 1
    caught = verdict(inputs, off_by_one, "int64", "sum")
    assert not caught.ok and re.fullmatch(r"projection off by -?\d+ mod 2\^64", caught.reason)


def test_chunk_projections_add_up_to_the_segments():
    x = np.arange(-500, 500, dtype=np.int64)
    pieces = [(0, 300), (300, 1000)]
    parts = [
        project(x[a:b], "int64", projection_vector(chunk_seed(7, c), b - a, "int64")) for c, (a, b) in enumerate(pieces)
    ]
    z = np.concatenate([projection_vector(chunk_seed(7, c), b - a, "int64") for c, (a, b) in enumerate(pieces)])
    assert combine(parts, "int64") == project(x, "int64", z)


def test_one_element_off_by_a_little_passes_the_projection_and_fails_the_exact_check(local_ray):
    inputs = [torch.randn(N, generator=torch.Generator().manual_seed(r)) for r in range(4)]
    cheat = reference_reduce([x.clone() for x in inputs], "avg")
    cheat[123_456] += 1e-3
    assert checked(inputs, cheat, samples=0, exact=False).ok  # within the projection's bound
    caught = checked(inputs, cheat, samples=0, exact=True)
    assert not caught.ok and caught.reason.startswith(
        "chunk 1: 1 of 100000 sampled elements differ; first at sample 23456"
    )


def test_samples_are_recomputed_exactly(local_ray):
    inputs = [torch.randn(N, generator=torch.Generator().manual_seed(r)) for r in range(2)]
    honest = reference_reduce([x.clone() for x in inputs], "sum")
    assert checked(inputs, honest, samples=50, exact=True, op="sum").ok
    every_element_nudged = torch.nextafter(honest, torch.full_like(honest, torch.inf))  # one ulp each
    caught = checked(inputs, every_element_nudged, samples=50, exact=False, op="sum")
    assert not caught.ok and caught.reason.startswith("150 of 150 sampled elements differ")
