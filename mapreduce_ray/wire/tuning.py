"""The host TCP settings a miner's wire wants, and which of them this host lacks.

A miner sends each round's results over connections that were idle since the last round. By default
Linux restarts such a connection's congestion window from its initial size
(net.ipv4.tcp_slow_start_after_idle=1), so every round's results climb back to the link's rate through
slow start, one doubling per round trip, and those round trips are long: the peers' uplinks are full of
their chunks, queued ahead of the acknowledgements. Keeping the window saves that climb every round.
"""

from __future__ import annotations

from pathlib import Path

MINER_SYSCTLS = {"net.ipv4.tcp_slow_start_after_idle": "0"}
SYSCTL_ROOT = Path("/proc/sys")


def untuned(wanted: dict[str, str] = MINER_SYSCTLS, root: Path = SYSCTL_ROOT) -> dict[str, str]:
    """The settings of `wanted` this host has otherwise, with the values wanted (a setting this host does
    not have, or lets no one read, is left out)."""
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
