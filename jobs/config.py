"""Config groups whose settings are documented dataclasses: their defaults are defined once, in the code.

Importing this registers them with Hydra's ConfigStore: `wire: default` (WireConfig, every party's
endpoint limits and deadlines), `relay: default` (RelaySettings, a miner's retention) and
`validator: default` (ValidatorConfig, less what the jobs take from `subnet` and `topology`). The
YAML files name these groups in their defaults and set only what differs.
"""

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf, open_dict

from actors.relay import RelaySettings
from mapreduce_ray.validator.config import ValidatorConfig
from mapreduce_ray.wire.config import WireConfig
from mapreduce_ray.wire.tls import check_certificate

FROM_OTHER_GROUPS = ("namespace", "chunk_bytes", "timeout_s")  # ValidatorConfig fields set from subnet.*, topology.*


def _overridable(settings: type, without: tuple[str, ...] = ()) -> DictConfig:
    """The typed config of a frozen settings dataclass (less the fields `without`), open to command-line overrides
    (Hydra keeps a frozen dataclass read-only); the values are checked again when the dataclass is built from it."""
    node = OmegaConf.structured(settings)
    _writable(node)
    with open_dict(node):
        for name in without:
            del node[name]
    return node


def _writable(node: DictConfig) -> None:
    OmegaConf.set_readonly(node, False)
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            _writable(child)


_store = ConfigStore.instance()
_store.store(group="wire", name="default", node=_overridable(WireConfig))
_store.store(group="relay", name="default", node=_overridable(RelaySettings))
_store.store(group="validator", name="default", node=_overridable(ValidatorConfig, FROM_OTHER_GROUPS))


def wire_config(cfg: DictConfig) -> WireConfig:
    """The party's wire settings; with TLS, its certificate and key checked first (ValueError naming the fix)."""
    config = WireConfig(**OmegaConf.to_container(cfg.wire, resolve=True))
    if config.tls:
        check_certificate(config.tls_cert, config.tls_key)
    return config


def relay_settings(cfg: DictConfig) -> RelaySettings:
    return RelaySettings(**OmegaConf.to_container(cfg.relay, resolve=True))
