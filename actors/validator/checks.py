"""A validator's check of one chunk of a miner's segment, recomputed on the validator's own hardware.

The validator fetches the chunk by ticket from the miner that retained it: every input beside the
`Chunk` message its peer signed, then the result beside a `Reduced` the miner signs for the
validator. Each input must carry the signature of the peer admitted at its rank and hash to the
digest that peer signed; the result must hash to its digest, name those inputs, and be the very
result the peers reported receiving. The validator then reduces the inputs in rank order itself
and compares bit for bit. A miner that fails any of these is wrong; one whose chunk cannot be
fetched or read is unverifiable: no strike, but the round counts as missed.
"""

from __future__ import annotations

from dataclasses import dataclass

from mapreduce_ray.errors import MapReduceError
from mapreduce_ray.messages import Chunk, Reduced, Ticket, decode, encode
from mapreduce_ray.plan import plan_round
from mapreduce_ray.protocol import Kind, attest
from mapreduce_ray.shards import from_buffer
from mapreduce_ray.types import JobSpec, ReduceOp, RoundKind
from mapreduce_ray.validator.verify import Verdict, check_exact
from mapreduce_ray.wire.endpoint import Remote
from mapreduce_ray.wire.frames import check_schema, digest, unframe


@dataclass(frozen=True)
class ChunkCheck:
    """Chunk `chunk` of `segment` of round `seq` of job `spec`, reduced by its miner `miner`, which every
    peer reported receiving with digest `sent`; `admitted` maps each rank to its peer's hotkey. `proofs`: the
    sealed sketches a peer got beside the result, when it hands them in as evidence (they must be its peers' own)."""

    spec: JobSpec
    admitted: dict[int, str]
    seq: int
    miner: int
    segment: int
    chunk: int
    sent: str
    proofs: tuple[str, ...] | None = None


class Unverifiable(MapReduceError):
    """A miner did not serve a chunk it should hold, or served it outside the protocol."""


def check_chunk(remote: Remote, check: ChunkCheck, validator: str, timeout_s: float) -> Verdict:
    """Fetch one chunk (inputs and result) from its miner and recompute it here; Unverifiable when the miner
    does not serve it."""
    spec, miner = check.spec, check.spec.miners[check.miner].hotkey
    messages = _fetch(remote, check, timeout_s)
    try:
        *inputs, result = messages
        netuid = remote.netuid
        chunks = [(decode(Chunk, attest(_wire(m), Kind.CHUNK, None, miner, netuid).body, "Chunk"), m) for m in inputs]
        senders = [attest(_wire(m), Kind.CHUNK, None, miner, netuid).sender for m in inputs]
        reduced = decode(Reduced, attest(_wire(result), Kind.REDUCED, miner, validator, netuid).body, "Reduced")
    except (MapReduceError, ValueError) as e:
        raise Unverifiable(f"{remote.who} served chunk {check.chunk} outside the protocol: {e}") from None
    if not chunks:
        return Verdict(False, "served a result without its inputs")
    first = chunks[0][0]
    ranks = [first.src] if first.kind is RoundKind.BROADCAST else list(range(1, spec.peer_count + 1))
    place = (spec.job_id, check.seq, check.segment, check.chunk)
    for (body, _), sender in zip(chunks, senders, strict=True):
        if (body.job_id, body.seq, body.segment, body.chunk) != place:
            return Verdict(False, "served an input of another round or chunk")
        if check.admitted.get(body.rank) != sender:
            return Verdict(False, f"served an input that the peer at rank {body.rank} did not sign")
        if (body.kind, body.op, body.src, body.tensor) != (first.kind, first.op, first.src, first.tensor):
            return Verdict(False, "served inputs that disagree about the round")
    if [body.rank for body, _ in chunks] != ranks:
        return Verdict(False, f"served the inputs of ranks {[b.rank for b, _ in chunks]}, not {ranks}")
    a, b = plan_round(spec, first.tensor)[check.segment].chunks[check.chunk]
    nbytes = (b - a) * first.tensor.dtype_info.itemsize
    try:
        datas = [unframe(message.data, nbytes, remote.who) for _, message in chunks]
        data = unframe(result.data, nbytes, remote.who)
    except MapReduceError as e:
        return Verdict(False, str(e))
    for (body, _), input_data in zip(chunks, datas, strict=True):
        if digest(input_data) != body.digest:
            return Verdict(False, f"served bytes of rank {body.rank} other than it signed")
    if digest(data) != reduced.digest or reduced.inputs != tuple(body.digest for body, _ in chunks):
        return Verdict(False, "served a result its own signed digests do not match")
    if reduced.digest != check.sent:
        return Verdict(False, "served another result than the one it sent the peers")
    if check.proofs is not None and check.proofs != tuple(body.proof for body, _ in chunks):
        return Verdict(False, f"chunk {check.chunk}: relayed sketches other than the ones its peers sent")
    dtype = first.tensor.dtype_info
    op = ReduceOp.SUM if first.kind is RoundKind.BROADCAST else first.op
    verdict = check_exact([from_buffer(d, dtype) for d in datas], from_buffer(data, dtype), dtype.name, op)
    return verdict if verdict.ok else Verdict(False, f"chunk {check.chunk}: {verdict.reason}")


def _fetch(remote: Remote, check: ChunkCheck, timeout_s: float) -> list:
    """The ticket's messages: the inputs, then the result (at most one per peer, and one more)."""
    ticket = Ticket(check.spec.job_id, check.seq, check.segment, check.chunk)
    messages = []
    try:
        reply = remote.fetch("ticket", encode(ticket), timeout_s)
        try:
            check_schema(reply.schema, remote.who)
            while len(messages) <= check.spec.peer_count + 1:
                try:
                    messages.append(reply.read_chunk())
                except StopIteration:
                    break
        finally:
            reply.close()
    except MapReduceError as e:
        raise Unverifiable(f"{remote.who} did not serve chunk {check.chunk} of segment {check.segment}: {e}") from None
    if not 2 <= len(messages) <= check.spec.peer_count + 1:
        raise Unverifiable(f"{remote.who} served {len(messages)} messages for one chunk")
    return messages


def _wire(message) -> bytes:
    if message.app_metadata is None:
        raise ValueError("a frame without its signed message")
    return message.app_metadata.to_pybytes()
