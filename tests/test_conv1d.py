"""GPT-2-style Conv1D weights (stored d_in x d_out): the build takes V in nn.Linear's
orientation, so C acts where PEFT's B acts, for square and non-square targets; every refusal
names its real cause. Real transformers GPT-2 checkpoints and PEFT adapters, dense reference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from safelora_ray import AlignmentSet, BuildConfig, SanitizeConfig, build, sanitize
from safelora_ray.core.errors import CheckpointError
from tests.adapters import edit_config, make_gpt2_adapter, read_weights, tiny_gpt2
from tests.reference import dense_c, sanitize_dense

TARGETS = ["c_attn", "c_proj"]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny GPT-2 base, an 'aligned' copy (base + a low-rank update + noise on every Conv1D
    weight) saved with save_pretrained, and the alignment set for c_attn/c_proj."""
    root = tmp_path_factory.mktemp("gpt2")
    base = tiny_gpt2(0)
    base.save_pretrained(str(root / "base"))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if p.dim() == 2 and name.rsplit(".", 2)[-2] in ("c_attn", "c_proj", "c_fc"):
                d0, d1 = p.shape
                p.add_(torch.randn(d0, 3, generator=g) @ torch.randn(3, d1, generator=g) * 0.02
                       + torch.randn(d0, d1, generator=g) * 0.002)
    base.save_pretrained(str(root / "aligned"))
    wb = load_file(str(root / "base" / "model.safetensors"))
    wa = load_file(str(root / "aligned" / "model.safetensors"))
    res = build(BuildConfig(base=str(root / "base"), aligned=str(root / "aligned"),
                            out=str(root / "set"), targets=TARGETS, workers=0, progress=False))
    return {"root": root, "base": wb, "aligned": wa, "set": res.uri}


def _c_linear(gpt2: dict, module: str) -> torch.Tensor:
    """The dense reference C of a Conv1D module: V = (W_aligned − W_base)ᵀ (d_out x d_in)."""
    name = module + ".weight"
    return dense_c(gpt2["base"][name].T, gpt2["aligned"][name].T)


def test_conv1d_alignment_is_built_on_the_output_side(gpt2: dict) -> None:
    aset = AlignmentSet.open(gpt2["set"])
    assert len(aset.rows) == 6  # per layer: c_attn, attn.c_proj, mlp.c_proj
    attn = aset.rows["transformer.h.0.attn.c_attn"]  # stored 32 x 96: d_out 96, non-square
    assert attn.layout == "conv1d" and attn.shape == (96, 32)
    assert attn.form == "V" and attn.stored_shape == (96, 32)
    mlp = aset.rows["transformer.h.1.mlp.c_proj"]  # stored 128 x 32: d_out 32
    assert mlp.shape == (32, 128) and mlp.form == "C" and mlp.stored_shape == (32, 32)
    for module in aset.rows:
        c = aset.load(module).dense().double()
        torch.testing.assert_close(c, _c_linear(gpt2, module), rtol=2e-5, atol=1e-7)
    # The square c_proj: the stored difference's own V Vᵀ would be the input-side matrix.
    sq = "transformer.h.0.attn.c_proj"
    wrong = dense_c(gpt2["base"][sq + ".weight"], gpt2["aligned"][sq + ".weight"])
    assert not torch.allclose(aset.load(sq).dense().double(), wrong, atol=1e-4)
    table = pq.read_table(Path(gpt2["set"]) / "manifest.parquet").to_pylist()
    assert {r["layout"] for r in table} == {"conv1d"}
    assert "conv1d" in aset.summary()


def test_sanitize_gpt2_adapter_matches_dense(gpt2: dict, tmp_path: Path) -> None:
    """PEFT's own GPT-2 adapter (fan_in_fan_out, lora_only biases), square and non-square
    targets, against the dense reference with C on the output side."""
    cat = tmp_path / "catalog"
    path, weights = make_gpt2_adapter(cat / "gpt2-tenant", bias="lora_only")
    assert json.loads((path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    cs = {m: _c_linear(gpt2, m) for m in weights}
    # A threshold between the reference cosines, so some modules are projected and some not.
    _, cos, _, _ = sanitize_dense(cs, weights, threshold=1.0)
    tau = sorted(cos.values())[len(cos) // 2 - 1]
    new_b, cos, selected, pdst = sanitize_dense(cs, weights, threshold=tau)
    assert 0 < len(selected) < len(weights)
    run = sanitize(SanitizeConfig(alignment=gpt2["set"], adapters=str(cat),
                                  out=str(tmp_path / "out"), threshold=tau, workers=0,
                                  progress=False, run_id="gpt2"))
    assert (run.ok, run.error) == (1, 0), run.errors
    out, _ = read_weights(tmp_path / "out" / "gpt2-tenant")
    src, _ = read_weights(path)
    for m in weights:
        key = f"base_model.model.{m}.lora_B.weight"
        torch.testing.assert_close(out[key].double(), new_b[m], rtol=1e-5, atol=1e-6)
    for key in src:  # A, biases: byte for byte
        if not key.endswith("lora_B.weight"):
            assert torch.equal(out[key], src[key]), key
    layers = pq.read_table(tmp_path / "out" / "_reports" / "gpt2" / "layers.parquet")
    got = {r["module"]: r for r in layers.to_pylist()}
    assert {m for m, r in got.items() if r["projected"]} == selected
    assert all(got[m]["cos_rounded"] == cos[m] for m in weights)
    adapters = pq.read_table(tmp_path / "out" / "_reports" / "gpt2" / "adapters.parquet")
    note = adapters.to_pylist()[0]["note"]
    assert note.startswith("biases left as is: ") and "attn.c_attn.base_layer.bias" in note
    assert adapters.to_pylist()[0]["pdst"] == pytest.approx(pdst, rel=1e-5)


def test_refusals_name_the_real_cause(gpt2: dict, tmp_path: Path) -> None:
    cat = tmp_path / "catalog"
    # An adapter whose config denies the Conv1D layout (PEFT never writes this for GPT-2).
    make_gpt2_adapter(cat / "no-fifo", target_modules=["c_proj"])
    edit_config(cat / "no-fifo", lambda c: c.update(fan_in_fan_out=False))
    # Factors laid out for the transposed weight (A r x d_out, B d_in x r) on c_attn.
    path, _ = make_gpt2_adapter(cat / "swapped", target_modules=["c_attn"])
    from tests.adapters import rewrite_weights

    def swap(t: dict) -> dict:
        for k in [k for k in t if k.endswith("lora_A.weight")]:
            kb = k.replace("lora_A", "lora_B")
            a, b = t[k], t[kb]
            t[k], t[kb] = b.T.contiguous(), a.T.contiguous()
        return t

    rewrite_weights(path, swap)
    run = sanitize(SanitizeConfig(alignment=gpt2["set"], adapters=str(cat),
                                  out=str(tmp_path / "out"), threshold=0.5, workers=0,
                                  progress=False))
    errors = dict(run.errors)
    assert run.error == 2
    assert "fan_in_fan_out=false, which PEFT never saves for a Conv1D" in errors["no-fifo"]
    assert "factors are transposed against the weight" in errors["swapped"]
    assert "base model" not in errors["swapped"]

    # A set built from GPT-2 weights whose config.json claims another model is nn.Linear:
    # a GPT-2 adapter is refused for that reason, not for its shapes.
    root = gpt2["root"]
    for side in ("base", "aligned"):
        shutil.copytree(root / side, tmp_path / f"lin-{side}")
        (tmp_path / f"lin-{side}" / "config.json").write_text('{"model_type": "qwen"}')
    lin = build(BuildConfig(base=str(tmp_path / "lin-base"), aligned=str(tmp_path / "lin-aligned"),
                            out=str(tmp_path / "lin-set"), targets=["c_proj"], workers=0,
                            progress=False))
    cat2 = tmp_path / "catalog2"
    make_gpt2_adapter(cat2 / "fifo", target_modules=["c_proj"])
    run = sanitize(SanitizeConfig(alignment=lin.uri, adapters=str(cat2),
                                  out=str(tmp_path / "out2"), threshold=0.5, workers=0,
                                  progress=False))
    assert run.error == 1
    assert "fan_in_fan_out=true" in run.errors[0][1]
    assert "holds this module as an nn.Linear weight" in run.errors[0][1]

    # No config.json at all: a c_attn target cannot be oriented, so the build refuses.
    for side in ("base", "aligned"):
        (tmp_path / f"lin-{side}" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"no config\.json .*Conv1D"):
        build(BuildConfig(base=str(tmp_path / "lin-base"), aligned=str(tmp_path / "lin-aligned"),
                          out=str(tmp_path / "set3"), targets=["c_attn"], workers=0,
                          progress=False))


def test_set_without_layout_columns_still_opens(gpt2: dict, tmp_path: Path) -> None:
    """A manifest written before layouts were recorded reads as nn.Linear modules."""
    copy = tmp_path / "old-set"
    shutil.copytree(gpt2["set"], copy)
    table = pq.read_table(copy / "manifest.parquet")
    pq.write_table(table.drop_columns(["layout", "proj_rank", "proj_energy", "digest"]),
                   copy / "manifest.parquet")
    # Such a set predates the digests too (an edited manifest with them would be refused).
    meta = json.loads((copy / "alignment.json").read_text())
    del meta["integrity"]
    (copy / "alignment.json").write_text(json.dumps(meta))
    aset = AlignmentSet.open(str(copy))
    assert {r.layout for r in aset.rows.values()} == {"linear"}
    assert all(r.proj_rank is None for r in aset.rows.values())


def test_project_model_gpt2_fine_tune(gpt2: dict, tmp_path: Path) -> None:
    """A full fine-tune of GPT-2: ΔW and W_out in the stored (transposed) orientation, C on
    the output side; every other tensor byte for byte."""
    from safelora_ray import FinetuneConfig, project_model
    from tests.reference import dense_finetune

    model = tiny_gpt2(0)
    model.load_state_dict({**model.state_dict(), **gpt2["aligned"]})
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.003)
    model.save_pretrained(str(tmp_path / "ft"))
    ft = load_file(str(tmp_path / "ft" / "model.safetensors"))
    res = project_model(FinetuneConfig(alignment=gpt2["set"], aligned=str(gpt2["root"] / "aligned"),
                                       finetuned=str(tmp_path / "ft"), out=str(tmp_path / "o"),
                                       num_proj_layers=3, workers=0, progress=False))
    ref = {}
    for m in AlignmentSet.open(gpt2["set"]).rows:
        w = m + ".weight"
        ref[m] = dense_finetune(_c_linear(gpt2, m), gpt2["aligned"][w].T, ft[w].T)
    tau = sorted(r[0] for r in ref.values())[2]
    assert set(res.selected_modules) == {m for m, r in ref.items() if r[0] <= tau}
    out = load_file(str(tmp_path / "o" / "model.safetensors"))
    for name, w in ft.items():
        m = name.removesuffix(".weight")
        if m in res.selected_modules:
            torch.testing.assert_close(out[name].double(), ref[m][1].T, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(out[name], w), name


def test_a_config_that_names_no_model_tells_nothing() -> None:
    """Layouts come from config.json, never from names alone: a config with neither
    ``model_type`` nor ``architectures`` says nothing (a GPT-2-named module is then refused)."""
    from safelora_ray.planning.plan import conv1d_names

    assert conv1d_names(None) is None
    assert conv1d_names({"hidden_size": 768}) is None
    assert conv1d_names({"model_type": "gpt2"}) == conv1d_names(
        {"architectures": ["GPT2LMHeadModel"]}) != frozenset()
    assert conv1d_names({"model_type": "llama"}) == frozenset()
    assert conv1d_names({"architectures": ["LlamaForCausalLM"]}) == frozenset()
