"""Alignment-set builds on a real local Ray, against the dense float64 reference."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from safelora_ray import AlignmentSet, BuildConfig, build
from safelora_ray.cli.main import main as cli_main
from safelora_ray.core.errors import AlignmentSetError, CheckpointError, ConfigError
from safelora_ray.formats.checkpoint import Checkpoint
from safelora_ray.planning.plan import plan_build
from tests.factory import (
    Arch,
    aligned_from,
    allocated_bytes,
    llama_tensors,
    write_checkpoint,
    write_sparse_checkpoint,
)
from tests.hub_cache import write_hub_repo
from tests.reference import dense_c

pytestmark = pytest.mark.usefixtures("ray_local")


def _pair(tmp_path, arch=None, dtype=torch.bfloat16, shards=(3, 2), seed=0):
    base = llama_tensors(arch or Arch(), seed=seed, dtype=dtype)
    aligned = aligned_from(base, seed=seed + 1)
    b = write_checkpoint(tmp_path / "base", base, shards=shards[0])
    a = write_checkpoint(tmp_path / "aligned", aligned, shards=shards[1])
    return base, aligned, str(b), str(a)


def _check_against_reference(uri, base, aligned, targets):
    aset = AlignmentSet.open(uri)
    expected = sorted(n[: -len(".weight")] for n in base
                      if any(n.endswith(f".{t}.weight") for t in targets))
    assert sorted(aset.rows) == expected
    for module in expected:
        name = module + ".weight"
        am = aset.load(module)
        ref = dense_c(base[name], aligned[name])
        torch.testing.assert_close(am.dense().to(torch.float64), ref, rtol=2e-5, atol=1e-7)
        v = aligned[name].to(torch.float64) - base[name].to(torch.float64)
        assert am.norm == pytest.approx(float(v.norm()), rel=1e-6)
    return aset


@pytest.mark.parametrize("workers", [2, 0], ids=["ray", "in-process"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_build_sharded_matches_reference(tmp_path, dtype, workers):
    base, aligned, b, a = _pair(tmp_path, dtype=dtype)
    res = build(BuildConfig(base=b, aligned=a, out=str(tmp_path / "set"), workers=workers,
                            progress=False))
    assert res.num_modules == 4 and not res.reused
    assert res.workers == workers and res.device == "cpu"
    aset = _check_against_reference(res.uri, base, aligned, ["q_proj", "v_proj"])
    md = aset.metadata
    assert md["content_id"] == res.content_id and md["targets"] == ["q_proj", "v_proj"]
    assert md["base"]["layout"] == "sharded"
    assert "model.safetensors.index.json" in md["base"]["files"]
    table = pq.read_table(tmp_path / "set" / "manifest.parquet")
    assert table.num_rows == 4
    row = table.to_pylist()[0]
    assert row["layer"] == 0 and row["kind"] in ("q_proj", "v_proj")
    assert row["source_digest"].startswith("sha256-tree16m:")
    # Shards are keyed by module name and load with the safetensors library.
    for shard in md["shards"]:
        assert set(load_file(tmp_path / "set" / shard)) <= set(aset.rows)


def test_build_single_file_gqa_all_linear(tmp_path):
    arch = Arch(layers=2, hidden=32, heads=8, kv_heads=2, intermediate=48)
    base, aligned, b, a = _pair(tmp_path, arch=arch, dtype=torch.float16, shards=(1, 1))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    res = build(BuildConfig(base=b, aligned=a, out=str(tmp_path / "set"), targets=targets,
                            workers=2, max_file_bytes=8 * 1024, progress=False))
    aset = _check_against_reference(res.uri, base, aligned, targets)
    v = aset.rows["model.layers.0.self_attn.v_proj"]
    assert v.shape == (8, 32) and v.form == "C" and v.stored_shape == (8, 8)
    up = aset.rows["model.layers.1.mlp.up_proj"]
    assert up.form == "V" and up.stored_shape == (48, 32)
    assert len(aset.metadata["shards"]) > 2  # max_file_bytes split the output


def test_rebuild_same_inputs_is_reused_and_other_inputs_refused(tmp_path):
    _base, _aligned, b, a = _pair(tmp_path)
    out = str(tmp_path / "set")
    first = build(BuildConfig(base=b, aligned=a, out=out, progress=False))
    again = build(BuildConfig(base=b, aligned=a, out=out, progress=False))
    assert again.reused and again.content_id == first.content_id
    # A running job names the set it started with: another one there since is an error.
    assert AlignmentSet.open(out, expect=first.content_id).content_id == first.content_id
    with pytest.raises(AlignmentSetError, match="changed while the run started"):
        AlignmentSet.open(out, expect="als-0123")
    with pytest.raises(AlignmentSetError, match="immutable"):
        build(BuildConfig(base=b, aligned=a, out=out, targets="q_proj", progress=False))
    # config.json decides each weight's orientation: a changed one is another input.
    cfg = Path(a) / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()),
                               "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(AlignmentSetError, match="immutable"):
        build(BuildConfig(base=b, aligned=a, out=out, progress=False))


def test_content_id_is_independent_of_sharding_and_storage_layout(tmp_path):
    base, _aligned, b, a = _pair(tmp_path)
    r1 = build(BuildConfig(base=b, aligned=a, out=str(tmp_path / "s1"), workers=1,
                           progress=False))
    single_b = write_checkpoint(tmp_path / "b1", base, shards=1)
    r2 = build(BuildConfig(base=str(single_b), aligned=a, out=str(tmp_path / "s2"), workers=2,
                           max_file_bytes=1024, progress=False))
    assert r1.content_id == r2.content_id
    # Built in this process (no worker actor): the same set.
    r3 = build(BuildConfig(base=b, aligned=a, out=str(tmp_path / "s3"), workers=0,
                           progress=False))
    assert r3.workers == 0 and r3.content_id == r1.content_id


def test_interrupted_build_is_not_a_set(tmp_path):
    _base, _aligned, b, a = _pair(tmp_path)
    out = tmp_path / "set"
    build(BuildConfig(base=b, aligned=a, out=str(out), progress=False))
    (out / "alignment.json").unlink()
    with pytest.raises(AlignmentSetError, match="incomplete alignment set"):
        AlignmentSet.open(str(out))
    assert cli_main(["inspect", str(out)]) == 1
    # Running the build again completes it.
    res = build(BuildConfig(base=b, aligned=a, out=str(out), progress=False))
    assert not res.reused and AlignmentSet.open(str(out)).content_id == res.content_id


def test_nothing_at_all_is_not_a_set(tmp_path):
    with pytest.raises(AlignmentSetError, match="no alignment set"):
        AlignmentSet.open(str(tmp_path))


# ----------------------------------------------------------------------------------------------
# Bad inputs: each gets a clear error naming the tensor or file
# ----------------------------------------------------------------------------------------------


def _build_err(tmp_path, base, aligned, match, targets="q_proj,v_proj", exc=CheckpointError):
    b = write_checkpoint(tmp_path / "bad_base", base, shards=2)
    a = write_checkpoint(tmp_path / "bad_aligned", aligned, shards=1)
    with pytest.raises(exc, match=match):
        build(BuildConfig(base=str(b), aligned=str(a), out=str(tmp_path / "o"), targets=targets,
                          progress=False))
    assert not (tmp_path / "o" / "alignment.json").exists()


def test_missing_target_in_aligned(tmp_path):
    base = llama_tensors(Arch())
    aligned = aligned_from(base)
    del aligned["model.layers.1.self_attn.v_proj.weight"]
    _build_err(tmp_path, base, aligned,
               r"missing from the aligned model .*layers\.1\.self_attn\.v_proj")


def test_shape_mismatch(tmp_path):
    base = llama_tensors(Arch())
    aligned = aligned_from(base)
    aligned["model.layers.0.self_attn.q_proj.weight"] = torch.randn(32, 31)
    _build_err(tmp_path, base, aligned, r"'model\.layers\.0\.self_attn\.q_proj\.weight': shape")


def test_dtype_mismatch(tmp_path):
    base = llama_tensors(Arch())
    aligned = aligned_from(base)
    aligned["model.layers.0.self_attn.q_proj.weight"] = aligned[
        "model.layers.0.self_attn.q_proj.weight"].half()
    _build_err(tmp_path, base, aligned, r"q_proj\.weight': dtype F32 in base .* F16 in aligned")


def test_identical_weights_zero_norm(tmp_path):
    base = llama_tensors(Arch())
    aligned = aligned_from(base)
    aligned["model.layers.1.self_attn.q_proj.weight"] = base[
        "model.layers.1.self_attn.q_proj.weight"].clone()
    _build_err(tmp_path, base, aligned, r"module 'model\.layers\.1\.self_attn\.q_proj'.*identical")


def test_target_matches_nothing(tmp_path):
    base = llama_tensors(Arch())
    _build_err(tmp_path, base, aligned_from(base), r"target\(s\) qkv_proj match no tensor",
               targets="q_proj,qkv_proj")


def test_non_float_and_non_2d_targets(tmp_path):
    base = llama_tensors(Arch())
    aligned = aligned_from(base)
    base["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(32, 32, dtype=torch.int32)
    aligned["model.layers.0.self_attn.q_proj.weight"] = torch.ones(32, 32, dtype=torch.int32)
    _build_err(tmp_path, base, aligned, r"q_proj\.weight'.*dtype I32 is not a float type")
    base = llama_tensors(Arch())
    aligned = aligned_from(base)
    _build_err(tmp_path, base, aligned, r"input_layernorm\.weight.*is not 2-D",
               targets="input_layernorm")


def test_bad_targets_flag(tmp_path):
    with pytest.raises(ConfigError):
        BuildConfig(base="a", aligned="b", out="c", targets=" , ")
    with pytest.raises(ConfigError):
        BuildConfig(base="a", aligned="b", out="c", targets="q_proj,../x")


def test_pickle_only_and_missing_checkpoints(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "pytorch_model.bin").write_bytes(b"\x80\x04not unpickled")
    with pytest.raises(CheckpointError, match=r"pickle.*never loaded"):
        Checkpoint.open(str(tmp_path / "p"))
    (tmp_path / "e").mkdir()
    with pytest.raises(CheckpointError, match="no safetensors checkpoint"):
        Checkpoint.open(str(tmp_path / "e"))


def test_index_inconsistencies(tmp_path):
    base = llama_tensors(Arch())
    b = write_checkpoint(tmp_path / "b", base, shards=2)
    index = json.loads((b / "model.safetensors.index.json").read_text())
    name = "model.layers.0.self_attn.q_proj.weight"
    other = next(f for f in set(index["weight_map"].values()) if f != index["weight_map"][name])
    index["weight_map"][name] = other
    (b / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="header does not contain it"):
        Checkpoint.open(str(b)).ref(name)
    index["weight_map"][name] = "../escape.safetensors"
    (b / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="maps outside the checkpoint"):
        Checkpoint.open(str(b))
    (b / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a JSON index"):
        Checkpoint.open(str(b))


def test_truncated_shard_names_the_file(tmp_path):
    base = llama_tensors(Arch())
    b = write_checkpoint(tmp_path / "b", base, shards=1)
    f = b / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(Exception, match=r"model\.safetensors"):
        Checkpoint.open(str(b))


# ----------------------------------------------------------------------------------------------
# Reads only the targets
# ----------------------------------------------------------------------------------------------


def test_sparse_70b_shaped_holes_build_fast_in_small_memory(tmp_path):
    """Non-target tensors of ~8.6 GB apparent size are never read."""
    g = torch.Generator().manual_seed(0)
    targets_b, targets_a = {}, {}
    for layer in range(2):
        for mod, shape in (("q_proj", (64, 64)), ("v_proj", (16, 64))):
            name = f"model.layers.{layer}.self_attn.{mod}.weight"
            w = (torch.randn(*shape, generator=g) * 0.05).to(torch.bfloat16)
            targets_b[name] = w
            targets_a[name] = (w.float() + torch.randn(*shape, generator=g) * 0.01).bfloat16()
    holes = {f"model.layers.{i}.mlp.up_proj.weight": (28672, 8192) for i in range(2)}
    holes["model.embed_tokens.weight"] = (32000, 8192)
    b = write_sparse_checkpoint(tmp_path / "b", targets_b, holes)
    a = write_sparse_checkpoint(tmp_path / "a", targets_a, holes)
    size = (b / "model.safetensors").stat().st_size
    assert size > 1.4e9 and allocated_bytes(b / "model.safetensors") < 10e6
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    res = build(BuildConfig(base=str(b), aligned=str(a), out=str(tmp_path / "set"),
                            progress=False))
    elapsed = time.perf_counter() - t0
    assert elapsed < 60
    assert res.source_bytes == 2 * sum(t.numel() * 2 for t in targets_b.values())
    assert res.bytes_read <= 1.05 * res.source_bytes + 2 * 64 * 1024  # + two header reads
    # The driver never touched the holes (its RSS grew by far less than one hole).
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 200_000  # KiB
    _check_against_reference(res.uri, targets_b, targets_a, ["q_proj", "v_proj"])


def test_plan_shards_are_balanced_and_contiguous(tmp_path):
    _base, _aligned, b, a = _pair(tmp_path, arch=Arch(layers=8))
    plan = plan_build(Checkpoint.open(b), Checkpoint.open(a), num_shards=3)
    assert len(plan.shards) == 3
    per_shard = [sum(f.input_bytes for f in s) for s in plan.shards]
    assert max(per_shard) <= 1.5 * min(per_shard)
    order = [m.module for s in plan.shards for f in s for m in f.modules]
    assert order == [m.module for m in plan.modules]  # contiguous runs, layer order


# ----------------------------------------------------------------------------------------------
# Other storages: S3 (SeaweedFS) and the Hub (offline cache)
# ----------------------------------------------------------------------------------------------


def _upload_dir(bucket, prefix, path):
    import boto3

    s3 = boto3.client("s3")
    for f in sorted(path.iterdir()):
        s3.upload_file(str(f), bucket, f"{prefix}/{f.name}")


def test_build_from_s3_to_s3(tmp_path, s3_bucket):
    base, aligned, _b, _a = _pair(tmp_path, shards=(3, 1))
    _upload_dir(s3_bucket, "models/base", tmp_path / "base")
    _upload_dir(s3_bucket, "models/aligned", tmp_path / "aligned")
    out = f"s3://{s3_bucket}/sets/llama-qv"
    res = build(BuildConfig(base=f"s3://{s3_bucket}/models/base",
                            aligned=f"s3://{s3_bucket}/models/aligned", out=out, workers=2,
                            progress=False))
    aset = _check_against_reference(out, base, aligned, ["q_proj", "v_proj"])
    assert aset.metadata["base"]["uri"] == f"s3://{s3_bucket}/models/base"
    assert all(len(v) >= 32 for v in aset.metadata["base"]["files"].values())  # ETags
    # Bytes fetched from S3 (driver headers + worker tensor reads) stay near the target bytes.
    assert res.bytes_read <= 1.05 * res.source_bytes + 4 * 64 * 1024
    assert cli_main(["inspect", out]) == 0


def test_build_from_hf_cache_offline(tmp_path, hf_cache):
    base, aligned, _b, _a = _pair(tmp_path, shards=(2, 1))
    files_b = {p.name: p for p in (tmp_path / "base").iterdir()}
    files_a = {p.name: p for p in (tmp_path / "aligned").iterdir()}
    sha_b = write_hub_repo(hf_cache, "acme/llama-base", files_b)
    write_hub_repo(hf_cache, "acme/llama-chat", files_a, revision="v1")
    res = build(BuildConfig(base="hf://acme/llama-base", aligned="hf://acme/llama-chat@v1",
                            out=str(tmp_path / "set"), progress=False))
    aset = _check_against_reference(res.uri, base, aligned, ["q_proj", "v_proj"])
    assert aset.metadata["base"]["revision"] == sha_b


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def test_cli_build_and_inspect(tmp_path, capsys):
    _base, _aligned, b, a = _pair(tmp_path)
    out = str(tmp_path / "set")
    rc = cli_main(["build", "--base", b, "--aligned", a, "--out", out, "--no-progress"])
    assert rc == 0
    assert "built alignment set als-" in capsys.readouterr().out
    assert cli_main(["inspect", out, "--modules"]) == 0
    text = capsys.readouterr().out
    assert "q_proj 2" in text and "model.layers.1.self_attn.v_proj" in text
    assert cli_main(["build", "--base", b, "--aligned", a, "--out", out, "--targets", ",",
                     "--no-progress"]) == 2
    missing = str(tmp_path / "nope")
    assert cli_main(["build", "--base", missing, "--aligned", a, "--out", out,
                     "--no-progress"]) == 1
    assert "no safetensors checkpoint" in capsys.readouterr().err


def test_shards_load_with_safetensors_and_keys_are_modules(tmp_path):
    # A shard written by our streaming writer is a normal safetensors file.
    _base, _aligned, b, a = _pair(tmp_path)
    res = build(BuildConfig(base=b, aligned=a, out=str(tmp_path / "set"), progress=False))
    md = AlignmentSet.open(res.uri).metadata
    all_keys = set()
    for shard in md["shards"]:
        tensors = load_file(tmp_path / "set" / shard)
        assert all(t.dtype == torch.float32 for t in tensors.values())
        all_keys |= set(tensors)
    assert all_keys == set(AlignmentSet.open(res.uri).rows)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "unused.safetensors"))  # library available


def test_gpu_required_on_a_cpu_cluster_is_a_clear_error(tmp_path):
    _, _, b, a = _pair(tmp_path)
    with pytest.raises(ConfigError, match="has no GPU"):
        build(BuildConfig(base=b, aligned=a, out=str(tmp_path / "set"), use_gpu=True,
                          progress=False))


def test_source_digest_is_a_sha256_tree_over_both_parts():
    """An independent computation of the documented scheme, on parts of 0, 1 and 3+ chunks."""
    import concurrent.futures as cf
    import hashlib

    from safelora_ray.pipelines.build.worker import DIGEST_CHUNK, source_digest

    g = torch.Generator().manual_seed(5)
    big = torch.randint(0, 256, (2 * DIGEST_CHUNK + 12345,), dtype=torch.uint8,
                        generator=g).numpy().tobytes()
    for parts in ([big, b"abc"], [b"", big], [b"x" * DIGEST_CHUNK, b"y"]):
        root = hashlib.sha256(b"sha256-tree16m\0")
        for p in parts:
            root.update(len(p).to_bytes(8, "little"))
            for i in range(0, len(p), DIGEST_CHUNK):
                root.update(hashlib.sha256(p[i:i + DIGEST_CHUNK]).digest())
        expected = "sha256-tree16m:" + root.hexdigest()
        with cf.ThreadPoolExecutor(3) as pool:
            assert source_digest([bytearray(p) for p in parts], pool) == expected
        assert source_digest(parts) == expected
    # the split between base and aligned is part of the digest
    assert source_digest([b"ab", b"c"]) != source_digest([b"a", b"bc"])
