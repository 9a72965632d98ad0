"""examples/tutorial.py, the seed's tutorial ported, run by two processes at once on a local subnet."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).parent.parent
TIMEOUT_S = 120.0


def test_tutorial_two_ranks_get_the_broadcast_and_the_exact_average(subnets):
    options = subnets[2].peer_options  # its state dir is $MAPREDUCE_STATE_DIR, which the ranks inherit
    args = ["--count", "2", "--netuid", str(options["netuid"]), "--validator.uid", str(options["validator_uid"])]
    args += ["--size_mib", "1", "--step_seconds", "0", "--job", uuid.uuid4().hex]
    procs = [
        subprocess.Popen(
            [sys.executable, "examples/tutorial.py", "--rank", str(rank), *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (1, 2)
    ]
    try:
        outputs = [proc.communicate(timeout=TIMEOUT_S) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    digests = []
    for rank, (proc, (stdout, stderr)) in enumerate(zip(procs, outputs, strict=True), start=1):
        assert proc.returncode == 0, f"rank {rank} exited {proc.returncode}:\n{stdout}{stderr[-3000:]}"
        lines = stdout.splitlines()
        digests += re.findall(rf"^rank {rank} broadcast: weights digest ([0-9a-f]{{16}})$", stdout, re.MULTILINE)
        assert [line for line in lines if " epoch " in line] == [
            f"rank {rank} epoch {i}: all_reduce gave 2.0 (expected 2.0)" for i in range(2)
        ]
        assert lines[-1] == f"Peer {rank} has finished training."
    assert len(digests) == 2 and digests[0] == digests[1], digests
