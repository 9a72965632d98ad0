"""BenchmarkActor: a validator's bot that plays one rank of a benchmark of a miner.

A bot is an actor in the validator's own Ray, with a hotkey of its own. To benchmark a miner the
validator admits a one-miner job with a different bot at every rank, as a live job has a trainer
at every rank, and has each bot run its rank. Every bot draws every rank's data from one seed the
validator drew from the operating system's entropy (so no miner can know or cache it, and each bot
knows the reference), runs one all_reduce through the miner over its endpoint, timing it end to
end, compares its result bit for bit with the reference reduction, and answers with a
BenchmarkResult; the validator combines the ranks' answers.
"""

from __future__ import annotations

import time

import torch

from mapreduce_ray.chain import ChainConfig
from mapreduce_ray.errors import MapReduceError, RoundMismatchError, RoundTimeoutError, WrongResultError
from mapreduce_ray.messages import BenchmarkResult, Outcome
from mapreduce_ray.peer import Peer
from mapreduce_ray.protocol import MetagraphCache, Verifier
from mapreduce_ray.reference import reference_reduce
from mapreduce_ray.types import JobSpec
from mapreduce_ray.wallets import WalletConfig, load_identity
from mapreduce_ray.wire.config import WireConfig

DTYPE = torch.float32
OP = "avg"


class BenchmarkActor:
    """Create with `ray.remote(BenchmarkActor).options(name=benchmark_name(uid), ...).remote(wallet, chain)`."""

    def __init__(self, wallet: WalletConfig, chain: ChainConfig, wire: WireConfig | None = None):
        torch.set_num_threads(1)
        self._wire = wire or WireConfig()
        self._identity = load_identity(wallet)
        client = chain.open()
        self.uid = client.require_uid(self._identity.hotkey, wallet)
        self._metagraph = MetagraphCache(client)
        self._netuid = chain.netuid
        self._runs = 0

    def status(self) -> dict:
        return {"uid": self.uid, "hotkey": self._identity.hotkey, "runs": self._runs}

    def run(self, spec: JobSpec, size_bytes: int, rank: int, seed: int, secret: bytes) -> BenchmarkResult:
        """Play `rank` of one all_reduce of `size_bytes` per rank through the one miner of `spec`: every rank's
        data comes from `seed`, and the job's results are checked with `secret`, as a live job's are."""
        miner = spec.miners[0]
        generator = torch.Generator().manual_seed(seed)
        numel = max(1, size_bytes // DTYPE.itemsize)
        tensors = [torch.randn(numel, generator=generator, dtype=DTYPE) for _ in range(spec.peer_count)]
        expected = reference_reduce(tensors, OP)
        mine = tensors[rank - 1]
        del tensors
        peer = Peer(rank, spec.peer_count, job=spec.name, wire=self._wire, netuid=self._netuid)
        peer.attach(spec, self._identity, Verifier(self._identity.hotkey, self._metagraph), secret=secret)
        started_at, start = time.time(), time.perf_counter()
        try:
            peer.all_reduce(mine, OP)
            seconds = time.perf_counter() - start
            outcome = Outcome.EXACT if torch.equal(mine, expected) else Outcome.WRONG
            detail = "" if outcome is Outcome.EXACT else f"rank {rank} got a result that differs from the reference"
        except RoundTimeoutError as e:
            seconds, outcome, detail = time.perf_counter() - start, Outcome.LATE, str(e)
        except (RoundMismatchError, WrongResultError) as e:  # signed for other chunks, or failing the check
            seconds, outcome, detail = time.perf_counter() - start, Outcome.WRONG, str(e)
        except MapReduceError as e:
            seconds, outcome, detail = time.perf_counter() - start, Outcome.FAILED, str(e)
        finally:
            peer.destroy_process_group()
        self._runs += 1
        return BenchmarkResult(miner.uid, miner.hotkey, numel * DTYPE.itemsize, seconds, outcome, detail, started_at)
