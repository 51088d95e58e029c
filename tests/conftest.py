"""Shared fixtures: a real S3 server (SeaweedFS on loopback), an offline Hugging Face Hub cache, a
local Ray per module; and Ray's token, temp files and logs kept inside the test run's own
temp dir, never in the user's ``~/.ray`` or ``/tmp/ray``."""

from __future__ import annotations

import logging
import os
import pathlib
import secrets
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

logger = logging.getLogger(__name__)

#: Ray's default token file, which a new local Ray writes when no token is configured.
HOME_TOKEN = pathlib.Path.home() / ".ray" / "auth_token"


_RAY_ENV = ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_TMPDIR", "RAY_AUTH_TOKEN",
            "RAY_ADDRESS", "SAFELORA_SET_CACHE")
_saved_env: dict[str, str | None] = {}
_ray_root: pathlib.Path | None = None
_had_home_token = False


def pytest_configure(config: pytest.Config) -> None:
    """Every Ray the tests start (in this process, in CLI subprocesses, ``ray start``) keeps
    its token, temp files and logs (and every process its copies of alignment sets kept on
    S3) in one short temp dir of this run (Unix socket paths are
    limited to ~107 bytes, so not under pytest's long tmp paths), with token auth on.

    Ray 2.60 turns token auth on for a new local instance and, without a token, writes one to
    ``~/.ray/auth_token``; a stray token there later turns auth on for the user's own
    ``ray start --head``. ``RAY_AUTH_TOKEN_PATH`` points Ray at this run's token instead.
    Set here, before any test module imports Ray: Ray reads its auth mode once, at import.
    """
    global _ray_root, _had_home_token
    _had_home_token = HOME_TOKEN.exists()
    _ray_root = pathlib.Path(tempfile.mkdtemp(prefix="slr-ray-", dir="/tmp"))
    token = _ray_root / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    for k in _RAY_ENV:
        _saved_env[k] = os.environ.pop(k, None)
    os.environ.update(RAY_AUTH_TOKEN_PATH=str(token), RAY_AUTH_MODE="token",
                      RAY_TMPDIR=str(_ray_root),
                      # nodes' copies of sets on S3: this run's, never the user's cache
                      SAFELORA_SET_CACHE=str(_ray_root / "set-cache"))


def pytest_unconfigure(config: pytest.Config) -> None:
    for k, v in _saved_env.items():
        os.environ.pop(k, None)
        if v is not None:
            os.environ[k] = v
    if _ray_root is not None:
        shutil.rmtree(_ray_root, ignore_errors=True)
    if not _had_home_token and HOME_TOKEN.exists():
        raise pytest.UsageError(
            f"the tests wrote Ray's token to {HOME_TOKEN}: keep it in RAY_AUTH_TOKEN_PATH")


@pytest.fixture(scope="session")
def ray_isolation() -> pathlib.Path:
    """The run's Ray temp dir (``RAY_TMPDIR``; see :func:`pytest_configure`)."""
    assert _ray_root is not None
    return _ray_root


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real S3 server for the session: SeaweedFS (:mod:`tests.seaweedfs`) on loopback ports,
    its data in the run's temp dir, stopped by pid at the end. Started once (~3 s)."""
    from tests.seaweedfs import SeaweedFS

    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server(seaweedfs: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The S3 endpoint of :func:`seaweedfs`; the AWS env points boto3 (and the CLI, and Ray
    workers started later) at it with the admin identity.

    Yields:
        The endpoint URL, ``http://127.0.0.1:<port>``.
    """
    empty = tmp_path_factory.mktemp("aws") / "none"
    with pytest.MonkeyPatch.context() as mp:
        for k, v in seaweedfs.env().items():
            mp.setenv(k, v)
        # Isolate from the developer's AWS setup and never reach instance metadata.
        mp.setenv("AWS_CONFIG_FILE", str(empty))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
        for var in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
            mp.delenv(var, raising=False)
        yield seaweedfs.endpoint


@pytest.fixture(scope="session")
def s3_admin_client(s3_server: str) -> Any:
    """A boto3 S3 client for :func:`s3_server`, shared by the session (clients are slow to make)."""
    import boto3

    return boto3.session.Session().client("s3", endpoint_url=s3_server)


@pytest.fixture
def s3_bucket(s3_admin_client: Any) -> str:
    """A fresh, empty bucket on :func:`s3_server`; returns its name."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    s3_admin_client.create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Any:
    """An empty output root, once on local disk and once in an S3 bucket."""
    from safelora_ray.storage import open_storage

    if request.param == "local":
        return open_storage(str(tmp_path / "out"))
    bucket = request.getfixturevalue("s3_bucket")
    return open_storage(f"s3://{bucket}/out")


@pytest.fixture
def hf_cache(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """An empty Hub cache dir in ``HF_HUB_CACHE``, with ``HF_HUB_OFFLINE=1``."""
    cache = tmp_path / "hf-hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert os.environ["HF_HUB_CACHE"] == str(cache)
    return cache


@pytest.fixture(scope="module")
def ray_local(s3_server: str, ray_isolation: pathlib.Path) -> Iterator[None]:
    """A real local Ray for one test module (2 CPUs, a small object store).

    Depends on ``s3_server`` so that the workers inherit the AWS settings of the S3 server.
    Started as the product starts a local Ray (``ensure_ray``: preloaded worker processes),
    its temp files under this run's temp dir.
    """
    import ray

    from safelora_ray.execution.ray_utils import ensure_ray

    ensure_ray(num_cpus=2, object_store_memory=150 * 1024**2, include_dashboard=False,
               log_to_driver=False, configure_logging=False,
               _temp_dir=tempfile.mkdtemp(prefix="m-", dir=ray_isolation))
    try:
        yield
    finally:
        ray.shutdown()
