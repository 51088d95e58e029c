"""The exact projection (SPEC §1, optional form): ``build --projection exact`` stores U_k,
sanitize applies U_k (U_kᵀ B); checked against a dense float64 SVD, rank and energy modes."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from safelora_ray import AlignmentSet, BuildConfig, SanitizeConfig, build, sanitize
from safelora_ray.cli.main import build_parser
from safelora_ray.cli.main import main as cli_main
from safelora_ray.core.errors import AlignmentSetError, ConfigError
from tests.adapters import make_adapter, read_weights
from tests.factory import Arch, aligned_from, llama_tensors, write_checkpoint
from tests.reference import dense_exact, sanitize_dense

ARCH = Arch(layers=2, hidden=32, heads=4, kv_heads=2, intermediate=48)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("exact")
    base = llama_tensors(ARCH, seed=3, dtype=torch.bfloat16)
    aligned = aligned_from(base, seed=4)
    write_checkpoint(root / "base", base, shards=2)
    write_checkpoint(root / "aligned", aligned, shards=1)
    return {"root": root, "base": base, "aligned": aligned}


def _check(aset: AlignmentSet, pair: dict, **mode: float) -> dict[str, int]:
    ks = {}
    for module, row in aset.rows.items():
        name = module + ".weight"
        ref, k = dense_exact(pair["base"][name], pair["aligned"][name], **mode)
        am = aset.load(module)
        assert am.form == "U" and row.form == "U"
        assert row.proj_rank == k and row.stored_shape == (row.shape[0], k)
        torch.testing.assert_close(am.dense().double(), ref, rtol=0, atol=2e-6)
        u = am.tensor.double()
        torch.testing.assert_close(u.T @ u, torch.eye(k, dtype=torch.float64), atol=2e-6,
                                   rtol=0)
        v = pair["aligned"][name].double() - pair["base"][name].double()
        s2 = torch.linalg.svdvals(v) ** 2
        assert row.proj_energy == pytest.approx(float(s2[:k].sum() / s2.sum()), rel=1e-9)
        ks[module] = k
    return ks


@pytest.mark.parametrize("mode", [{"rank": 3}, {"energy": 0.98}], ids=["rank", "energy"])
def test_exact_build_matches_dense_svd(pair: dict, tmp_path: Path, mode: dict) -> None:
    out = tmp_path / "set"
    res = build(BuildConfig(base=str(pair["root"] / "base"), aligned=str(pair["root"] / "aligned"),
                            out=str(out), targets="q_proj,v_proj", projection="exact",
                            workers=0, progress=False, max_file_bytes=1024, **mode))
    aset = AlignmentSet.open(res.uri)
    ks = _check(aset, pair, **mode)
    if "energy" in mode:  # the energy rule picks different k for q (32 x 32) and v (16 x 32)
        assert len(set(ks.values())) > 1 and all(1 <= k < 16 for k in ks.values())
    md = aset.metadata
    assert md["method"]["name"] == "safelora-exact" and md["method"]["forms"].keys() == {"U"}
    assert {k: md["method"][k] for k in mode} == mode
    assert md["stored_bytes"] == sum(4 * r.shape[0] * r.proj_rank for r in aset.rows.values())
    assert len(md["shards"]) > 1  # max_file_bytes split the output: per-file k layouts
    assert "exact k" in aset.summary()
    table = pq.read_table(out / "manifest.parquet").to_pylist()
    assert {r["module"]: r["proj_rank"] for r in table} == ks


def test_sanitize_applies_the_truncated_basis(pair: dict, tmp_path: Path) -> None:
    mode = {"energy": 0.8}
    res = build(BuildConfig(base=str(pair["root"] / "base"), aligned=str(pair["root"] / "aligned"),
                            out=str(tmp_path / "set"), projection="exact", workers=0,
                            progress=False, **mode))
    cat = tmp_path / "cat"
    _, weights = make_adapter(cat / "t1", gqa=True, r=3)
    cs = {m: dense_exact(pair["base"][m + ".weight"], pair["aligned"][m + ".weight"], **mode)[0]
          for m in weights}
    new_b, _, selected, _ = sanitize_dense(cs, weights, num_proj_layers=2)
    assert len(selected) >= 2
    run = sanitize(SanitizeConfig(alignment=res.uri, adapters=str(cat), out=str(tmp_path / "o"),
                                  num_proj_layers=2, workers=0, progress=False))
    assert run.ok == 1, run.errors
    out, _ = read_weights(tmp_path / "o" / "t1")
    for m in weights:
        torch.testing.assert_close(out[f"base_model.model.{m}.lora_B.weight"].double(),
                                   new_b[m], rtol=1e-5, atol=1e-6)


def test_exact_flags_and_immutability(pair: dict, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="exactly one of --rank K or --energy E"):
        BuildConfig(base="a", aligned="b", out="c", projection="exact")
    with pytest.raises(ConfigError, match="need --projection exact"):
        BuildConfig(base="a", aligned="b", out="c", rank=4)
    with pytest.raises(ConfigError, match=r"energy must be in \(0, 1\]"):
        BuildConfig(base="a", aligned="b", out="c", projection="exact", energy=1.5)
    b, a = str(pair["root"] / "base"), str(pair["root"] / "aligned")
    # v_proj is 16 x 32: k = 20 cannot be.
    with pytest.raises(ConfigError, match=r"rank 20 exceeds min\(d_out, d_in\) = 16"):
        build(BuildConfig(base=b, aligned=a, out=str(tmp_path / "x"), projection="exact",
                          rank=20, workers=0, progress=False))
    out = str(tmp_path / "set")
    assert cli_main(["build", "--base", b, "--aligned", a, "--out", out, "--projection",
                     "exact", "--rank", "2", "--workers", "0", "--no-progress"]) == 0
    meta = json.loads((tmp_path / "set" / "alignment.json").read_text())
    assert meta["method"]["rank"] == 2
    again = build(BuildConfig(base=b, aligned=a, out=out, projection="exact", rank=2,
                              workers=0, progress=False))
    assert again.reused
    with pytest.raises(AlignmentSetError, match="immutable"):
        build(BuildConfig(base=b, aligned=a, out=out, workers=0, progress=False))
    assert build_parser().parse_args(["build", "--base", b, "--aligned", a, "--out", out,
                                      "--projection", "exact", "--energy", "0.9"]).energy == 0.9


def test_project_model_applies_the_truncated_basis(pair: dict, tmp_path: Path) -> None:
    """A full fine-tune projected with an exact set: W_aligned + U_k (U_kᵀ ΔW)."""
    from safelora_ray import FinetuneConfig, project_model
    from tests.reference import dense_finetune

    mode = {"rank": 4}
    res = build(BuildConfig(base=str(pair["root"] / "base"), aligned=str(pair["root"] / "aligned"),
                            out=str(tmp_path / "set"), projection="exact", workers=0,
                            progress=False, **mode))
    g = torch.Generator().manual_seed(9)
    ft = {n: (w.float() + torch.randn(w.shape, generator=g) * 0.01).to(w.dtype)
          for n, w in pair["aligned"].items()}
    write_checkpoint(tmp_path / "ft", ft, shards=2)
    ref = {}
    for n, w in ft.items():
        if n.endswith(("q_proj.weight", "v_proj.weight")):
            c, _ = dense_exact(pair["base"][n], pair["aligned"][n], **mode)
            ref[n] = dense_finetune(c, pair["aligned"][n], w)
    out = project_model(FinetuneConfig(alignment=res.uri, aligned=str(pair["root"] / "aligned"),
                                       finetuned=str(tmp_path / "ft"), out=str(tmp_path / "o"),
                                       threshold=1.0, workers=0, progress=False))
    assert out.selected == len(ref) == 4
    got = {}
    for f in (tmp_path / "o").glob("*.safetensors"):
        got.update(load_file(str(f)))
    for n, (_, w_out, _, _) in ref.items():
        # bf16 weights: float32 vs float64 before the cast, within one bf16 step
        torch.testing.assert_close(got[n].double(), w_out.to(torch.bfloat16).double(),
                                   rtol=8e-3, atol=1e-6)
    for n, w in ft.items():
        if n not in ref:
            assert torch.equal(got[n], w), n
