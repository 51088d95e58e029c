"""A corrupt alignment set is refused, never used (issue 20, item 1): four bytes changed inside a
shard, or an edited manifest, stop sanitize (in this process and on Ray workers, whose first
worker shares the set on the node: its files mapped and checked), project-model and
``inspect --verify`` with a one-line error naming the shard, exit 1, nothing written at
--out; the same for a SaLoRA set. A set written before digests still loads (a warning). An
output the ledger calls done that was deleted or cut short since is written again by the next
run (local and S3)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import struct
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from safelora_ray import BuildConfig, build
from safelora_ray.cli.main import main as cli_main
from safelora_ray.core.errors import AlignmentSetError, SafeLoraError
from safelora_ray.formats import alignment_set as als
from safelora_ray.formats.alignment_set import AlignmentSet
from safelora_ray.pipelines.sanitize.driver import SanitizeConfig, sanitize
from tests.adapters import make_adapter, save_base_model

pytestmark = pytest.mark.usefixtures("ray_local")

#: What the issue saw: one entry of a C matrix became this.
BAD_VALUE = -2902.7


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama pair (GQA), its q/v set, a fine-tune and a catalog of 3 adapters."""
    root = tmp_path_factory.mktemp("integrity")
    base = save_base_model(root / "base", seed=0, gqa=True)
    aligned = save_base_model(root / "aligned", seed=5, gqa=True)
    finetuned = save_base_model(root / "finetuned", seed=7, gqa=True)
    res = build(BuildConfig(base=str(base), aligned=str(aligned), out=str(root / "set"),
                            workers=0, progress=False))
    for k in range(3):
        make_adapter(root / f"catalog/t/a{k}", gqa=True, adapter_seed=20 + k)
    return {"root": root, "base": base, "aligned": aligned, "finetuned": finetuned,
            "set": Path(res.uri), "catalog": root / "catalog"}


def flip(set_dir: Path, value: float = BAD_VALUE) -> tuple[Path, str]:
    """Write ``value`` (4 bytes, float32) over an entry in the middle of the first tensor of the
    first shard; returns the shard and the tensor."""
    shard = sorted((set_dir / "shards").glob("*.safetensors"))[0]
    raw = bytearray(shard.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    name, info = min(((k, v) for k, v in header.items() if k != "__metadata__"),
                     key=lambda kv: kv[1]["data_offsets"][0])
    lo, hi = info["data_offsets"]
    at = 8 + n + lo + ((hi - lo) // 2 // 4) * 4
    assert raw[at:at + 4] != struct.pack("<f", value)
    raw[at:at + 4] = struct.pack("<f", value)
    shard.write_bytes(bytes(raw))
    return shard, name


def corrupt_copy(src: Path, dst: Path) -> tuple[Path, str]:
    shutil.copytree(src, dst)
    return flip(dst)


def _tree(root: Path) -> dict[str, bytes]:
    return ({str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
            if root.exists() else {})


def _names_shard(err: str, shard: Path) -> None:
    assert f"shards/{shard.name}" in err, err
    assert "corrupt" in err, err
    assert "\n" not in err.strip(), err  # one line


# -- Safe LoRA sets ------------------------------------------------------------------------------


def test_intact_set_has_digests_and_verifies(world: dict[str, Path],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    md = json.loads((world["set"] / "alignment.json").read_text())
    integrity = md["integrity"]
    shards = sorted(p.name for p in (world["set"] / "shards").glob("*.safetensors"))
    assert sorted(Path(p).name for p in integrity["shards"]) == shards
    # The recorded digests are the files' own (sha256sum gives the same).
    for path, rec in integrity["shards"].items():
        data = (world["set"] / path).read_bytes()
        assert rec == {"sha256": "sha256:" + hashlib.sha256(data).hexdigest(),
                       "bytes": len(data)}
    manifest = (world["set"] / "manifest.parquet").read_bytes()
    assert integrity["manifest"] == "sha256:" + hashlib.sha256(manifest).hexdigest()
    assert all(d.startswith("sum64-4k:")
               for d in pq.read_table(world["set"] / "manifest.parquet")["digest"].to_pylist())
    assert cli_main(["inspect", str(world["set"]), "--verify"]) == 0
    assert f"verified       {len(shards)} shard file(s)" in capsys.readouterr().out


@pytest.mark.parametrize("workers", [0, 1], ids=["in-process", "ray-workers"])
def test_sanitize_refuses_a_flipped_shard(world: dict[str, Path], tmp_path: Path,
                                          workers: int) -> None:
    bad = tmp_path / "set"
    shard, tensor = corrupt_copy(world["set"], bad)
    out = tmp_path / "out"
    with pytest.raises(AlignmentSetError) as info:
        sanitize(SanitizeConfig(alignment=str(bad), adapters=str(world["catalog"]), out=str(out),
                                threshold=0.5, workers=workers, progress=False,
                                task_timeout_s=300))
    err = str(info.value)
    _names_shard(err, shard)
    assert repr(tensor) in err and str(bad) in err
    assert not list(out.rglob("adapter_config.json")) and not (out / "_ledger").exists()


def test_sanitize_cli_exits_1_and_writes_nothing(world: dict[str, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "set"
    shard, _ = corrupt_copy(world["set"], bad)
    out = tmp_path / "out"
    rc = cli_main(["sanitize", "--alignment", str(bad), "--adapters", str(world["catalog"]),
                   "--out", str(out), "--threshold", "0.5", "--workers", "0", "--no-progress"])
    assert rc == 1
    _names_shard(capsys.readouterr().err.strip().splitlines()[-1], shard)
    assert not list(out.rglob("adapter_config.json")) and not (out / "_ledger").exists()


def test_project_model_refuses_a_flipped_shard(world: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "set"
    shard, _ = corrupt_copy(world["set"], bad)
    out = tmp_path / "out"
    rc = cli_main(["project-model", "--alignment", str(bad), "--aligned", str(world["aligned"]),
                   "--finetuned", str(world["finetuned"]), "--out", str(out),
                   "--threshold", "0.5", "--workers", "0", "--no-progress"])
    assert rc == 1
    _names_shard(capsys.readouterr().err.strip().splitlines()[-1], shard)
    assert not list(out.rglob("*.safetensors"))
    # The intact set runs.
    assert cli_main(["project-model", "--alignment", str(world["set"]), "--aligned",
                     str(world["aligned"]), "--finetuned", str(world["finetuned"]), "--out",
                     str(tmp_path / "ok"), "--threshold", "0.5", "--workers", "0",
                     "--no-progress"]) == 0


def test_inspect_verify_names_the_shard(world: dict[str, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "set"
    shard, _ = corrupt_copy(world["set"], bad)
    assert cli_main(["inspect", str(bad)]) == 0  # metadata only: it cannot see the bytes
    capsys.readouterr()
    assert cli_main(["inspect", str(bad), "--verify"]) == 1
    _names_shard(capsys.readouterr().err.strip(), shard)
    # A shard cut short is named too (its size, before any hashing).
    cut = tmp_path / "cut"
    shutil.copytree(world["set"], cut)
    first = sorted((cut / "shards").glob("*.safetensors"))[0]
    first.write_bytes(first.read_bytes()[:-4])
    assert cli_main(["inspect", str(cut), "--verify"]) == 1
    err = capsys.readouterr().err
    assert f"shards/{first.name} is corrupt" in err and "bytes" in err


def test_an_edited_manifest_is_refused(world: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "set"
    shutil.copytree(world["set"], bad)
    table = pq.read_table(bad / "manifest.parquet")
    i = table.column_names.index("norm")
    norms = table.column("norm").to_pylist()
    table = table.set_column(i, table.schema.field(i),
                             pa.array([norms[0] * 2, *norms[1:]], pa.float64()))
    pq.write_table(table, bad / "manifest.parquet")
    with pytest.raises(AlignmentSetError, match=r"manifest\.parquet is corrupt"):
        AlignmentSet.open(str(bad))
    with pytest.raises(SafeLoraError, match=r"manifest\.parquet is corrupt"):
        sanitize(SanitizeConfig(alignment=str(bad), adapters=str(world["catalog"]),
                                out=str(tmp_path / "out"), threshold=0.5, workers=0,
                                progress=False))
    assert not (tmp_path / "out").exists()


def test_a_set_from_before_digests_still_loads_with_one_warning(
        world: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    old = tmp_path / "set"
    shutil.copytree(world["set"], old)
    md = json.loads((old / "alignment.json").read_text())
    del md["integrity"]
    (old / "alignment.json").write_text(json.dumps(md))
    table = pq.read_table(old / "manifest.parquet")
    pq.write_table(table.drop(["digest"]), old / "manifest.parquet")
    intact = AlignmentSet.open(str(world["set"]))
    with caplog.at_level(logging.WARNING, logger=als.__name__):
        aset = AlignmentSet.open(str(old))
        AlignmentSet.open(str(old))
    warned = [r for r in caplog.records if "before sets carried digests" in r.getMessage()]
    assert len(warned) == 1 and str(old) in warned[0].getMessage()
    for m in aset.rows:
        assert aset.rows[m].digest is None
        assert torch.equal(aset.load(m).tensor, intact.load(m).tensor)
    with pytest.raises(AlignmentSetError, match="cannot be verified"):
        aset.verify()
    # On Ray workers (each opens the set, their records relayed here): still one warning.
    other = tmp_path / "set2"
    shutil.copytree(old, other)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        res = sanitize(SanitizeConfig(alignment=str(other), adapters=str(world["catalog"]),
                                      out=str(tmp_path / "out"), threshold=0.5, workers=1,
                                      progress=False, task_timeout_s=300))
    assert res.ok == 3
    warned = [r for r in caplog.records if "before sets carried digests" in r.getMessage()]
    assert len(warned) == 1 and str(other) in warned[0].getMessage()


# -- SaLoRA sets ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def salora_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from safelora_ray.pipelines.salora.modules import SaloraConfig, salora_modules
    from tests.salora_models import save_model, token_samples, write_token_calibration

    root = tmp_path_factory.mktemp("salora-integrity")
    model = save_model(root / "llama", "llama")
    cal = write_token_calibration(root / "cal.jsonl", token_samples(7))
    res = salora_modules(SaloraConfig(model=str(model), calibration=str(cal),
                                      out=str(root / "set"), safety_rank=4, workers=0,
                                      progress=False, targets="q_proj,v_proj"))
    return Path(res.uri)


def test_salora_set_is_checked_too(salora_set: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    md = json.loads((salora_set / "alignment.json").read_text())
    assert md["method"]["name"] == "salora" and md["integrity"]["shards"]
    assert cli_main(["inspect", str(salora_set), "--verify"]) == 0
    for k in range(2):
        make_adapter(tmp_path / f"cat/t/a{k}", gqa=True, adapter_seed=30 + k)
    bad = tmp_path / "set"
    shard, tensor = corrupt_copy(salora_set, bad)
    capsys.readouterr()
    assert cli_main(["inspect", str(bad), "--verify"]) == 1
    _names_shard(capsys.readouterr().err.strip(), shard)
    out = tmp_path / "out"
    for workers in ("0", "1"):
        rc = cli_main(["sanitize", "--method", "salora", "--alignment", str(bad), "--adapters",
                       str(tmp_path / "cat"), "--out", str(out), "--workers", workers,
                       "--no-progress"])
        assert rc == 1
        err = capsys.readouterr().err.strip().splitlines()[-1]
        _names_shard(err, shard)
        assert repr(tensor) in err
        assert not list(out.rglob("adapter_config.json")) and not (out / "_ledger").exists()
    with pytest.raises(AlignmentSetError, match="corrupt"):
        from safelora_ray.pipelines.salora.export import export_cs

        export_cs(str(bad), str(tmp_path / "cs.safetensors"))


# -- The ledger: outputs deleted or cut short since are written again ---------------------------


def _run(world: dict[str, Path], out: str, run_id: str) -> dict[str, str]:
    """One run; each adapter's status, from the run's report."""
    import io

    from safelora_ray.storage import open_storage

    res = sanitize(SanitizeConfig(alignment=str(world["set"]), adapters=str(world["catalog"]),
                                  out=out, threshold=0.5, workers=0, progress=False,
                                  run_id=run_id))
    raw = open_storage(out).read(f"_reports/{res.run_id}/adapters.parquet")
    return {r["adapter_id"]: r["status"] for r in pq.read_table(io.BytesIO(raw)).to_pylist()}


def test_ledger_redoes_outputs_deleted_or_cut_short_local(world: dict[str, Path],
                                                          tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = _run(world, str(out), "r1")
    assert set(first.values()) == {"ok"}
    written = _tree(out / "t")
    ledger = json.loads((out / "_ledger" / "t" / "a0.json").read_text())
    assert ledger["outputs"]["adapter_model.safetensors"]["bytes"] == len(
        written["a0/adapter_model.safetensors"])
    st = out / "t/a0/adapter_model.safetensors"
    st.write_bytes(st.read_bytes()[:-100])  # cut short
    (out / "t/a1/adapter_model.safetensors").unlink()  # deleted
    again = _run(world, str(out), "r2")
    assert again == {"t/a0": "ok", "t/a1": "ok", "t/a2": "skipped"}
    assert _tree(out / "t") == written  # the same bytes as the first run wrote
    third = _run(world, str(out), "r3")
    assert set(third.values()) == {"skipped"}


def test_ledger_redoes_outputs_deleted_or_cut_short_s3(world: dict[str, Path], s3_bucket: str,
                                                       s3_admin_client: Any) -> None:
    out = f"s3://{s3_bucket}/out"
    first = _run(world, out, "r1")
    assert set(first.values()) == {"ok"}

    def get(key: str) -> bytes:
        return s3_admin_client.get_object(Bucket=s3_bucket, Key=f"out/{key}")["Body"].read()

    keys = [f"t/a{k}/adapter_model.safetensors" for k in range(3)]
    written = {k: get(k) for k in keys}
    s3_admin_client.put_object(Bucket=s3_bucket, Key=f"out/{keys[0]}",
                               Body=written[keys[0]][:-100])
    s3_admin_client.delete_object(Bucket=s3_bucket, Key=f"out/{keys[1]}")
    again = _run(world, out, "r2")
    assert again == {"t/a0": "ok", "t/a1": "ok", "t/a2": "skipped"}
    assert {k: get(k) for k in keys} == written
    assert set(_run(world, out, "r3").values()) == {"skipped"}


# -- The tensor digest itself --------------------------------------------------------------------


class _Parts:
    """A storage read in parts, several at a time (as S3's ``read_into``)."""

    part_size = 1  # rounded up to the digest's 4 MiB window
    max_concurrency = 3

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.reads: list[tuple[int, int]] = []

    def read_into(self, path: str, start: int, buffer: memoryview) -> None:
        self.reads.append((start, len(buffer)))
        buffer[:] = self.data[start:start + len(buffer)]


@pytest.mark.parametrize("n", [0, 5, 4096, 4096 * 3 + 7, 3 * 4 * 1024**2 + 12345])
def test_read_digested_equals_the_written_digest(tmp_path: Path, n: int) -> None:
    from safelora_ray.formats.integrity import read_digested, tensor_digest
    from safelora_ray.storage import open_storage

    data = torch.randint(0, 256, (n + 100,), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(n)).numpy().tobytes()
    (tmp_path / "f").write_bytes(data)
    want = tensor_digest(data[100:])
    buf = bytearray(n)
    assert read_digested(open_storage(str(tmp_path)), "f", 100, memoryview(buf)) == want
    assert bytes(buf) == data[100:]
    parts = _Parts(data)
    buf = bytearray(n)
    assert read_digested(parts, "f", 100, memoryview(buf)) == want
    assert bytes(buf) == data[100:]
    if n > 4 * 1024**2:  # read in 4 MiB windows, not in one read
        assert len(parts.reads) == 4


def test_tensor_digest_sees_flips_moves_and_cuts() -> None:
    from safelora_ray.formats.integrity import tensor_digest

    data = bytearray(torch.randn(3 * 4096 // 4, generator=torch.Generator().manual_seed(0))
                     .numpy().tobytes())
    base = tensor_digest(data)
    seen = set()
    for bit in range(0, 8 * len(data), 997):  # single bit flips all over
        d = bytearray(data)
        d[bit // 8] ^= 1 << (bit % 8)
        seen.add(tensor_digest(d))
    assert base not in seen and len(seen) == len(range(0, 8 * len(data), 997))
    for at in (0, 3, 4094, 6000):  # 4 bytes anywhere (across word and block edges too)
        d = bytearray(data)
        d[at:at + 4] = struct.pack("<f", BAD_VALUE)
        assert tensor_digest(d) != base
    moved = data[4096:8192] + data[:4096] + data[8192:]
    assert tensor_digest(moved) != base
    assert tensor_digest(data[:-4096] + bytes(4096)) != base  # a zeroed tail
    assert tensor_digest(data[:-4]) != base


def test_a_flipped_shard_on_s3_is_refused(world: dict[str, Path], tmp_path: Path,
                                          s3_bucket: str, s3_admin_client: Any,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "set"
    shard, tensor = corrupt_copy(world["set"], bad)
    for name, src in (("good", world["set"]), ("bad", bad)):
        for f in sorted(p for p in src.rglob("*") if p.is_file()):
            s3_admin_client.upload_file(str(f), s3_bucket, f"{name}/{f.relative_to(src)}")
    good = AlignmentSet.open(f"s3://{s3_bucket}/good")
    assert all(good.load(m).tensor.shape for m in good.rows)
    assert cli_main(["inspect", f"s3://{s3_bucket}/good", "--verify"]) == 0
    out = tmp_path / "out"
    rc = cli_main(["sanitize", "--alignment", f"s3://{s3_bucket}/bad", "--adapters",
                   str(world["catalog"]), "--out", str(out), "--threshold", "0.5",
                   "--workers", "1", "--no-progress"])
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    _names_shard(err, shard)
    assert f"s3://{s3_bucket}/bad/shards/{shard.name}" in err and repr(tensor) in err
    assert not list(out.rglob("adapter_config.json"))
    assert cli_main(["inspect", f"s3://{s3_bucket}/bad", "--verify"]) == 1
