"""Errors a user of the collectives can meet; each message names the fix."""


class MapReduceError(Exception):
    """Base class of every error raised by mapreduce_ray."""


class UnsupportedDtypeError(MapReduceError, TypeError):
    """The tensor's element type cannot be reduced or carried."""


class InvalidTensorError(MapReduceError, ValueError):
    """The tensor cannot take part as given (empty, read-only, wrong device, too big)."""


class JobError(MapReduceError):
    """Joining, using or leaving a job failed."""


class RoundMismatchError(MapReduceError):
    """Peers disagree about a round (op, dtype, shape or source)."""


class RoundTimeoutError(MapReduceError, TimeoutError):
    """A round did not complete before its deadline."""
