"""Arrow IPC frames of the job streams: one fixed schema, each batch a flat run of a chunk's bytes.

Every frame on a job stream is a single-column record batch of non-null uint8, whatever the
tensor's dtype: the dtype, the chunk's place and its BLAKE3 digest travel in the signed message
beside it. Sending wraps the chunk's memory without a copy; receiving checks, before the bytes
are used, that the stream's schema is exactly this one (no extension types, no metadata), that
the batch passes Arrow's full validation, and that it has no nulls and exactly the expected
length; the receiver then compares the bytes' `digest` with the signed one.
"""

from __future__ import annotations

import pyarrow as pa
import torch
from blake3 import blake3

from mapreduce_ray.errors import FrameRejectedError
from mapreduce_ray.shards import to_buffer

CHUNK_SCHEMA = pa.schema([pa.field("chunk", pa.uint8(), nullable=False)])


def frame(elements: torch.Tensor) -> pa.RecordBatch:
    """A frame over the bytes of contiguous 1-D `elements` (no copy: keep them unchanged until sent)."""
    return frame_buffer(to_buffer(elements))


def frame_buffer(data: pa.Buffer) -> pa.RecordBatch:
    """A frame over the bytes of an Arrow buffer (no copy)."""
    array = pa.Array.from_buffers(pa.uint8(), len(data), [None, data])
    return pa.RecordBatch.from_arrays([array], schema=CHUNK_SCHEMA)


def check_schema(schema: pa.Schema | None, who: str) -> None:
    """Refuse a stream whose schema is not exactly CHUNK_SCHEMA (extension types and metadata included)."""
    if schema is None or not schema.equals(CHUNK_SCHEMA, check_metadata=True):
        raise FrameRejectedError(f"{who} sent a stream of schema {_describe(schema)}, not {_describe(CHUNK_SCHEMA)}")


def unframe(batch: pa.RecordBatch | None, nbytes: int, who: str) -> pa.Buffer:
    """The `nbytes` bytes a received frame carries, once it is shown to be one of ours."""
    if batch is None:
        raise FrameRejectedError(f"{who} sent a message without its frame")
    check_schema(batch.schema, who)
    if batch.num_rows != nbytes:
        raise FrameRejectedError(f"{who} sent a frame of {batch.num_rows} bytes where {nbytes} were due")
    try:
        batch.validate(full=True)
    except (pa.ArrowInvalid, pa.ArrowException) as e:
        raise FrameRejectedError(f"{who} sent a malformed frame: {e}") from None
    column = batch.column(0)
    if column.null_count:
        raise FrameRejectedError(f"{who} sent a frame with null bytes")
    data = column.buffers()[1]
    return data.slice(column.offset, nbytes)


def digest(data: pa.Buffer | memoryview) -> str:
    """The BLAKE3 digest of a chunk's bytes, as the signed messages name it."""
    return blake3(data).hexdigest()


def _describe(schema: pa.Schema | None) -> str:
    if schema is None:
        return "none"
    fields = ", ".join(
        f"{f.name}: {f.type}{'' if f.nullable else ' not null'}{' with metadata' if f.metadata else ''}" for f in schema
    )
    return f"({fields}){' with metadata' if schema.metadata else ''}"
