"""Adapter catalogs: directory trees (local, S3) and manifests; ids and their validation."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from safelora_ray.core.errors import ConfigError
from safelora_ray.planning.catalog import AdapterRef, iter_catalog, validate_id


def _adapter(root: Path, rel: str) -> None:
    d = root / rel
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text("{}")
    (d / "adapter_model.safetensors").write_bytes(b"")


@pytest.mark.parametrize("good", ["a", "tenant-1/adapter_v2", "x/y/z", "A.b+c=d@e-f", "9"])
def test_valid_ids(good: str) -> None:
    assert validate_id(good) == good


@pytest.mark.parametrize("bad, message", [
    ("", "empty or absolute"),
    ("/abs", "empty or absolute"),
    ("a\\b", "empty or absolute"),
    ("_reports", "reserved"),
    ("_ledger/x", "reserved"),
    ("a//b", "empty, '.' or '..'"),
    ("a/../b", "empty, '.' or '..'"),
    ("a/./b", "empty, '.' or '..'"),
    ("a/", "empty, '.' or '..'"),
    ("has space", "unsupported characters"),
    ("a/_b", "unsupported characters"),
    ("a/.hidden", "unsupported characters"),
    ("ünï", "unsupported characters"),
])
def test_invalid_ids(bad: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        validate_id(bad)
    assert repr(bad) in str(info.value)


def test_directory_catalog_order_and_bad_ids(tmp_path: Path) -> None:
    for rel in ("b/two", "a/one", "a/one/nested", "bad name", "_private", "c"):
        _adapter(tmp_path, rel)
    (tmp_path / "not-an-adapter").mkdir()
    (tmp_path / "not-an-adapter" / "README.md").write_text("x")
    items = list(iter_catalog(str(tmp_path)))
    refs = [i for i in items if isinstance(i, AdapterRef)]
    bad = dict(i for i in items if isinstance(i, tuple))
    assert [r.adapter_id for r in refs] == ["a/one", "a/one/nested", "b/two", "c"]
    assert all(r.uri == str(tmp_path) and r.prefix == r.adapter_id for r in refs)
    assert set(bad) == {"bad name", "_private"}
    assert "unsupported characters" in bad["bad name"] and "reserved" in bad["_private"]


def test_single_adapter_directory_is_a_catalog(tmp_path: Path) -> None:
    _adapter(tmp_path, "my-adapter")
    assert list(iter_catalog(str(tmp_path / "my-adapter"))) == [
        AdapterRef("my-adapter", str(tmp_path / "my-adapter"), "")]


def test_empty_catalog(tmp_path: Path) -> None:
    assert list(iter_catalog(str(tmp_path))) == []


def test_jsonl_manifest(tmp_path: Path) -> None:
    lines = [{"uri": "/data/a/x/", "id": "t/x"}, {"uri": "s3://b/p/y"}, {"uri": "/d/z", "id": ""},
             {"uri": "/d/w", "id": "t/x"}, {"uri": "/d/v", "id": "../v"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    items = list(iter_catalog(str(tmp_path / "m.jsonl")))
    assert items[:3] == [AdapterRef("t/x", "/data/a/x", ""), AdapterRef("y", "s3://b/p/y", ""),
                         AdapterRef("z", "/d/z", "")]
    assert items[3][0] == "t/x" and "appears twice" in items[3][1]
    assert items[4][0] == "../v" and "'..'" in items[4][1]


@pytest.mark.parametrize("content, message", [
    ('{"uri": "/a"}\nnot json\n', "line 2 is not JSON"),
    ('{"id": "a"}\n', "line 1 needs a string 'uri'"),
    ('["/a"]\n', "line 1 needs a string 'uri'"),
])
def test_bad_jsonl_manifest(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "m.jsonl").write_text(content)
    with pytest.raises(ConfigError, match=message):
        list(iter_catalog(str(tmp_path / "m.jsonl")))


def test_parquet_manifest(tmp_path: Path) -> None:
    pq.write_table(pa.table({"uri": ["/d/a", "/d/b"], "id": ["x/a", None],
                             "owner": ["o", "p"]}), tmp_path / "m.parquet")
    assert list(iter_catalog(str(tmp_path / "m.parquet"))) == [
        AdapterRef("x/a", "/d/a", ""), AdapterRef("b", "/d/b", "")]
    pq.write_table(pa.table({"path": ["/d/a"]}), tmp_path / "bad.parquet")
    with pytest.raises(ConfigError, match="needs a 'uri' column"):
        list(iter_catalog(str(tmp_path / "bad.parquet")))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(ConfigError, match="not a Parquet file"):
        list(iter_catalog(str(tmp_path / "junk.parquet")))


def test_s3_directory_catalog(tmp_path: Path, s3_bucket: str, s3_admin_client) -> None:
    for key in ("cat/a/one/adapter_config.json", "cat/a/one/adapter_model.safetensors",
                "cat/b/adapter_config.json", "cat/bad id/adapter_config.json",
                "cat/readme.txt"):
        s3_admin_client.put_object(Bucket=s3_bucket, Key=key, Body=b"{}")
    items = list(iter_catalog(f"s3://{s3_bucket}/cat"))
    assert items[0] == AdapterRef("a/one", f"s3://{s3_bucket}/cat", "a/one")
    assert items[1] == AdapterRef("b", f"s3://{s3_bucket}/cat", "b")
    assert items[2][0] == "bad id" and "unsupported characters" in items[2][1]
    assert len(items) == 3
