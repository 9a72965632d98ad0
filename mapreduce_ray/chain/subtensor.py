"""`Chain` on a real subnet, through the bittensor 11 SDK.

Reads are the SDK's typed reads; writes are its intents (`bt.ServeAxon`, `bt.SetWeights`), signed by the
hotkey. Every SDK failure leaves as one of our errors, in one line naming the hotkey and the subnet.
Registering costs TAO and needs the coldkey, so it is the operator's step: `how_to_register` gives the command.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
import threading
import time
from collections.abc import Iterator, Mapping

import bittensor as bt
from bittensor.settings import resolve_endpoint
from bittensor.sp_core import ss58_encode

from mapreduce_ray.chain.base import DEFAULT_NETUID, Chain, Metagraph, Neuron
from mapreduce_ray.errors import ChainError, NoValidatorPermitError, RateLimitedError
from mapreduce_ray.wallets import WalletConfig

log = logging.getLogger(__name__)
_RETRY_IN = re.compile(r"retry in ~(\d+) blocks", re.IGNORECASE)  # from the SDK's rate-limit preflight
# The neuron certificate's algorithm byte for what this project announces there: SHA-256 of the endpoint's
# TLS key (SubjectPublicKeyInfo, DER), 32 bytes. Only a TLS announcement replaces a neuron certificate, so
# an endpoint dropping TLS retracts its digest with NO_KEY (algorithm 0, no key).
KEY_SHA256 = 1
KEY_SHA256_BYTES = 32
NO_KEY = b"\x00"


class SubtensorChain(Chain):
    """`netuid` on `network`: finney, test, local, or a ws:// or wss:// endpoint.

    `substrate` replaces the SDK's RPC backend (tests pass an in-memory fake). Nothing is contacted
    before the first call.
    """

    def __init__(
        self,
        network: str = "finney",
        netuid: int = DEFAULT_NETUID,
        *,
        version_key: int = 0,
        fallback_endpoints: tuple[str, ...] = (),
        serve_timeout_s: float = 900.0,
        substrate=None,
    ):
        """`version_key`, `fallback_endpoints` and `serve_timeout_s` as in ChainConfig."""
        self.network = network
        self.netuid = netuid
        self.version_key = version_key
        self.fallback_endpoints = list(fallback_endpoints)
        self.serve_timeout_s = serve_timeout_s
        self._endpoint = resolve_endpoint(network)[1]  # ValueError for an unknown network name
        for url in self.fallback_endpoints:
            if not url.startswith(("ws://", "wss://")):
                raise ValueError(f"chain.fallback_endpoints holds {url!r}; give ws:// or wss:// URLs")
        self._substrate = substrate
        self._client: bt.SyncClient | None = None
        self._lock = threading.Lock()

    def describe(self) -> str:
        return f"netuid {self.netuid} on {self.network}"

    def how_to_register(self, wallet: WalletConfig) -> str:
        return (
            f"btcli subnets register --netuid {self.netuid} --network {self.network} "
            f"--wallet {wallet.name} --wallet-hotkey {wallet.hotkey} --wallet-path {wallet.path}"
        )

    def register(self, hotkey: str, coldkey: str, stake: float = 0.0) -> int:
        """The uid of an already registered hotkey; registering a new one is left to the operator."""
        uid = self.uid_of(hotkey)
        if uid is None:
            raise ChainError(
                f"hotkey {hotkey} is not registered on {self.describe()}; registering costs TAO and is signed by "
                f"its coldkey {coldkey}, so the operator runs: btcli subnets register --netuid {self.netuid} "
                f"--network {self.network} --wallet <coldkey-wallet> --hotkey {hotkey}"
            )
        return uid

    def block(self) -> int:
        with self._errors("reading the block"):
            return self._sync().block

    def uid_of(self, hotkey: str) -> int | None:
        with self._errors(f"looking up the uid of hotkey {hotkey}"):
            return self._sync().neurons.uid(hotkey_ss58=hotkey, netuid=self.netuid)

    def metagraph(self) -> Metagraph:
        with self._errors("reading the metagraph"):
            graph = self._sync().subnets.metagraph(self.netuid, commitments=False)
            certificates = self._sync().query_map(("SubtensorModule", "NeuronCertificates"), [self.netuid])
        keys = dict(filter(None, map(_key_digest, certificates)))
        if graph is None:
            raise ChainError(f"{self.describe()} does not exist")
        neurons = tuple(
            Neuron(
                uid=n.uid,
                hotkey=n.hotkey,
                coldkey=n.coldkey,
                stake=n.total_stake.amount,
                validator_permit=n.validator_permit,
                endpoint=n.axon,
                last_update=n.last_update,
                certificate=keys.get(n.hotkey),
            )
            for n in graph.neurons
        )
        return Metagraph(netuid=self.netuid, block=graph.block, neurons=neurons)

    def serve(self, signer, endpoint: str, certificate: str | None = None) -> None:
        """Announce nothing when the chain already holds this endpoint and key digest (a restart in place);
        otherwise announce, waiting out the serving rate limit for up to `serve_timeout_s`."""
        ip, port = _ip_and_port(endpoint)
        hotkey = signer.ss58_address
        with self._errors(f"serving {endpoint}", hotkey):
            axon, held_key = self._axon(hotkey), self._announced_key(hotkey)
            held = (int(axon.get("ip") or 0), int(axon.get("port") or 0))
            if held == (int(ipaddress.ip_address(ip)), port) and held_key == certificate:
                return
            if certificate is not None:
                blob = bytes([KEY_SHA256]) + bytes.fromhex(certificate)
            elif held_key is not None:
                blob = NO_KEY
            else:
                blob = None
            if blob is None:
                intent = bt.ServeAxon(netuid=self.netuid, ip=ip, port=port)
            else:
                intent = bt.ServeAxonTls(netuid=self.netuid, ip=ip, port=port, certificate="0x" + blob.hex())
            deadline = time.monotonic() + self.serve_timeout_s
            while True:
                result = self._sync().execute(intent, signer)
                if result.success or result.error is None or result.error.code is not bt.ErrorCode.RATE_LIMITED:
                    result.raise_for_failure()
                    return
                blocks, seconds = self._serving_wait(hotkey)
                if time.monotonic() + seconds > deadline:
                    raise RateLimitedError(
                        f"serving {endpoint} by hotkey {hotkey} on {self.describe()} is rate limited; retry in "
                        f"{blocks} blocks (~{seconds:.0f} s), or let chain.serve_timeout_s wait that long"
                    )
                log.info(
                    "%s: serving %s is rate limited; announcing again in %.0f s", self.describe(), endpoint, seconds
                )
                time.sleep(seconds)

    def _serving_wait(self, hotkey: str) -> tuple[int, float]:
        """Blocks and seconds until the chain's serving rate limit lets `hotkey` announce again (a block at least)."""
        client = self._sync()
        limit = int(client.query(bt.storage.SubtensorModule.ServingRateLimit, [self.netuid]) or 0)
        blocks = max(1, int(self._axon(hotkey).get("block", 0)) + limit - client.block)
        return blocks, blocks * client.block_time()

    def _axon(self, hotkey: str) -> dict:
        """What the chain holds of `hotkey`'s endpoint (ip as an integer, port, block), {} when nothing."""
        return self._sync().query(bt.storage.SubtensorModule.Axons, [self.netuid, hotkey]) or {}

    def _announced_key(self, hotkey: str) -> str | None:
        """The hex key digest of this project the chain holds for `hotkey`, if any."""
        value = self._sync().query(("SubtensorModule", "NeuronCertificates"), [self.netuid, hotkey])
        held = _key_digest((hotkey, value))
        return None if held is None else held[1]

    def set_weights(self, signer, weights: Mapping[int, float]) -> int | None:
        """Weights under `version_key`, or the subnet's WeightsVersionKey when higher; the SDK commits them
        (timelocked, revealed by the chain) where commit-reveal is on, and that reveal round is returned."""
        with self._errors("setting weights", signer.ss58_address):
            required = self._sync().query(bt.storage.SubtensorModule.WeightsVersionKey, [self.netuid])
            key = max(self.version_key, int(required or 0))
            intent = bt.SetWeights(netuid=self.netuid, weights=dict(weights), version_key=key)
            result = self._sync().execute(intent, signer).raise_for_failure()
        return result.data.get("reveal_round")

    def min_allowed_weights(self) -> int:
        with self._errors("reading the subnet's MinAllowedWeights"):
            return int(self._sync().query(bt.storage.SubtensorModule.MinAllowedWeights, [self.netuid]) or 0)

    def weights(self) -> dict[int, dict[int, float]]:
        with self._errors("reading the weights"):
            rows = self._sync().weights.weights(self.netuid)  # each row sums to 1
        return {uid: _largest_is_one(row) for uid, row in rows.items() if row}

    def _sync(self) -> bt.SyncClient:
        """The SDK client, built and connected on first use (and connecting again after a failed attempt)."""
        with self._lock:
            if self._client is None:
                self._client = bt.SyncClient(
                    self.network,
                    fallback_endpoints=self.fallback_endpoints,
                    archive_endpoints=[],
                    substrate=self._substrate,
                )
            return self._client.connect()

    @contextlib.contextmanager
    def _errors(self, action: str, hotkey: str | None = None) -> Iterator[None]:
        """Raise the SDK's failures while doing `action` (signed by `hotkey`) as our errors."""
        try:
            yield
        except bt.RpcConnectionError as e:
            where = " or ".join([self._endpoint, *self.fallback_endpoints])
            raise ChainError(f"could not reach {where} ({self.describe()}): {_one_line(e)}") from e
        except bt.ChainError as e:
            raise self._error(e, action, hotkey) from e
        except bt.BittensorError as e:  # refused before reaching the chain, e.g. weights that are all zero
            raise ChainError(f"{action}{_by(hotkey)} on {self.describe()} failed: {_one_line(e)}") from e

    def _error(self, error: bt.ChainError, action: str, hotkey: str | None) -> ChainError:
        where = self.describe()
        if error.code is bt.ErrorCode.NOT_REGISTERED:
            return self.not_registered(hotkey)
        # The chain's dispatch error has a name; the SDK's own check (on Null-consensus subnets) only words.
        if error.name == "NeuronNoValidatorPermit" or "validator permit" in error.message.lower():
            return NoValidatorPermitError(
                f"hotkey {hotkey} has no validator permit on {where}, so it cannot set weights; "
                "permits go to the top stakers"
            )
        if error.code is bt.ErrorCode.RATE_LIMITED:
            wait = _RETRY_IN.search(error.message)
            retry = f"retry in {wait[1]} blocks" if wait else f"retry later ({_one_line(error)})"
            return RateLimitedError(f"{action}{_by(hotkey)} on {where} is rate limited; {retry}")
        return ChainError(f"{action}{_by(hotkey)} on {where} failed: {_one_line(error)}")


def _ip_and_port(endpoint: str) -> tuple[str, int]:
    """("10.0.0.1", 8091) from "10.0.0.1:8091"; IPv6 as "[::1]:8091"."""
    host, _, port = endpoint.rpartition(":")
    with contextlib.suppress(ValueError):
        ip = ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
        if 0 < int(port) < 65536:
            return str(ip), int(port)
    raise ValueError(f"endpoint must be ip:port, e.g. 10.0.0.1:8091; got {endpoint!r}")


def _key_digest(entry) -> tuple[str, str] | None:
    """(hotkey, hex key digest) of one NeuronCertificates entry, or None when it holds something else."""
    hotkey, value = entry
    if not isinstance(value, dict) or value.get("algorithm") != KEY_SHA256:
        return None
    try:
        hotkey = hotkey if isinstance(hotkey, str) else ss58_encode(bytes(hotkey))
        key = value.get("public_key")
        key = bytes.fromhex(key.removeprefix("0x")) if isinstance(key, str) else bytes(key)
    except (TypeError, ValueError):  # decoded otherwise than as bytes: not ours
        return None
    return (hotkey, key.hex()) if len(key) == KEY_SHA256_BYTES else None


def _largest_is_one(row: dict[int, float]) -> dict[int, float]:
    top = max(row.values())
    return {uid: weight / top for uid, weight in row.items()}


def _by(hotkey: str | None) -> str:
    return f" by hotkey {hotkey}" if hotkey else ""


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())
