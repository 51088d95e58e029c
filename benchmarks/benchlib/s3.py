"""Storage for ``--storage s3``: a moto S3 server (:class:`MotoS3`) or a real one, SeaweedFS
(:class:`SeaweedS3`, the launcher of the tests: ``tests/seaweedfs.py``), started by the
benchmark itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

from safelora_ray.formats.synthetic import MiB


class MotoS3:
    """A moto S3 server on 127.0.0.1 (a free port) with the AWS environment pointing at it.

    Must be started **before** ``ray.init`` so that the Ray workers inherit the environment.
    Objects live in the server's process (this driver): its memory counts in the driver's RSS.
    """

    def __init__(self, workdir: Path) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        empty = workdir / "aws-none"
        empty.write_text("")
        os.environ.update({
            "AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(empty),
            "AWS_SHARED_CREDENTIALS_FILE": str(empty),
        })
        for var in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
            os.environ.pop(var, None)
        import boto3

        self.client = boto3.session.Session().client("s3", endpoint_url=self.endpoint)
        self.bucket = "safelora-bench"
        self.client.create_bucket(Bucket=self.bucket)

    def upload_tree(self, local: str | Path, prefix: str) -> str:
        """Upload a directory tree; returns its ``s3://`` URI."""
        from boto3.s3.transfer import TransferConfig

        cfg = TransferConfig(multipart_chunksize=64 * MiB, max_concurrency=4)
        local = Path(local)
        for f in sorted(p for p in local.rglob("*") if p.is_file()):
            key = f"{prefix}/{f.relative_to(local).as_posix()}"
            self.client.upload_file(str(f), self.bucket, key, Config=cfg)
        return f"s3://{self.bucket}/{prefix}"

    def uri(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.server.stop()


def _point_env(env: dict[str, str], workdir: Path) -> None:
    """Point boto3 (this process, and Ray workers started later) at ``env``'s server."""
    empty = workdir / "aws-none"
    empty.write_text("")
    os.environ.update({**env, "AWS_EC2_METADATA_DISABLED": "true",
                       "AWS_CONFIG_FILE": str(empty), "AWS_SHARED_CREDENTIALS_FILE": str(empty)})
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
        os.environ.pop(var, None)


class SeaweedS3(MotoS3):
    """A real S3 server: SeaweedFS on loopback ports, its data under ``workdir/seaweedfs``,
    stopped (by pid) by :meth:`stop`. Same interface as :class:`MotoS3`; its processes are
    not the driver's (their RSS is not in the driver's)."""

    def __init__(self, workdir: Path, bucket: str = "safelora-bench", *,
                 volume_size_mb: int = 64, volumes_per_growth: int = 1) -> None:
        repo = str(Path(__file__).resolve().parents[2])
        if repo not in sys.path:
            sys.path.append(repo)
        from tests.seaweedfs import SeaweedFS

        self.weed = SeaweedFS(Path(workdir) / "seaweedfs", volume_size_mb=volume_size_mb,
                              volumes_per_growth=volumes_per_growth).start()
        self.endpoint = self.weed.endpoint
        _point_env(self.weed.env(), Path(workdir))
        self.client: Any = self.weed.client(max_pool_connections=64)
        self.bucket = bucket
        self.client.create_bucket(Bucket=self.bucket)

    def stop(self) -> None:
        self.weed.stop()
