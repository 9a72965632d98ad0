"""The wire between parties: Arrow Flight endpoints and calls, btauth identity, IPC frames, limits. No Ray."""

from mapreduce_ray.wire.config import WireConfig
from mapreduce_ray.wire.endpoint import Endpoint, Remote

__all__ = ["Endpoint", "Remote", "WireConfig"]
