"""A validator's party in its own Ray: the ValidatorActor (actor) serving its endpoint, and its collaborators,
each with its own state: jobs (JobBook), benchmarks (Benchmarks, run by the bots of actors.benchmark),
checks and rulings (Auditor, recomputing chunks as actors.validator.checks does), epochs (Epochs), and
the served miners (MinerDirectory)."""

from actors.validator.actor import MAX_CONCURRENCY, ValidatorActor, ValidatorEndpoint

__all__ = ["MAX_CONCURRENCY", "ValidatorActor", "ValidatorEndpoint"]
