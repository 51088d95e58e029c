"""A lease (lock with expiry) kept as one object in storage, taken with conditional writes.

Two runs that point at the same output never interleave: the first takes the lease; the
second sees it held and stops (exit 4) or, asked to wait, polls until it is free. A live run
renews its lease every ``ttl_s / 6`` seconds (a heartbeat); a lease not renewed for ``ttl_s``
seconds (default 60) is abandoned and taken over. A lease whose holder is provably dead is
taken over at once: it was taken on this host (same hostname, boot and PID namespace) and its
process is gone, or its pid now belongs to a process started at another time.

Where the leases live: the nightly's at ``<output_root>/_nightly/lock.json``; ``sanitize``'s
and ``project-model``'s at ``<out>/_safelora/lease.json`` (:data:`OUT_LEASE`). Both folders
start with ``_``: no catalog lists them and no sweep removes them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from safelora_ray.core.errors import LeaseHeldError, NotFoundError, SafeLoraError, StorageError
from safelora_ray.core.validate import env_number
from safelora_ray.storage import Storage
from safelora_ray.storage.local import LocalStorage, remove_empty_dir

logger = logging.getLogger(__name__)

#: The lease of a ``sanitize`` or ``project-model`` output, under its ``--out``.
OUT_LEASE = "_safelora/lease.json"
#: Seconds without a renewal after which a lease counts as abandoned.
DEFAULT_TTL_S = env_number("SAFELORA_LEASE_TTL_S", 60)
#: Seconds between two looks at a held lease while waiting for it.
WAIT_POLL_S = 1.0
#: Reads of a lease record renewed while it was read, before giving up.
_READ_TRIES = 5

__all__ = ["DEFAULT_TTL_S", "OUT_LEASE", "Lease", "LeaseHeldError", "hold_output"]


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return None


def host_id() -> str:
    """This host as a lease records it: hostname, kernel boot and PID namespace (two
    containers on one node share the boot, never the namespace)."""
    try:
        ns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        ns = "-"
    boot = _read_text("/proc/sys/kernel/random/boot_id") or "-"
    return f"{socket.gethostname()}|{boot}|{ns}"


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of ``pid`` from /proc, None without it."""
    raw = _read_text(f"/proc/{pid}/stat")
    if raw is None or ")" not in raw:
        return None
    fields = raw.rsplit(")", 1)[1].split()  # after "pid (comm)": comm may hold spaces
    return (fields[0], fields[19]) if len(fields) > 19 else None


def process_start(pid: int) -> str | None:
    """When ``pid`` started (to tell it from a later process given the same pid)."""
    st = _proc_stat(pid)
    return st[1] if st else None


def process_gone(pid: int, started: str | None) -> bool:
    """Whether process ``pid`` (started at ``started``) provably no longer runs here."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # another user's process: it exists
    except OSError:
        return False
    st = _proc_stat(pid)
    if st is None:
        return False
    state, start = st
    return state in ("Z", "X") or (started is not None and start != started)


@dataclass
class Lease:
    """A lease on ``path`` in ``storage``.

    Args:
        storage: Where the lease object lives.
        path: The lease object's path.
        owner: A description of this run (run id).
        ttl_s: Seconds after the last renewal at which the lease counts as abandoned; it is
            renewed every ``ttl_s / 6``.
        command: The command holding it (named when another run is refused).
    """

    storage: Storage
    path: str
    owner: str
    ttl_s: float = DEFAULT_TTL_S
    command: str = ""

    def __post_init__(self) -> None:
        self.token = uuid.uuid4().hex
        self._version: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._host = host_id()
        self._pid = os.getpid()
        self._started = process_start(self._pid)
        # Folders the lease alone creates go with it (a run refused at once leaves no --out).
        self._new_dirs: list[str] = []
        if isinstance(self.storage, LocalStorage):
            d = os.path.dirname(os.path.join(self.storage.root, self.path))
            while not os.path.isdir(d) and d.startswith(self.storage.root):
                self._new_dirs.append(d)
                d = os.path.dirname(d)

    def _record(self) -> bytes:
        now = time.time()
        return json.dumps({
            "owner": self.owner, "command": self.command, "token": self.token,
            "host": socket.gethostname(),
            "host_id": self._host, "pid": self._pid, "pid_started": self._started,
            "renewed_at": now, "ttl_s": self.ttl_s, "expires_at": now + self.ttl_s,
        }).encode()

    def _current(self) -> tuple[dict[str, Any] | None, str | None]:
        """The recorded lease and its version, read as one: the holder may renew it between
        the reads (its version, its size, its bytes), which shows as a changed version or a
        short read; such a read is done again."""
        for attempt in range(_READ_TRIES):
            try:
                version = self.storage.version(self.path)
                raw = self.storage.read(self.path, max_bytes=1024**2)
                if self.storage.version(self.path) != version:
                    continue
            except NotFoundError:
                return None, None
            except StorageError:
                if attempt == _READ_TRIES - 1:
                    raise
                continue
            try:
                rec = json.loads(raw)
            except ValueError:
                return {}, version  # garbage: treat as expired
            return rec if isinstance(rec, dict) else {}, version
        raise StorageError(f"{self.storage.describe(self.path)} changed at every one of "
                           f"{_READ_TRIES} reads")

    def _why_free(self, rec: dict[str, Any]) -> str | None:
        """Why a recorded lease may be taken over, or None while its holder may be alive."""
        try:
            expires, pid = float(rec["expires_at"]), int(rec["pid"])
        except (KeyError, TypeError, ValueError):
            return "it is unreadable"
        if expires <= time.time():
            return f"it expired (no renewal for {rec.get('ttl_s', '?')} s)"
        if rec.get("host_id") == self._host and process_gone(pid, rec.get("pid_started")):
            return f"its process {pid} on this host is gone"
        return None

    def _held_message(self, rec: dict[str, Any]) -> str:
        ago = time.time() - float(rec.get("renewed_at", 0))
        until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(rec["expires_at"])))
        cmd = f"{rec['command']} " if rec.get("command") else ""
        return (f"{self.storage.describe(self.path)} is held by {cmd}run {rec.get('owner')!r} "
                f"(pid {rec.get('pid')} on {rec.get('host')}, renewed {ago:.0f} s ago; "
                f"abandoned if not renewed until {until})")

    def acquire(self, wait_s: float | None = None) -> None:
        """Take the lease, or take over an abandoned one.

        Args:
            wait_s: While a live run holds it, look again every second for at most this many
                seconds (``math.inf``: until it is free); None: do not wait.

        Raises:
            LeaseHeldError: a live run holds it (the message names the holder).
        """
        self._stop.clear()  # (a lease given back by a failed acquire may be taken again)
        try:
            self._acquire(wait_s)
        except BaseException:
            # Ctrl-C or an error once the record may be written (a PUT whose answer was
            # lost, the confirming read, the heartbeat's start): the caller gets no lease to
            # release, so a record of ours goes now instead of blocking the next run.
            with contextlib.suppress(Exception):
                self.release()
            raise

    def _acquire(self, wait_s: float | None) -> None:
        deadline = None if wait_s is None else time.monotonic() + wait_s
        waiting, races = False, 0
        while True:
            rec, version = self._current()
            why = None if rec is None else self._why_free(rec)
            if rec is None or why is not None:
                if rec is not None:
                    logger.warning("taking over the lease %s of run %r: %s",
                                   self.storage.describe(self.path), rec.get("owner"), why)
                if self._take(version):
                    break
                rec = self._current()[0]  # another run was faster
                if not rec or self._why_free(rec) is not None:
                    races += 1
                    if races > 5:
                        raise LeaseHeldError(
                            f"{self.storage.describe(self.path)} could not be taken: other "
                            "runs keep taking it")
                    continue
            if deadline is None or time.monotonic() >= deadline:
                raise LeaseHeldError(self._held_message(rec))
            if not waiting:
                logger.info("waiting: %s", self._held_message(rec))
                waiting = True
            time.sleep(min(WAIT_POLL_S, max(0.0, deadline - time.monotonic())))
        self._thread = threading.Thread(target=self._renew_loop, name="lease-renew", daemon=True)
        self._thread.start()

    def _take(self, version: str | None) -> bool:
        if not self.storage.put_bytes_if(self.path, self._record(), if_version=version):
            # A conditional PUT whose response was lost is retried by botocore and then fails
            # its own precondition (412): the record there may be ours all the same.
            rec, current = self._current()
            if not rec or rec.get("token") != self.token:
                return False
            self._version = current
            return True
        self._version = self.storage.version(self.path)
        # Confirm: on stores without read-after-write conditional semantics, re-read wins.
        rec, _ = self._current()
        return bool(rec) and rec.get("token") == self.token

    def _renew_loop(self) -> None:
        while not self._stop.wait(max(0.2, self.ttl_s / 6)):
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
        try:
            rec, _ = self._current()
            if rec and rec.get("token") == self.token:
                self.storage.delete(self.path)
        except SafeLoraError as e:
            # The store is unreachable as the run ends (an S3 outage): the run's own result
            # matters more than this delete; the lease lapses by itself.
            logger.warning("could not release lease %s (%s): it lapses %.0f s after its last "
                           "renewal, or at once for a run on this host once this process has "
                           "ended", self.storage.describe(self.path), e, self.ttl_s)
            return
        for d in self._new_dirs:  # deepest first; one holding anything else stays
            if not remove_empty_dir(d):
                break

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def hold_output(storage: Storage, command: str, owner: str,
                wait_s: float | None = None) -> Lease:
    """Take the lease of an output root (:data:`OUT_LEASE`) for ``command``'s run ``owner``;
    the caller releases it on every way out.

    Raises:
        LeaseHeldError: another live run writes there (and ``wait_s`` ran out).
    """
    lease = Lease(storage, OUT_LEASE, owner=owner, command=command)
    lease.acquire(wait_s=wait_s)
    return lease

