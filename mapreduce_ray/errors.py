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


class PeerLostError(MapReduceError):
    """A peer of the round sent nothing, or its chunks were lost with its process: the round cannot finish."""


class NonFiniteError(MapReduceError, ValueError):
    """A peer handed in NaN or Inf to a job that refuses them."""


class MinerFaultError(MapReduceError):
    """A miner died, failed, missed its deadline or sent results its signatures do not vouch for;
    peers hand its segment to the next miner."""


class WrongResultError(MinerFaultError):
    """A miner sent a reduced chunk that fails the peers' check of it: a wrong result, proven."""


class IdentityError(MapReduceError):
    """Who a party is, or what it may do, could not be established."""


class WalletError(IdentityError):
    """A wallet or its hotkey is missing or unreadable."""


class ChainError(IdentityError):
    """The chain refused a request or could not be reached."""


class NotRegisteredError(ChainError):
    """A hotkey is not registered on the subnet."""


class NoValidatorPermitError(ChainError):
    """A hotkey acts as a validator but holds no validator permit."""


class RateLimitedError(ChainError):
    """The chain's rate limit forbids this write for some more blocks."""


class MessageRejectedError(IdentityError):
    """A signed message failed a check; the subclass names which."""


class MalformedMessageError(MessageRejectedError):
    """Not a message of our protocol, or not of the expected kind or version."""


class SignatureSchemeError(MessageRejectedError):
    """Signed with another scheme than sr25519."""


class BadSignatureError(MessageRejectedError):
    """The signature does not match the bytes: tampered, or signed by another key."""


class WrongReceiverError(MessageRejectedError):
    """Addressed to another hotkey."""


class ExpiredMessageError(MessageRejectedError):
    """Timestamp outside the accepted window."""


class ReplayedMessageError(MessageRejectedError):
    """A nonce this receiver has already seen from this sender."""


class LimitExceededError(MessageRejectedError):
    """A caller went past one of an endpoint's limits (wire settings): refused, not queued."""


class FrameRejectedError(MessageRejectedError):
    """An Arrow IPC frame from another party is not one of ours: another schema, malformed, too large, or
    its bytes do not match the digest signed for them."""


class EndpointError(MapReduceError):
    """Another party's endpoint could not be reached, refused a call, or answered outside the protocol."""


class CertificateMismatchError(EndpointError):
    """An endpoint's TLS key is not the one its hotkey announced on chain."""


# Errors a miner reports because of the peers or their job, not itself: every peer gets them as they are.
PEER_FAULTS = (PeerLostError, RoundMismatchError, JobError, NonFiniteError, InvalidTensorError)
