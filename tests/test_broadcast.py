import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from mapreduce_ray import InvalidTensorError, Peer, RoundMismatchError


@pytest.mark.parametrize("src", [1, 3])
@pytest.mark.parametrize("miners", [1, 3])
def test_broadcast_reaches_every_peer_from_any_source(subnets, src, miners, run_peers):
    source = torch.randn(300_000, dtype=torch.float32)  # over 1 MiB: several chunks per miner
    original = source.clone()
    results = run_peers(subnets[miners], 4, lambda peer: peer.broadcast(source if peer.rank == src else None, src=src))
    assert results[src - 1] is source and torch.equal(source, original)
    for rank, result in enumerate(results, start=1):
        if rank != src:
            assert result is not source and torch.equal(result, original)


def test_receivers_may_pass_a_tensor_to_fill(subnets, run_peers):
    source = torch.arange(24, dtype=torch.bfloat16).reshape(2, 3, 4)
    targets = {r: torch.zeros(2, 3, 4, dtype=torch.bfloat16) for r in (2, 3)}
    results = run_peers(subnets[2], 3, lambda peer: peer.broadcast(source if peer.rank == 1 else targets[peer.rank]))
    for rank in (2, 3):
        assert results[rank - 1] is targets[rank] and torch.equal(targets[rank], source)


def test_zero_d_and_read_only_numpy_sources(subnets, run_peers):
    scalar = torch.tensor(3.5, dtype=torch.float64)
    array = np.arange(10, dtype=np.int32)
    array.flags.writeable = False

    def both(peer):
        return peer.broadcast(scalar if peer.rank == 2 else None, src=2), peer.broadcast(
            array if peer.rank == 1 else None
        )

    for got_scalar, got_array in run_peers(subnets[2], 2, both):
        assert got_scalar.shape == () and got_scalar.item() == 3.5
        assert np.array_equal(np.asarray(got_array), np.arange(10))


def test_a_receiver_with_the_wrong_shape_gets_a_clear_error_and_keeps_its_tensor(subnets, run_peers):
    wrong = torch.full((5,), 7.0)

    def attempt(peer):
        if peer.rank == 1:
            return peer.broadcast(torch.ones(4))
        with pytest.raises(RoundMismatchError, match=r"rank 1 sends float32 \(4,\) but rank 2 passed float32 \(5,\)"):
            peer.broadcast(wrong)

    run_peers(subnets[2], 2, attempt)
    assert torch.equal(wrong, torch.full((5,), 7.0))


def test_source_must_pass_a_tensor_and_src_must_be_a_rank(subnets, run_peers):
    def attempt(peer):
        with pytest.raises(InvalidTensorError, match="rank 1 is the broadcast source and must pass the tensor"):
            peer.broadcast(None)
        with pytest.raises(ValueError, match=r"src must be an int in 1..1, got 2"):
            peer.broadcast(torch.ones(1), src=2)

    run_peers(subnets[1], 1, attempt)


def test_a_receiver_refuses_a_source_tensor_over_its_bandwidth_before_allocating_it(subnets):
    """Rank 2 takes at most 1 KiB (Peer(bandwidth=1024)) and passes no tensor: the 16 KiB the source broadcasts
    is refused from the miner's first signed statement of it, naming the fix. (Unchecked, so the source need not
    wait for the receiver's verdicts.)"""
    options = {**subnets[2].peer_options, "job": uuid.uuid4().hex, "verify_results": False}
    source, receiver = Peer(1, 2, **options), Peer(2, 2, 1024, **options)
    for peer in (source, receiver):
        peer.init_process_group()
    try:
        with ThreadPoolExecutor(2) as pool:
            sent = pool.submit(source.broadcast, torch.ones(4096))
            with pytest.raises(
                InvalidTensorError,
                match=r"the source's tensor \(float32 \(4096,\)\) is over this peer's bandwidth of 1024 bytes; "
                r"pass Peer\(bandwidth=\) of at least 16384 to take it$",
            ):
                receiver.broadcast(None)
            sent.result(timeout=60)
    finally:
        for peer in (source, receiver):
            peer.destroy_process_group()
