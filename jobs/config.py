"""Config groups whose settings are documented dataclasses: their defaults are defined once, in the code.

Importing this registers them with Hydra's ConfigStore: `wire: default` (WireConfig, every party's
endpoint limits and deadlines) and `relay: default` (RelaySettings, a miner's retention).
"""

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from actors.relay import RelaySettings
from mapreduce_ray.wire.config import WireConfig
from mapreduce_ray.wire.tls import check_certificate


def _overridable(settings: type) -> DictConfig:
    """The typed config of a frozen settings dataclass, open to command-line overrides (Hydra keeps a frozen
    dataclass read-only); the values are checked again when the dataclass is built from it."""
    node = OmegaConf.structured(settings)
    OmegaConf.set_readonly(node, False)
    return node


_store = ConfigStore.instance()
_store.store(group="wire", name="default", node=_overridable(WireConfig))
_store.store(group="relay", name="default", node=_overridable(RelaySettings))


def wire_config(cfg: DictConfig) -> WireConfig:
    """The party's wire settings; with TLS, its certificate and key checked first (ValueError naming the fix)."""
    config = WireConfig(**OmegaConf.to_container(cfg.wire, resolve=True))
    if config.tls:
        check_certificate(config.tls_cert, config.tls_key)
    return config


def relay_settings(cfg: DictConfig) -> RelaySettings:
    return RelaySettings(**OmegaConf.to_container(cfg.relay, resolve=True))
