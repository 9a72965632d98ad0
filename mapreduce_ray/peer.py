"""The Peer API: a trainer's handle on a job, in the shape of the seed's `Peer`.

A peer joins a job through a validator, then runs collectives through the job's
miners. For each round it cuts its flat tensor into the plan's chunks and makes one
call per miner carrying that miner's chunks (inline when small, else through the
object store once). Miners stream back the reduced chunks; the peer copies them
into its tensor only after every chunk has arrived, so a failed round leaves the
tensor untouched. All peers read the same results, so all end bitwise identical.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from mapreduce_ray.errors import (
    InvalidTensorError,
    JobError,
    MapReduceError,
    RoundMismatchError,
    RoundTimeoutError,
    UnsupportedDtypeError,
)
from mapreduce_ray.naming import DEFAULT_NAMESPACE, validator_name
from mapreduce_ray.plan import Segment, plan_round
from mapreduce_ray.shards import FlatTensor, Tensor, flatten, from_buffer, new_tensor
from mapreduce_ray.transport import receive, ship
from mapreduce_ray.types import JobSpec, ReduceOp, RoundKind, RoundSpec, TensorSpec


class Peer:
    """One of `peer_count` trainers (ranks 1..peer_count) averaging tensors through miners.

    rank, peer_count: this process's rank and the number of peers in the job.
    bandwidth: the largest tensor, in bytes, this peer will hand in (None: no limit).
    validator_uid: the validator to ask for the job.
    job: peers that use the same job name (and validator) form one job.
    namespace: the Ray namespace the subnet's actors live in.
    connect_timeout_s: deadline for joining and leaving the job.
    """

    def __init__(
        self,
        rank: int,
        peer_count: int,
        bandwidth: int | None = None,
        *,
        validator_uid: int = 0,
        job: str = "default",
        namespace: str = DEFAULT_NAMESPACE,
        connect_timeout_s: float = 30.0,
    ):
        if not isinstance(peer_count, int) or peer_count < 1:
            raise ValueError(f"peer_count must be a positive int, got {peer_count!r}")
        if not isinstance(rank, int) or not 1 <= rank <= peer_count:
            raise ValueError(f"rank must be an int in 1..{peer_count}, got {rank!r}")
        if bandwidth is not None and bandwidth <= 0:
            raise ValueError(f"bandwidth must be a positive number of bytes or None, got {bandwidth!r}")
        self.rank = rank
        self.peer_count = peer_count
        self.bandwidth = bandwidth
        self.validator_uid = validator_uid
        self.job = job
        self.namespace = namespace
        self.connect_timeout_s = connect_timeout_s
        self.spec: JobSpec | None = None
        self._validator = None
        self._miners: list = []
        self._seq = 0

    def init_process_group(self) -> JobSpec:
        """Join the job through the validator and look up its miners."""
        if self.spec is not None:
            raise JobError(f"rank {self.rank} already joined job {self.job!r}; call destroy_process_group() first")
        if not ray.is_initialized():
            raise JobError(
                "Ray is not connected: call ray.init(address='auto') on a cluster, "
                "or actors.start_local_subnet() in this process"
            )
        self._validator = _lookup(validator_name(self.validator_uid), self.namespace, "validator")
        join = self._validator.join.remote(self.job, self.rank, self.peer_count)
        self.spec = _get(join, self.connect_timeout_s, f"joining job {self.job!r}")
        self._miners = [_lookup(m.name, self.spec.namespace, "miner") for m in self.spec.miners]
        self._seq = 0
        return self.spec

    def destroy_process_group(self) -> None:
        """Leave the job: miners release its rounds, the validator ends it when its last peer leaves."""
        spec, miners, self.spec, self._miners = self.spec, self._miners, None, []
        if spec is not None:
            calls = [m.release_job.remote(spec.job_id, self.rank) for m in miners]
            calls.append(self._validator.leave.remote(spec.job_id, self.rank))
            _get(calls, self.connect_timeout_s, "leaving the job")

    def __enter__(self) -> Peer:
        self.init_process_group()
        return self

    def __exit__(self, *exc) -> None:
        self.destroy_process_group()

    def all_reduce(self, tensor: Tensor, op: str | ReduceOp = "avg") -> Tensor:
        """Reduce `tensor` across all peers in place (op: "avg" or "sum") and return it.

        Every peer ends with a bitwise-identical tensor.
        """
        op = ReduceOp.parse(op)
        flat = self._flatten(tensor, "all_reduce")
        if op is ReduceOp.AVG and flat.dtype.is_integer:
            raise UnsupportedDtypeError(
                f"avg of {flat.dtype.name} tensors would truncate; use all_reduce(t, op='sum') and divide yourself"
            )
        flat.require_writable("all_reduce")
        round_ = self._next_round(RoundKind.ALL_REDUCE, op, None, flat.spec)
        segments = [s for s in plan_round(round_.job, flat.spec) if s.chunks]
        streams = {self._send(round_, s.miner, flat, s): s.miner for s in segments}
        results = self._collect(round_, streams)
        self._write(round_, flat, segments, results)
        return tensor

    def broadcast(self, tensor: Tensor | None = None, src: int = 1) -> Tensor:
        """Send `tensor` from rank `src` to every peer and return it.

        Receivers may pass a tensor of the source's dtype and shape to fill in place,
        or None to get a new torch tensor.
        """
        if not isinstance(src, int) or not 1 <= src <= self.peer_count:
            raise ValueError(f"src must be an int in 1..{self.peer_count}, got {src!r}")
        is_source = self.rank == src
        if is_source and tensor is None:
            raise InvalidTensorError(f"rank {src} is the broadcast source and must pass the tensor to send")
        flat = None if tensor is None else self._flatten(tensor, "broadcast")
        if flat is not None and not is_source:
            flat.require_writable("broadcast")
        round_ = self._next_round(RoundKind.BROADCAST, None, src, flat.spec if flat else None)
        if is_source:
            streams = {self._send(round_, s.miner, flat, s): s.miner for s in plan_round(round_.job, flat.spec)}
        else:
            streams = {self._send(round_, i, None, None): i for i in range(len(round_.job.miners))}
        results = self._collect(round_, streams)
        return tensor if is_source else self._receive(round_, flat, results)

    def _receive(self, round_: RoundSpec, flat: FlatTensor | None, results: dict[int, list]) -> Tensor:
        """Write a broadcast's result into `flat`, or into a new tensor when None."""
        source_spec = _source_spec(round_, results)
        if flat is None:
            flat = flatten(new_tensor(source_spec))
        elif flat.spec != source_spec:
            raise RoundMismatchError(
                f"{round_.describe()}: rank {round_.src} sends {source_spec.describe()} "
                f"but rank {self.rank} passed {flat.spec.describe()}"
            )
        self._write(round_, flat, plan_round(round_.job, source_spec), {i: r[1:] for i, r in results.items()})
        return flat.source

    def _flatten(self, tensor: Tensor, verb: str) -> FlatTensor:
        flat = flatten(tensor)
        if flat.spec.numel == 0:
            raise InvalidTensorError(f"{verb} of an empty tensor: pass a tensor with at least one element")
        nbytes = flat.spec.nbytes
        if self.bandwidth is not None and nbytes > self.bandwidth:
            raise InvalidTensorError(
                f"tensor is {nbytes} bytes but this peer's bandwidth is {self.bandwidth} bytes; "
                "pass a larger bandwidth to Peer(...)"
            )
        return flat

    def _next_round(
        self, kind: RoundKind, op: ReduceOp | None, src: int | None, tensor: TensorSpec | None
    ) -> RoundSpec:
        if self.spec is None:
            raise JobError(f"rank {self.rank} has not joined a job; call init_process_group() first")
        self._seq += 1
        return RoundSpec(self.spec, self._seq, kind, op, src, tensor)

    def _send(self, round_: RoundSpec, miner: int, flat: FlatTensor | None, segment: Segment | None):
        """Ship this peer's chunks of `segment` and open the miner's result stream."""
        chunks = None if flat is None else [ship(flat.flat[a:b]) for a, b in segment.chunks]
        call = self._miners[miner].reduce.options(num_returns="streaming")
        return call.remote(round_, miner, self.rank, chunks)

    def _collect(self, round_: RoundSpec, streams: dict) -> dict[int, list]:
        """Everything each miner's stream yields, in order, by miner index."""
        deadline = time.monotonic() + round_.job.timeout_s
        items: dict[int, list] = {i: [] for i in streams.values()}
        pending = dict(streams)
        while pending:
            remaining = deadline - time.monotonic()
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(remaining, 0))
            if not ready:
                names = sorted(round_.job.miners[i].name for i in pending.values())
                raise RoundTimeoutError(
                    f"{round_.describe()}: miners {names} did not finish within {round_.job.timeout_s:g} s"
                )
            for stream in ready:
                miner = pending[stream]
                try:
                    item = next(stream)
                except StopIteration:
                    del pending[stream]
                    continue
                name = f"{round_.describe()}: miner {round_.job.miners[miner].name!r}"
                with _causes_raised(name, round_.job.timeout_s):
                    items[miner].extend(ray.get(item, timeout=max(deadline - time.monotonic(), 0)))
        return items

    def _write(self, round_: RoundSpec, flat: FlatTensor, plan, results: dict[int, list]) -> None:
        """The final in-place write: copy every reduced chunk into the tensor."""
        if any(len(results.get(seg.miner, [])) != len(seg.chunks) for seg in plan):
            raise RoundMismatchError(f"{round_.describe()}: miners returned a different number of chunks than planned")
        chunks = [(rng, item) for seg in plan for rng, item in zip(seg.chunks, results.get(seg.miner, []), strict=True)]
        with _causes_raised(f"{round_.describe()}: reading results", round_.job.timeout_s):
            buffers = receive([item for _, item in chunks], round_.job.timeout_s)
        for ((a, b), _), buffer in zip(chunks, buffers, strict=True):
            flat.flat[a:b].copy_(from_buffer(buffer, flat.dtype))
        flat.commit()


def _source_spec(round_: RoundSpec, results: dict[int, list]) -> TensorSpec:
    specs = {r[0] for r in results.values()}
    if len(specs) != 1:
        raise RoundMismatchError(f"{round_.describe()}: miners disagree about the source tensor: {specs}")
    return specs.pop()


def _lookup(name: str, namespace: str, role: str):
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        raise JobError(
            f"no {role} named {name!r} in Ray namespace {namespace!r}; start a subnet first "
            "(python -m jobs.local, or actors.start_local_subnet())"
        ) from None


def _get(refs, timeout_s: float, what: str):
    with _causes_raised(what, timeout_s):
        return ray.get(refs, timeout=timeout_s)


@contextmanager
def _causes_raised(what: str, timeout_s: float) -> Iterator[None]:
    """Raise our own errors from remote calls as themselves, and Ray's as one clear line."""
    try:
        yield
    except GetTimeoutError:
        raise RoundTimeoutError(f"{what}: no answer within {timeout_s:g} s") from None
    except RayTaskError as e:
        if isinstance(e.cause, MapReduceError):
            raise e.cause from None
        raise
    except RayActorError:
        raise MapReduceError(f"{what}: the actor died") from None
