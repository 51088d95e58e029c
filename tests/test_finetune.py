"""project-model (SPEC §3): full fine-tunes of real transformers checkpoints (Llama with GQA,
Phi-3's fused qkv_proj), against a dense float64 reference; threshold and number modes, local
and S3, in this process and on Ray workers; byte-for-byte copies, the index, from_pretrained,
reads, reruns and atomicity."""

from __future__ import annotations

import importlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open

from safelora_ray import BuildConfig, FinetuneConfig, build, project_model
from safelora_ray.cli.main import main as cli_main
from safelora_ray.core.errors import CheckpointError, ConfigError
from safelora_ray.formats.checkpoint import Checkpoint
from safelora_ray.storage import open_storage
from tests.adapters import tiny_model
from tests.crashy import crashing_worker
from tests.reference import dense_c, dense_finetune

actor_mod = importlib.import_module("safelora_ray.execution.actor")  # starts the actors
pytestmark = pytest.mark.usefixtures("ray_local")

GQA_TARGETS = ("q_proj", "k_proj", "v_proj")


# ----------------------------------------------------------------------------------------------
# Models: base → aligned (a low-rank update) → fine-tuned (aligned + residuals, some along the
# alignment direction, some not; non-targets changed too)
# ----------------------------------------------------------------------------------------------


def _phi3(dtype: torch.dtype) -> Any:
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=48, vocab_size=64,
                        max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Phi3ForCausalLM(config).to(dtype).eval()


def _trio(root: Path, model: Any, targets: tuple[str, ...], ft_shard: str | None,
          seed: int) -> dict[str, Any]:
    """Save base, aligned and fine-tuned checkpoints and build the alignment set."""
    base = root / "base"
    model.save_pretrained(str(base))
    sb = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and ".layers." in name:
                d0, d1 = p.shape
                p.add_((torch.randn(d0, 2, generator=g) @ torch.randn(2, d1, generator=g) * 0.02
                        + torch.randn(d0, d1, generator=g) * 0.002).to(p.dtype))
    aligned = root / "aligned"
    model.save_pretrained(str(aligned), max_shard_size="30KB")
    sa = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            module = name.removesuffix(".weight")
            if any(module.endswith("." + t) for t in targets):
                v = sa[name].double() - sb[name].double()
                lean = 0.4 * (i % 4)  # 0, 0.4, 0.8, 1.2: from random to along V
                delta = (v @ torch.randn(v.shape[1], v.shape[1], generator=g,
                                         dtype=torch.float64) * 0.05 * lean
                         + torch.randn(*v.shape, generator=g, dtype=torch.float64) * 0.003)
                p.add_(delta.to(p.dtype))
            else:  # every other tensor changes too: the output must keep the fine-tune's
                p.add_((torch.randn(p.shape, generator=g) * 0.001).to(p.dtype))
    ft = root / "finetuned"
    kw = {"max_shard_size": ft_shard} if ft_shard else {}
    model.save_pretrained(str(ft), **kw)
    (ft / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    (ft / "README.md").write_text("a fine-tune\n")
    (ft / "training_args.bin").write_bytes(b"\x80\x04 not a pickle we load")
    res = build(BuildConfig(base=str(base), aligned=str(aligned), out=str(root / "set"),
                            targets=list(targets), workers=0, progress=False))
    return {"root": root, "base": base, "aligned": aligned, "ft": ft, "set": res.uri,
            "sb": sb, "sa": sa, "sft": {k: v.detach().clone()
                                        for k, v in model.state_dict().items()},
            "targets": targets}


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Tiny Llama, GQA (k/v_proj 16 x 32), float32; the fine-tune sharded."""
    trio = _trio(tmp_path_factory.mktemp("llama"), tiny_model(0, gqa=True), GQA_TARGETS,
                 "20KB", seed=5)
    assert (trio["ft"] / "model.safetensors.index.json").exists()
    return trio


def _reference(trio: dict[str, Any]) -> dict[str, tuple[float, torch.Tensor, float, float]]:
    out = {}
    for name, w in trio["sb"].items():
        module = name.removesuffix(".weight")
        if w.dim() == 2 and any(module.endswith("." + t) for t in trio["targets"]):
            c = dense_c(w, trio["sa"][name])
            out[module] = dense_finetune(c, trio["sa"][name], trio["sft"][name])
    return out


def _select(ref: dict[str, Any], threshold: float | None = None,
            k: int | None = None) -> set[str]:
    cos = {m: r[0] for m, r in ref.items()}
    tau = threshold if threshold is not None else sorted(cos.values())[k - 1]  # type: ignore
    return {m for m, c in cos.items() if c <= tau}


def _raw(path: Path) -> dict[str, tuple[bytes, bytes]]:
    """Per weights file: (header bytes, data bytes) by file name; and per tensor raw bytes."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        data = f.read_bytes()
        n = int.from_bytes(data[:8], "little")
        out[f.name] = (data[:8 + n], data)
    return out


def _tensor_bytes(path: Path) -> dict[str, bytes]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        data = f.read_bytes()
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        for name, info in header.items():
            if name != "__metadata__":
                b, e = info["data_offsets"]
                out[name] = data[8 + n + b:8 + n + e]
    return out


def _check_output(trio: dict[str, Any], out: Path, selected: set[str], rtol: float,
                  atol: float) -> None:
    """Selected targets = the dense W_aligned + CΔW in the tensor's dtype; every other tensor,
    every header and every non-weight file = the fine-tune's bytes; the index is right; the
    checkpoint loads with from_pretrained."""
    from transformers import AutoModelForCausalLM

    ft = trio["ft"]
    ref = _reference(trio)
    src_files, out_files = _raw(ft), _raw(out)
    assert sorted(src_files) == sorted(out_files)
    for name, (header, data) in src_files.items():
        assert out_files[name][0] == header, name  # names, dtypes, offsets, metadata
        assert len(out_files[name][1]) == len(data)
    src_t, out_t = _tensor_bytes(ft), _tensor_bytes(out)
    changed = set()
    for name, raw in src_t.items():
        module = name.removesuffix(".weight")
        if module in selected:
            changed.add(module)
            dtype = trio["sft"][name].dtype
            got = torch.frombuffer(bytearray(out_t[name]), dtype=dtype).reshape(
                trio["sft"][name].shape)
            torch.testing.assert_close(got.double(), ref[module][1].to(dtype).double(),
                                       rtol=rtol, atol=atol)
        else:
            assert out_t[name] == raw, name
    assert changed == selected
    if (ft / "model.safetensors.index.json").exists():
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert (out / "model.safetensors.index.json").read_bytes() == (
            ft / "model.safetensors.index.json").read_bytes()
        assert index["metadata"]["total_size"] == sum(len(b) for b in out_t.values())
    for extra in ("config.json", "generation_config.json", "tokenizer_config.json",
                  "README.md"):
        assert (out / extra).read_bytes() == (ft / extra).read_bytes()
    assert not (out / "training_args.bin").exists()  # a weight/pickle file: never copied
    assert not [p for p in out.rglob(".tmp-*")]
    model = AutoModelForCausalLM.from_pretrained(str(out))
    state = model.state_dict()
    for name, w in trio["sft"].items():
        module = name.removesuffix(".weight")
        expect = ref[module][1].to(w.dtype) if module in selected else w
        torch.testing.assert_close(state[name].to(w.dtype).double(), expect.double(),
                                   rtol=rtol, atol=atol)


def _reports(out: Path) -> tuple[dict[str, dict], dict[str, Any]]:
    rows = {r["module"]: r for r in pq.read_table(out / "_safelora" / "layers.parquet")
            .to_pylist()}
    summary = json.loads((out / "_safelora" / "summary.json").read_text())
    return rows, summary


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------


def test_llama_gqa_threshold_local(llama: dict[str, Any], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    ref = _reference(llama)
    cos = sorted(r[0] for r in ref.values())
    tau = (cos[len(cos) // 2 - 1] + cos[len(cos) // 2]) / 2
    selected = _select(ref, threshold=tau)
    assert 0 < len(selected) < len(ref)
    out = tmp_path / "out"
    args = ["project-model", "--alignment", llama["set"], "--aligned", str(llama["aligned"]),
            "--finetuned", str(llama["ft"]), "--out", str(out), "--threshold", str(tau),
            "--workers", "0", "--no-progress"]
    assert cli_main(args) == 0
    assert f"projected {len(selected)} of {len(ref)} target modules" in capsys.readouterr().out
    _check_output(llama, out, selected, rtol=1e-6, atol=1e-7)
    rows, summary = _reports(out)
    assert set(rows) == set(ref)
    for m, r in rows.items():
        assert r["cos_rounded"] == ref[m][0] and r["selected"] == (m in selected)
        assert r["norm_delta"] == pytest.approx(ref[m][2], rel=1e-5)
        assert r["norm_projected"] == pytest.approx(ref[m][3], rel=1e-5)
    v = rows["model.layers.0.self_attn.v_proj"]
    assert v["shape"] == [16, 32] and v["form"] == "C" and v["layout"] == "linear"
    assert summary["counts"]["selected"] == len(selected) and summary["tau"] == tau
    assert summary["skipped_files"] == ["training_args.bin"]
    assert summary["aligned"]["matches_set"] == "same"
    html = (out / "_safelora" / "report.html").read_text()
    assert "τ = " in html and "<svg" in html
    # Reads: the three inputs, within 5 % of what must be read (+ the header reads).
    b = summary["bytes"]
    n_files = len(list(llama["ft"].glob("*.safetensors")))
    assert b["read"] <= 1.05 * b["must_read"] + (2 * n_files + 4) * 64 * 1024
    prov = json.loads((out / "_safelora" / "projection.json").read_text())
    assert prov["status"] == "complete" and prov["alignment"]["content_id"]
    # Rerun: reused; other inputs: refused (immutable).
    assert cli_main(args) == 0
    assert "reused" in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="outputs are immutable"):
        project_model(FinetuneConfig(alignment=llama["set"], aligned=str(llama["aligned"]),
                                     finetuned=str(llama["ft"]), out=str(out),
                                     threshold=tau + 0.1, workers=0, progress=False))


def test_llama_number_mode_is_global(llama: dict[str, Any], tmp_path: Path) -> None:
    """τ is the k-th smallest cosine over every target module of the model, not per file."""
    ref = _reference(llama)
    res = project_model(FinetuneConfig(alignment=llama["set"], aligned=str(llama["aligned"]),
                                       finetuned=str(llama["ft"]), out=str(tmp_path / "o"),
                                       num_proj_layers=3, workers=0, progress=False))
    selected = _select(ref, k=3)
    assert set(res.selected_modules) == selected and len(selected) >= 3
    assert res.tau == sorted(r[0] for r in ref.values())[2]
    _check_output(llama, tmp_path / "o", selected, rtol=1e-6, atol=1e-7)


def test_phi3_fused_qkv_bf16_single_file_on_s3_with_ray(tmp_path: Path, s3_bucket: str,
                                                         s3_admin_client: Any) -> None:
    """Phi-3's fused qkv_proj, bf16, a single-file fine-tune; inputs and output on S3; two Ray
    workers; number mode."""
    trio = _trio(tmp_path / "phi3", _phi3(torch.bfloat16), ("qkv_proj",), None, seed=7)
    assert (trio["ft"] / "model.safetensors").exists()
    for side in ("aligned", "ft"):
        for f in sorted(trio[side].iterdir()):
            s3_admin_client.upload_file(str(f), s3_bucket, f"models/{side}/{f.name}")
    out_uri = f"s3://{s3_bucket}/projected/phi3"
    res = project_model(FinetuneConfig(
        alignment=trio["set"], aligned=f"s3://{s3_bucket}/models/aligned",
        finetuned=f"s3://{s3_bucket}/models/ft", out=out_uri, num_proj_layers=1, workers=2,
        progress=False))
    ref = _reference(trio)
    selected = _select(ref, k=1)
    assert set(res.selected_modules) == selected and res.workers >= 1
    # The set was built from the local aligned copy: the S3 one is assumed a copy of it.
    local = tmp_path / "download"
    st = open_storage(out_uri)
    for obj in st.list(""):
        dest = local / obj.path
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(st.read(obj.path))
    # bf16: W_aligned + CΔW in float32 then cast vs float64 then cast: within one bf16 step.
    _check_output(trio, local, selected, rtol=8e-3, atol=1e-6)
    rows, summary = _reports(local)
    assert rows["model.layers.1.self_attn.qkv_proj"]["shape"] == [64, 32]
    assert summary["aligned"]["matches_set"] == "unverified"
    assert res.bytes_read <= 1.05 * res.must_read_bytes + 8 * 64 * 1024 + 2 * sum(
        os.path.getsize(p) for p in trio["ft"].glob("*.safetensors"))  # number mode: 2 passes


def test_failure_midway_leaves_nothing_visible_and_rerun_completes(
        llama: dict[str, Any], tmp_path: Path) -> None:
    """A bad tensor in the last file fails the run after other files were written: no index,
    so no checkpoint; fixing the input and running again completes it."""
    ft = tmp_path / "ft"
    shutil.copytree(llama["ft"], ft)
    index = json.loads((ft / "model.safetensors.index.json").read_text())
    name = "model.layers.1.self_attn.q_proj.weight"
    fname = index["weight_map"][name]
    path = ft / fname
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    b, _ = json.loads(data[8:8 + n])[name]["data_offsets"]
    data[8 + n + b:8 + n + b + 4] = torch.tensor([float("nan")]).numpy().tobytes()
    path.write_bytes(bytes(data))
    out = tmp_path / "out"
    cfg = {"alignment": llama["set"], "aligned": str(llama["aligned"]), "finetuned": str(ft),
           "out": str(out), "threshold": 0.5, "workers": 0, "progress": False}
    with pytest.raises(CheckpointError, match=r"q_proj\.weight.*NaN"):
        project_model(FinetuneConfig(**cfg))
    assert not (out / "model.safetensors.index.json").exists()
    assert not (out / fname).exists()  # that file was never published
    assert json.loads((out / "_safelora" / "projection.json").read_text())["status"] == "writing"
    shutil.rmtree(ft)
    shutil.copytree(llama["ft"], ft)  # the input fixed (same content: new versions)
    res = project_model(FinetuneConfig(**cfg))
    assert not res.reused and (out / "model.safetensors.index.json").exists()
    _check_output(llama, out, set(res.selected_modules), rtol=1e-6, atol=1e-7)


def test_killed_worker(llama: dict[str, Any], tmp_path: Path, monkeypatch) -> None:
    """A worker that dies while writing a file: the file is run again once Ray has restarted
    the worker. One that dies every time fails the run with nothing visible; a rerun completes
    it."""
    flag = tmp_path / "crashes"
    flag.mkdir()

    def die_mid_file(fn, args):
        import safelora_ray.pipelines.project_model.worker as fm

        if fn.__name__ == "write_file" and not getattr(fm, "_crashy", False):
            real = fm._write_bytes

            def dying(*a, **kw):  # after the header and some tensors: mid-file
                marks = sorted(flag.glob("crash-*"))
                if len(marks) < int((flag / "limit").read_text()):
                    (flag / f"crash-{len(marks)}").write_text("x")
                    os._exit(1)
                return real(*a, **kw)

            fm._write_bytes, fm._crashy = dying, True

    Crashy = crashing_worker(die_mid_file)  # restarted on its node after each death
    monkeypatch.setattr(actor_mod, "SafeLoraWorker", Crashy)
    cfg = {"alignment": llama["set"], "aligned": str(llama["aligned"]),
           "finetuned": str(llama["ft"]), "threshold": 0.5, "workers": 1, "progress": False}
    (flag / "limit").write_text("1")  # one crash, then fine
    res = project_model(FinetuneConfig(out=str(tmp_path / "o1"), **cfg))
    assert (flag / "crash-0").exists() and not (flag / "crash-1").exists()
    assert (tmp_path / "o1" / "model.safetensors.index.json").exists()
    _check_output(llama, tmp_path / "o1", set(res.selected_modules), rtol=1e-6, atol=1e-7)
    (flag / "limit").write_text("100")  # always
    with pytest.raises(CheckpointError, match="its worker died 3 times"):
        project_model(FinetuneConfig(out=str(tmp_path / "o2"), **cfg))
    assert not (tmp_path / "o2" / "model.safetensors.index.json").exists()
    monkeypatch.undo()
    res = project_model(FinetuneConfig(out=str(tmp_path / "o2"), **cfg))
    assert not res.reused
    _check_output(llama, tmp_path / "o2", set(res.selected_modules), rtol=1e-6, atol=1e-7)


def test_refusals(llama: dict[str, Any], tmp_path: Path) -> None:
    base = {"alignment": llama["set"], "aligned": str(llama["aligned"]),
            "finetuned": str(llama["ft"]), "workers": 0, "progress": False}
    with pytest.raises(ConfigError, match="exactly one of --threshold or --num-proj-layers"):
        FinetuneConfig(out="x", **base)
    with pytest.raises(ConfigError, match="would be written into an input"):
        project_model(FinetuneConfig(out=str(llama["ft"]), threshold=0.5, **base))
    with pytest.raises(CheckpointError, match="not written by project-model"):
        project_model(FinetuneConfig(out=str(llama["aligned"]), threshold=0.5,
                                     **{**base, "aligned": str(llama["ft"]),
                                        "finetuned": str(llama["ft"])}))
    # A fine-tune of another model: a target tensor of the set is missing / has other shapes.
    other = tmp_path / "other"
    tiny_model(0, gqa=False).save_pretrained(str(other))
    with pytest.raises(CheckpointError, match=r"k_proj\.weight.*\[32, 32\].*\[16, 32\]"):
        project_model(FinetuneConfig(out=str(tmp_path / "o"), threshold=0.5,
                                     **{**base, "finetuned": str(other)}))
    assert not (tmp_path / "o").exists()
    ck = Checkpoint.open(str(llama["ft"]))
    assert ck.model_config()["model_type"] == "llama"


def test_sparse_70b_shaped_finetune_streams_holes(tmp_path: Path) -> None:
    """Non-target tensors of 70B shapes (~1.4 GB apparent, sparse holes) are streamed through
    in chunks, never held whole; holes stay holes; reads stay within 5 % of what must be read
    (all of the fine-tune, the aligned targets, the set's matrices)."""
    import resource

    from tests.factory import allocated_bytes, write_sparse_checkpoint

    g = torch.Generator().manual_seed(3)
    tb, ta, tf = {}, {}, {}
    for layer in range(2):
        for mod, shape in (("q_proj", (64, 64)), ("v_proj", (16, 64))):
            name = f"model.layers.{layer}.self_attn.{mod}.weight"
            w = (torch.randn(*shape, generator=g) * 0.05).to(torch.bfloat16)
            tb[name] = w
            ta[name] = (w.float() + torch.randn(*shape, generator=g) * 0.01).bfloat16()
            tf[name] = (ta[name].float() + torch.randn(*shape, generator=g) * 0.005).bfloat16()
    holes = {f"model.layers.{i}.mlp.up_proj.weight": (28672, 8192) for i in range(2)}
    holes["model.embed_tokens.weight"] = (32000, 8192)
    b = write_sparse_checkpoint(tmp_path / "b", tb, holes)
    a = write_sparse_checkpoint(tmp_path / "a", ta, holes)
    f = write_sparse_checkpoint(tmp_path / "f", tf, holes)
    size = (f / "model.safetensors").stat().st_size
    assert size > 1.4e9 and allocated_bytes(f / "model.safetensors") < 10e6
    aset = build(BuildConfig(base=str(b), aligned=str(a), out=str(tmp_path / "set"),
                             workers=0, progress=False))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = project_model(FinetuneConfig(alignment=aset.uri, aligned=str(a), finetuned=str(f),
                                       out=str(tmp_path / "out"), threshold=0.5, workers=0,
                                       progress=False))
    assert res.modules == 4 and res.bytes_written == size
    assert res.bytes_read <= 1.05 * res.must_read_bytes + 4 * 64 * 1024
    assert res.must_read_bytes >= size
    out = tmp_path / "out" / "model.safetensors"
    assert out.stat().st_size == size and allocated_bytes(out) < 10e6  # holes stayed holes
    # Chunks of 64 MiB, a few in flight: far below one 470 MB up_proj, let alone the file.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 400_000  # KiB
    with safe_open(str(out), "pt") as fo, safe_open(str(f / "model.safetensors"), "pt") as fi:
        assert fo.metadata() == fi.metadata() and sorted(fo.keys()) == sorted(fi.keys())
        for name in tf:
            assert fo.get_tensor(name).shape == tf[name].shape
        assert not fo.get_slice("model.embed_tokens.weight")[:4].any()
    print(f"project-model of {size / 1e9:.2f} GB apparent: {res.duration_s:.1f} s")


@pytest.mark.slow  # a subprocess importing torch and transformers; the CLI is tested above
def test_jobs_entrypoint(llama: dict[str, Any], tmp_path: Path) -> None:
    """jobs/project_model.py takes the CLI's flags (run as a Ray Job runs it: a script)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, str(root / "jobs" / "project_model.py"), "--alignment", llama["set"],
         "--aligned", str(llama["aligned"]), "--finetuned", str(llama["ft"]), "--out",
         str(tmp_path / "out"), "--num-proj-layers", "2", "--strict-k", "--workers", "0",
         "--no-progress"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "projected 2 of 6 target modules" in proc.stdout
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
