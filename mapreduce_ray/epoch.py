"""One scoring epoch: the ledger's measurements become EMA scores and then weights on the chain."""

from __future__ import annotations

from mapreduce_ray.chain import Chain
from mapreduce_ray.errors import RateLimitedError
from mapreduce_ray.ledger import MinerLedger
from mapreduce_ray.scoring import ScoringConfig, update_scores, weights_for


def run_epoch(ledger: MinerLedger, chain: Chain, signer, config: ScoringConfig) -> dict[int, float] | None:
    """Update and save the scores, set the weights on chain; the weights, or None when the chain's
    rate limit refused them (the scores are updated either way) or nobody earned any."""
    scores = update_scores(ledger.scores(), ledger.records(), config)
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
