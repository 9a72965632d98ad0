"""The Peer API: a trainer's handle on a job, in the shape of the seed's `Peer`.

A peer joins a job through a validator, then runs collectives through the job's
miners. For each round it cuts its flat tensor into the plan's chunks and makes one
call per miner carrying that miner's chunks (inline when small, else through the
object store once). Miners stream back the reduced chunks; the peer copies them
into its tensor only after every chunk has arrived, so a failed round leaves the
tensor untouched. All peers read the same results, so all end bitwise identical.

Identity: the peer signs as its wallet's hotkey, which must be registered on the
subnet. It asks the validator with a signed JobRequest and accepts only a job
spec signed by that validator holding a permit; it signs every contribution with
the fingerprints of its chunks, and checks the miners' signed receipts and results.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import ray

from mapreduce_ray.chain import DEFAULT_NETUID, ChainConfig
from mapreduce_ray.errors import (
    InvalidTensorError,
    JobError,
    NoValidatorPermitError,
    RoundMismatchError,
    RoundTimeoutError,
    UnsupportedDtypeError,
    WalletError,
)
from mapreduce_ray.messages import (
    Contribution,
    ContributionReceipt,
    JobAdmission,
    JobLeave,
    JobRequest,
    RoundReport,
    SegmentResult,
    open_body,
    seal_body,
)
from mapreduce_ray.naming import DEFAULT_NAMESPACE, validator_name
from mapreduce_ray.plan import Segment, plan_round
from mapreduce_ray.protocol import MetagraphCache, Verifier
from mapreduce_ray.remote import causes_raised, get
from mapreduce_ray.shards import FlatTensor, Tensor, flatten, from_buffer, new_tensor
from mapreduce_ray.transport import fingerprint, receive, ship
from mapreduce_ray.types import JobSpec, ReduceOp, RoundKind, RoundSpec, TensorSpec
from mapreduce_ray.wallets import Identity, dev_peer_wallet, identity_of


class Peer:
    """One of `peer_count` trainers (ranks 1..peer_count) averaging tensors through miners.

    rank, peer_count: this process's rank and the number of peers in the job.
    bandwidth: the largest tensor, in bytes, this peer will hand in (None: no limit).
    wallet: a bittensor.Wallet, a hotkey Keypair or a WalletConfig whose hotkey is
        registered on the subnet. None on the embedded chain: the development wallet
        dev-peer/rank-{rank} that a local subnet registers.
    validator_uid: the validator to ask for the job.
    network: "embedded" (the offline chain in `state_dir`), or a bittensor network:
        finney, test, local, or a ws:// or wss:// URL.
    netuid: the subnet. state_dir: the embedded chain's directory (None: the default).
    job: peers that use the same job name (and validator) form one job.
    namespace: the Ray namespace the subnet's actors live in.
    connect_timeout_s: deadline for joining and leaving the job.
    """

    def __init__(
        self,
        rank: int,
        peer_count: int,
        bandwidth: int | None = None,
        wallet=None,
        validator_uid: int = 0,
        network: str = "embedded",
        *,
        netuid: int = DEFAULT_NETUID,
        state_dir: str | Path | None = None,
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
        self.wallet = wallet
        self.validator_uid = validator_uid
        self.chain = chain_config(network, netuid, state_dir)
        self.job = job
        self.namespace = namespace
        self.connect_timeout_s = connect_timeout_s
        self.spec: JobSpec | None = None
        self._identity: Identity | None = None
        self._verifier: Verifier | None = None
        self._validator = None
        self._validator_hotkey = ""
        self._miners: list = []
        self._seq = 0
        self._sent: dict[int, Contribution] = {}  # this round's contributions, by miner
        self._shipped: dict[int, list] = {}  # this round's shipped chunks, by miner
        self._receipts: dict[int, bytes] = {}  # this round's signed receipts, by miner
        self._results: dict[int, list[tuple[SegmentResult, bytes]]] = {}  # this round's signed results, by miner

    def init_process_group(self) -> JobSpec:
        """Join the job through the validator (signed request, signed admission) and look up its miners."""
        if self.spec is not None:
            raise JobError(f"rank {self.rank} already joined job {self.job!r}; call destroy_process_group() first")
        if not ray.is_initialized():
            raise JobError(
                "Ray is not connected: call ray.init(address='auto') on a cluster, "
                "or actors.start_local_subnet() in this process"
            )
        identity = self._load_identity()
        chain = self.chain.open()
        metagraph = MetagraphCache(chain)
        graph = metagraph.get(refresh=True)  # one read serves the registration and the validator checks
        if graph.by_hotkey(identity.hotkey) is None:
            raise chain.not_registered(identity.hotkey, identity.wallet)
        validator = graph.neuron(self.validator_uid)
        permitted = sorted(n.uid for n in graph.validators)
        if validator is None or not validator.validator_permit:
            raise NoValidatorPermitError(
                f"uid {self.validator_uid} is no validator on {chain.describe()}; "
                f"pass validator_uid= one of {permitted}"
            )
        handle = _lookup(validator_name(self.validator_uid), self.namespace, "validator")
        self._verifier = Verifier(identity.hotkey, metagraph)
        request = JobRequest(self.job, self.rank, self.peer_count, self.bandwidth)
        answer = get(
            handle.join.remote(seal_body(identity.keypair, request, validator.hotkey)),
            self.connect_timeout_s,
            f"joining job {self.job!r}",
        )
        admission, _ = open_body(self._verifier, answer, JobAdmission, sender=validator.hotkey)
        if (admission.rank, admission.peer, admission.spec.name) != (self.rank, identity.hotkey, self.job):
            raise JobError(f"validator uid {self.validator_uid} admitted someone else; refusing its job spec")
        return self.attach(admission.spec, identity, self._verifier, handle, validator.hotkey)

    def attach(
        self, spec: JobSpec, identity: Identity, verifier: Verifier, validator=None, validator_hotkey: str = ""
    ) -> JobSpec:
        """Take part in a job admitted by other means (a benchmark bot's); rounds are reported to
        `validator` when given."""
        self._identity, self._verifier = identity, verifier
        self._validator, self._validator_hotkey = validator, validator_hotkey
        self.spec = spec
        self._miners = [_lookup(m.name, spec.namespace, "miner") for m in spec.miners]
        self._seq = 0
        return spec

    def destroy_process_group(self) -> None:
        """Leave the job: miners release its rounds, the validator ends it when its last peer leaves."""
        spec, miners, self.spec, self._miners = self.spec, self._miners, None, []
        if spec is not None:
            leave = JobLeave(spec.job_id, self.rank)
            calls = [
                m.release_job.remote(self._seal(leave, slot.hotkey))
                for m, slot in zip(miners, spec.miners, strict=True)
            ]
            if self._validator is not None:
                calls.append(self._validator.leave.remote(self._seal(leave, self._validator_hotkey)))
            get(calls, self.connect_timeout_s, "leaving the job")

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
        self._report(round_, results)
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
        out = tensor if is_source else self._receive(round_, flat, results)
        self._report(round_, results)
        return out

    def _receive(self, round_: RoundSpec, flat: FlatTensor | None, results: dict[int, list]) -> Tensor:
        """Write a broadcast's result into `flat`, or into a new tensor when None."""
        source_spec = self._source_spec(round_)
        if flat is None:
            flat = flatten(new_tensor(source_spec))
        elif flat.spec != source_spec:
            raise RoundMismatchError(
                f"{round_.describe()}: rank {round_.src} sends {source_spec.describe()} "
                f"but rank {self.rank} passed {flat.spec.describe()}"
            )
        self._write(round_, flat, plan_round(round_.job, source_spec), results)
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
        if self.spec is not None and nbytes > self.spec.max_bytes:
            raise InvalidTensorError(
                f"tensor is {nbytes} bytes but the miners of job {self.job!r} verified capacity for "
                f"{self.spec.max_bytes} bytes; split the tensor, or join with Peer(..., bandwidth={nbytes}) "
                "to be matched with miners that can take it"
            )
        return flat

    def _next_round(
        self, kind: RoundKind, op: ReduceOp | None, src: int | None, tensor: TensorSpec | None
    ) -> RoundSpec:
        if self.spec is None:
            raise JobError(f"rank {self.rank} has not joined a job; call init_process_group() first")
        self._seq += 1
        self._sent, self._shipped, self._receipts, self._results = {}, {}, {}, {}
        return RoundSpec(self.spec, self._seq, kind, op, src, tensor)

    def _send(self, round_: RoundSpec, miner: int, flat: FlatTensor | None, segment: Segment | None):
        """Ship this peer's chunks of `segment` under a signed Contribution and open the miner's result stream."""
        chunks = None if flat is None else [ship(flat.flat[a:b], copy_inline=True) for a, b in segment.chunks]
        prints = tuple(fingerprint(c) for c in chunks or ())
        r = round_
        contribution = Contribution(r.job.job_id, r.seq, r.kind, r.op, r.src, r.tensor, miner, self.rank, prints)
        self._sent[miner] = contribution
        self._shipped[miner] = chunks or []
        call = self._miners[miner].reduce.options(num_returns="streaming")
        return call.remote(self._seal(contribution, r.job.miners[miner].hotkey), chunks)

    def _seal(self, body, receiver: str) -> bytes:
        return seal_body(self._identity.keypair, body, receiver)

    def _collect(self, round_: RoundSpec, streams: dict) -> dict[int, list]:
        """The reduced chunks each miner streams back, in order, by miner index, every signed item checked."""
        deadline = time.monotonic() + round_.job.timeout_s
        items: dict[int, list] = {i: [] for i in streams.values()}
        pending = dict(streams)
        while pending:
            remaining = deadline - time.monotonic()
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(remaining, 0))
            if not ready:
                self._report(round_, {}, late=sorted(pending.values()))
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
                with causes_raised(name, round_.job.timeout_s):
                    value = ray.get(item, timeout=max(deadline - time.monotonic(), 0))
                receipt, result, batch = value
                if miner not in self._results:
                    self._check_receipt(round_, miner, receipt)
                    self._receipts[miner] = receipt
                    self._results[miner] = []
                items[miner].extend(self._check_result(round_, miner, len(items[miner]), result, batch))
        return items

    def _check_receipt(self, round_: RoundSpec, miner: int, wire: bytes | None) -> None:
        """The first item of a miner's stream must carry its signed receipt of exactly what this peer sent."""
        slot, sent = round_.job.miners[miner], self._sent[miner]
        if wire is None:
            raise RoundMismatchError(f"{round_.describe()}: miner {slot.name!r} sent results without a receipt")
        receipt, _ = open_body(self._verifier, wire, ContributionReceipt, sender=slot.hotkey)
        expected = ContributionReceipt(
            sent.job_id, sent.seq, sent.kind, sent.op, sent.src, miner, self.rank, sent.chunks
        )
        if receipt != expected:
            raise RoundMismatchError(f"{round_.describe()}: miner {slot.name!r} receipted another contribution")

    def _check_result(self, round_: RoundSpec, miner: int, first: int, wire: bytes, batch: list) -> list:
        """The batch, if the miner's signed SegmentResult vouches for exactly these chunks."""
        slot = round_.job.miners[miner]
        result, _ = open_body(self._verifier, wire, SegmentResult, sender=slot.hotkey)
        signed = (result.job_id, result.seq, result.miner, result.rank, result.first_chunk, result.chunks)
        received = (round_.job.job_id, round_.seq, miner, self.rank, first, tuple(fingerprint(s) for s in batch))
        if signed != received:
            raise RoundMismatchError(f"{round_.describe()}: miner {slot.name!r} signed other results than it sent")
        self._results[miner].append((result, wire))
        return batch

    def _report(self, round_: RoundSpec, results: dict[int, list], late: Sequence[int] = ()) -> None:
        """Forward the miners' signed receipts and results, with this peer's chunks, to the validator.

        Fire and forget: the validator checks a random share of rounds after the fact;
        the chunks stay in the object store while it holds them. (The miners hand it
        the results themselves: refs that arrived in streamed items cannot be lent on.)
        """
        if self._validator is None:
            return
        miners = sorted(results)
        report = RoundReport(
            round_.job.job_id,
            round_.seq,
            self.rank,
            ray.get_runtime_context().get_node_id(),
            tuple(miners),
            tuple(self._receipts[m].decode() for m in miners),
            tuple(tuple(wire.decode() for _, wire in self._results[m]) for m in miners),
            tuple(late),
        )
        wire = self._seal(report, self._validator_hotkey)
        self._validator.report.remote(wire, [self._shipped[m] for m in miners])

    def _source_spec(self, round_: RoundSpec) -> TensorSpec:
        """The broadcast source's tensor spec, as every miner signed it."""
        specs = {r.tensor for results in self._results.values() for r, _ in results}
        if len(specs) != 1:
            raise RoundMismatchError(f"{round_.describe()}: miners disagree about the source tensor: {specs}")
        return specs.pop()

    def _load_identity(self) -> Identity:
        if self.wallet is not None:
            return identity_of(self.wallet)
        if self.chain.backend != "embedded":
            raise WalletError(f"pass wallet= (a bittensor.Wallet registered on netuid {self.chain.netuid})")
        return identity_of(dev_peer_wallet(self.chain.state_path, self.rank))

    def _write(self, round_: RoundSpec, flat: FlatTensor, plan, results: dict[int, list]) -> None:
        """The final in-place write: copy every reduced chunk into the tensor."""
        if any(len(results.get(seg.miner, [])) != len(seg.chunks) for seg in plan):
            raise RoundMismatchError(f"{round_.describe()}: miners returned a different number of chunks than planned")
        chunks = [(rng, item) for seg in plan for rng, item in zip(seg.chunks, results.get(seg.miner, []), strict=True)]
        with causes_raised(f"{round_.describe()}: reading results", round_.job.timeout_s):
            buffers = receive([item for _, item in chunks], round_.job.timeout_s)
        for ((a, b), _), buffer in zip(chunks, buffers, strict=True):
            if buffer.size != (b - a) * flat.dtype.itemsize:
                raise RoundMismatchError(
                    f"{round_.describe()}: a miner returned {buffer.size} bytes for elements {a}..{b - 1}"
                )
        for ((a, b), _), buffer in zip(chunks, buffers, strict=True):
            flat.flat[a:b].copy_(from_buffer(buffer, flat.dtype))
        flat.commit()


def _lookup(name: str, namespace: str, role: str):
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        raise JobError(
            f"no {role} named {name!r} in Ray namespace {namespace!r}; start a subnet first "
            "(python -m jobs.local, or actors.start_local_subnet())"
        ) from None


def chain_config(network: str, netuid: int, state_dir: str | Path | None) -> ChainConfig:
    """The chain a `network` name means: "embedded", or a bittensor network."""
    if network == "embedded":
        return ChainConfig(netuid=netuid, state_dir=None if state_dir is None else str(state_dir))
    return ChainConfig(backend="bittensor", network=network, netuid=netuid)
