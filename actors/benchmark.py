"""BenchmarkActor: a validator's bot that measures one miner at a time with real rounds.

A bot is an actor in the validator's own Ray. The validator orders a benchmark (a one-miner
job it has admitted this bot's hotkey to at the miner, at every rank). The bot draws fresh random data from
the operating system's entropy for each rank, so no miner can know or cache it,
runs one all_reduce through the miner with every rank at once, times it end to
end over the miner's endpoint, compares every rank's result bit for bit with the
reference reduction, and answers with a BenchmarkResult.
"""

from __future__ import annotations

import secrets
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from mapreduce_ray.chain import ChainConfig
from mapreduce_ray.errors import MapReduceError, RoundMismatchError, RoundTimeoutError, WrongResultError
from mapreduce_ray.messages import BenchmarkResult, Outcome
from mapreduce_ray.peer import Peer
from mapreduce_ray.protocol import MetagraphCache, Verifier
from mapreduce_ray.reference import reference_reduce
from mapreduce_ray.sketch import SECRET_BYTES
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
        self._runs = 0

    def status(self) -> dict:
        return {"uid": self.uid, "hotkey": self._identity.hotkey, "runs": self._runs}

    def run(self, spec: JobSpec, size_bytes: int) -> BenchmarkResult:
        """Run one all_reduce of `size_bytes` per rank through the one miner of `spec`."""
        miner = spec.miners[0]
        generator = torch.Generator().manual_seed(secrets.randbits(63))
        numel = max(1, size_bytes // DTYPE.itemsize)
        tensors = [torch.randn(numel, generator=generator, dtype=DTYPE) for _ in range(spec.peer_count)]
        expected = reference_reduce(tensors, OP)
        peers = [Peer(rank, spec.peer_count, job=spec.name, wire=self._wire) for rank in range(1, spec.peer_count + 1)]
        secret = secrets.token_bytes(SECRET_BYTES)  # its results are checked as a live job's are
        for peer in peers:  # a verifier each: every rank gets the miner's messages, each sealed once for all
            peer.attach(spec, self._identity, Verifier(self._identity.hotkey, self._metagraph), secret=secret)
        start = time.perf_counter()
        try:
            with ThreadPoolExecutor(len(peers)) as pool:
                list(pool.map(lambda p: p.all_reduce(tensors[p.rank - 1], OP), peers))
            seconds = time.perf_counter() - start
            wrong = [r for r, t in enumerate(tensors, 1) if not torch.equal(t, expected)]
            outcome = Outcome.WRONG if wrong else Outcome.EXACT
            detail = f"rank(s) {wrong} got a result that differs from the reference" if wrong else ""
        except RoundTimeoutError as e:
            seconds, outcome, detail = time.perf_counter() - start, Outcome.LATE, str(e)
        except (RoundMismatchError, WrongResultError) as e:  # signed for other chunks, or failing the check
            seconds, outcome, detail = time.perf_counter() - start, Outcome.WRONG, str(e)
        except MapReduceError as e:
            seconds, outcome, detail = time.perf_counter() - start, Outcome.FAILED, str(e)
        finally:
            for peer in peers:
                peer.destroy_process_group()
        self._runs += 1
        return BenchmarkResult(miner.uid, miner.hotkey, numel * DTYPE.itemsize, seconds, outcome, detail)
