"""Waiting on Ray calls: our errors come back as themselves, Ray's as one clear line."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from mapreduce_ray.errors import MapReduceError, RoundTimeoutError


def get(refs, timeout_s: float, what: str):
    """ray.get(refs) within `timeout_s`, errors raised as by `causes_raised`."""
    with causes_raised(what, timeout_s):
        return ray.get(refs, timeout=timeout_s)


@contextmanager
def causes_raised(what: str, timeout_s: float) -> Iterator[None]:
    """Raise our own errors from remote calls as themselves, and Ray's as one clear line."""
    try:
        yield
    except GetTimeoutError:
        raise RoundTimeoutError(f"{what}: no answer within {timeout_s:g} s") from None
    except RayTaskError as e:
        if isinstance(e.cause, MapReduceError):
            raise e.cause from None
        raise
    except RayActorError:
        raise MapReduceError(f"{what}: the actor died") from None
