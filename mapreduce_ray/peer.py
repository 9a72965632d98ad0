"""The Peer API: a trainer's handle on a job, in the shape of the seed's `Peer`.

A peer joins a job through a validator, then runs collectives through the job's
miners. For each round it cuts its flat tensor into the plan's chunks and makes one
call per miner carrying that miner's chunks (inline when small, else through the
object store once). Miners stream back the reduced chunks, and the peer starts
pulling each one as soon as it is announced, so downloading overlaps uploading; it
copies them into its tensor only after every chunk has arrived, so a failed round leaves the
tensor untouched. All peers read the same results, so all end bitwise identical.

Faults: a miner that dies, fails or misses its deadline has its segment handed
to the next miner of the segment's failover order (`plan.failover_order`), which
every peer derives alike; the chunks already shipped are handed on, not re-sent.
With redundancy r each segment goes to r miners at once; peers compare their
signed digests and ask the validator to rule when they differ.

Identity: the peer signs as its wallet's hotkey, which must be registered on the
subnet. It asks the validator with a signed JobRequest and accepts only a job
spec signed by that validator holding a permit; it signs every contribution with
the fingerprints of its chunks, and checks the miners' signed receipts and results.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import TimeoutError as FetchTimeout
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import ray
from blake3 import blake3
from ray.exceptions import (
    GetTimeoutError,
    ObjectLostError,
    ObjectStoreFullError,
    OutOfDiskError,
    RayActorError,
    RayTaskError,
)

from mapreduce_ray.chain import DEFAULT_NETUID, ChainConfig
from mapreduce_ray.errors import (
    IdentityError,
    InvalidTensorError,
    JobError,
    MessageRejectedError,
    MinerFaultError,
    NonFiniteError,
    NoValidatorPermitError,
    PeerLostError,
    RoundMismatchError,
    RoundTimeoutError,
    StoreFullError,
    UnsupportedDtypeError,
    WalletError,
)
from mapreduce_ray.messages import (
    Contribution,
    ContributionReceipt,
    Dispute,
    JobAdmission,
    JobLeave,
    JobRequest,
    RoundReport,
    Ruling,
    SegmentResult,
    open_body,
    seal_body,
)
from mapreduce_ray.metrics import record_round
from mapreduce_ray.naming import DEFAULT_NAMESPACE, validator_name
from mapreduce_ray.plan import Segment, failover_order, plan_round
from mapreduce_ray.protocol import MetagraphCache, Verifier
from mapreduce_ray.remote import causes_raised, get
from mapreduce_ray.shards import FlatTensor, Tensor, flatten, from_buffer, new_tensor
from mapreduce_ray.transport import fingerprint, prefetch, ship
from mapreduce_ray.types import JobSpec, ReduceOp, RoundKind, RoundSpec, TensorSpec
from mapreduce_ray.wallets import Identity, dev_peer_wallet, identity_of

log = logging.getLogger(__name__)


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
    redundancy: how many miners reduce each segment; peers compare their digests and the
        validator rules when they differ (the first peer to join sets it for the job).
    reject_nonfinite: miners refuse NaN and Inf, naming the peer that handed them in; by
        default they propagate as in torch.distributed.
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
        redundancy: int = 1,
        reject_nonfinite: bool = False,
    ):
        if not isinstance(peer_count, int) or peer_count < 1:
            raise ValueError(f"peer_count must be a positive int, got {peer_count!r}")
        if not isinstance(rank, int) or not 1 <= rank <= peer_count:
            raise ValueError(f"rank must be an int in 1..{peer_count}, got {rank!r}")
        if bandwidth is not None and bandwidth <= 0:
            raise ValueError(f"bandwidth must be a positive number of bytes or None, got {bandwidth!r}")
        self.rank = rank
        self.peer_count = peer_count
        if not isinstance(redundancy, int) or redundancy < 1:
            raise ValueError(f"redundancy must be an int >= 1, got {redundancy!r}")
        self.bandwidth = bandwidth
        self.redundancy = redundancy
        self.reject_nonfinite = reject_nonfinite
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
        self._sent: dict[tuple[int, int], Contribution] = {}  # this round's contributions, by (miner, segment)
        self._shipped: dict[int, list | None] = {}  # this round's shipped chunks by segment (None: a receiver)
        self._delivered: list[_Delivery] = []  # this round's complete deliveries
        self._failed: set[int] = set()  # the miners that failed this round
        self._reported = False

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
        request = JobRequest(
            self.job, self.rank, self.peer_count, self.bandwidth, self.redundancy, self.reject_nonfinite
        )
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
        """Leave the job, which ends it for every peer: the validator frees its miners, and the miners
        release this peer's rounds. A miner that died meanwhile is skipped; one that does not answer
        within `connect_timeout_s` lets go of the rounds at their deadline."""
        spec, miners, self.spec, self._miners = self.spec, self._miners, None, []
        self._sent, self._shipped, self._delivered = {}, {}, []  # the last round's objects go with the job
        if spec is None:
            return
        leave = JobLeave(spec.job_id, self.rank)
        releases = [
            m.release_job.remote(self._seal(leave, slot.hotkey)) for m, slot in zip(miners, spec.miners, strict=True)
        ]
        if self._validator is not None:
            get(
                self._validator.leave.remote(self._seal(leave, self._validator_hotkey)),
                self.connect_timeout_s,
                "leaving the job",
            )
        done, _ = ray.wait(releases, num_returns=len(releases), timeout=self.connect_timeout_s)
        for ref in done:
            with causes_raised("leaving the job", self.connect_timeout_s), suppress(RayActorError):
                ray.get(ref)

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
        started = time.monotonic()
        round_ = self._next_round(RoundKind.ALL_REDUCE, op, None, flat.spec)
        plan = [s for s in plan_round(round_.job, flat.spec) if s.chunks]
        with self._reporting(round_):
            results = self._exchange(round_, self._ship(flat, plan))
        self._write(round_, flat, plan, results)
        record_round(round_, self.rank, flat.spec.nbytes, time.monotonic() - started)
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
        started = time.monotonic()
        round_ = self._next_round(RoundKind.BROADCAST, None, src, flat.spec if flat else None)
        with self._reporting(round_):
            if is_source:
                results = self._exchange(round_, self._ship(flat, plan_round(round_.job, flat.spec)))
            else:
                results = self._exchange(round_, dict.fromkeys(range(len(round_.job.miners))))
        if not is_source:
            flat = self._receive(round_, flat, results)
        record_round(round_, self.rank, flat.spec.nbytes, time.monotonic() - started)
        return flat.source

    def _receive(self, round_: RoundSpec, flat: FlatTensor | None, results: dict[int, _Delivery]) -> FlatTensor:
        """Write a broadcast's result into `flat`, or into a new tensor when None; the flat tensor written."""
        specs = {r.tensor for delivery in results.values() for r, _ in delivery.results}
        if len(specs) != 1:
            raise RoundMismatchError(f"{round_.describe()}: miners disagree about the source tensor: {specs}")
        source_spec = specs.pop()
        if flat is None:
            flat = flatten(new_tensor(source_spec))
        elif flat.spec != source_spec:
            raise RoundMismatchError(
                f"{round_.describe()}: rank {round_.src} sends {source_spec.describe()} "
                f"but rank {self.rank} passed {flat.spec.describe()}"
            )
        self._write(round_, flat, plan_round(round_.job, source_spec), results)
        return flat

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
        self._sent, self._shipped, self._delivered, self._failed, self._reported = {}, {}, [], set(), False
        return RoundSpec(self.spec, self._seq, kind, op, src, tensor)

    def _ship(self, flat: FlatTensor, plan: Sequence[Segment]) -> dict[int, list]:
        """This peer's chunks of every segment, each shipped once (inline, or into the object store)."""
        try:
            return {seg.miner: [ship(flat.flat[a:b], copy_inline=True) for a, b in seg.chunks] for seg in plan}
        except (ObjectStoreFullError, OutOfDiskError) as e:
            raise StoreFullError(
                f"rank {self.rank} could not put its {flat.spec.nbytes}-byte tensor into Ray's object store: "
                f"{type(e).__name__}; free object refs this process holds, or start Ray with more "
                "object_store_memory or spill space"
            ) from None

    def _exchange(self, round_: RoundSpec, shipped: dict[int, list | None]) -> dict[int, _Delivery]:
        """Every segment's result, by segment: each segment goes to the first `redundancy` miners of its
        failover order, and to the next one whenever one of them fails; replicas are compared by digest."""
        job = round_.job
        deadline = time.monotonic() + job.timeout_s
        self._shipped = shipped
        untried = {s: list(failover_order(s, len(job.miners))) for s in shipped}
        running: dict = {}  # result stream -> its delivery
        delivered: dict[int, list[_Delivery]] = {s: [] for s in shipped}

        def launch(segment: int) -> None:
            """Hand the segment to its next untried miner, if any and if time is left."""
            while untried[segment] and time.monotonic() < deadline:
                miner = untried[segment].pop(0)
                # the last miner that may take the segment gets whatever time the round has left
                attempt_deadline = (
                    min(deadline, time.monotonic() + job.attempt_timeout_s) if untried[segment] else deadline
                )
                delivery = _Delivery(segment, miner, attempt_deadline)
                try:
                    with _miner_faults(delivery):
                        running[self._send(round_, delivery)] = delivery
                    return
                except MinerFaultError as e:
                    self._fail(round_, delivery, e)

        for segment in shipped:
            for _ in range(job.redundancy):
                launch(segment)
        while running:
            wait_s = min(d.deadline for d in running.values()) - time.monotonic()
            ready, _ = ray.wait(list(running), num_returns=1, timeout=max(wait_s, 0))
            for stream in ready:
                delivery = running[stream]
                try:
                    if not self._advance(round_, stream, delivery):
                        continue
                    delivered[delivery.segment].append(delivery)
                except MinerFaultError as e:
                    self._fail(round_, delivery, e)
                    launch(delivery.segment)
                del running[stream]
            for stream, delivery in list(running.items()):
                if time.monotonic() >= delivery.deadline:
                    del running[stream]
                    self._fail(round_, delivery, MinerFaultError("missed its deadline"))
                    launch(delivery.segment)
        self._delivered = [d for deliveries in delivered.values() for d in deliveries]
        missing = sorted(s for s, deliveries in delivered.items() if not deliveries)
        if missing:
            failed = sorted(job.miners[m].name for m in self._failed)
            raise RoundTimeoutError(
                f"{round_.describe()}: no miner delivered segment(s) {missing} within {job.timeout_s:g} s; "
                f"miners that failed: {failed}"
            )
        return {s: self._agreed(round_, s, deliveries, deadline) for s, deliveries in delivered.items()}

    def _send(self, round_: RoundSpec, delivery: _Delivery):
        """Hand this peer's chunks of a segment to a miner under a signed Contribution; open its result stream."""
        r, chunks = round_, self._shipped[delivery.segment]
        prints = tuple(fingerprint(c) for c in chunks or ())
        contribution = Contribution(
            r.job.job_id, r.seq, r.kind, r.op, r.src, r.tensor, delivery.miner, self.rank, prints, delivery.segment
        )
        self._sent[(delivery.miner, delivery.segment)] = contribution
        call = self._miners[delivery.miner].reduce.options(num_returns="streaming")
        return call.remote(self._seal(contribution, r.job.miners[delivery.miner].hotkey), chunks)

    def _advance(self, round_: RoundSpec, stream, delivery: _Delivery) -> bool:
        """Take the next item of a ready result stream; True when the stream ended.

        Errors the miner raises because of a peer (a lost rank, a mismatch) are raised
        as themselves; anything else going wrong with the miner is a MinerFaultError."""
        with _miner_faults(delivery):
            try:
                item = next(stream)
            except StopIteration:
                delivery.buffers = [
                    f.result(timeout=max(delivery.deadline - time.monotonic(), 0)) for f in delivery.items
                ]
                return True
            receipt, result, batch = ray.get(item, timeout=max(delivery.deadline - time.monotonic(), 0))
        if delivery.receipt is None:
            self._check_receipt(round_, delivery, receipt)
        delivery.items.extend(prefetch(s) for s in self._check_result(round_, delivery, result, batch))
        return False

    def _fail(self, round_: RoundSpec, delivery: _Delivery, error: MinerFaultError) -> None:
        self._failed.add(delivery.miner)
        log.warning(
            "%s: miner %r %s; segment %d goes to the next miner",
            round_.describe(),
            round_.job.miners[delivery.miner].name,
            error,
            delivery.segment,
        )

    def _check_receipt(self, round_: RoundSpec, delivery: _Delivery, wire: bytes | None) -> None:
        """The first item of a miner's stream must carry its signed receipt of exactly what this peer sent."""
        slot, sent = round_.job.miners[delivery.miner], self._sent[(delivery.miner, delivery.segment)]
        if wire is None:
            raise MinerFaultError("sent results without a receipt")
        receipt, _ = self._open(wire, ContributionReceipt, slot.hotkey)
        expected = ContributionReceipt(
            sent.job_id, sent.seq, sent.kind, sent.op, sent.src, sent.miner, self.rank, sent.chunks, sent.segment
        )
        if receipt != expected:
            raise MinerFaultError("receipted another contribution")
        delivery.receipt = wire

    def _check_result(self, round_: RoundSpec, delivery: _Delivery, wire: bytes, batch: list) -> list:
        """The batch, if the miner's signed SegmentResult vouches for exactly these chunks."""
        result, _ = self._open(wire, SegmentResult, round_.job.miners[delivery.miner].hotkey)
        signed = (result.job_id, result.seq, result.miner, result.segment, result.rank, result.first_chunk)
        where = (round_.job.job_id, round_.seq, delivery.miner, delivery.segment, self.rank, len(delivery.items))
        prints = tuple(fingerprint(s) for s in batch)
        digests_expected = len(batch) if round_.job.redundancy > 1 else 0
        if signed != where or result.chunks != prints or len(result.digests) != digests_expected:
            raise MinerFaultError("signed other results than it sent")
        delivery.results.append((result, wire))
        return batch

    def _open(self, wire: bytes, kind: type, sender: str):
        try:
            return open_body(self._verifier, wire, kind, sender=sender)
        except MessageRejectedError as e:
            raise MinerFaultError(f"sent a message that fails its check: {e}") from None

    def _agreed(self, round_: RoundSpec, segment: int, deliveries: list[_Delivery], deadline: float) -> _Delivery:
        """The delivery of a segment this peer uses: the only one, or the one the replicas agree on,
        or, when their digests differ, the one the validator rules exact."""
        first = deliveries[0]
        if all(d.digests == first.digests and d.holds_its_digests for d in deliveries):
            return first
        ruling = self._dispute(round_, segment, deadline)
        winner = next((d for d in deliveries if d.miner == ruling.miner), None)
        if winner is None:
            raise MinerFaultError(
                f"{round_.describe()}: the miners of segment {segment} disagree and the validator found none "
                f"of them exact: {ruling.reason}"
            )
        return winner

    def _dispute(self, round_: RoundSpec, segment: int, deadline: float) -> Ruling:
        """Report the round, then ask the validator (by the round's deadline) which of the segment's
        miners is right."""
        if self._validator is None:
            raise MinerFaultError(f"{round_.describe()}: miners disagree on segment {segment} and no validator rules")
        self._report(round_)
        dispute = Dispute(round_.job.job_id, round_.seq, segment, self.rank)
        answer = get(
            self._validator.arbitrate.remote(self._seal(dispute, self._validator_hotkey)),
            max(deadline - time.monotonic(), 0),
            f"{round_.describe()}: asking the validator to rule on segment {segment}",
        )
        ruling, _ = open_body(self._verifier, answer, Ruling, sender=self._validator_hotkey)
        if (ruling.job_id, ruling.seq, ruling.segment) != (dispute.job_id, dispute.seq, segment):
            raise JobError(f"{round_.describe()}: the validator ruled on another segment")
        return ruling

    def _seal(self, body, receiver: str) -> bytes:
        return seal_body(self._identity.keypair, body, receiver)

    @contextmanager
    def _reporting(self, round_: RoundSpec) -> Iterator[None]:
        """Report the round to the validator when it ends, however it ends."""
        try:
            yield
        finally:
            self._report(round_)

    def _report(self, round_: RoundSpec) -> None:
        """Forward the miners' signed receipts and results, with this peer's chunks, to the validator,
        once per round.

        Fire and forget: the validator checks a random share of rounds after the fact;
        the chunks stay in the object store while it holds them. (The miners hand it
        the results themselves: refs that arrived in streamed items cannot be lent on.)
        """
        if self._validator is None or self._reported:
            return
        self._reported = True
        report = RoundReport(
            round_.job.job_id,
            round_.seq,
            self.rank,
            ray.get_runtime_context().get_node_id(),
            tuple(d.miner for d in self._delivered),
            tuple(d.receipt.decode() for d in self._delivered),
            tuple(tuple(wire.decode() for _, wire in d.results) for d in self._delivered),
            tuple(sorted(self._failed)),
        )
        wire = self._seal(report, self._validator_hotkey)
        self._validator.report.remote(wire, [self._shipped[d.segment] or [] for d in self._delivered])

    def _load_identity(self) -> Identity:
        if self.wallet is not None:
            return identity_of(self.wallet)
        if self.chain.backend != "embedded":
            raise WalletError(f"pass wallet= (a bittensor.Wallet registered on netuid {self.chain.netuid})")
        return identity_of(dev_peer_wallet(self.chain.state_path, self.rank))

    def _write(self, round_: RoundSpec, flat: FlatTensor, plan, results: dict[int, _Delivery]) -> None:
        """The final in-place write: check every segment's reduced chunks, then copy them in."""
        buffers = {seg.miner: results[seg.miner].buffers for seg in plan}
        for seg in plan:
            if len(buffers[seg.miner]) != len(seg.chunks):
                raise RoundMismatchError(f"{round_.describe()}: a miner returned another number of chunks than planned")
            for (a, b), buffer in zip(seg.chunks, buffers[seg.miner], strict=True):
                if buffer.size != (b - a) * flat.dtype.itemsize:
                    raise RoundMismatchError(
                        f"{round_.describe()}: a miner returned {buffer.size} bytes for elements {a}..{b - 1}"
                    )
        for seg in plan:
            for (a, b), buffer in zip(seg.chunks, buffers[seg.miner], strict=True):
                flat.flat[a:b].copy_(from_buffer(buffer, flat.dtype))
        flat.commit()


@dataclass
class _Delivery:
    """One miner reducing one segment of a round for this peer: what it signed, and the bytes it sent."""

    segment: int
    miner: int
    deadline: float
    receipt: bytes | None = None
    results: list[tuple[SegmentResult, bytes]] = field(default_factory=list)  # each signed result with its wire
    items: list = field(default_factory=list)  # futures of the result chunks' bytes, pulled as they stream in
    buffers: list = field(default_factory=list)  # their bytes, fetched when the stream ended

    @property
    def digests(self) -> tuple[str, ...]:
        return tuple(d for r, _ in self.results for d in r.digests)

    @property
    def holds_its_digests(self) -> bool:
        """Whether the fetched bytes are those the signed digests name (trivially so without digests)."""
        return not self.digests or tuple(blake3(b).hexdigest() for b in self.buffers) == self.digests


# Errors a miner raises because of the peers, not itself: every peer gets them as they are.
_PEER_FAULTS = (PeerLostError, RoundMismatchError, JobError, NonFiniteError, IdentityError, InvalidTensorError)


@contextmanager
def _miner_faults(delivery: _Delivery) -> Iterator[None]:
    """Errors of a miner's stream as MinerFaultError, except those that are the peers' (raised as they are)."""
    try:
        yield
    except RayTaskError as e:
        if isinstance(e.cause, _PEER_FAULTS):
            raise e.cause from None
        raise MinerFaultError(f"failed: {e.cause!r}"[:300]) from None
    except (RayActorError, ObjectLostError):
        raise MinerFaultError("died") from None
    except (GetTimeoutError, FetchTimeout):  # the builtin TimeoutError only from Python 3.11 on
        raise MinerFaultError("missed its deadline") from None


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
