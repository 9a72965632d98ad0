"""One scoring epoch: the ledger's measurements become EMA scores and then weights on the chain."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

from mapreduce_ray.chain import Chain
from mapreduce_ray.errors import RateLimitedError
from mapreduce_ray.ledger import MinerLedger
from mapreduce_ray.scoring import ScoringConfig, update_scores, weights_for


def run_epoch(
    ledger: MinerLedger, chain: Chain, signer, config: ScoringConfig, online: Collection[int] | None = None
) -> dict[int, float] | None:
    """Update and save the scores, set the weights on chain; the weights, or None when the chain's
    rate limit refused them (the scores are updated either way) or nobody earned any. A miner not
    `online` (None: all are) earns nothing this epoch, so its score decays."""
    records = [
        r if online is None or r.uid in online else dataclasses.replace(r, throughput=0.0) for r in ledger.records()
    ]
    scores = update_scores(ledger.scores(), records, config)
    ledger.save_scores(scores)
    ledger.epoch_at = chain.block()
    weights = weights_for(scores, ledger.hosts())
    if not any(weights.values()):
        return None
    try:
        chain.set_weights(signer, weights)
    except RateLimitedError:
        return None
    ledger.weights_set_at = chain.block()
    return weights
