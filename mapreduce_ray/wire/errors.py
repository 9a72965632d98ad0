"""Errors across the wire: ours travel as a class name and one line of text, never as objects.

A server raises `refusal(error)`; the Flight error carries the message and, in its extra info,
JSON naming the class. The caller's `translated` raises that class again if it is one of ours
(looked up by name among mapreduce_ray.errors), prefixed with who answered; anything else the
wire throws becomes an EndpointError or, for a deadline, a RoundTimeoutError.
"""

from __future__ import annotations

import inspect
import json
import re

import pyarrow.flight as fl

from mapreduce_ray import errors
from mapreduce_ray.errors import EndpointError, IdentityError, MapReduceError, RoundTimeoutError

MAX_MESSAGE_CHARS = 600
MAX_EXTRA_BYTES = 256
KNOWN = {
    name: cls
    for name, cls in inspect.getmembers(errors, inspect.isclass)
    if issubclass(cls, MapReduceError) and cls.__module__ == errors.__name__
}
_DETAIL = re.compile(r"(\. Detail: .*|\. gRPC client debug context: .*)$", re.DOTALL)
_PREFIX = re.compile(r"^Flight returned [a-z ]+ error, with message: ")
_TOO_LARGE = re.compile(r"Received message larger than max \((\d+) vs\. (\d+)\)")


def refusal(error: MapReduceError) -> fl.FlightError:
    """The Flight error that carries one of our errors to the caller."""
    kind = fl.FlightUnauthenticatedError if isinstance(error, IdentityError) else fl.FlightServerError
    text = " ".join(str(error).split())[:MAX_MESSAGE_CHARS]
    return kind(text, extra_info=json.dumps({"error": type(error).__name__}).encode())


def translated(error: fl.FlightError, who: str) -> MapReduceError:
    """Our error for a Flight error a call to `who` raised."""
    text = _PREFIX.sub("", _DETAIL.sub("", str(error)))[:MAX_MESSAGE_CHARS]
    if isinstance(error, fl.FlightTimedOutError):
        return RoundTimeoutError(f"{who} did not answer in time")
    if isinstance(error, fl.FlightUnavailableError):
        return EndpointError(f"{who} cannot be reached: {text}")
    if isinstance(error, fl.FlightCancelledError):
        return EndpointError(f"{who}: the call was cancelled (a message over the size limit, or the stream was cut)")
    cls = KNOWN.get(_class_name(getattr(error, "extra_info", b"")))
    if cls is None:
        return EndpointError(f"{who} answered outside the protocol: {text}")
    if issubclass(cls, IdentityError):
        return cls(f"{who} refused the call: {text}")
    return cls(text)


def stream_fault(error: Exception) -> str:
    """Why a stream broke, in one line: gRPC's refusal of a message over the size limit is named as such."""
    text = " ".join(str(error).split())
    too_large = _TOO_LARGE.search(text)
    if too_large:
        return f"sent a message over the size limit ({too_large[1]} bytes, at most {too_large[2]})"
    return f"broke off the job stream ({text[:300]})"


def _class_name(extra: bytes | None) -> str:
    if not extra or len(extra) > MAX_EXTRA_BYTES:
        return ""
    try:
        value = json.loads(extra)
    except (ValueError, UnicodeDecodeError):
        return ""
    name = value.get("error") if isinstance(value, dict) else None
    return name if isinstance(name, str) else ""
