"""Shared fixtures: an S3 server (moto over real HTTP) and an offline Hugging Face Hub cache."""

from __future__ import annotations

import logging
import os
import pathlib
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

logger = logging.getLogger(__name__)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server on a free localhost port; the AWS env points boto3 at it.

    Yields:
        The endpoint URL, ``http://127.0.0.1:<port>``.
    """
    from moto.server import ThreadedMotoServer

    # werkzeug logs every request at INFO; keep test output readable.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    empty = tmp_path_factory.mktemp("aws") / "none"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        # Isolate from the developer's AWS setup and never reach instance metadata.
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        mp.setenv("AWS_CONFIG_FILE", str(empty))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
        for var in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
            mp.delenv(var, raising=False)
        try:
            yield endpoint
        finally:
            server.stop()


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
def ray_local(s3_server: str) -> Iterator[None]:
    """A real local Ray for one test module (2 CPUs, a small object store).

    Depends on ``s3_server`` so that the workers inherit the AWS settings of the moto server.
    Started as the product starts a local Ray (``ensure_ray``: preloaded worker processes).
    """
    import ray

    from safelora_ray.ray_utils import ensure_ray

    ensure_ray(num_cpus=2, object_store_memory=150 * 1024**2, include_dashboard=False,
               log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()
