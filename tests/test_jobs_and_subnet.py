import subprocess
import sys
import time

import pytest
import ray
import torch
from hydra.errors import ConfigCompositionException

from actors import PeerActor, start_local_subnet
from actors.relay import RelaySettings
from actors.subnet import DEV_VALIDATOR_STAKE, register_dev_wallet
from jobs.config import relay_settings, wire_config
from jobs.validator import validator_config
from mapreduce_ray import JobError, Peer
from mapreduce_ray.chain import ChainConfig
from mapreduce_ray.errors import EndpointError
from mapreduce_ray.validator.config import BenchmarkConfig, ValidatorConfig, VerifyConfig
from mapreduce_ray.wallets import dev_wallet
from mapreduce_ray.wire.config import WireConfig
from mapreduce_ray.wire.tls import create_certificate


def test_init_process_group_returns_the_job_spec(subnets, run_peers):
    specs = run_peers(subnets[3], 2, lambda peer: peer.spec)
    assert specs[0] == specs[1]
    assert specs[0].peer_count == 2 and [m.name for m in specs[0].miners] == ["miner-1", "miner-2", "miner-3"]


def test_rounds_are_released_once_every_peer_left(subnets, run_peers):
    subnet = subnets[2]
    run_peers(subnet, 3, lambda peer: [peer.all_reduce(torch.randn(100_000)) for _ in range(3)])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        statuses = ray.get([m.status.remote() for m in subnet.miners])
        if all(s["open_rounds"] == 0 for s in statuses):
            break
        time.sleep(0.05)
    assert [s["open_rounds"] for s in statuses] == [0, 0]
    assert ray.get(subnet.validator.job_table.remote()) == []


def test_a_peer_keeps_only_its_latest_round_open(subnets, run_peers):
    subnet = subnets[1]

    def three_rounds(peer):
        for _ in range(3):
            peer.all_reduce(torch.randn(1000))
        return ray.get(subnet.miners[0].status.remote())["open_rounds"]

    assert max(run_peers(subnet, 2, three_rounds)) <= 2


def test_joining_a_validator_that_serves_no_endpoint_names_the_fix(subnets):
    chain = subnets[1].chain
    wallet = dev_wallet(chain.state_path, "dev-validator", "silent")
    uid = register_dev_wallet(chain.open(), wallet, stake=DEV_VALIDATOR_STAKE)
    with pytest.raises(EndpointError, match=rf"validator uid {uid} announced no endpoint on netuid 101 .* start it"):
        Peer(1, 1, **{**subnets[1].peer_options, "validator_uid": uid}).init_process_group()


def test_collectives_before_joining_name_the_fix(subnets):
    with pytest.raises(JobError, match=r"rank 1 has not joined a job; call init_process_group\(\) first"):
        Peer(1, 1, **subnets[1].peer_options).all_reduce(torch.ones(1))


def test_joining_twice_and_disagreeing_about_peer_count_are_refused(subnets):
    options = {**subnets[1].peer_options, "job": "twice"}
    first = Peer(1, 2, **options)
    first.init_process_group()
    try:
        with pytest.raises(JobError, match=r"rank 1 already joined job 'twice'; call destroy_process_group\(\) first"):
            first.init_process_group()
        with pytest.raises(JobError, match=r"rank 1 already joined job 'twice'; a rank joins once"):
            Peer(1, 2, **options).init_process_group()
        with pytest.raises(JobError, match=r"job 'twice' has 2 peers but rank 2 says 3; pass the same peer_count"):
            Peer(2, 3, **options).init_process_group()
    finally:
        first.destroy_process_group()


def test_peer_arguments_are_checked():
    with pytest.raises(ValueError, match=r"rank must be an int in 1..2, got 0"):
        Peer(0, 2)
    with pytest.raises(ValueError, match="peer_count must be a positive int, got 0"):
        Peer(1, 0)
    with pytest.raises(ValueError, match="bandwidth must be a positive number of bytes or None, got -5"):
        Peer(1, 1, -5)


def test_peer_works_as_a_context_manager(subnets):
    with Peer(1, 1, job="ctx", **subnets[1].peer_options) as peer:
        assert peer.all_reduce(torch.tensor([2.0, 4.0]), "sum").tolist() == [2.0, 4.0]
    assert peer.spec is None


def test_a_second_subnet_in_the_same_namespace_is_refused(subnets):
    with pytest.raises(
        RuntimeError, match=r"a subnet already runs in Ray namespace 'tests-1-miners'.*pass another namespace"
    ):
        start_local_subnet(1, namespace=subnets[1].namespace, chain=subnets[1].chain)


def test_a_peer_needs_no_ray(subnets):
    script = (
        "import sys, torch, ray; from mapreduce_ray import Peer; "
        f"peer = Peer(1, 1, job='no-ray', **{subnets[1].peer_options!r}); peer.init_process_group(); "
        "print(peer.all_reduce(torch.tensor([1.0, 2.0]), 'sum').tolist(), ray.is_initialized()); "
        "peer.destroy_process_group()"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[1.0, 2.0] False"


def test_a_refused_subnet_leaves_no_miner_behind(local_ray):
    namespace = "tests-validator-taken"  # on a fresh netuid the validator is uid 0, the miners 1 and 2
    squatter = ray.remote(num_cpus=0)(PeerActor).options(name="validator-0", namespace=namespace).remote(1, 1)
    ray.get(squatter.run.remote(lambda peer: None))
    try:
        with pytest.raises(RuntimeError, match="a subnet already runs in Ray namespace 'tests-validator-taken'"):
            start_local_subnet(2, namespace=namespace, chain=ChainConfig(netuid=150))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _named(namespace, "miner-1", "miner-2"):
            time.sleep(0.05)
        assert _named(namespace, "miner-1", "miner-2") == []
    finally:
        ray.kill(squatter)


def test_validator_settings_default_to_the_dataclass_and_take_overrides_but_not_what_other_groups_set(job_config):
    """conf/validator.yaml sets no validator.* value: they all come from ValidatorConfig, once."""
    from_job = {"namespace": "mapreduce", "chunk_bytes": 4 * 1024 * 1024, "timeout_s": 60}
    assert validator_config(job_config("validator", "+wallet=dev-validator")) == ValidatorConfig(**from_job)
    cfg = job_config(
        "validator", "+wallet=dev-validator", "validator.benchmark.bots=[a,b]", "validator.verify.fraction=0.5"
    )
    assert validator_config(cfg) == ValidatorConfig(
        **from_job, benchmark=BenchmarkConfig(bots=("a", "b")), verify=VerifyConfig(fraction=0.5)
    )
    with pytest.raises(ConfigCompositionException, match=r"^Could not override 'validator\.timeout_s'"):
        job_config("validator", "+wallet=dev-validator", "validator.timeout_s=5")  # it is subnet.timeout_s
    with pytest.raises(ConfigCompositionException, match=r"^Error merging override validator\.verify\.fraction=x$"):
        job_config("validator", "+wallet=dev-validator", "validator.verify.fraction=x")


def _named(namespace: str, *names: str) -> list[str]:
    """Which of `names` are live actors in `namespace`."""
    alive = []
    for name in names:
        try:
            ray.get_actor(name, namespace=namespace)
            alive.append(name)
        except ValueError:
            pass
    return alive


def test_wire_and_relay_settings_take_command_line_overrides_and_refuse_unknown_ones(job_config, tmp_path):
    cert, key = str(tmp_path / "e.pem"), str(tmp_path / "e.key")
    create_certificate(cert, key)
    cfg = job_config(
        "miner",
        "+wallet=dev-miner",
        f"wire.tls_cert={cert}",
        f"wire.tls_key={key}",
        "wire.port_range=9000:9010",
        "relay.retention_s=5",
    )
    assert wire_config(cfg) == WireConfig(tls_cert=cert, tls_key=key, port_range="9000:9010")
    assert wire_config(cfg).ports == range(9000, 9011)
    assert relay_settings(cfg) == RelaySettings(retention_s=5.0)
    with pytest.raises(ConfigCompositionException, match=r"^Error merging override wire\.window_bytes=many$"):
        job_config("validator", "+wallet=dev-validator", "wire.window_bytes=many")
    with pytest.raises(ConfigCompositionException, match=r"^Could not override 'wire\.windows'"):
        job_config("validator", "+wallet=dev-validator", "wire.windows=1")
