"""Where parties find each other: Ray actor names and the subnet's namespace."""

DEFAULT_NAMESPACE = "mapreduce"


def validator_name(uid: int) -> str:
    return f"validator-{uid}"


def miner_name(uid: int) -> str:
    return f"miner-{uid}"


def benchmark_name(uid: int) -> str:
    return f"benchmark-{uid}"
