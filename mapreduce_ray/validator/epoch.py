"""One scoring epoch: the ledger's measurements become EMA scores and then weights on the chain."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Mapping

from mapreduce_ray.chain import Chain
from mapreduce_ray.chain.base import U16_MAX
from mapreduce_ray.errors import RateLimitedError
from mapreduce_ray.validator.ledger import MinerLedger
from mapreduce_ray.validator.scoring import ScoringConfig, update_scores, weights_for

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class WeightsSet:
    """The weights a validator handed the chain: held now, or committed until the chain reveals them."""

    weights: dict[int, float]
    reveal_round: int | None = None  # on a commit-reveal subnet, the drand round at which the chain reveals them


def run_epoch(
    ledger: MinerLedger, chain: Chain, signer, config: ScoringConfig, online: Collection[int] | None = None
) -> WeightsSet | None:
    """Update and save the scores, set the weights on chain; what was set, or None when the chain's
    rate limit refused them (the scores are updated either way) or nobody earned any. A miner not
    `online` (None: all are) earns nothing this epoch, so its score decays."""
    records = [
        r if online is None or r.uid in online else dataclasses.replace(r, throughput=0.0) for r in ledger.records()
    ]
    scores = update_scores(ledger.scores(), records, config)
    ledger.save_scores(scores)
    ledger.epoch_at = chain.block()
    weights = {uid: w for uid, w in weights_for(scores, ledger.hosts()).items() if w > 0}
    if not weights:
        return None
    weights = enough_weights(weights, chain, signer.ss58_address)
    try:
        reveal_round = chain.set_weights(signer, weights)
    except RateLimitedError:
        return None
    ledger.weights_set_at = chain.block()
    return WeightsSet(weights, reveal_round)


def enough_weights(weights: Mapping[int, float], chain: Chain, hotkey: str) -> dict[int, float]:
    """`weights` (all positive) on at least the chain's MinAllowedWeights uids: when too few miners are scored,
    other uids (served endpoints first, then by uid) get the smallest weight the chain stores (1/U16_MAX of the
    largest), and when the subnet has too few uids for that, the validator weighs itself alone (which the chain
    allows), so its weights stay fresh until enough miners are scored."""
    need = chain.min_allowed_weights()
    if len(weights) >= need:
        return dict(weights)
    graph = chain.metagraph()
    own = graph.by_hotkey(hotkey)
    others = sorted(
        (n for n in graph.neurons if n.uid not in weights and n.hotkey != hotkey),
        key=lambda n: (n.endpoint is None, n.uid),
    )
    smallest = max(weights.values()) / U16_MAX
    padded = {**weights, **{n.uid: smallest for n in others[: need - len(weights)]}}
    if len(padded) >= need or own is None:
        log.warning(
            "%s asks for weights on at least %d uids and %d miners are scored; %d other uids get 1/%d of the "
            "largest weight until more miners are benchmarked",
            chain.describe(),
            need,
            len(weights),
            len(padded) - len(weights),
            U16_MAX,
        )
        return padded
    log.warning(
        "%s asks for weights on at least %d uids and has %d besides this validator; it weighs itself alone "
        "until more miners register",
        chain.describe(),
        need,
        len(graph.neurons) - 1,
    )
    return {own.uid: 1.0}
