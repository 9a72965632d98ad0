"""python -m jobs.train: P trainers averaging through miners step as one process on the global batch."""

import pytest
import ray
import torch
import torch.nn.functional as F

from actors.trainer import Digits, TrainSettings, make_model, make_optimizer
from jobs.train import run
from mapreduce_ray.training import batch_schedule, rank_share


def single_process(settings: TrainSettings) -> torch.Tensor:
    """The parameters after the same steps in one process, each on the whole global batch."""
    data = Digits.load(settings.seed, settings.test_fraction)
    model = make_model(settings, data.train_x.shape[1])
    optimizer = make_optimizer(settings, model)
    for batch in batch_schedule(len(data.train_y), settings.batch_size, settings.steps, settings.seed):
        optimizer.zero_grad()
        F.cross_entropy(model(data.train_x[batch]), data.train_y[batch]).backward()
        optimizer.step()
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach()


def test_trainers_step_as_one_process_on_the_global_batch(subnets, job_config):
    subnet = subnets[2]
    cfg = job_config("train", "topology.peers=2", "train.steps=6", "log_every=4", "job=train", subnet=subnet)
    report = run(cfg)

    expected = single_process(TrainSettings(**cfg.train))
    initial = make_model(TrainSettings(**cfg.train), 64)
    assert report.in_step  # every rank holds the same bits
    assert not torch.equal(report.parameters, torch.nn.utils.parameters_to_vector(initial.parameters()))
    torch.testing.assert_close(report.parameters, expected, rtol=1e-5, atol=1e-6)
    assert [r["steps"] for r in report.rows] == ["1-4", "5-6"]
    assert all(float(r["algbw MB/s"]) > 0 for r in report.rows)
    miners = {s["name"] for s in ray.get([m.status.remote() for m in subnet.miners], timeout=30)}
    assert {r["miner"] for r in report.miners} == miners
    assert 0 <= report.test_accuracy <= 1


def test_shares_of_a_global_batch_are_equal_and_disjoint():
    batch = batch_schedule(100, 12, 1, seed=3)[0]
    shares = [rank_share(batch, rank, 3) for rank in (1, 2, 3)]
    assert torch.equal(torch.cat(shares), batch)
    with pytest.raises(ValueError, match="a global batch of 12 does not split evenly across 5 peers"):
        rank_share(batch, 1, 5)


def test_batches_cover_every_example_once_per_epoch():
    batches = batch_schedule(10, 4, 5, seed=0)  # 20 indices: two shuffled epochs of 10
    flat = torch.cat(batches)
    assert sorted(flat[:10].tolist()) == list(range(10))
    assert sorted(flat[10:].tolist()) == list(range(10))
    with pytest.raises(ValueError, match=r"batch_size must be in 1..10"):
        batch_schedule(10, 11, 1, seed=0)


def test_a_batch_that_does_not_split_across_peers_is_one_line(job_config):
    cfg = job_config("train", "topology.peers=3", "train.batch_size=64")
    with pytest.raises(ValueError, match=r"^train.batch_size=64 does not split evenly across topology.peers=3$"):
        run(cfg)


def test_a_validator_uid_that_does_not_answer_while_another_does_is_one_line(subnets, job_config):
    cfg = job_config("train", "train.steps=1", subnet=subnets[2])
    cfg.subnet.validator_uid = 99
    with pytest.raises(
        ValueError,
        match=rf"^validator uid 99 does not answer on netuid 102 on the embedded chain at .*, but uid\(s\) "
        rf"\[{subnets[2].validator_uid}\] do: pass subnet.validator_uid=UID",
    ):
        run(cfg)
