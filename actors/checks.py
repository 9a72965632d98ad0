"""A validator's checks of a reduced segment, computed next to the objects they read.

The validator moves scalars, not segments. Each segment comes with the node
that stored it (a peer's node for a contribution, the miner's for a result);
the node's `Checker` actor reads that node's chunks from its own store and
returns, per chunk, its projection onto its part of z and a few sampled
elements. Chunks that rode inline are inspected where they are. The exact check
runs on the Checker of the node holding the result: it recomputes every chunk
from the contributions, which travel there once more (to the miner's node, not
to the validator), and returns a Verdict. Checkers are started on demand, one
per node, and reused, so a check starts no worker process.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from mapreduce_ray.dtypes import dtype_named
from mapreduce_ray.errors import MapReduceError
from mapreduce_ray.evidence import Stored
from mapreduce_ray.remote import get
from mapreduce_ray.shards import from_buffer
from mapreduce_ray.transport import Shipped, receive
from mapreduce_ray.types import ReduceOp
from mapreduce_ray.verify import (
    Projection,
    Reduction,
    Verdict,
    check_projection,
    check_samples,
    chunk_sample_indices,
    chunk_seed,
    combine,
    project,
    projection_vector,
)

LOCAL = "local"  # where inline chunks are inspected: in the calling process


@dataclass(frozen=True)
class Inspection:
    """A segment's projection, its sampled elements (chunk by chunk), and the node each chunk was read on."""

    projection: Projection
    samples: torch.Tensor
    nodes: list[str]


def inspect_chunk(buffer, dtype_name: str, seed: int, chunk: int, samples: int) -> tuple[Projection, torch.Tensor]:
    """Chunk `chunk` of a segment: its projection onto its part of z and its sampled elements."""
    elements = from_buffer(buffer, dtype_named(dtype_name))
    z = projection_vector(chunk_seed(seed, chunk), elements.numel(), dtype_name)
    picked = elements[torch.from_numpy(chunk_sample_indices(seed, chunk, elements.numel(), samples))].clone()
    return project(elements, dtype_name, z), picked


def inspect_here(
    dtype_name: str, seed: int, samples: int, items: list[tuple[int, int, Shipped]], timeout_s: float
) -> list:
    """inspect_chunk for each (segment, chunk, shipped) item, read on this node: (segment, chunk, projection,
    samples, node) each."""
    node = ray.get_runtime_context().get_node_id()
    out = []
    for segment, chunk, shipped in items:
        (buffer,) = receive([shipped], timeout_s)
        out.append((segment, chunk, *inspect_chunk(buffer, dtype_name, seed, chunk, samples), node))
    return out


def recompute_here(dtype_name: str, op: str, result: list, contributions: list[list], timeout_s: float) -> Verdict:
    """Recompute every chunk from the contributions (rank order), one chunk at a time, and compare it
    with the result bit for bit; the first chunk that differs fails."""
    dtype = dtype_named(dtype_name)
    for index, shipped in enumerate(result):
        buffers = receive([shipped, *(c[index] for c in contributions)], timeout_s)
        verdict = check_samples(
            [from_buffer(b, dtype) for b in buffers[1:]], from_buffer(buffers[0], dtype), dtype_name, op
        )
        if not verdict.ok:
            return dataclasses.replace(verdict, reason=f"chunk {index}: {verdict.reason}")
    return Verdict(True, 0.0, 0.0, "ok")


class Checker:
    """Runs checks on its node for the process that started it."""

    def inspect(self, dtype_name: str, seed: int, samples: int, items: list, timeout_s: float) -> list:
        return inspect_here(dtype_name, seed, samples, items, timeout_s)

    def recompute(self, dtype_name: str, op: str, result: list, contributions: list[list], timeout_s: float) -> Verdict:
        return recompute_here(dtype_name, op, result, contributions, timeout_s)


CHECKER_CONCURRENCY = 2
_checkers: dict[str, ray.actor.ActorHandle] = {}  # node id -> this process's Checker there
_checkers_lock = threading.Lock()


def checker_on(node: str) -> ray.actor.ActorHandle:
    """This process's Checker on `node` (this node when unknown or LOCAL), started when missing."""
    if node in ("", LOCAL):
        node = ray.get_runtime_context().get_node_id()
    with _checkers_lock:
        if node not in _checkers:
            near = NodeAffinitySchedulingStrategy(node, soft=False)  # there or nowhere: locality is the point
            options = {"scheduling_strategy": near, "max_concurrency": CHECKER_CONCURRENCY}
            _checkers[node] = ray.remote(num_cpus=0)(Checker).options(**options).remote()
        return _checkers[node]


def _checked(calls: list, timeout_s: float, what: str) -> list:
    """The calls' results; a Checker that died is forgotten, so the next check starts a new one."""
    try:
        return get(calls, timeout_s, what)
    except MapReduceError:
        with _checkers_lock:
            _checkers.clear()
        raise


def inspect_segments(
    segments: Sequence[Stored], dtype_name: str, seed: int, samples: int, timeout_s: float
) -> list[Inspection]:
    """An Inspection of each segment; `samples` elements sampled from each chunk."""
    by_node: dict[str, list] = defaultdict(list)
    for i, segment in enumerate(segments):
        for c, shipped in enumerate(segment.chunks):
            by_node[segment.node if isinstance(shipped, ray.ObjectRef) else LOCAL].append((i, c, shipped))
    local = inspect_here(dtype_name, seed, samples, by_node.pop(LOCAL, []), timeout_s)
    calls = [
        checker_on(node).inspect.remote(dtype_name, seed, samples, items, timeout_s) for node, items in by_node.items()
    ]
    parts = sorted(
        [*local, *(p for done in _checked(calls, timeout_s, "inspecting chunks next to their objects") for p in done)],
        key=lambda p: (p[0], p[1]),
    )
    inspections = []
    for i in range(len(segments)):
        mine = [p for p in parts if p[0] == i]
        inspections.append(
            Inspection(
                combine([p[2] for p in mine], dtype_name),
                torch.cat([p[3] for p in mine]) if mine else torch.empty(0),
                [p[4] for p in mine],
            )
        )
    return inspections


def check_segment(
    contributions: Sequence[Stored],
    result: Stored,
    dtype_name: str,
    op: str | ReduceOp,
    n: int,
    seed: int,
    samples: int,
    exact: bool,
    timeout_s: float,
) -> Verdict:
    """Check a miner's reduced segment against the peers' contributions (rank order).

    Projection onto z from `seed` and `samples` sampled elements per chunk always;
    with `exact`, every chunk recomputed on the result's node. The first failed check wins.
    """
    if any(len(c.chunks) != len(result.chunks) for c in contributions):
        return Verdict(False, float("inf"), 0.0, "the result has another number of chunks than the contributions")
    *inspected, outcome = inspect_segments([*contributions, result], dtype_name, seed, samples, timeout_s)
    reduction = Reduction(dtype_name, op, len(contributions), n)
    verdict = check_projection([i.projection for i in inspected], outcome.projection, reduction)
    if verdict.ok:
        verdict = check_samples([i.samples for i in inspected], outcome.samples, dtype_name, op)
    if verdict.ok and exact:
        chunks = [list(c.chunks) for c in contributions]
        call = checker_on(result.node).recompute.remote(
            dtype_name, ReduceOp.parse(op).value, list(result.chunks), chunks, timeout_s
        )
        (verdict,) = _checked([call], timeout_s, "recomputing the result next to it")
    return verdict
