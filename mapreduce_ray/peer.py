"""The Peer API: a trainer's handle on a job, in the shape of the seed's `Peer`.

A peer joins a job through a validator's endpoint (its address and hotkey are on chain): a
btauth-signed JobRequest, answered with a JobAdmission the validator signs, naming the job's
miners and their endpoints. It then keeps one job stream open to each miner it needs
(mapreduce_ray.links) and runs each collective as one `Round` (mapreduce_ray.rounds). After a
round it tells the validator, off the critical path, which miners delivered and which failed.
Nothing here needs Ray: a peer runs in any process that reaches the endpoints.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from mapreduce_ray.chain import DEFAULT_NETUID, ChainConfig
from mapreduce_ray.errors import (
    EndpointError,
    InvalidTensorError,
    JobError,
    MapReduceError,
    NotRegisteredError,
    NoValidatorPermitError,
    UnsupportedDtypeError,
    WalletError,
)
from mapreduce_ray.links import JobLinks
from mapreduce_ray.messages import (
    REPORT_BATCH,
    BenchmarkRequest,
    Dispute,
    Excluded,
    JobAdmission,
    JobLeave,
    JobRequest,
    Measurements,
    MinerMeasurement,
    Reports,
    RoundReport,
    Ruling,
    encode,
    open_body,
)
from mapreduce_ray.metrics import record_round
from mapreduce_ray.protocol import METAGRAPH_MISS_REFRESH_S, MetagraphCache, Verifier
from mapreduce_ray.rounds import Round
from mapreduce_ray.shards import FlatTensor, Tensor, flatten
from mapreduce_ray.sketch import Sketcher
from mapreduce_ray.types import JobSpec, ReduceOp, RoundKind, RoundSpec, TensorSpec
from mapreduce_ray.wallets import Identity, dev_peer_wallet, identity_of
from mapreduce_ray.wire.config import WireConfig
from mapreduce_ray.wire.endpoint import Remote

log = logging.getLogger(__name__)

REPORT_INTERVAL_S = 0.5  # a peer reports fewer rounds than a batch to the validator at most this often
REPORTS_QUEUED = 8 * REPORT_BATCH  # round reports a peer keeps while the validator is slow to take them


class Peer:
    """One of `peer_count` trainers (ranks 1..peer_count) averaging tensors through miners.

    rank, peer_count: this process's rank and the number of peers in the job.
    bandwidth: the largest tensor, in bytes, this peer will hand in (None: no limit).
    wallet: a bittensor.Wallet, a hotkey Keypair or a WalletConfig whose hotkey is
        registered on the subnet. None on the embedded chain: the development wallet
        dev-peer/rank-{rank} that a local subnet registers.
    validator_uid: the validator to ask for the job (its endpoint is read from the chain).
    network: "embedded" (the offline chain in `state_dir`), or a bittensor network:
        finney, test, local, or a ws:// or wss:// URL.
    port_range: "first:last", the seed's firewall rule: the local ports a party's endpoints may bind
        (`wire.port_range` of miners and validators). A peer binds none: it only dials out to the validator's
        and the miners' endpoints, so it needs no open port, and its range is only checked.
    benchmark_max_size: the largest benchmark, in bytes per rank, this job lets the validator run on its
        miners: when `bandwidth` is over their verified capacity they are benchmarked at the size the job
        needs, up to this, instead of the job being refused; `request_benchmark()` runs within it too.
        None: up to `bandwidth`; 0: none.
    netuid: the subnet. state_dir: the embedded chain's directory (None: the default).
    job: peers that use the same job name (and validator) form one job.
    connect_timeout_s: deadline for joining (which may wait for benchmarks on demand) and leaving the job.
    redundancy: how many miners reduce each segment; peers compare their digests and the
        validator rules when they differ (the first peer to join sets it for the job).
    reject_nonfinite: miners refuse NaN and Inf, naming the peer that handed them in; by
        default they propagate as in torch.distributed.
    verify_results: every reduced chunk is checked before use against sketches its peers sealed with a
        secret miners never see (mapreduce_ray.sketch); a chunk that fails goes to the next miner. False
        (every peer of the job alike) skips the checks and their cost, and miners can see that it does.
    wire: limits and deadlines of this peer's calls (mapreduce_ray.wire.WireConfig).
    """

    def __init__(
        self,
        rank: int,
        peer_count: int,
        bandwidth: int | None = None,
        wallet=None,
        validator_uid: int = 0,
        network: str = "embedded",
        port_range: str | None = None,
        benchmark_max_size: int | None = None,
        *,
        netuid: int = DEFAULT_NETUID,
        state_dir: str | Path | None = None,
        job: str = "default",
        connect_timeout_s: float = 120.0,
        redundancy: int = 1,
        reject_nonfinite: bool = False,
        verify_results: bool = True,
        wire: WireConfig | None = None,
    ):
        if not isinstance(peer_count, int) or peer_count < 1:
            raise ValueError(f"peer_count must be a positive int, got {peer_count!r}")
        if not isinstance(rank, int) or not 1 <= rank <= peer_count:
            raise ValueError(f"rank must be an int in 1..{peer_count}, got {rank!r}")
        if bandwidth is not None and bandwidth <= 0:
            raise ValueError(f"bandwidth must be a positive number of bytes or None, got {bandwidth!r}")
        if not isinstance(redundancy, int) or redundancy < 1:
            raise ValueError(f"redundancy must be an int >= 1, got {redundancy!r}")
        if benchmark_max_size is not None and (not isinstance(benchmark_max_size, int) or benchmark_max_size < 0):
            raise ValueError(f"benchmark_max_size must be an int >= 0 (bytes) or None, got {benchmark_max_size!r}")
        self.rank = rank
        self.peer_count = peer_count
        self.bandwidth = bandwidth
        self.redundancy = redundancy
        self.reject_nonfinite = reject_nonfinite
        self.verify_results = verify_results
        self.wallet = wallet
        self.validator_uid = validator_uid
        self.chain = chain_config(network, netuid, state_dir)
        self.job = job
        self.connect_timeout_s = connect_timeout_s
        self.benchmark_max_size = benchmark_max_size
        self.wire = wire or WireConfig()
        if port_range is not None:
            self.wire = replace(self.wire, port_range=port_range)
        self.spec: JobSpec | None = None
        self._identity: Identity | None = None
        self._verifier: Verifier | None = None
        self._validator: Remote | None = None
        self._links: JobLinks | None = None
        self._reports: _Reporter | None = None
        self._sketcher: Sketcher | None = None
        self._excluded: frozenset[int] = frozenset()  # the job's miners the validator told this peer it struck
        self._left_out: frozenset[int] = frozenset()  # the job's miners every peer leaves out (checked jobs)
        self._seq = 0

    def init_process_group(self) -> JobSpec:
        """Join the job through the validator (signed request, signed admission)."""
        if self.spec is not None:
            raise JobError(f"rank {self.rank} already joined job {self.job!r}; call destroy_process_group() first")
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
        if validator.endpoint is None:
            raise EndpointError(
                f"validator uid {self.validator_uid} announced no endpoint on {chain.describe()}: it is not "
                "running; start it (python -m jobs.validator), or pass another validator_uid"
            )
        verifier = Verifier(identity.hotkey, metagraph)
        who = f"validator uid {self.validator_uid}"
        remote = Remote(
            who,
            validator.endpoint,
            validator.hotkey,
            identity.keypair,
            self.wire,
            validator.certificate,
            netuid=chain.netuid,
        )
        request = JobRequest(
            self.job,
            self.rank,
            self.peer_count,
            self.bandwidth,
            self.redundancy,
            self.reject_nonfinite,
            self.benchmark_max_size,
            self.verify_results,
        )
        try:
            answer = remote.call("join", encode(request), self.connect_timeout_s)
        except NotRegisteredError:  # registered since the validator last read the chain: it reads it again soon
            time.sleep(METAGRAPH_MISS_REFRESH_S)
            answer = remote.call("join", encode(request), self.connect_timeout_s)
        admission, _ = open_body(verifier, answer, JobAdmission, sender=validator.hotkey)
        if (admission.rank, admission.peer, admission.spec.name) != (self.rank, identity.hotkey, self.job):
            raise JobError(f"validator uid {self.validator_uid} admitted someone else; refusing its job spec")
        return self.attach(admission.spec, identity, verifier, remote, bytes.fromhex(admission.secret))

    def attach(
        self,
        spec: JobSpec,
        identity: Identity,
        verifier: Verifier,
        validator: Remote | None = None,
        secret: bytes = b"",
    ) -> JobSpec:
        """Take part in a job admitted by other means (a benchmark bot's); rounds are reported to
        `validator` when given, and results checked with the job's `secret` when given (every peer of the
        job holds the same one, or none)."""
        self._identity, self._verifier, self._validator = identity, verifier, validator
        self._sketcher = Sketcher(secret, spec.job_id) if secret else None
        self._excluded = self._left_out = frozenset()
        self.spec = spec
        self._links = JobLinks(spec, self.rank, identity.keypair, verifier, self.wire, self._miner_remote)
        self._reports = _Reporter(self._send_reports) if validator is not None else None
        self._seq = 0
        return spec

    def destroy_process_group(self) -> None:
        """Leave the job, which ends it for every peer: the miners see this peer's streams end, and the
        validator frees the job's miners."""
        spec, links, reports, self.spec, self._links, self._reports = (
            self.spec,
            self._links,
            self._reports,
            None,
            None,
            None,
        )
        if spec is None:
            return
        links.close()
        if reports is not None:
            reports.close(self.connect_timeout_s)
        if self._validator is not None:
            self._validator.call("leave", encode(JobLeave(spec.job_id, self.rank)), self.connect_timeout_s)

    def request_benchmark(self, timeout_s: float | None = None) -> tuple[MinerMeasurement, ...]:
        """Ask the validator to benchmark this job's miners now (each at the larger of its usual size and the
        capacity it holds for the job, within `benchmark_max_size`), and return how each did: outcome, throughput
        in bytes/s per rank, verified capacity in bytes. Call it between rounds: the job's miners serve the
        benchmark then. `timeout_s`: the deadline (default: the job's round deadline, twice)."""
        if self.spec is None or self._validator is None:
            raise JobError(f"rank {self.rank} has not joined a job through a validator; call init_process_group()")
        request = BenchmarkRequest(self.spec.job_id, self.rank)
        deadline = 2 * self.spec.timeout_s if timeout_s is None else timeout_s
        answer = self._validator.call("benchmark", encode(request), deadline)
        measured, _ = open_body(self._verifier, answer, Measurements, sender=self._validator.hotkey)
        if measured.job_id != self.spec.job_id:
            raise JobError(f"validator uid {self.validator_uid} answered with another job's benchmarks")
        return measured.miners

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
        self._run(self._next_round(RoundKind.ALL_REDUCE, op, None, flat.spec), flat)
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
        spec = self._next_round(RoundKind.BROADCAST, None, src, flat.spec if is_source else None)
        return self._run(spec, flat).source

    def _run(self, spec: RoundSpec, flat: FlatTensor | None) -> FlatTensor:
        """Run one round; the flat tensor written (a new one for a broadcast receiver that passed none)."""
        dispute = self._dispute if self._validator else None
        # in a checked job every peer leaves a struck miner out from the round after its verdicts all told of it,
        # so all peers leave it out from the same round; otherwise each as soon as the validator says so
        excluded = self._left_out if self._sketcher is not None else self._excluded
        round_ = Round(
            spec, self.rank, self._links, flat, dispute, self._sketcher, excluded, self._excluded, self.bandwidth
        )
        try:
            round_.run()
        finally:
            if round_.left_out - self._left_out:
                names = [spec.job.miners[m].name for m in sorted(round_.left_out - self._left_out)]
                log.warning("job %r: every peer leaves out miner(s) %s from now on", self.job, names)
                self._left_out |= round_.left_out
            if self._reports is not None and not round_.reported:
                if round_.wrong:  # evidence: the validator rules now, and the next round leaves the miner out
                    self._report_now(round_.report())
                else:
                    self._reports.put(round_.report())
        record_round(spec, self.rank, round_.tensor.nbytes, time.monotonic() - round_.started)
        return round_.flat

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
        return RoundSpec(self.spec, self._seq, kind, op, src, tensor)

    def _miner_remote(self, index: int) -> Remote:
        slot = self.spec.miners[index]
        keypair = self._identity.keypair
        who = f"miner {slot.name!r}"
        return Remote(who, slot.endpoint, slot.hotkey, keypair, self.wire, slot.certificate, netuid=self.chain.netuid)

    def _dispute(self, round_: Round, segment: int) -> Ruling:
        """Report the round, then ask the validator, by the round's deadline, which of the segment's miners is
        right."""
        if not round_.reported:
            self._send_reports((round_.report(),))
            round_.reported = True
        dispute = Dispute(self.spec.job_id, round_.spec.seq, segment, self.rank)
        answer = self._validator.call("dispute", encode(dispute), max(round_.deadline - time.monotonic(), 0.001))
        ruling, _ = open_body(self._verifier, answer, Ruling, sender=self._validator.hotkey)
        if (ruling.job_id, ruling.seq, ruling.segment) != (dispute.job_id, dispute.seq, segment):
            raise JobError(f"round {dispute.seq} of job {self.job!r}: the validator ruled on another segment")
        return ruling

    def _send_reports(self, reports: tuple[RoundReport, ...]) -> None:
        """Hand the validator round reports; its answer names the job's miners it struck, left out from now on."""
        answer = self._validator.call("report", encode(Reports(reports)))
        excluded, _ = open_body(self._verifier, answer, Excluded, sender=self._validator.hotkey)
        if self.spec is not None and excluded.job_id == self.spec.job_id:
            if excluded.miners != tuple(sorted(self._excluded)):
                log.warning("the validator struck miner(s) %s of job %r: they are left out", excluded.miners, self.job)
            self._excluded = frozenset(excluded.miners)

    def _report_now(self, report: RoundReport) -> None:
        try:
            self._send_reports((report,))
        except MapReduceError as e:
            log.warning("round %d's report, with evidence of wrong results, went unsent: %s", report.seq, e)

    def _load_identity(self) -> Identity:
        if self.wallet is not None:
            return identity_of(self.wallet)
        if self.chain.backend != "embedded":
            raise WalletError(f"pass wallet= (a bittensor.Wallet registered on netuid {self.chain.netuid})")
        try:
            return identity_of(dev_peer_wallet(self.chain.state_path, self.rank))
        except WalletError:
            raise WalletError(
                f"no development wallet for rank {self.rank} in {self.chain.state_path}: start the local subnet with "
                f"peers >= {self.rank}, or make and register one: python -m jobs.register +wallet=dev-peer "
                f"wallet.hotkey=rank-{self.rank}"
            ) from None


class _Reporter:
    """Sends round reports to the validator (with `send`) on a thread of its own, together: a full batch at once,
    a partial one at most every REPORT_INTERVAL_S. No round waits for the validator, and the validator gets one
    call per while or per REPORT_BATCH rounds, not one per round. At most REPORTS_QUEUED wait; more go
    unreported."""

    def __init__(self, send: Callable[[tuple[RoundReport, ...]], None]):
        self._send_batch = send
        self._queue: queue.Queue = queue.Queue(REPORTS_QUEUED)
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._send, name="round-reports", daemon=True)
        self._thread.start()

    def put(self, report: RoundReport) -> None:
        try:
            self._queue.put_nowait(report)
        except queue.Full:
            log.warning("the validator is behind; round %d goes unreported", report.seq)

    def close(self, timeout_s: float) -> None:
        """Send what is queued, within `timeout_s`."""
        self._closing.set()
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _send(self) -> None:
        while True:
            batch = [self._queue.get()]
            while not self._queue.empty() and len(batch) < REPORT_BATCH:
                batch.append(self._queue.get_nowait())
            reports = tuple(r for r in batch if r is not None)
            if reports:
                try:
                    self._send_batch(reports)
                except MapReduceError as e:
                    log.warning("%d round report(s) went unsent: %s", len(reports), e)
            if None in batch:
                return
            if len(batch) < REPORT_BATCH:  # rounds come slowly: let them gather
                self._closing.wait(REPORT_INTERVAL_S)


def chain_config(network: str, netuid: int, state_dir: str | Path | None) -> ChainConfig:
    """The chain a `network` name means: "embedded", or a bittensor network."""
    if network == "embedded":
        return ChainConfig(netuid=netuid, state_dir=None if state_dir is None else str(state_dir))
    return ChainConfig(backend="bittensor", network=network, netuid=netuid)
