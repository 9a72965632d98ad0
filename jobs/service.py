"""What jobs.miner, jobs.validator, jobs.benchmark and jobs.register share.

A wallet and chain from config, registration (on the embedded chain) or a check
of it (on bittensor), this party's own Ray, and a detached actor on this node
served until Ctrl-C. Other parties reach it only through the endpoint it announces.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import ray
from omegaconf import DictConfig
from ray.exceptions import RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors import connect_ray
from mapreduce_ray.chain import ChainConfig
from mapreduce_ray.errors import JobError, MapReduceError, WalletError
from mapreduce_ray.remote import get
from mapreduce_ray.wallets import (
    WalletConfig,
    coldkey_of,
    dev_wallet,
    ensure_dev_wallet,
    is_dev_wallet,
    load_identity,
)

log = logging.getLogger(__name__)
START_TIMEOUT_S = 120.0
STATUS_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0


@contextmanager
def user_errors() -> Iterator[None]:
    """Errors a user can cause end the job with one line and exit code 2."""
    try:
        yield
    except (MapReduceError, ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def wallet_and_chain(cfg: DictConfig) -> tuple[WalletConfig, ChainConfig]:
    """The wallet chosen with +wallet=NAME (a development wallet is created if missing) and the subnet's chain."""
    if "wallet" not in cfg:
        raise WalletError("choose a wallet: +wallet=NAME, where conf/wallet/NAME.yaml exists (e.g. +wallet=dev-miner)")
    chain = ChainConfig(**cfg.subnet.chain)
    w = cfg.wallet
    state = chain.state_path
    wallet = dev_wallet(state, w.name, w.hotkey) if w.path is None else WalletConfig(w.name, w.hotkey, w.path)
    if is_dev_wallet(wallet, state):
        ensure_dev_wallet(wallet)
    return wallet, chain


def registered_uid(chain_config: ChainConfig, wallet: WalletConfig, stake: float) -> int:
    """The wallet's uid: registered now on the embedded chain if needed; on bittensor it must be already."""
    chain, hotkey = chain_config.open(), load_identity(wallet).hotkey
    if chain_config.backend == "embedded":
        return chain.register(hotkey, coldkey_of(wallet), stake)
    return chain.require_uid(hotkey, wallet)


def connect(ray_cfg: DictConfig) -> None:
    try:
        connect_ray(**ray_cfg)
    except ConnectionError:
        raise JobError(
            f"no Ray cluster found at address {ray_cfg.address!r}: start one with `ray start --head`, "
            "or pass ray=local to run one inside this process"
        ) from None


def start_detached(actor_class, name: str, namespace: str, *args, max_concurrency: int = 1):
    """Start `actor_class(*args)` on this node as detached actor `name`, and wait until it answers."""
    try:
        ray.get_actor(name, namespace=namespace)
    except ValueError:
        pass
    else:
        raise JobError(f"{name} already runs in Ray namespace {namespace!r}; stop it first (Ctrl-C where it runs)")
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    handle = (
        ray.remote(num_cpus=0)(actor_class)
        .options(
            name=name,
            namespace=namespace,
            lifetime="detached",
            max_concurrency=max_concurrency,
            scheduling_strategy=here,
        )
        .remote(*args)
    )
    try:
        get(handle.status.remote(), START_TIMEOUT_S, f"starting {name}")
    except RayActorError as e:
        raise JobError(f"{name} failed to start: {str(e).strip().splitlines()[-1]}") from None
    return handle


def serve_until_interrupted(handle, name: str, namespace: str, interval_s: float, show: Callable[[dict], str]) -> None:
    """Log `show(status)` every `interval_s` until SIGINT or SIGTERM, then kill the actor and wait until it is gone."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while True:
            log.info("%s: %s", name, show(get(handle.status.remote(), STATUS_TIMEOUT_S, f"asking {name}")))
            if stop.wait(interval_s):
                break
    finally:
        ray.kill(handle)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline and _alive(name, namespace):
            time.sleep(0.1)
        log.info("%s stopped", name)


def serve_role(
    cfg: DictConfig,
    actor_class,
    name_of: Callable[[int], str],
    args_of: Callable[[WalletConfig, ChainConfig], tuple],
    show: Callable[[dict], str],
    max_concurrency: int = 1,
) -> None:
    """Register the wallet, start `actor_class(*args_of(wallet, chain))` as `name_of(uid)` here, serve until Ctrl-C."""
    with user_errors():
        wallet, chain = wallet_and_chain(cfg)
        uid = registered_uid(chain, wallet, cfg.stake)
        connect(cfg.ray)
        name, namespace = name_of(uid), cfg.subnet.namespace
        print(describe_ray(), flush=True)
        handle = start_detached(actor_class, name, namespace, *args_of(wallet, chain), max_concurrency=max_concurrency)
        hotkey = load_identity(wallet).hotkey
        endpoint = get(handle.status.remote(), STATUS_TIMEOUT_S, f"asking {name}").get("endpoint")
        tls = " over grpc+tls" if cfg.get("wire", {}).get("tls_cert") else ""
        where = f" at endpoint {endpoint}{tls}" if endpoint else ""
        print(f"{name} (hotkey {hotkey}) serving {chain.open().describe()}{where}; Ctrl-C stops it", flush=True)
        serve_until_interrupted(handle, name, namespace, cfg.status_interval_s, show)


def describe_ray() -> str:
    """This party's Ray cluster: its GCS address and its nodes."""
    nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    return f"Ray cluster {ray.get_runtime_context().gcs_address}: {len(nodes)} node(s) {nodes}"


def _alive(name: str, namespace: str) -> bool:
    try:
        ray.get_actor(name, namespace=namespace)
        return True
    except ValueError:
        return False
