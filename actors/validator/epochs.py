"""A validator's scoring epochs: every `epoch_blocks` blocks the ledger's measurements become EMA
scores and weights on chain (mapreduce_ray.validator.epoch), and what the chain holds is read back."""

from __future__ import annotations

import threading

from actors.validator.directory import MinerDirectory
from mapreduce_ray.chain.base import Chain
from mapreduce_ray.metrics import record_scores
from mapreduce_ray.validator.config import ValidatorConfig
from mapreduce_ray.validator.epoch import WeightsSet, run_epoch
from mapreduce_ray.validator.ledger import MinerLedger
from mapreduce_ray.validator.scoring import epoch_due


class Epochs:
    """The epochs of validator `uid` (signing with `keypair`) on `chain`, scoring the miners `miners` serves."""

    def __init__(
        self, config: ValidatorConfig, ledger: MinerLedger, chain: Chain, miners: MinerDirectory, keypair, uid: int
    ):
        self.config, self.ledger, self.chain, self.miners = config, ledger, chain, miners
        self._keypair, self._uid = keypair, uid
        self._lock = threading.Lock()
        self.done = 0
        self._held = chain.weights().get(uid, {})  # as the chain stores them; set before a restart, too
        self._committed: WeightsSet | None = None  # weights the chain has yet to reveal

    def due(self) -> bool:
        return epoch_due(self.ledger.epoch_at, self.chain.block(), self.config.epoch_blocks)

    def run(self) -> dict[int, float]:
        """Score the miners and set weights now (when the chain allows); the weights set, or {}."""
        online = set(self.miners.miners)
        done = run_epoch(self.ledger, self.chain, self._keypair, self.config.scoring, online)
        held = self.chain.weights().get(self._uid, {})  # as the chain quantized them
        with self._lock:
            self.done += 1
            self._held = held
            if done is not None:
                self._committed = done if done.reveal_round is not None else None
        record_scores(self.chain.netuid, self.ledger.scores(), held)  # replaced, never changed in place
        return done.weights if done else {}

    def status(self) -> dict:
        """The weights the chain holds, and on a commit-reveal subnet the ones it has yet to reveal beside them."""
        with self._lock:
            committed = self._committed
            return {
                "weights": dict(self._held),
                "weights_committed": None if committed is None else dict(committed.weights),
                "reveal_round": None if committed is None else committed.reveal_round,
                "weights_set_at": self.ledger.weights_set_at,
                "epochs": self.done,
            }
