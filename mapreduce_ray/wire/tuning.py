"""The host TCP settings a miner's wire wants, and which of them this host lacks.

A miner sends each round's results over connections that were idle since the last round. By default
Linux restarts such a connection's congestion window from its initial size
(net.ipv4.tcp_slow_start_after_idle=1), so every round's results climb back to the link's rate through
slow start, one doubling per round trip, and those round trips are long: the peers' uplinks are full of
their chunks, queued ahead of the acknowledgements. Keeping the window saves that climb every round.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

MINER_SYSCTLS: Mapping[str, str] = MappingProxyType({"net.ipv4.tcp_slow_start_after_idle": "0"})
SYSCTL_ROOT = Path("/proc/sys")


def untuned(wanted: Mapping[str, str] = MINER_SYSCTLS, root: Path = SYSCTL_ROOT) -> dict[str, str]:
    """Those of `wanted` this host sets to another value, each with the value wanted (a setting this host
    lacks, or lets no one read, is skipped)."""
    lacking = {}
    for key, value in wanted.items():
        try:
            current = (root / key.replace(".", "/")).read_text().strip()
        except OSError:
            continue
        if current != value:
            lacking[key] = value
    return lacking


def advice(lacking: dict[str, str]) -> str:
    """One line telling a miner's operator how to set what `lacking` names (as returned by `untuned`)."""
    settings = " ".join(f"{key}={value}" for key, value in lacking.items())
    return (
        f"this host restarts idle TCP connections from slow start, so every round's results start slowly: "
        f"run `sysctl -w {settings}` as root (README: Running the parties)"
    )
