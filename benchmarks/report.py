"""How benchmarks print their tables and append them, with the command and the machine, to RESULTS.md."""

from __future__ import annotations

import datetime
import os
import platform
import sys

import ray
import torch


def markdown_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = [header, ("---",) * len(header), *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def append_run(path: str, title: str, table: str, notes: str = "", command: str = "python") -> None:
    """Append a section: today's date and `title`, the command line that ran (`command` and this script's
    arguments), the machine, `notes` and the table."""
    with open(path, "a") as f:
        f.write(
            f"\n## {datetime.date.today().isoformat()}: {title}\n\n"
            f"Command: `{command} {' '.join(sys.argv)}`  \n"
            f"Machine: {os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}, "
            f"ray {ray.__version__}, torch {torch.__version__}" + (f"  \n{notes}" if notes else "") + f"\n\n{table}\n"
        )
