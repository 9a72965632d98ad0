"""The README's cluster path: `ray start --head`, then `ray job submit ... python -m jobs.train ray.address=auto`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ray_head

REPO = Path(__file__).parent.parent
BIN = Path(sys.executable).parent
JOB_TIMEOUT_S = 420


@pytest.fixture
def head_with_dashboard():
    """A Ray head whose processes find this environment's `python` first, as in an activated virtualenv."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    with ray_head(env, dashboard=True) as head:
        yield head, env


def test_the_training_job_submitted_to_a_ray_head_succeeds(head_with_dashboard):
    head, env = head_with_dashboard
    submit = [str(BIN / "ray"), "job", "submit", "--address", head.dashboard, "--working-dir", ".", "--"]
    job = ["python", "-m", "jobs.train", "ray.address=auto"]  # as in the README, then a shorter run
    job += ["train.steps=20", "log_every=10", "topology.peers=2", "topology.miners=1"]
    done = subprocess.run(submit + job, cwd=REPO, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout
    table = done.stdout[done.stdout.index("steps ") :].splitlines()
    assert [line.split()[0] for line in table[1:3]] == ["1-10", "11-20"]
    assert "miner-" in done.stdout.split("held-out digits: loss")[1]  # the miners' table follows
