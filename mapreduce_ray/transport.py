"""How shards travel between peers and miners.

A shard of at most INLINE_BYTES rides inside the actor call (or the streamed item)
itself; anything larger goes through Ray's object store once and travels as a ref.
Small rounds thus skip the store entirely, and large ones copy each byte once.

Signed messages name shipped chunks by `fingerprint`: the object id of a stored
chunk (objects in the store are immutable, so the id pins the bytes at no cost),
or the BLAKE3 digest of an inline one.
"""

from __future__ import annotations

from concurrent.futures import Future

import pyarrow as pa
import ray
import torch
from blake3 import blake3

from mapreduce_ray.shards import to_buffer

INLINE_BYTES = 64 * 1024

Shipped = pa.Buffer | ray.ObjectRef


def ship(elements: torch.Tensor, *, copy_inline: bool = False) -> Shipped:
    """An inline buffer or an object-store ref for `elements`.

    Pass copy_inline=True when `elements` will be overwritten before the call or
    item carrying it is serialized.
    """
    if elements.nbytes <= INLINE_BYTES:
        return pa.py_buffer(to_buffer(elements).to_pybytes()) if copy_inline else to_buffer(elements)
    return ray.put(to_buffer(elements))


def fingerprint(shipped: Shipped) -> str:
    """What a signature commits to for a shipped chunk."""
    if isinstance(shipped, ray.ObjectRef):
        return f"object:{shipped.hex()}"
    return f"blake3:{blake3(shipped).hexdigest()}"


def prefetch(shipped: Shipped) -> Future:
    """A future of the shard's buffer; for a ref this starts pulling it right away."""
    if isinstance(shipped, ray.ObjectRef):
        return shipped.future()
    done: Future = Future()
    done.set_result(shipped)
    return done


def receive(shipped: list[Shipped], timeout_s: float) -> list[pa.Buffer]:
    """The buffers of `shipped`, fetching the refs among them (one ray.get)."""
    refs = [s for s in shipped if isinstance(s, ray.ObjectRef)]
    fetched = iter(ray.get(refs, timeout=timeout_s)) if refs else iter(())
    return [next(fetched) if isinstance(s, ray.ObjectRef) else s for s in shipped]
