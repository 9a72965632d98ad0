"""python -m jobs.local: on a running subnet, and its errors the way a user sees them."""

import subprocess
import sys

import pytest

from jobs.local import check_config, format_table, run


def run_job(cwd, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs.local", f"hydra.run.dir={cwd}", *overrides],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_local_job_checks_and_times_every_round(subnets, job_config):
    cfg = job_config("local", "topology.peers=3", "size_mib=1", "rounds=2", "dtype=bfloat16", subnet=subnets[2])
    lines = format_table(run(cfg)).splitlines()
    assert lines[0].split() == [
        "collective",
        "size",
        "peers",
        "miners",
        "rounds",
        "median",
        "ms",
        "algbw",
        "GB/s",
        "busbw",
        "GB/s",
        "check",
    ]
    assert lines[1].split()[:7] == ["broadcast", "1", "MiB", "bfloat16", "3", "2", "1"]
    assert lines[2].split()[:8] == ["all_reduce", "avg", "1", "MiB", "bfloat16", "3", "2", "2"]
    assert lines[1].endswith("exact") and lines[2].endswith("exact")


def test_impossible_settings_are_one_clear_line(tmp_path, job_config):
    done = run_job(tmp_path, "dtype=int32", "op=avg")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == "error: op=avg of int32 would truncate; pass op=sum"
    with pytest.raises(ValueError, match=r"^validator.benchmark.size_mib must be positive, got 0.0$"):
        check_config(job_config("local", "validator.benchmark.size_mib=0"))
    with pytest.raises(ValueError, match=r"^validator.benchmark.best_of must be at least 1, got 0$"):
        check_config(job_config("local", "validator.benchmark.best_of=0"))
