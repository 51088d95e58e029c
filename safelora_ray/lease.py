"""A lease (lock with expiry) kept as one object in storage, taken with conditional writes.

Two runs that point at the same output root never interleave: the first takes the lease; the
second sees it held and stops. A run that died leaves a lease that expires after its TTL and is
then taken over. A live run renews its lease in the background.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from safelora_ray.errors import NotFoundError, SafeLoraError
from safelora_ray.storage import Storage

logger = logging.getLogger(__name__)


class LeaseHeldError(SafeLoraError):
    """Another live run holds the lease."""


@dataclass
class Lease:
    """A lease on ``path`` in ``storage``.

    Args:
        storage: Where the lease object lives.
        path: The lease object's path.
        owner: A description of this run (run id).
        ttl_s: Seconds after the last renewal at which the lease counts as abandoned.
    """

    storage: Storage
    path: str
    owner: str
    ttl_s: float = 6 * 3600

    def __post_init__(self) -> None:
        self.token = uuid.uuid4().hex
        self._version: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        now = time.time()
        return json.dumps({
            "owner": self.owner, "token": self.token, "host": socket.gethostname(),
            "pid": os.getpid(), "renewed_at": now, "expires_at": now + self.ttl_s,
        }).encode()

    def _current(self) -> tuple[dict[str, Any] | None, str | None]:
        try:
            version = self.storage.version(self.path)
            rec = json.loads(self.storage.read(self.path, max_bytes=1024**2))
        except NotFoundError:
            return None, None
        except ValueError:
            return {}, self.storage.version(self.path)  # garbage: treat as expired
        return rec if isinstance(rec, dict) else {}, version

    def acquire(self) -> None:
        """Take the lease, or take over an expired one.

        Raises:
            LeaseHeldError: a live run holds it (the message names the holder).
        """
        rec, version = self._current()
        if rec is not None and float(rec.get("expires_at", 0)) > time.time():
            raise LeaseHeldError(
                f"{self.storage.describe(self.path)} is held by run {rec.get('owner')!r} on "
                f"{rec.get('host')} until "
                f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(rec['expires_at']))}"
            )
        if rec is not None:
            logger.warning("taking over the expired lease of run %r", rec.get("owner"))
        if not self.storage.put_bytes_if(self.path, self._record(), if_version=version):
            raise LeaseHeldError(f"{self.storage.describe(self.path)} was taken by another run")
        self._version = self.storage.version(self.path)
        # Confirm: on stores without read-after-write conditional semantics, re-read wins.
        rec, _ = self._current()
        if not rec or rec.get("token") != self.token:
            raise LeaseHeldError(f"{self.storage.describe(self.path)} was taken by another run")
        self._thread = threading.Thread(target=self._renew_loop, name="lease-renew", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(max(1.0, self.ttl_s / 3)):
            try:
                if self.storage.put_bytes_if(self.path, self._record(), if_version=self._version):
                    self._version = self.storage.version(self.path)
                else:
                    logger.error("lease %s was lost to another run", self.path)
                    return
            except SafeLoraError as e:  # transient storage trouble: try again next period
                logger.warning("could not renew lease %s: %s", self.path, e)

    def release(self) -> None:
        """Give the lease back (only if it is still ours)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        rec, _ = self._current()
        if rec and rec.get("token") == self.token:
            self.storage.delete(self.path)

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
