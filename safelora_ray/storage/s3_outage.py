"""Riding out an S3 server that goes away for a while (a restart, a fail-over).

botocore's ``standard`` retries are made for single failed requests, not for an endpoint that
is down for seconds: a connection error waits 50 ms x 2^attempt with full jitter, so 10
attempts give up after 12.8 s on average (25.6 s at most, often well under 10 s), and the
client's retry quota (500 tokens, 14 per retry, shared by every thread of the client) runs
dry after ~35 retries: with 8 I/O threads a few seconds of outage is enough, after which every
request fails at once. A restarted SeaweedFS is gone 4-10 s; each adapter in flight then
failed.

:func:`ride_out_outages` adds a ``needs-retry`` handler to a client: once the endpoint has
answered in this process, a request that meets a connection error or a 500/502/503/504 is
retried (capped exponential backoff, no quota) until :data:`OUTAGE_S` seconds after its first
failure; then it fails as before, and the storage layer turns that into the adapter's error.
An endpoint that never answered (a wrong ``AWS_ENDPOINT_URL``) keeps botocore's ordinary
retries, so a typo still fails in seconds, not after the whole window.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any

import botocore.exceptions

from safelora_ray.core.validate import env_number

logger = logging.getLogger(__name__)

#: Seconds a request keeps being retried after its first failure while an endpoint that has
#: answered before is unreachable or answers 5xx (``SAFELORA_S3_OUTAGE_S``; 0 turns it off).
OUTAGE_S: float = env_number("SAFELORA_S3_OUTAGE_S", 60.0, float)
#: The longest wait between two attempts (a server back up is found within this).
_MAX_DELAY_S = 2.0
_OUTAGE_STATUS = {500, 502, 503, 504}
# Refused/timed-out connects (ConnectionError), resets and read timeouts (HTTPClientError).
_OUTAGE_ERRORS = (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError)

_answered: set[str] = set()  # endpoints that have answered once in this process
_warned: set[str] = set()
_state_lock = threading.Lock()


def _status(response: Any) -> int | None:
    if response is None:
        return None
    http = response[0] if isinstance(response, tuple) else response
    return getattr(http, "status_code", None)


def _needs_retry(response: Any = None, endpoint: Any = None, attempts: int = 1,
                 caught_exception: BaseException | None = None,
                 request_dict: dict[str, Any] | None = None, **_: Any) -> float | None:
    """A delay in seconds to retry after, or None (botocore's own handler decides)."""
    url = str(getattr(endpoint, "host", ""))
    status = _status(response)
    if status is not None and status not in _OUTAGE_STATUS:
        if url not in _answered:
            with _state_lock:
                _answered.add(url)
        return None
    outage = status in _OUTAGE_STATUS or isinstance(caught_exception, _OUTAGE_ERRORS)
    if not outage or OUTAGE_S <= 0 or url not in _answered or request_dict is None:
        return None
    context = request_dict.setdefault("context", {})
    now = time.monotonic()
    first = context.setdefault("safelora_first_failure", now)
    if now - first >= OUTAGE_S:
        return None
    if url not in _warned:
        with _state_lock:
            _warned.add(url)
        what = f"HTTP {status}" if status is not None else type(caught_exception).__name__
        logger.warning("S3 endpoint %s is not answering (%s): requests are retried for up to "
                       "%.0f s (SAFELORA_S3_OUTAGE_S)", url, what, OUTAGE_S)
    # Jittered, so that the threads of a fleet do not all come back at the same instant.
    cap = min(_MAX_DELAY_S, 0.1 * 2 ** min(attempts, 10))
    return random.uniform(cap / 2, cap)


def ride_out_outages(client: Any) -> Any:
    """Register the outage handler on ``client`` (an S3 client); returns the client."""
    client.meta.events.register("needs-retry.s3", _needs_retry,
                                unique_id="safelora-ride-out-outages")
    return client


__all__ = ["OUTAGE_S", "ride_out_outages"]
