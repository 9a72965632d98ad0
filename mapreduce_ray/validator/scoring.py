"""How a validator turns what it measured and verified about miners into weights.

Only measured or verified quantities count; nothing a miner reports about itself:

- throughput: bytes/s of the validator's own benchmark rounds through the miner,
  counted only when the result was exact;
- capacity: the largest benchmark size that passed;
- reliability: the fraction of assigned rounds finished before the deadline;
- strikes: a verified wrong result zeroes the score at once and bans the miner
  for a while.

    instant = throughput · min(1, capacity / capacity_target) · reliability
              (0 when struck, or when reliability < min_reliability)
    score   = (1 − α) · score + α · instant            (EMA; a strike or unreliability sets it to 0)
    host    : miners on one host (node or IP) share the best score among them, split
              evenly among those that earned any, so k uids on one machine earn no
              more than one
    weights = score / Σ score

Every function here is pure: no Ray, no I/O.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

MIB = 1024 * 1024


@dataclass(frozen=True)
class ScoringConfig:
    """How measurements become scores (the validator's `validator.scoring.*`)."""

    ema_alpha: float = 0.1  # weight of the newest instant score
    capacity_target: int = 64 * MIB  # capacity at which a miner gets full capacity credit
    min_reliability: float = 0.9  # below this on-time fraction a miner earns nothing

    def __post_init__(self):
        if not 0 < self.ema_alpha <= 1:
            raise ValueError(f"ema_alpha must be in (0, 1], got {self.ema_alpha}")
        if self.capacity_target <= 0 or not 0 <= self.min_reliability <= 1:
            raise ValueError("capacity_target must be positive and min_reliability in [0, 1]")


@dataclass(frozen=True)
class MinerRecord:
    """What the validator measured and verified about one uid since its last epoch."""

    uid: int
    host: str  # the node or IP the miner runs on
    throughput: float = 0.0  # bytes/s of exact benchmark rounds (0: none passed)
    capacity: int = 0  # bytes: the largest benchmark that passed
    rounds_assigned: int = 0
    rounds_on_time: int = 0
    struck: bool = False  # a verified mismatch, or banned

    @property
    def reliability(self) -> float:
        """On-time fraction of assigned rounds; a miner not yet given rounds is judged by its benchmarks alone."""
        return self.rounds_on_time / self.rounds_assigned if self.rounds_assigned else 1.0


def instant_score(record: MinerRecord, config: ScoringConfig) -> float:
    if record.struck or record.reliability < config.min_reliability:
        return 0.0
    capacity_credit = min(1.0, record.capacity / config.capacity_target)
    return max(record.throughput, 0.0) * capacity_credit * record.reliability


def update_scores(
    previous: Mapping[int, float], records: Iterable[MinerRecord], config: ScoringConfig
) -> dict[int, float]:
    """The EMA of instant scores per uid; a struck or unreliable miner drops to 0 at once.
    Uids without a record keep theirs."""
    scores = dict(previous)
    for record in records:
        instant = instant_score(record, config)
        old = scores.get(record.uid, 0.0)
        forfeits = record.struck or record.reliability < config.min_reliability
        scores[record.uid] = 0.0 if forfeits else (1 - config.ema_alpha) * old + config.ema_alpha * instant
    return scores


def share_hosts(scores: Mapping[int, float], hosts: Mapping[int, str]) -> dict[int, float]:
    """Miners on one host share the best score among them, split evenly among those that earned any."""
    members: dict[str, list[int]] = defaultdict(list)
    for uid in scores:
        members[hosts.get(uid, f"uid-{uid}")].append(uid)
    shared = {}
    for uids in members.values():
        earners = [uid for uid in uids if scores[uid] > 0]
        best = max((scores[uid] for uid in earners), default=0.0)
        shared.update({uid: best / len(earners) if uid in earners else 0.0 for uid in uids})
    return shared


def normalize(scores: Mapping[int, float]) -> dict[int, float]:
    """Weights summing to 1 (all zero when no miner earned anything)."""
    total = sum(max(s, 0.0) for s in scores.values())
    return {uid: (max(s, 0.0) / total if total > 0 else 0.0) for uid, s in scores.items()}


def weights_for(scores: Mapping[int, float], hosts: Mapping[int, str]) -> dict[int, float]:
    """The weights to set on chain for these EMA scores."""
    return normalize(share_hosts(scores, hosts))


def epoch_due(last_epoch_block: int | None, block: int, epoch_blocks: int) -> bool:
    """Whether a scoring epoch is due: the first one at once, then every `epoch_blocks` blocks."""
    return last_epoch_block is None or block - last_epoch_block >= epoch_blocks
