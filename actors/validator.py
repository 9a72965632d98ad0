"""ValidatorActor: admits peers to jobs. Peers join a job by name and rank.

A peer sends a signed JobRequest; the validator checks it against the metagraph,
picks the job's miners (neurons without a validator permit that announced an
endpoint and run a miner actor in this namespace), sends every miner a signed
JobAdmission for that peer, and answers the peer with the same admission signed
for it. On start it announces its endpoint on the chain, like a miner.
Benchmarking, verifying and scoring miners build on this.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import ray

from actors.node import node_endpoint
from mapreduce_ray.chain import ChainConfig
from mapreduce_ray.errors import JobError, NoValidatorPermitError
from mapreduce_ray.messages import JobAdmission, JobLeave, JobRequest, open_body, seal_body
from mapreduce_ray.naming import miner_name
from mapreduce_ray.protocol import MetagraphCache, Verifier
from mapreduce_ray.remote import get
from mapreduce_ray.types import JobSpec, MinerSlot
from mapreduce_ray.wallets import WalletConfig, load_identity


@dataclass
class _Job:
    spec: JobSpec
    miners: list  # actor handles, in spec.miners order
    ranks: dict[int, str] = field(default_factory=dict)  # rank -> peer hotkey


class ValidatorActor:
    """Create with `ray.remote(ValidatorActor).options(name=validator_name(uid), namespace=...).remote(...)`.

    miner_weights: {uid: weight} sizing the miners' segments (None: equal).
    """

    def __init__(
        self,
        wallet: WalletConfig,
        chain: ChainConfig,
        namespace: str,
        chunk_bytes: int,
        timeout_s: float,
        miner_weights: dict[int, float] | None = None,
    ):
        if chunk_bytes < 1 or timeout_s <= 0:
            raise ValueError(f"chunk_bytes and timeout_s must be positive, got {chunk_bytes}, {timeout_s}")
        self._identity = load_identity(wallet)
        self._chain = chain.open()
        self._metagraph = MetagraphCache(self._chain)
        me = self._metagraph.get(refresh=True).by_hotkey(self._identity.hotkey)
        if me is None:
            raise self._chain.not_registered(self._identity.hotkey, wallet)
        self.uid = me.uid
        if not me.validator_permit:
            raise NoValidatorPermitError(
                f"validator uid {self.uid} ({self._identity.hotkey}) holds no validator permit on "
                f"{self._chain.describe()}; permits go to the top stakers: add stake to its hotkey"
            )
        self._verifier = Verifier(self._identity.hotkey, self._metagraph)
        self._chain.serve(self._identity.keypair, node_endpoint())
        self._namespace = namespace
        self._chunk_bytes = chunk_bytes
        self._timeout_s = timeout_s
        self._miner_weights = dict(miner_weights or {})
        self._jobs: dict[str, _Job] = {}

    def join(self, wire: bytes) -> bytes:
        """Admit the sender of a signed JobRequest; returns the JobAdmission signed for it."""
        request, envelope = open_body(self._verifier, wire, JobRequest)
        name, rank, peer = request.job, request.rank, envelope.sender
        job = self._jobs.get(name) or self._new_job(name, request.peer_count)
        if job.spec.peer_count != request.peer_count:
            raise JobError(
                f"job {name!r} has {job.spec.peer_count} peers but rank {rank} says {request.peer_count}; "
                "pass the same peer_count on every peer"
            )
        if rank in job.ranks:
            raise JobError(
                f"rank {rank} already joined job {name!r}; a rank joins once: call destroy_process_group() "
                "first, or use another job name"
            )
        if peer in job.ranks.values():
            raise JobError(f"hotkey {peer} already holds a rank in job {name!r}; each peer needs its own hotkey")
        admission = JobAdmission(job.spec, rank, peer)
        calls = [
            handle.admit.remote(seal_body(self._identity.keypair, admission, slot.hotkey))
            for slot, handle in zip(job.spec.miners, job.miners, strict=True)
        ]
        get(calls, self._timeout_s, f"admitting rank {rank} to job {name!r} at its miners")
        self._jobs[name] = job
        job.ranks[rank] = peer
        return seal_body(self._identity.keypair, admission, peer)

    def leave(self, wire: bytes) -> None:
        """Remove the sender of a signed JobLeave; the job ends when its last peer leaves."""
        leave, envelope = open_body(self._verifier, wire, JobLeave)
        for name, job in list(self._jobs.items()):
            if job.spec.job_id == leave.job_id and job.ranks.get(leave.rank) == envelope.sender:
                del job.ranks[leave.rank]
                if not job.ranks:
                    del self._jobs[name]

    def jobs(self) -> list[dict]:
        return [
            {"name": name, "job_id": j.spec.job_id, "peer_count": j.spec.peer_count, "ranks": sorted(j.ranks)}
            for name, j in self._jobs.items()
        ]

    def status(self) -> dict:
        return {"uid": self.uid, "hotkey": self._identity.hotkey, "jobs": len(self._jobs)}

    def _new_job(self, name: str, peer_count: int) -> _Job:
        slots, handles = [], []
        for neuron in self._metagraph.get(refresh=True).neurons:
            if neuron.endpoint is None or neuron.validator_permit:
                continue
            try:
                handles.append(ray.get_actor(miner_name(neuron.uid), namespace=self._namespace))
            except ValueError:
                continue  # registered and announced, but not running here
            slots.append(MinerSlot(neuron.uid, neuron.hotkey, self._miner_weights.get(neuron.uid, 1.0)))
        if not slots:
            raise JobError(
                f"no miner of {self._chain.describe()} runs in Ray namespace {self._namespace!r}; "
                "start one: python -m jobs.miner +wallet=NAME"
            )
        spec = JobSpec(
            job_id=uuid.uuid4().hex[:12],
            name=name,
            namespace=self._namespace,
            peer_count=peer_count,
            miners=tuple(slots),
            chunk_bytes=self._chunk_bytes,
            timeout_s=self._timeout_s,
        )
        return _Job(spec, handles)
