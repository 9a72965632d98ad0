"""Projections computed next to the objects they read.

A validator checking a round moves a couple of scalars per chunk, not the chunk:
each stored chunk is projected by a task scheduled on a node that holds it
(Ray's object locations, soft node affinity), so the task reads it from its own
node's store. Chunks that rode inline are projected where they are.
"""

from __future__ import annotations

from collections.abc import Sequence

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from mapreduce_ray.dtypes import dtype_named
from mapreduce_ray.remote import get
from mapreduce_ray.shards import from_buffer
from mapreduce_ray.transport import Shipped
from mapreduce_ray.verify import Projection, chunk_seed, combine, project, projection_vector


def project_chunk(buffer, dtype_name: str, seed: int, chunk: int) -> tuple[Projection, str]:
    """Chunk `chunk` of a segment projected onto its part of z, and the node that computed it."""
    elements = from_buffer(buffer, dtype_named(dtype_name))
    z = projection_vector(chunk_seed(seed, chunk), elements.numel(), dtype_name)
    return project(elements, dtype_name, z), ray.get_runtime_context().get_node_id()


_project_remote = ray.remote(num_cpus=0)(project_chunk)


def project_segment(
    chunks: Sequence[Shipped], dtype_name: str, seed: int, timeout_s: float
) -> tuple[Projection, list[str]]:
    """The segment's Projection, and for each chunk the node it was computed on."""
    refs = [c for c in chunks if isinstance(c, ray.ObjectRef)]
    locations = ray.experimental.get_object_locations(refs, timeout_ms=int(timeout_s * 1000)) if refs else {}
    parts = []
    for index, chunk in enumerate(chunks):
        if not isinstance(chunk, ray.ObjectRef):
            parts.append(project_chunk(chunk, dtype_name, seed, index))
            continue
        nodes = locations.get(chunk, {}).get("node_ids") or []
        options = {"scheduling_strategy": NodeAffinitySchedulingStrategy(nodes[0], soft=True)} if nodes else {}
        parts.append(_project_remote.options(**options).remote(chunk, dtype_name, seed, index))
    pending = [p for p in parts if isinstance(p, ray.ObjectRef)]
    done = iter(get(pending, timeout_s, "projecting chunks next to their objects"))
    parts = [next(done) if isinstance(p, ray.ObjectRef) else p for p in parts]
    return combine([p for p, _ in parts], dtype_name), [node for _, node in parts]
