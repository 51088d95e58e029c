"""A small fault-injecting HTTP proxy for S3 tests, in front of an S3 server (the tests' SeaweedFS).

Clients point ``AWS_ENDPOINT_URL`` at the proxy; it forwards every request to the upstream
server and, on a configurable schedule, answers some of them with a fault instead:

- ``"500"``: HTTP 500 with an S3 ``InternalError`` XML body (the request is not forwarded);
- ``"503"``: HTTP 503 with an S3 ``SlowDown`` XML body (throttling; not forwarded);
- ``"reset"``: the connection is closed after the request was read, before any response byte
  (the request is not forwarded);
- ``"truncate"``: the request *is* forwarded, then the status line, the headers and half of
  the body are sent and the connection is closed mid-response (for a response without a body,
  half of the header block).

botocore's ``standard`` retry mode retries 500, 503 SlowDown and broken connections; a
streaming GET whose body breaks is re-read by the storage layer itself.

Apart from the schedule, ``deny_prefixes`` models a bucket policy that denies some keys:
every request for an object under one of them, and every LIST whose ``prefix`` lies under
one, is answered HTTP 403 ``AccessDenied`` (always, not retried to success: like S3; not
forwarded). ``deny_methods`` narrows it to some methods: ``{"PUT", "POST", "DELETE"}`` makes a
read-only prefix.

The proxy is bounded: it injects at most ``max_faults`` faults, never faults the same request
(method, path, query, Range) twice, so every retried request eventually goes through, and it
shuts itself down after ``lifetime_s`` seconds even if the test forgets to. It records what it
did in :attr:`S3FaultProxy.stats` so a test can assert that the faults really happened and
that every faulted request was retried to success.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import socket
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

logger = logging.getLogger(__name__)

KINDS = ("500", "503", "reset", "truncate")

_HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailers", "transfer-encoding", "upgrade", "expect",
}

_ERROR_XML = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
    "<Message>{message}</Message><RequestId>fault-{n}</RequestId></Error>"
)
_ERRORS = {
    "500": (500, "Internal Server Error", "InternalError",
            "We encountered an internal error. Please try again."),
    "503": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "denied": (403, "Forbidden", "AccessDenied", "Access Denied"),
}


@dataclass
class FaultSchedule:
    """Which requests get a fault.

    Attributes:
        every: Fault every ``every``-th eligible request (1 = every eligible one).
        kinds: Fault kinds, used in turn (see the module docstring).
        max_faults: Stop injecting after this many faults.
        skip_first: Let this many eligible requests through before the first fault.
        methods: Only requests with these HTTP methods are eligible (None: all).
        deny_prefixes: ``bucket/key-prefix`` strings whose objects and listings are always
            answered 403 AccessDenied (see the module docstring); not counted as faults.
        deny_methods: Only these methods are denied under ``deny_prefixes`` (None: all).
    """

    every: int = 3
    kinds: tuple[str, ...] = KINDS
    max_faults: int = 1000
    skip_first: int = 0
    methods: frozenset[str] | None = None
    deny_prefixes: tuple[str, ...] = ()
    deny_methods: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError("every must be >= 1")
        unknown = set(self.kinds) - set(KINDS)
        if unknown or not self.kinds:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; use {KINDS}")


@dataclass
class ProxyStats:
    """What the proxy did (read under :attr:`S3FaultProxy.lock`, or after :meth:`stop`).

    Attributes:
        requests: Requests received.
        forwarded: Requests forwarded upstream (including truncated ones).
        injected: Faults injected, by kind.
        faulted_keys: Request keys that got a fault (method, path?query, Range).
        retried_ok: Faulted keys that were later requested again and answered in full.
        error_answered: Truncated keys whose status line, sent whole, was an error (404 ...):
            the client has its answer from it and rightly does not ask again.
        by_method: Requests received, by method.
        paths: Requests received, by path (without the query string).
    """

    requests: int = 0
    forwarded: int = 0
    injected: Counter[str] = field(default_factory=Counter)
    faulted_keys: set[tuple[str, str, str]] = field(default_factory=set)
    retried_ok: set[tuple[str, str, str]] = field(default_factory=set)
    error_answered: set[tuple[str, str, str]] = field(default_factory=set)
    by_method: Counter[str] = field(default_factory=Counter)
    paths: Counter[str] = field(default_factory=Counter)
    denied: int = 0

    @property
    def total_injected(self) -> int:
        return sum(self.injected.values())

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "forwarded": self.forwarded,
                "injected": dict(self.injected), "total_injected": self.total_injected,
                "faulted_requests": len(self.faulted_keys),
                "retried_ok": len(self.retried_ok), "by_method": dict(self.by_method),
                "denied": self.denied}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    proxy: S3FaultProxy


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as botocore's pool expects
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("s3-fault-proxy: " + format, *args)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)
            return b"".join(chunks)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _handle(self) -> None:
        proxy = self.server.proxy
        body = self._body()
        key = (self.command, self.path, self.headers.get("Range", ""))
        fault = proxy._decide(key, self.command)
        if fault in _ERRORS:
            status, reason, code, message = _ERRORS[fault]
            payload = _ERROR_XML.format(code=code, message=message,
                                        n=proxy.stats.total_injected).encode()
            self.send_response(status, reason)
            self.send_header("Content-Type", "application/xml")
            self.send_header("x-amz-request-id", "fault-proxy")
            if fault == "503":
                self.send_header("Retry-After", "0")
            if self.command == "HEAD":
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            return
        if fault == "reset":
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        status, reason, headers, data = proxy._forward(self.command, self.path, self.headers,
                                                       body)
        head = [f"{self.protocol_version} {status} {reason}\r\n".encode("latin-1")]
        length_sent = False
        for k, v in headers:
            lk = k.lower()
            if lk in _HOP_BY_HOP:
                continue
            if lk == "content-length":
                if self.command == "HEAD":
                    length_sent = True
                    head.append(f"{k}: {v}\r\n".encode("latin-1"))
                continue
            head.append(f"{k}: {v}\r\n".encode("latin-1"))
        if not length_sent:
            head.append(f"Content-Length: {len(data)}\r\n".encode("latin-1"))
        head.append(b"\r\n")
        raw_head = b"".join(head)
        payload = b"" if self.command == "HEAD" else data
        if fault == "truncate":
            self.close_connection = True
            # With a body: every header and half of the body. Without one: part of the
            # status line (a truncated header block would read as a complete response).
            cut = raw_head + payload[: len(payload) // 2] if payload else raw_head[:10]
            if payload and status >= 300:
                with proxy.lock:
                    proxy.stats.error_answered.add(key)
            with contextlib.suppress(OSError):
                self.wfile.write(cut)
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(raw_head + payload)
        proxy._completed(key)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


class S3FaultProxy:
    """A threaded HTTP proxy on 127.0.0.1 that injects S3 faults (see the module docstring).

    Args:
        upstream: The real server, ``http://host:port``.
        schedule: Which requests get which fault.
        lifetime_s: The proxy stops itself after this long.

    Use as a context manager; :attr:`endpoint` is the URL to give clients.
    """

    def __init__(self, upstream: str, schedule: FaultSchedule | None = None,
                 lifetime_s: float = 600.0) -> None:
        u = urllib.parse.urlsplit(upstream)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.upstream_host, self.upstream_port = u.hostname, u.port or 80
        self.schedule = schedule or FaultSchedule()
        self.lifetime_s = lifetime_s
        self.stats = ProxyStats()
        self.lock = threading.Lock()
        self._eligible = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None
        self._local = threading.local()
        self.endpoint = ""

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> str:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.proxy = self
        self._server = server
        host, port = server.server_address[:2]
        self.endpoint = f"http://{host}:{port}"
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="s3-fault-proxy", daemon=True)
        self._thread.start()
        self._timer = threading.Timer(self.lifetime_s, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self.endpoint

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._timer is not None and threading.current_thread() is not self._timer:
            self._timer.cancel()

    def __enter__(self) -> S3FaultProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- scheduling --------------------------------------------------------------------------
    def _decide(self, key: tuple[str, str, str], method: str) -> str | None:
        s = self.schedule
        with self.lock:
            self.stats.requests += 1
            self.stats.by_method[method] += 1
            self.stats.paths[key[1].split("?", 1)[0]] += 1
            if (s.deny_prefixes and (s.deny_methods is None or method in s.deny_methods)
                    and _denied(key[1], s.deny_prefixes)):
                self.stats.denied += 1
                return "denied"
            if s.methods is not None and method not in s.methods:
                return None
            if key in self.stats.faulted_keys or self.stats.total_injected >= s.max_faults:
                return None  # a retry always goes through: the run can complete
            self._eligible += 1
            n = self._eligible - s.skip_first
            if n <= 0 or n % s.every:
                return None
            kind = s.kinds[self.stats.total_injected % len(s.kinds)]
            self.stats.injected[kind] += 1
            self.stats.faulted_keys.add(key)
            return kind

    def _completed(self, key: tuple[str, str, str]) -> None:
        with self.lock:
            if key in self.stats.faulted_keys:
                self.stats.retried_ok.add(key)

    # -- forwarding --------------------------------------------------------------------------
    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=60)
            self._local.conn = conn
        return conn

    def _forward(self, method: str, path: str, headers: Any, body: bytes
                 ) -> tuple[int, str, list[tuple[str, str]], bytes]:
        fwd = [(k, v) for k, v in headers.items() if k.lower() not in _HOP_BY_HOP
               and k.lower() != "content-length"]
        for attempt in (1, 2):  # a pooled upstream connection may have gone stale
            conn = self._conn()
            try:
                conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
                for k, v in fwd:
                    conn.putheader(k, v)
                conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body or None)
                resp = conn.getresponse()
                data = resp.read()
                break
            except (OSError, http.client.HTTPException):
                conn.close()
                self._local.conn = None
                if attempt == 2:
                    raise
        with self.lock:
            self.stats.forwarded += 1
        return resp.status, resp.reason, list(resp.getheaders()), data


def _denied(target: str, prefixes: tuple[str, ...]) -> bool:
    """Whether a path-style request (``/bucket/key?query``) is for an object under one of
    ``prefixes``, or is a LIST of a prefix under one."""
    split = urllib.parse.urlsplit(target)
    path = urllib.parse.unquote(split.path).lstrip("/")
    query = urllib.parse.parse_qs(split.query)
    if "prefix" in query and "/" not in path.rstrip("/"):
        path = f"{path.rstrip('/')}/{query['prefix'][0]}"
    return any(path.startswith(p) for p in prefixes)


def wait_for(predicate: Any, timeout: float = 30.0, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


__all__ = ["KINDS", "FaultSchedule", "ProxyStats", "S3FaultProxy", "wait_for"]
