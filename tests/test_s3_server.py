"""What the product relies on from S3, exercised on a real server (SeaweedFS, the session's
``s3_server``): ranged GETs, multipart uploads above the single-PUT limit, conditional writes
for the leases, checksums as current boto3 sends them, listing 10,000 keys in order, and the
errors a user meets (a missing bucket, a read-only identity, wrong keys) as one-line CLI
messages that never show a credential."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

import safelora_ray.storage.s3 as s3mod
from safelora_ray.cli.demo import write_adapter
from safelora_ray.cli.main import main as cli_main
from safelora_ray.core.errors import ChangedError, NotFoundError, StorageError
from safelora_ray.storage import open_storage
from tests.seaweedfs import ADMIN_SECRET, READER_KEY, READER_SECRET
from tests.test_guardrails import tiny_world

MiB = 1024 * 1024


def _pattern(n: int, seed: int = 0) -> bytes:
    return (hashlib.sha256(str(seed).encode()).digest() * (n // 32 + 1))[:n]


def test_ranged_gets_split_into_parts(s3_bucket: str) -> None:
    s = open_storage(f"s3://{s3_bucket}/r")
    data = _pattern(3 * MiB + 12345)
    s.put_bytes("blob", data)
    for start, n in [(0, 1), (7, 100), (MiB - 3, 7), (len(data) - 10, 10), (0, len(data))]:
        assert s.read_range("blob", start, n) == data[start : start + n]
    s.part_size = 256 * 1024  # a read above it is several parallel ranged GETs
    buf = bytearray(2 * MiB + 3)
    s.read_into("blob", 11, memoryview(buf))
    assert bytes(buf) == data[11 : 11 + len(buf)]
    assert s.bytes_read >= len(buf)
    # a range partly past the end: S3 answers 206 with what there is; the product says so
    with pytest.raises(StorageError, match=r"short read .* got 1 \(the object has \d+ bytes"):
        s.read_range("blob", len(data) - 1, 2)
    with pytest.raises(StorageError, match="past the end"):
        s.read_range("blob", len(data) + 5, 2)


def test_reads_pinned_to_a_listed_version(s3_bucket: str, tmp_path: Path) -> None:
    """A read given the version a listing showed (``If-Match``) fails with ChangedError once
    the object is rewritten, in one GET or in parallel ranged parts; so does a local file's."""
    s = open_storage(f"s3://{s3_bucket}/pin")
    s.put_bytes("blob", _pattern(MiB + 7))
    (listed,) = list(s.list(""))
    assert s.read("blob", if_version=listed.version) == _pattern(MiB + 7)
    s.put_bytes("blob", _pattern(MiB + 7, seed=1))  # same size, other bytes
    with pytest.raises(ChangedError, match=r"s3://.*/pin/blob changed since it was listed"):
        s.read("blob", if_version=listed.version)
    s.part_size = 256 * 1024
    with pytest.raises(ChangedError):
        s.read_into("blob", 0, memoryview(bytearray(MiB)), if_version=listed.version)
    (now,) = list(s.list(""))
    s.read_into("blob", 0, memoryview(bytearray(MiB)), if_version=now.version)
    local = open_storage(str(tmp_path))
    local.put_bytes("f", b"one")
    (lv,) = list(local.list(""))
    assert local.read("f", if_version=lv.version) == b"one"
    os.utime(tmp_path / "f", ns=(1, 1))
    with pytest.raises(ChangedError):
        local.read_into("f", 0, memoryview(bytearray(3)), if_version=lv.version)


def test_multipart_upload_above_the_single_put_limit(s3_bucket: str, tmp_path: Path,
                                                     s3_admin_client: Any,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard above ``UPLOAD_PART_SIZE`` goes up in parts (lowered to S3's 5 MiB minimum),
    each with the CRC32 checksum current boto3 sends by default; it reads back byte-exact."""
    monkeypatch.setattr(s3mod, "UPLOAD_PART_SIZE", 5 * MiB)
    data = _pattern(12 * MiB + 5, seed=1)
    local = tmp_path / "shard.safetensors"
    local.write_bytes(data)
    s = open_storage(f"s3://{s3_bucket}/set")
    s.put_file("shards/shard-0.safetensors", str(local))
    head = s3_admin_client.head_object(Bucket=s3_bucket, Key="set/shards/shard-0.safetensors")
    assert head["ETag"].strip('"').endswith("-3")  # three parts: 5 + 5 + 2 MiB
    assert head["ContentLength"] == len(data)
    assert s.read_range("shards/shard-0.safetensors", 0, len(data)) == data
    # a small file is one PUT
    local.write_bytes(b"x" * 100)
    s.put_file("small", str(local))
    assert "-" not in s.version("small")


def test_current_boto3_checksums_are_accepted(s3_bucket: str, s3_admin_client: Any) -> None:
    cfg = s3_admin_client.meta.config
    assert getattr(cfg, "request_checksum_calculation", "when_supported") == "when_supported"
    s = open_storage(f"s3://{s3_bucket}")
    s.put_bytes("c", b"checksummed")
    got = s3_admin_client.get_object(Bucket=s3_bucket, Key="c", ChecksumMode="ENABLED")
    assert got["Body"].read() == b"checksummed"


def test_conditional_writes_for_leases(s3_bucket: str) -> None:
    """``If-None-Match: *`` and ``If-Match`` are honoured (SeaweedFS >= 4 answers 412), so
    two lease takers can never both win."""
    s = open_storage(f"s3://{s3_bucket}/locks")
    assert s.put_bytes_if("lease", b"a", if_version=None) is True
    assert s.put_bytes_if("lease", b"b", if_version=None) is False  # already taken
    v = s.version("lease")
    assert s.put_bytes_if("lease", b"c", if_version="0" * 32) is False  # stale version
    assert s.read_range("lease", 0, 1) == b"a"
    assert s.put_bytes_if("lease", b"d", if_version=v) is True
    assert s.read_range("lease", 0, 1) == b"d"
    assert s.put_bytes_if("gone", b"e", if_version=v) is False  # If-Match on a missing key
    assert not s.exists("gone")
    # Racing creators: exactly one wins.
    with ThreadPoolExecutor(8) as pool:
        wins = list(pool.map(lambda i: s.put_bytes_if("race", b"%d" % i, if_version=None),
                             range(8)))
    assert wins.count(True) == 1


def test_the_server_grows_the_volumes_it_is_told(tmp_path: Path) -> None:
    """The benchmarks' server makes SeaweedFS's seven volumes per growth step, the tests' one
    (hundreds of buckets); each its own collection, so a bucket's first PUT shows it."""
    from tests.seaweedfs import SeaweedFS

    with SeaweedFS(tmp_path / "weed", volume_size_mb=128, volumes_per_growth=3) as srv:
        client = srv.client()
        for bucket in ("growth-three", "growth-three-b"):
            client.create_bucket(Bucket=bucket)
            client.put_object(Bucket=bucket, Key="k", Body=b"x")
            assert srv.writable_volumes(bucket) == 3


def test_listing_ten_thousand_keys(s3_bucket: str, seaweedfs: Any) -> None:
    keys = [f"cat/t{i % 7}/ad-{i:05d}/adapter_config.json" for i in range(10_000)]
    seaweedfs.put_many(s3_bucket, dict.fromkeys(keys, b"{}"))
    s = open_storage(f"s3://{s3_bucket}/cat")
    got = [o.path for o in s.list()]
    assert got == sorted(k[len("cat/"):] for k in keys)
    assert len(got) == 10_000 and all(o.size == 2 for o in s.list("t3"))


def test_order_is_byte_order_even_where_the_server_walks_a_tree(s3_bucket: str) -> None:
    s = open_storage(f"s3://{s3_bucket}")
    for k in ("a/b", "a-c", "a.d/e", "a0", "Z"):
        s.put_bytes(k, b"1")
    assert [o.path for o in s.list()] == ["Z", "a-c", "a.d/e", "a/b", "a0"]


# ----------------------------------------------------------------------------------------------
# Errors as a user meets them: one line each, naming the URI, never a credential
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    w = tiny_world(tmp_path_factory.mktemp("s3err"))
    g = torch.Generator().manual_seed(0)
    cat = w["root"] / "cat"
    for name in ("a1", "a2"):
        lora = {m: (torch.randn(2, r.shape[1], generator=g), torch.randn(r.shape[0], 2,
                                                                         generator=g))
                for m, r in w["rows"].items()}
        write_adapter(cat / name, lora, 2)
    w["cat"] = cat
    return w


def _upload(client: Any, bucket: str, prefix: str, local: Path) -> None:
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        client.upload_file(str(f), bucket, f"{prefix}/{f.relative_to(local).as_posix()}")


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli_main(argv)
    out, err = capsys.readouterr()
    return code, out + err


def _one_line_error(text: str) -> str:
    lines = [ln for ln in text.splitlines() if "error" in ln.lower()]
    assert lines, text
    assert "Traceback" not in text, text
    for secret in (ADMIN_SECRET, READER_SECRET):
        assert secret not in text
    return lines[0]


def test_missing_bucket_is_one_line(small_world: dict[str, Any], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    code, text = _cli(["sanitize", "--alignment", small_world["set"], "--adapters",
                       "s3://no-such-bucket-slr/cat", "--out", str(tmp_path / "o"),
                       "--workers", "0", "--no-progress", "--threshold", "0.35"], capsys)
    assert code != 0
    line = _one_line_error(text)
    assert "no-such-bucket-slr" in line and "does not exist" in line, text
    code, text = _cli(["inspect", "s3://no-such-bucket-slr/set"], capsys)
    assert code != 0 and "no-such-bucket-slr" in _one_line_error(text)


def test_read_only_identity_gets_access_denied(small_world: dict[str, Any], s3_bucket: str,
                                               s3_admin_client: Any, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Inputs readable, the output not writable: the run stops with one line naming the
    output and AccessDenied; nothing of the secret shows anywhere."""
    _upload(s3_admin_client, s3_bucket, "cat", small_world["cat"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", READER_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", READER_SECRET)
    s = open_storage(f"s3://{s3_bucket}/out")
    with pytest.raises(StorageError, match=r"access denied to s3://.*/out/x \(PUT, HTTP 403"):
        s.put_bytes("x", b"1")
    assert open_storage(f"s3://{s3_bucket}/cat").exists("a1/adapter_config.json")
    code, text = _cli(["sanitize", "--alignment", small_world["set"], "--adapters",
                       f"s3://{s3_bucket}/cat", "--out", f"s3://{s3_bucket}/out",
                       "--workers", "0", "--no-progress", "--threshold", "0.35"], capsys)
    assert code != 0, text
    line = _one_line_error(text)
    assert "access denied" in line.lower() and f"s3://{s3_bucket}/out" in line, text
    assert READER_SECRET not in text


def test_wrong_keys_are_one_line(small_world: dict[str, Any], s3_bucket: str,
                                 capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "no-such-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-abcdef")
    code, text = _cli(["inspect", f"s3://{s3_bucket}/set"], capsys)
    assert code != 0
    line = _one_line_error(text)
    assert "403" in line and f"s3://{s3_bucket}/set" in line, text
    assert "wrong-secret-abcdef" not in text


def test_sanitize_s3_to_s3_reports_hold_no_credentials(small_world: dict[str, Any],
                                                        s3_bucket: str, s3_admin_client: Any,
                                                        capsys: pytest.CaptureFixture[str],
                                                        caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    _upload(s3_admin_client, s3_bucket, "cat", small_world["cat"])
    code, text = _cli(["sanitize", "--alignment", small_world["set"], "--adapters",
                       f"s3://{s3_bucket}/cat", "--out", f"s3://{s3_bucket}/out",
                       "--workers", "0", "--no-progress", "--threshold", "0.35"], capsys)
    assert code == 0, text
    out = open_storage(f"s3://{s3_bucket}/out")
    paths = [o.path for o in out.list()]
    assert any(p.startswith("a1/") for p in paths) and any(p.startswith("a2/") for p in paths)
    secrets = (ADMIN_SECRET.encode(), os.environ["AWS_SECRET_ACCESS_KEY"].encode())
    for p in paths:
        body = out.read_range(p, 0, out.size(p))
        assert not any(s in body for s in secrets), p
    assert not any(s.decode() in text + caplog.text for s in secrets)
    with pytest.raises(NotFoundError):
        out.size("a1/nothing")


# ----------------------------------------------------------------------------------------------
# Requests per adapter: what a sanitize s3 → s3 asks the server, beyond the floor's GET + PUT
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def s3_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every S3 call the product's clients make from now on, as ``(operation, key or
    prefix)`` (botocore's ``before-parameter-build``: one per call, whatever its retries)."""
    calls: list[tuple[str, str]] = []
    make = s3mod._new_client

    def counted() -> Any:
        client = make()

        def seen(model: Any, params: dict[str, Any], **_: Any) -> None:
            calls.append((model.name, str(params.get("Key") or params.get("Prefix") or "")))

        client.meta.events.register("before-parameter-build.s3", seen)
        return client

    monkeypatch.setattr(s3mod, "_new_client", counted)
    return calls


def test_sanitize_s3_requests_per_adapter_and_reruns(small_world: dict[str, Any],
                                                      s3_bucket: str, s3_admin_client: Any,
                                                      s3_calls: list[tuple[str, str]]) -> None:
    """A new adapter costs the floor's four requests (its two GETs, its two output PUTs) and
    its ledger record's PUT: its folder's listing is the catalog's (no LIST per adapter), the
    ledger is listed once per run (no GET that 404s per adapter) and the outputs' versions
    come from the PUTs' ETags (no LIST of them). Those versions are the ones a listing
    shows: a rerun skips every adapter, and redoes one whose output changed."""
    from safelora_ray import SanitizeConfig, sanitize

    _upload(s3_admin_client, s3_bucket, "cat", small_world["cat"])
    cfg = dict(alignment=small_world["set"], adapters=f"s3://{s3_bucket}/cat",
               out=f"s3://{s3_bucket}/out", threshold=0.35, workers=0, progress=False)
    r = sanitize(SanitizeConfig(**cfg))
    assert (r.ok, r.skipped, r.error) == (2, 0, 0), r.errors
    for ad in ("a1", "a2"):
        mine = [(op, k.split(f"/{ad}", 1)[1].lstrip("/.")) for op, k in s3_calls
                if f"/{ad}/" in k or k.endswith(f"/{ad}") or f"_ledger/{ad}." in k]
        assert sorted(mine) == sorted([
            ("GetObject", "adapter_config.json"),
            ("GetObject", "adapter_model.safetensors"), ("PutObject", "adapter_config.json"),
            ("PutObject", "adapter_model.safetensors"), ("PutObject", "json"),
        ]), (mine, s3_calls)
    assert [k for op, k in s3_calls if op == "ListObjectsV2" and "_ledger" in k] == [
        "out/_ledger/"]
    # The recorded versions are the listing's: a rerun reads no weights and skips both.
    s3_calls.clear()
    r = sanitize(SanitizeConfig(**cfg))
    assert (r.ok, r.skipped, r.error) == (0, 2, 0), r.errors
    assert not [k for op, k in s3_calls if op == "GetObject" and k.endswith(".safetensors")]
    # One output replaced behind the ledger's back: that adapter alone is redone.
    s3_admin_client.put_object(Bucket=s3_bucket, Key="out/a1/adapter_model.safetensors",
                               Body=b"not the output")
    r = sanitize(SanitizeConfig(**cfg))
    assert (r.ok, r.skipped, r.error) == (1, 1, 0), r.errors
    # --force reads no record at all.
    s3_calls.clear()
    r = sanitize(SanitizeConfig(**cfg, force=True))
    assert (r.ok, r.skipped, r.error) == (2, 0, 0), r.errors
    assert not [k for op, k in s3_calls if "_ledger" in k and op != "PutObject"]


def test_adapter_rewritten_after_the_catalog_was_listed(
        small_world: dict[str, Any], s3_bucket: str, s3_admin_client: Any,
        s3_calls: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    """The catalog's listing pins what is read: an adapter rewritten between the listing and
    its turn is listed again and read whole at its new version (never the listed versions
    recorded against new bytes: a rerun then skips it without reading its weights)."""
    from safelora_ray import SanitizeConfig, sanitize
    from safelora_ray.pipelines.sanitize import driver

    _upload(s3_admin_client, s3_bucket, "cat", small_world["cat"])
    listed = driver.iter_catalog

    def listed_then_rewritten(uri: str) -> Any:
        items = list(listed(uri))
        body = s3_admin_client.get_object(
            Bucket=s3_bucket, Key="cat/a2/adapter_model.safetensors")["Body"].read()
        s3_admin_client.put_object(Bucket=s3_bucket, Key="cat/a1/adapter_model.safetensors",
                                   Body=body)
        yield from items

    monkeypatch.setattr(driver, "iter_catalog", listed_then_rewritten)
    cfg = dict(alignment=small_world["set"], adapters=f"s3://{s3_bucket}/cat",
               out=f"s3://{s3_bucket}/out", threshold=0.35, workers=0, progress=False)
    r = sanitize(SanitizeConfig(**cfg))
    assert (r.ok, r.skipped, r.error) == (2, 0, 0), r.errors
    out = [s3_admin_client.get_object(Bucket=s3_bucket, Key=f"out/{a}/adapter_model."
                                      "safetensors")["Body"].read() for a in ("a1", "a2")]
    assert out[0] == out[1]  # a1 was read at its new version: a2's bytes
    assert [k for op, k in s3_calls if op == "ListObjectsV2" and "/a1" in k] == ["cat/a1/"]
    monkeypatch.setattr(driver, "iter_catalog", listed)
    s3_calls.clear()
    r = sanitize(SanitizeConfig(**cfg))
    assert (r.ok, r.skipped, r.error) == (0, 2, 0), r.errors
    assert not [k for op, k in s3_calls if op == "GetObject" and k.endswith(".safetensors")]


def test_cli_on_s3_shows_the_runs_lines_not_botocores(small_world: dict[str, Any],
                                                     s3_bucket: str, s3_admin_client: Any,
                                                     tmp_path: Path) -> None:
    """At the default level a run on S3 prints its own lines, not botocore's INFO lines (a
    "Found credentials in environment variables" for every client made); ``-v`` shows them."""
    import subprocess
    import sys

    _upload(s3_admin_client, s3_bucket, "cat", small_world["cat"])
    args = [sys.executable, "-m", "safelora_ray", "sanitize", "--alignment",
            small_world["set"], "--adapters", f"s3://{s3_bucket}/cat", "--workers", "0",
            "--no-progress", "--threshold", "0.35"]
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": repo}
    quiet = subprocess.run([*args, "--out", f"s3://{s3_bucket}/o1"], capture_output=True,
                           text=True, timeout=300, env=env, cwd=repo)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert "safelora_ray.pipelines.sanitize.driver" in quiet.stderr
    assert "botocore" not in quiet.stderr, quiet.stderr
    loud = subprocess.run([*args, "--out", f"s3://{s3_bucket}/o2", "-v"], capture_output=True,
                          text=True, timeout=300, env=env, cwd=repo)
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert "INFO botocore." in loud.stderr and "DEBUG botocore" not in loud.stderr
    assert ADMIN_SECRET not in quiet.stderr + loud.stderr
