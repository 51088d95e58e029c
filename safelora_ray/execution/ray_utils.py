"""Small Ray helpers shared by the build and the sanitizer (connection, resources, waiting)."""

from __future__ import annotations

import logging
import os
from typing import Any

import ray

from safelora_ray.core.interrupts import reclaim
from safelora_ray.core.validate import env_number

logger = logging.getLogger(__name__)


#: Storage settings forwarded from the driver to worker actors. Secrets (keys, tokens) are
#: deliberately absent: workers get credentials from the platform (IRSA, instance profiles,
#: mounted secrets), and a runtime_env is visible in the dashboard.
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "HF_HOME",
    "HF_HUB_CACHE",
    "HF_HUB_OFFLINE",
    "HF_ENDPOINT",
)


#: Ray setting read from the environment when a node starts: modules each worker process
#: imports as soon as it starts, before any actor needs them. Names, not imports: the
#: execution layer still imports no pipeline; the workers import the heavy task modules.
PRELOAD_ENV = "RAY_preload_python_modules"
PRELOAD_MODULES = ("torch,safelora_ray.execution.actor,safelora_ray.pipelines.build.worker,"
                   "safelora_ray.pipelines.sanitize.worker")

#: The environment of a local Ray's processes (unless set already): preloaded modules, and
#: two glibc malloc arenas per process — a worker runs up to ~70 threads (batches, a holder's
#: requests, I/O), each of which would get an arena keeping the memory it freed (glibc's
#: default: 8 per core). Measured: -60 MB RSS for a CPU node's holder, same speed
#: (docs/benchmarks.md, section 11). Clusters set it in their node spec (cluster/).
LOCAL_NODE_ENV = {PRELOAD_ENV: PRELOAD_MODULES, "MALLOC_ARENA_MAX": "2"}

# The forwarded variables as they were when this process started a local Ray (whose workers
# inherit its environment), and that instance's job id.
_local_env: dict[str, str] | None = None
_local_job: str | None = None


def _forwarded_env() -> dict[str, str]:
    return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}


def worker_runtime_env() -> dict[str, Any]:
    """A runtime_env that gives worker actors the driver's storage settings.

    Empty when the workers already have them: a local Ray this process started, with the same
    settings then as now. An empty runtime_env also lets an actor take one of the worker
    processes Ray started ahead (one with a runtime_env needs a new process: ~0.5 s more).
    """
    env = _forwarded_env()
    if (_local_env is not None and env == _local_env and ray.is_initialized()
            and ray.get_runtime_context().get_job_id() == _local_job):
        return {}
    return {"env_vars": env} if env else {}


#: Seconds to reach a cluster's address (DNS + TCP) and then to connect to it, before
#: ``ensure_ray`` gives up (Ray itself retries a wrong address for minutes).
CONNECT_TIMEOUT_S = env_number("SAFELORA_RAY_CONNECT_TIMEOUT_S", 60)
_PROBE_TIMEOUT_S = 10.0


def _host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of a GCS (``host:port``) or Ray Client (``ray://host:port``) address."""
    rest = address[len("ray://"):] if address.startswith("ray://") else address
    if "://" in rest:
        return None
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def probe_address(address: str, timeout_s: float = _PROBE_TIMEOUT_S) -> None:
    """Fail fast on a Ray address nothing answers at.

    Raises:
        ClusterError: naming the address: malformed, unknown host, or nothing listening.
    """
    import socket

    from safelora_ray.core.errors import ClusterError

    if address == "auto":
        return  # Ray answers at once when no local cluster runs
    if address.startswith(("http://", "https://")):
        raise ClusterError(
            f"Ray address {address!r} is a dashboard / job-server URL: pass it to "
            "`ray job submit` (RAY_ADDRESS there), and give this tool the cluster's GCS "
            "address (host:6379) or a Ray Client address (ray://host:10001)")
    hp = _host_port(address)
    if hp is None:
        raise ClusterError(f"Ray address {address!r} is not host:port, ray://host:port or "
                           "'auto'")
    host, port = hp
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except socket.gaierror as e:
        raise ClusterError(f"cannot reach the Ray cluster at {address!r}: unknown host "
                           f"{host!r} ({e.strerror})") from None
    except OSError as e:
        why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise ClusterError(f"cannot reach the Ray cluster at {address!r}: {why} (is the head "
                           "node up, and is this its GCS port, 6379 by default?)") from None


#: Where Ray 2.60 writes the token of a new local instance when none is configured. A token
#: there later turns token auth on for the user's own ``ray start --head``, whose clients
#: (``ray job submit``) then fail with "Missing authentication token".
HOME_TOKEN_PARTS = (".ray", "auth_token")
_TOKEN_ENV = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def _private_token() -> None:
    """Give a new local Ray a token of this process, never one in the user's home.

    Ray turns token auth on for a new local instance and, when it finds no token (in
    ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``), writes one to
    ``~/.ray/auth_token``. A token the user configured (or already has) is used as it is;
    otherwise this process writes one to a private temp dir (0700, the file 0600), points
    ``RAY_AUTH_TOKEN_PATH`` at it (the node processes inherit it) and removes it at exit.
    """
    import atexit
    import pathlib
    import secrets
    import shutil
    import tempfile

    if (any(os.environ.get(k) for k in _TOKEN_ENV)
            or os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled"
            or pathlib.Path.home().joinpath(*HOME_TOKEN_PARTS).exists()):
        return
    root = tempfile.mkdtemp(prefix="safelora-ray-auth-")
    token = os.path.join(root, "auth_token")
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    os.environ["RAY_AUTH_TOKEN_PATH"] = token
    # Registered before ray.init: at exit Ray's own shutdown (registered later) runs first.
    atexit.register(shutil.rmtree, root, True)


def ensure_ray(address: str | None = None, **init_kwargs: Any) -> None:
    """Connect to the cluster in ``address`` / ``RAY_ADDRESS``, or start a local one.

    A driver already connected (tests, Ray Jobs) is left as it is. A wrong address fails
    within :data:`CONNECT_TIMEOUT_S` with a message naming it (Ray alone retries for
    minutes). A local instance starts its worker processes with torch and safelora_ray
    imported (``RAY_preload_python_modules``, unless set already), so the first actors need
    not wait for those imports.

    Worker output is not forwarded to the driver: workers' log records travel back with their
    results and are emitted here, in order, once (see :mod:`safelora_ray.execution.relay`).

    Raises:
        ClusterError: the cluster cannot be reached or connected to in time.
    """
    global _local_env, _local_job
    if ray.is_initialized():
        return
    if not _tty():
        # Ray prints its own notices (a worker or node that died) with colour codes: not
        # into a log file.
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": False}
    if logging.getLogger().getEffectiveLevel() > logging.INFO:  # -q: only our warnings
        kwargs["logging_level"] = logging.WARNING  # no "Started a local Ray instance"
        _mute(TOKEN_NOTICES_LOGGER)
    if address is None:
        kwargs["include_dashboard"] = False
    else:
        probe_address(address)
    kwargs.update(init_kwargs)
    logger.info("connecting to Ray at %s", address or "a new local instance")
    # Read by the node processes ray.init starts (and so by every worker), not by this one.
    node_env = ({k: v for k, v in LOCAL_NODE_ENV.items() if k not in os.environ}
                if address is None else {})
    os.environ.update(node_env)
    try:
        if address is None:
            # A new private instance, even if a `ray start` cluster runs on this machine (Ray
            # would join that one): no address configured means a local Ray of our own.
            _private_token()
            ray.init(address="local", **kwargs)
        else:
            _init_bounded(address, kwargs)
    finally:
        for k in node_env:
            os.environ.pop(k, None)
    reclaim()  # ray.init replaced the SIGTERM handler: a stop must wind the run down
    if address is None:
        _local_env, _local_job = _forwarded_env(), ray.get_runtime_context().get_job_id()


#: The logger of Ray's notices that it turned token auth on (or found it off) for a new
#: local instance: facts about Ray's defaults, which ``-q`` does not print.
TOKEN_NOTICES_LOGGER = "ray._private.authentication.authentication_token_setup"


class _Drop(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


def _mute(name: str) -> None:
    """Drop every record of the logger ``name`` (once: the filter is not added twice)."""
    log = logging.getLogger(name)
    if not any(isinstance(f, _Drop) for f in log.filters):
        log.addFilter(_Drop())


def _tty() -> bool:
    import sys

    try:
        return sys.stdout.isatty() and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _init_bounded(address: str, kwargs: dict[str, Any]) -> None:
    """``ray.init(address)`` given :data:`CONNECT_TIMEOUT_S`: something that accepts TCP but
    is no Ray head (or a head that never answers) must not hang the run."""
    import threading

    from safelora_ray.core.errors import ClusterError

    box: dict[str, BaseException | None] = {}

    def connect() -> None:
        try:
            ray.init(address=address, **kwargs)
            box["error"] = None
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=connect, name="safelora-ray-connect", daemon=True)
    t.start()
    t.join(CONNECT_TIMEOUT_S)
    if "error" not in box:
        raise ClusterError(f"could not connect to the Ray cluster at {address!r} within "
                           f"{CONNECT_TIMEOUT_S:.0f} s (it accepts connections but does not "
                           "answer as a Ray head)")
    err = box["error"]
    if err is not None:
        raise ClusterError(f"could not connect to the Ray cluster at {address!r}: "
                           f"{type(err).__name__}: {err}") from err


def pick_device(num_gpus: float) -> str:
    """``cuda`` when the actor was given a GPU and torch sees one, else ``cpu``."""
    import torch

    if num_gpus > 0 and ray.get_gpu_ids() and torch.cuda.is_available():
        return "cuda"
    if num_gpus > 0:
        logger.warning("worker was scheduled on a GPU but torch sees no CUDA device; using CPU")
    return "cpu"


def get_unwrapped(ref: ray.ObjectRef, timeout_s: float) -> Any:
    """``ray.get`` with a timeout that re-raises our own errors without Ray's wrapper.

    A :class:`~safelora_ray.core.errors.SafeLoraError` raised in a worker reaches the user as the
    same one-line message it would have locally, not a remote traceback.
    """
    from safelora_ray.core.errors import SafeLoraError

    try:
        return ray.get(ref, timeout=timeout_s)
    except ray.exceptions.RayTaskError as e:
        cause = e.cause
        if isinstance(cause, SafeLoraError):
            raise cause from None
        raise
