"""Imports point down, and a trainer loads nothing of the validator's."""

import subprocess
import sys

LOADED = """
import sys
from mapreduce_ray import Peer
others = ("actors", "jobs")
print(sorted(m for m in sys.modules if m.split(".")[0] in others or m.startswith("mapreduce_ray.validator")))
"""


def test_a_trainer_importing_peer_loads_no_validator_module_no_actor_and_no_job():
    loaded = subprocess.run([sys.executable, "-c", LOADED], capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.strip() == "[]"
