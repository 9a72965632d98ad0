"""Bad input: each is one clear error, every peer's tensor stays as it was, and the job goes on.

Elsewhere: shapes that differ across peers (test_all_reduce), empty tensors, unknown ops, bool and
over-bandwidth tensors (test_all_reduce), a job that finished at a miner (test_identity), and
unsigned, tampered, misaddressed, replayed and unregistered messages (test_identity, test_protocol).
"""

from __future__ import annotations

import pytest
import torch

from mapreduce_ray import Peer
from mapreduce_ray.errors import InvalidTensorError, JobError, NonFiniteError, RoundMismatchError
from mapreduce_ray.reference import reference_reduce

MIB = 1024 * 1024


def test_dtypes_that_differ_across_peers_are_a_clear_error_and_change_nothing(subnets, run_peers):
    tensors = [torch.arange(10, dtype=torch.float32), torch.arange(10, dtype=torch.float64)]
    before = [t.clone() for t in tensors]

    def attempt(peer):
        with pytest.raises(RoundMismatchError, match=r"rank \d passed float(32|64) \(10,\), another rank float"):
            peer.all_reduce(tensors[peer.rank - 1], "sum")

    run_peers(subnets[2], 2, attempt)
    assert all(torch.equal(t, b) for t, b in zip(tensors, before, strict=True))


def test_nan_and_inf_propagate_as_in_torch_by_default(subnets, run_peers):
    nan, inf = float("nan"), float("inf")
    tensors = [torch.tensor([1.0, nan, inf, inf, 2.0]), torch.tensor([1.0, 3.0, -inf, inf, nan])]
    expected = reference_reduce([t.clone() for t in tensors], "avg")
    assert torch.equal(expected.isnan(), torch.tensor([False, True, True, False, True]))
    run_peers(subnets[2], 2, lambda peer: peer.all_reduce(tensors[peer.rank - 1]))
    for t in tensors:  # bit for bit, NaNs included
        assert torch.equal(t.view(torch.int32), expected.view(torch.int32))


def test_a_job_that_refuses_nan_names_the_peer_and_changes_nothing(subnets, run_peers):
    tensors = [torch.ones(1000), torch.ones(1000)]
    tensors[1][5] = float("nan")
    before = [t.clone() for t in tensors]

    def attempt(peer):
        with pytest.raises(NonFiniteError) as caught:
            peer.all_reduce(tensors[peer.rank - 1], "sum")
        return str(caught.value)

    for message in run_peers(subnets[2], 2, attempt, reject_nonfinite=True):
        assert message.endswith(
            "rank 2 handed in NaN or Inf (element 5 of its flat tensor); this job refuses them: "
            "fix the tensor, or join with reject_nonfinite=False"
        )
    assert all(torch.equal(t.view(torch.int32), b.view(torch.int32)) for t, b in zip(tensors, before, strict=True))


def test_a_tensor_larger_than_the_jobs_capacity_is_refused_before_anything_is_sent(subnets, run_peers):
    tensor = torch.ones(8 * MIB // 4 + 1)  # the test subnets' miners proved 8 MiB

    def attempt(peer):
        with pytest.raises(InvalidTensorError) as caught:
            peer.all_reduce(tensor)
        return str(caught.value), peer._seq

    message, seq = run_peers(subnets[1], 1, attempt)[0]
    assert message.startswith(f"tensor is {8 * MIB + 4} bytes but the miners of job ")
    assert f"verified capacity for {8 * MIB} bytes; split the tensor" in message
    assert seq == 0 and torch.equal(tensor, torch.ones_like(tensor))


def test_peers_must_agree_on_redundancy_and_there_must_be_miners_for_it(subnets):
    options = subnets[2].peer_options
    first, second = Peer(1, 2, job="disagree", **options), Peer(2, 2, job="disagree", redundancy=2, **options)
    first.init_process_group()
    try:
        with pytest.raises(JobError) as caught:
            second.init_process_group()
        assert str(caught.value) == (
            "job 'disagree' runs with redundancy=1, reject_nonfinite=False but rank 2 asks for "
            "redundancy=2, reject_nonfinite=False; pass the same on every peer"
        )
    finally:
        first.destroy_process_group()
    with pytest.raises(JobError) as caught:
        Peer(1, 1, job="too-redundant", redundancy=3, **options).init_process_group()
    assert str(caught.value) == (
        "redundancy 3 needs 3 miners but 2 are available; pass a smaller redundancy to Peer(...) "
        "or wait for more miners"
    )
