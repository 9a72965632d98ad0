"""An in-memory subtensor, so `SubtensorChain` runs the real bittensor SDK with no network.

`FakeSubstrate` implements the part of the `bittensor.Substrate` protocol that the SDK's reads
(`neurons.uid`, `subnets.metagraph`, `weights.weights`, the NeuronCertificates map) and intents (`SetWeights`,
plain or timelock-committed, `ServeAxon`, `ServeAxonTls`) use, over
the state of one subnet. `submit` applies extrinsics the way the subtensor pallet does, failing with the
pallet's dispatch errors. `SubtensorUnderTest` puts a `SubtensorChain` on top, for the chain tests.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from unittest import mock

import bittensor as bt
from bittensor._generated.errors import ERRORS
from bittensor.sp_core import ss58_encode

from mapreduce_ray.chain.subtensor import SubtensorChain

U16_MAX = 65535
RAO_PER_TAO = 10**9
MIN_ALLOWED_WEIGHTS = 1
SUBNET_OWNER = ss58_encode(bytes(32))  # holds no uid, so the pallet's owner exemption never applies


@dataclass
class FakeNeuron:
    hotkey: str
    coldkey: str
    stake: int  # rao
    registered_at: int
    last_update: int = 0  # block of the last weights; 0 (the storage default) means never
    axon: dict | None = None  # AxonInfo once served
    certificate: dict | None = None  # NeuronCertificate once served with TLS


class FakeSubstrate:
    """One subnet's chain state, read and written through the `bittensor.Substrate` protocol.

    Only the head state is kept: reads ignore `block_hash`, and the block moves only when a test moves it.
    Reads for another netuid find nothing, as for a subnet that does not exist. Validator permits go to the
    top `max_validators` neurons by stake with stake > 0; the chain recomputes them each epoch, this fake on
    every read. The max weight limit is u16::MAX: weights are unclipped. With `commit_reveal` on, weights arrive
    as timelocked commits, which this fake keeps (in `commits`) and never reveals: it has no drand beacon.
    """

    def __init__(self, netuid: int, *, rate_limit: int, max_validators: int, block: int = 1):
        self.netuid = netuid
        self.block = block
        self.rate_limit = rate_limit  # WeightsSetRateLimit, blocks
        self.max_validators = max_validators
        self.block_seconds = 12.0  # what the chain reports as its block time
        self.serving_rate_limit = 0  # ServingRateLimit, blocks; 0: none
        self.weights_version_key = 0  # WeightsVersionKey: weights under a lower key are refused
        self.min_allowed_weights = MIN_ALLOWED_WEIGHTS
        self.commit_reveal = False  # CommitRevealWeightsEnabled
        self.commits: list[tuple[str, int, bytes]] = []  # (hotkey, reveal round, ciphertext), unrevealed
        self.consensus = "Yuma"  # SubnetEpochConsensus; under "Null" the SDK itself checks the permit
        self.neurons: list[FakeNeuron] = []  # index = uid
        self.weights: dict[int, list[tuple[int, int]]] = {}  # uid -> [(dest uid, u16)]
        self.submitted: list[tuple[str, bt.calls.Call]] = []  # (signer ss58, call), every submitted extrinsic
        self.token_symbols: dict[int, str] = {}

    def register(self, hotkey: str, coldkey: str, stake: float = 0.0) -> int:
        """Put a neuron in the next uid with LastUpdate 0, as the chain's genesis does, so it may set weights at once
        (a neuron registered on the live chain waits out the rate limit from its registration block)."""
        uid = self.uid(hotkey)
        if uid is None:
            uid = len(self.neurons)
            self.neurons.append(FakeNeuron(hotkey, coldkey, round(stake * RAO_PER_TAO), self.block))
        return uid

    def uid(self, hotkey: str) -> int | None:
        return next((uid for uid, n in enumerate(self.neurons) if n.hotkey == hotkey), None)

    def permits(self) -> list[bool]:
        staked = sorted(
            (uid for uid, n in enumerate(self.neurons) if n.stake > 0), key=lambda u: -self.neurons[u].stake
        )
        top = set(staked[: self.max_validators])
        return [uid in top for uid in range(len(self.neurons))]

    # bittensor.Substrate: display and lifecycle

    def balance(self, rao: int, netuid: int = 0) -> bt.Balance:
        return bt.Balance(rao, netuid, self.token_symbols.get(netuid))

    async def connect(self) -> None:
        pass

    async def close(self) -> None:
        pass

    # bittensor.Substrate: reads

    async def block_number(self) -> int:
        return self.block

    async def finalized_block_number(self) -> int:
        return self.block

    async def block_hash(self, block: int | None = None) -> str:
        return f"0x{self.block if block is None else block:064x}"

    async def block_time(self) -> float:
        return self.block_seconds

    async def query(self, module: str, storage_function: str, params=None, block_hash=None):
        netuid, *keys = params or [None]
        if module != "SubtensorModule" or netuid != self.netuid:
            return None
        match storage_function:
            case "Uids":
                return self.uid(keys[0])
            case "CommitRevealWeightsEnabled":
                return self.commit_reveal
            case "WeightsVersionKey":
                return self.weights_version_key
            case "ServingRateLimit":
                return self.serving_rate_limit
            case "Axons":
                uid = self.uid(keys[0])
                return None if uid is None else self.neurons[uid].axon
            case "Tempo":
                return 360
            case "RevealPeriodEpochs":
                return 1
            case "LastEpochBlock" | "PendingEpochAt" | "SubnetEpochIndex":
                return 0
            case "BlocksSinceLastStep":
                return self.block
            case "WeightsSetRateLimit":
                return self.rate_limit
            case "LastUpdate":  # keyed by the mechanism's storage index, the netuid for mechanism 0
                return [n.last_update for n in self.neurons]
            case "MinAllowedWeights":
                return self.min_allowed_weights
            case "MaxWeightsLimit":
                return U16_MAX
            case "SubnetEpochConsensus":
                return self.consensus
            case "ValidatorPermit":
                return self.permits()
            case "NeuronCertificates":
                uid = self.uid(keys[0])
                return None if uid is None else self.neurons[uid].certificate
        raise NotImplementedError(f"the fake substrate has no storage item {module}.{storage_function}")

    async def query_map(self, module: str, storage_function: str, params=None, block_hash=None):
        match module, storage_function, params or []:
            case "SubtensorModule", "TokenSymbol", []:
                return []
            case "SubtensorModule", "Weights", [netuid]:
                return sorted(self.weights.items()) if netuid == self.netuid else []
            case "SubtensorModule", "NeuronCertificates", [netuid]:
                served = [(n.hotkey, n.certificate) for n in self.neurons if n.certificate]
                return served if netuid == self.netuid else []
        raise NotImplementedError(f"the fake substrate has no storage map {module}.{storage_function}")

    async def runtime_call(self, api: str, method: str, params: list, block_hash=None):
        if (api, method) != ("SubnetInfoRuntimeApi", "get_metagraph"):
            raise NotImplementedError(f"the fake substrate has no runtime API {api}.{method}")
        return self._metagraph() if params == [self.netuid] else None

    def _metagraph(self) -> dict:
        """The runtime API's metagraph record, with the fields the SDK's `Metagraph` reads."""
        n = self.neurons
        return {
            "netuid": self.netuid,
            "name": list(b"mapreduce"),
            "symbol": list("κ".encode()),
            "block": self.block,
            "tempo": 360,
            "last_step": 0,
            "blocks_since_last_step": self.block,
            "owner_hotkey": SUBNET_OWNER,
            "owner_coldkey": SUBNET_OWNER,
            "network_registered_at": 0,
            "num_uids": len(n),
            "max_uids": 256,
            "hotkeys": [x.hotkey for x in n],
            "coldkeys": [x.coldkey for x in n],
            "active": [True] * len(n),
            "validator_permit": self.permits(),
            "last_update": [x.last_update for x in n],
            "block_at_registration": [x.registered_at for x in n],
            "alpha_stake": [x.stake for x in n],
            "tao_stake": [0] * len(n),
            "total_stake": [x.stake for x in n],
            "axons": [x.axon or {"ip": 0, "port": 0, "ip_type": 0} for x in n],
        }

    # bittensor.Substrate: calls and writes

    async def compose(self, call: bt.calls.Call) -> bt.calls.Call:
        return call

    async def estimate_fee(self, call, keypair) -> bt.Balance:
        return bt.Balance(0)

    async def submit(self, call: bt.calls.Call, keypair, **_options) -> bt.ExtrinsicResult:
        """Dispatch `call` signed by `keypair` in the current block, as the pallet would."""
        signer = keypair.ss58_address
        self.submitted.append((signer, call))
        match call.module, call.function:
            case "SubtensorModule", "set_mechanism_weights":
                error = self._set_weights(signer, **call.params)
            case "SubtensorModule", "commit_timelocked_mechanism_weights":
                error = self._commit_weights(signer, **call.params)
            case "SubtensorModule", "serve_axon":
                error = self._serve_axon(signer, **call.params)
            case "SubtensorModule", "serve_axon_tls":
                error = self._serve_axon(signer, **call.params)
                if error is None:  # the pallet stores the first byte as the algorithm, the rest as the key
                    blob = call.params["certificate"]
                    self.neurons[self.uid(signer)].certificate = {
                        "public_key": "0x" + blob[1:].hex(),
                        "algorithm": blob[0],
                    }
            case _:
                raise NotImplementedError(f"the fake substrate cannot dispatch {call.module}.{call.function}")
        if error is None:
            return bt.ExtrinsicResult(success=True, message="Success", block_hash=await self.block_hash())
        # What the RPC backend reports for a pallet error: its docs, and its name.
        docs = next(e.docs for e in ERRORS.values() if (e.pallet, e.name) == ("SubtensorModule", error))
        return bt.ExtrinsicResult(success=False, message=docs, error=bt.ChainError(docs, error))

    def _set_weights(self, hotkey: str, netuid: int, mecid: int, dests: list, weights: list, version_key: int):
        """The pallet's checks, in its order, then the max-upscaled u16 row; returns the error's name or None."""
        uid = self.uid(hotkey)
        if (netuid, mecid) != (self.netuid, 0):
            return "MechanismDoesNotExist"
        if self.commit_reveal:
            return "CommitRevealEnabled"
        if len(dests) != len(weights):
            return "WeightVecNotEqualSize"
        if uid is None:
            return "HotKeyNotRegisteredInSubNet"
        if version_key < self.weights_version_key:
            return "IncorrectWeightVersionKey"
        neuron = self.neurons[uid]
        if neuron.last_update and self.block - neuron.last_update < self.rate_limit:
            return "SettingWeightsTooFast"
        self_weight = dests == [uid]
        if not (self_weight or self.permits()[uid]):
            return "NeuronNoValidatorPermit"
        if len(set(dests)) != len(dests):
            return "DuplicateUids"
        if any(dest >= len(self.neurons) for dest in dests):
            return "UidVecContainInvalidOne"
        if not self_weight and len(dests) < min(self.min_allowed_weights, len(self.neurons)):
            return "WeightVecLengthIsLow"
        top = max(weights, default=0) or 1
        self.weights[uid] = [(dest, value * U16_MAX // top) for dest, value in zip(dests, weights, strict=True)]
        neuron.last_update = self.block
        return None

    def _commit_weights(self, hotkey: str, netuid: int, mecid: int, commit: bytes, reveal_round: int, **_):
        """Keep a timelocked commit after the pallet's checks; returns the error's name or None."""
        uid = self.uid(hotkey)
        if (netuid, mecid) != (self.netuid, 0):
            return "MechanismDoesNotExist"
        if not self.commit_reveal:
            return "CommitRevealDisabled"
        if uid is None:
            return "HotKeyNotRegisteredInSubNet"
        neuron = self.neurons[uid]
        if neuron.last_update and self.block - neuron.last_update < self.rate_limit:
            return "CommittingWeightsTooFast"
        self.commits.append((hotkey, reveal_round, bytes(commit)))
        neuron.last_update = self.block
        return None

    def _serve_axon(self, hotkey: str, netuid: int, ip: int, port: int, ip_type: int, protocol: int, **_):
        """Store the endpoint after the pallet's checks; returns the error's name or None."""
        uid = self.uid(hotkey) if netuid == self.netuid else None
        if uid is None:
            return "HotKeyNotRegisteredInNetwork"
        neuron = self.neurons[uid]
        if neuron.axon and self.serving_rate_limit and self.block - neuron.axon["block"] < self.serving_rate_limit:
            return "ServingRateLimitExceeded"
        if ip_type not in (4, 6):
            return "InvalidIpType"
        neuron.axon = {"block": self.block, "ip": ip, "port": port, "ip_type": ip_type, "protocol": protocol}
        return None


class SubtensorUnderTest:
    """A `SubtensorChain` on netuid 10 of a `FakeSubstrate`, with the powers the chain tests need."""

    def __init__(self, rate_limit: int = 5, max_validators: int = 1):
        self.rate_limit = rate_limit
        self.substrate = FakeSubstrate(10, rate_limit=rate_limit, max_validators=max_validators)
        self.chain = SubtensorChain("local", netuid=10, substrate=self.substrate)
        # Connect now, while the token-symbol cache the SDK writes on connect points into a temporary directory.
        with (
            tempfile.TemporaryDirectory() as tmp,
            mock.patch.dict(os.environ, {"BTCLI_TOKEN_SYMBOLS_CACHE": os.path.join(tmp, "symbols.json")}),
        ):
            self.chain.block()

    def enroll(self, hotkey: str, coldkey: str, stake: float = 0.0) -> int:
        """Register `hotkey` directly in the chain's state, with `stake` TAO; returns its uid."""
        return self.substrate.register(hotkey, coldkey, stake)

    def advance(self, blocks: int) -> None:
        self.substrate.block += blocks
