"""Projections computed next to the objects: honest rounds pass, tampered results are caught, chunks add up."""

import re

import numpy as np
import pytest
import torch

from actors.projection import project_segment
from mapreduce_ray.reference import reference_reduce
from mapreduce_ray.shards import flatten
from mapreduce_ray.transport import ship
from mapreduce_ray.verify import Reduction, check_projection, chunk_seed, combine, project, projection_vector

CHUNKS = [(0, 100_000), (100_000, 200_000), (200_000, 201_000)]  # the last one small enough to ride inline
N = CHUNKS[-1][1]
SEED = 20261122


def shipped(tensor: torch.Tensor) -> list:
    flat = flatten(tensor).flat
    return [ship(flat[a:b]) for a, b in CHUNKS]


def verdict(inputs: list[torch.Tensor], result: torch.Tensor, dtype: str, op: str):
    contributions = [project_segment(shipped(x), dtype, SEED, timeout_s=60)[0] for x in inputs]
    projection, _ = project_segment(shipped(result), dtype, SEED, timeout_s=60)
    return check_projection(contributions, projection, Reduction(dtype, op, len(inputs), N))


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
