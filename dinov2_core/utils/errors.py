"""Tell transient failures (worth retrying) from permanent ones, and retry the transient ones.

One classifier for every layer: curation's reads, Prefect task retries, training data reads. A
*transient* error is one where the same call can succeed a moment later without anyone changing
anything: a refused or reset connection, a timeout, an S3 5xx or throttling reply, a stale NFS handle.
A *permanent* one needs a person: a full disk (``ENOSPC``), an exceeded quota (``EDQUOT``), a missing
file, a permission error, a read-only filesystem, a bad config, an undecodable image.

Standard library only. botocore / aiobotocore / aiohttp / urllib3 exceptions are recognised by class
name and module, walking the class hierarchy, so this module never imports them.
"""

from __future__ import annotations

import errno
import random
import socket
import time
from typing import Callable, TypeVar

T = TypeVar("T")

#: errno values that a retry cannot fix.
PERMANENT_ERRNOS = frozenset(
    getattr(errno, name) for name in (
        "ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM", "ENOENT", "EISDIR", "ENOTDIR", "ELOOP",
        "ENAMETOOLONG", "EEXIST", "ENOTEMPTY", "EINVAL", "EFBIG", "EMFILE", "ENFILE", "EXDEV",
    ) if hasattr(errno, name)
)

#: errno values of network and remote-filesystem hiccups.
TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name) for name in (
        "ECONNREFUSED", "ECONNRESET", "ECONNABORTED", "EPIPE", "ETIMEDOUT", "EHOSTUNREACH", "EHOSTDOWN",
        "ENETUNREACH", "ENETDOWN", "ENETRESET", "EAGAIN", "EWOULDBLOCK", "EINTR", "ESTALE", "EBUSY",
    ) if hasattr(errno, name)
)

#: Exception class names (anywhere in the class hierarchy) of network failures in botocore,
#: aiobotocore, aiohttp, urllib3, requests and http.client.
TRANSIENT_CLASS_NAMES = frozenset({
    # botocore / aiobotocore (botocore's own ``ConnectionError`` is not the builtin one)
    "ConnectionError", "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
    "ProxyConnectionError", "HTTPClientError", "ResponseStreamingError", "IncompleteReadError",
    # aiohttp
    "ClientConnectionError", "ClientConnectorError", "ServerDisconnectedError", "ServerTimeoutError",
    "ClientPayloadError", "ClientOSError",
    # urllib3 / requests / http.client
    "NewConnectionError", "ProtocolError", "MaxRetryError", "RemoteDisconnected", "IncompleteRead",
    "ChunkedEncodingError",
    "ConnectTimeout", "ReadTimeout",
    # fsspec
    "FSTimeoutError",
})

#: S3 / AWS error codes that mean "try again".
TRANSIENT_AWS_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "ProvisionedThroughputExceededException",
    "RequestLimitExceeded", "BandwidthLimitExceeded", "RequestTimeout", "RequestTimeoutException",
    "InternalError", "InternalFailure", "ServiceUnavailable", "ServiceUnavailableException",
    "503", "500", "502", "504",
})

_MAX_CHAIN = 8


def _class_names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def _aws_transient(exc: BaseException) -> bool | None:
    """For a botocore ``ClientError``-like exception: whether its code or HTTP status is retryable."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    code = str((response.get("Error") or {}).get("Code", ""))
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    if code in TRANSIENT_AWS_CODES:
        return True
    if isinstance(status, int):
        return status == 429 or status >= 500
    return False


def _classify_one(exc: BaseException) -> bool | None:
    """True / False when ``exc`` itself decides, None when only its cause can tell."""
    declared = getattr(exc, "transient", None)
    if isinstance(declared, bool):  # an exception class of ours that says so itself
        return declared
    if isinstance(exc, OSError) and exc.errno is not None:
        if exc.errno in PERMANENT_ERRNOS:
            return False
        if exc.errno in TRANSIENT_ERRNOS:
            return True
    if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout)):
        return True
    if _class_names(exc) & TRANSIENT_CLASS_NAMES:
        return True
    aws = _aws_transient(exc)
    if aws is not None:
        return aws
    return None


def is_transient_error(exc: BaseException) -> bool:
    """Whether retrying the failed call may succeed without anyone changing anything.

    Looks at ``exc`` and then at its ``__cause__`` / ``__context__`` chain (s3fs and fsspec wrap the
    botocore error in an ``OSError``); the first exception that decides wins. An exception may decide
    for itself with a boolean ``transient`` attribute (e.g. an ingest that lost reads to an outage). ``ENOSPC`` and
    ``EDQUOT`` (disk full, quota exceeded) are never transient; neither is anything unrecognised.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < _MAX_CHAIN:
        seen.add(id(current))
        verdict = _classify_one(current)
        if verdict is not None:
            return verdict
        current = current.__cause__ or current.__context__
    return False


def backoff_delay(attempt: int, base_s: float, max_s: float = 30.0) -> float:
    """Delay before retry number ``attempt`` (1-based): ``base_s * 2**(attempt-1)``, capped, with
    ±25 % jitter so many workers that failed together do not retry in lockstep."""
    delay = min(max_s, base_s * 2 ** (attempt - 1))
    return delay * random.uniform(0.75, 1.25)


def call_with_retries(call: Callable[[], T], retries: int, backoff_s: float,
                      on_retry: Callable[[BaseException, int], None] | None = None) -> T:
    """``call()``, retried up to ``retries`` times with exponential backoff while it raises a
    transient error (:func:`is_transient_error`); a permanent error, or the last transient one, is raised."""
    attempt = 0
    while True:
        try:
            return call()
        except Exception as err:
            if attempt >= retries or not is_transient_error(err):
                raise
            attempt += 1
            if on_retry is not None:
                on_retry(err, attempt)
            time.sleep(backoff_delay(attempt, backoff_s))
