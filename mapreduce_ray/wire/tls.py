"""Where a party's endpoint is announced on chain, with the fingerprint of its TLS certificate when it has one."""

from __future__ import annotations

from mapreduce_ray.chain import Chain
from mapreduce_ray.wire.config import WireConfig


def announce_address(chain: Chain, keypair, endpoint: str, wire: WireConfig) -> None:
    """Announce `endpoint` (host:port) for `keypair`'s hotkey."""
    chain.serve(keypair, endpoint)
