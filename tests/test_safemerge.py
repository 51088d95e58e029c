"""SafeMERGE (issue 24, SPEC §5) on the sanitize path, against a dense float64 reference.

The reference below is written from SPEC §5 and the paper (arXiv 2503.17239; the official
code's ``SafeLoRAMerger`` through PEFT's "linear" combination), not from this project's code:
per module it forms C, the cosine and ΔW' as dense float64 matrices. Each output adapter is
loaded by PEFT on the tiny Llama and every module's ``get_delta_weight`` (B'A' times the
output's scaling) is compared with it: task adapters with different alphas, rsLoRA, a
rank_pattern and an alpha_pattern; threshold and number modes; both combinations.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from safelora_ray import BuildConfig, build
from safelora_ray.cli.main import main as cli_main
from safelora_ray.core.errors import ConfigError
from safelora_ray.core.merge import MergeRule, merge_module, parse_weights
from safelora_ray.pipelines.sanitize.driver import SanitizeConfig, sanitize
from tests.adapters import (
    edit_config,
    load_base_model,
    make_adapter,
    rewrite_weights,
    save_aligned_pair,
    spread_b,
)
from tests.reference import dense_c, dense_cos

peft = pytest.importorskip("peft")

PFX = "base_model.model."
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
BASE_NAME = "tiny-llama"

# The task adapters: PEFT config (and rsLoRA, set in the saved config) per adapter id.
SPECS: dict[str, dict[str, Any]] = {
    "plain": {"r": 4, "lora_alpha": 8},
    "rslora": {"r": 4, "lora_alpha": 6, "rslora": True},
    "patterns": {"r": 4, "lora_alpha": 16, "rank_pattern": {"v_proj": 2},
                 "alpha_pattern": {"o_proj": 3.0}},
}
SAFETY_SPEC: dict[str, Any] = {"r": 4, "lora_alpha": 12}


# ----------------------------------------------------------------------------------------------
# The reference (SPEC §5, dense float64)
# ----------------------------------------------------------------------------------------------


def ref_rank_alpha(spec: dict[str, Any], module: str) -> tuple[int, float, float]:
    """(r, alpha, scaling) of a module as the adapter was made (patterns keyed by kind)."""
    kind = module.rsplit(".", 1)[-1]
    r = spec.get("rank_pattern", {}).get(kind, spec["r"])
    alpha = spec.get("alpha_pattern", {}).get(kind, spec["lora_alpha"])
    scaling = alpha / math.sqrt(r) if spec.get("rslora") else alpha / r
    return r, alpha, scaling


def ref_factors(path: Path, spec: dict[str, Any]) -> dict[str, tuple[Any, Any, float]]:
    """module → (A, B, scaling), A and B in float64 from the saved file."""
    t = load_file(str(path / "adapter_model.safetensors"))
    out = {}
    for k, a in t.items():
        if k.endswith(".lora_A.weight"):
            m = k[len(PFX): -len(".lora_A.weight")]
            b = t[f"{PFX}{m}.lora_B.weight"]
            out[m] = (a.double(), b.double(), ref_rank_alpha(spec, m)[2])
    return out


def safemerge_dense(c: dict[str, torch.Tensor], task: dict[str, tuple[Any, Any, float]],
                    safety: dict[str, tuple[Any, Any, float]], *, weights: tuple[float, float],
                    combination: str, threshold: float | None = None, k: int | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, float], set[str]]:
    """ΔW' per module, the rounded cosines and the merged modules (SPEC §5)."""
    w_f, w_s = weights
    cos = {m: round(dense_cos(c[m], a, b), 5) for m, (a, b, _) in task.items()}
    if threshold is not None:
        merged = {m for m, x in cos.items() if x < threshold}  # strict, as the official code
    else:
        assert k is not None
        tau = sorted(cos.values())[k - 1]
        merged = {m for m, x in cos.items() if x <= tau}  # ties included
    delta = {}
    for m, (a, b, s) in task.items():
        if m not in merged:
            delta[m] = s * (b @ a)
            continue
        a_s, b_s, s_s = safety[m]
        if combination == "linear":
            bb = math.sqrt(w_f * s) * b + math.sqrt(w_s * s_s) * b_s
            aa = math.sqrt(w_f * s) * a + math.sqrt(w_s * s_s) * a_s
            delta[m] = bb @ aa
        else:
            delta[m] = w_f * s * (b @ a) + w_s * s_s * (b_s @ a_s)
    return delta, cos, merged


def peft_deltas(base: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """ΔW of every LoRA module of the output, as PEFT loads it (scaling applied)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = PeftModel.from_pretrained(load_base_model(base), str(adapter_dir))
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and "default" in mod.lora_A:
            out[name.removeprefix(PFX)] = mod.get_delta_weight("default").double()
    return out


# ----------------------------------------------------------------------------------------------
# Fixtures: a model pair, its alignment set, a safety adapter and task adapters
# ----------------------------------------------------------------------------------------------


def _adapter(path: Path, spec: dict[str, Any], seed: int, base: str = BASE_NAME,
             **kw: Any) -> Path:
    args = {k: v for k, v in spec.items() if k != "rslora"}
    args.setdefault("target_modules", ["q_proj", "v_proj", "o_proj"])
    out, _ = make_adapter(path, adapter_seed=seed, **{**args, **kw})
    # Set after saving: PEFT records the (nameless) tiny model's name instead.
    edit_config(out, lambda c: c.update(use_rslora=bool(spec.get("rslora")),
                                        base_model_name_or_path=base))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("safemerge")
    base, aligned = save_aligned_pair(root, seed=5)
    sb = load_file(str(base / "model.safetensors"))
    sa = load_file(str(aligned / "model.safetensors"))
    c = {n[: -len(".weight")]: dense_c(w, sa[n]) for n, w in sb.items()
         if n.endswith(".weight") and w.dim() == 2 and ".layers." in n}
    v = {n[: -len(".weight")]: sa[n].double() - w.double() for n, w in sb.items()
         if n.endswith(".weight") and w.dim() == 2 and ".layers." in n}
    res = build(BuildConfig(base=str(base), aligned=str(aligned), out=str(root / "set"),
                            targets=list(TARGETS), workers=0, progress=False))
    safety = _adapter(root / "safety", SAFETY_SPEC, 7)
    catalog = root / "catalog"
    for i, (aid, spec) in enumerate(SPECS.items()):
        spread_b(_adapter(catalog / aid, spec, 20 + i), v, i)
    return {"root": root, "base": base, "c": c, "v": v, "set": res.uri, "safety": safety,
            "catalog": catalog}


def _run(world: dict[str, Any], out: Path, catalog: Path | None = None, **kw: Any) -> Any:
    kw.setdefault("safety_adapter", str(world["safety"]))
    cfg = SanitizeConfig(alignment=world["set"], adapters=str(catalog or world["catalog"]),
                         out=str(out), method="safemerge", workers=0, progress=False, **kw)
    return sanitize(cfg)


def _report(out: Path, run_id: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    rdir = out / "_reports" / run_id
    adapters = {r["adapter_id"]: r for r in pq.read_table(rdir / "adapters.parquet").to_pylist()}
    layers: dict[str, dict[str, Any]] = {}
    for r in pq.read_table(rdir / "layers.parquet").to_pylist():
        layers.setdefault(r["adapter_id"], {})[r["module"]] = r
    return adapters, layers


def _check_adapter(world: dict[str, Any], out: Path, aid: str, spec: dict[str, Any],
                   layers: dict[str, Any], **rule: Any) -> set[str]:
    task = ref_factors(world["catalog"] / aid, spec)
    safety = ref_factors(world["safety"], SAFETY_SPEC)
    delta, cos, merged = safemerge_dense(world["c"], task, safety, **rule)
    got = peft_deltas(world["base"], out / aid)
    assert set(got) == set(delta)
    for m, ref in delta.items():
        torch.testing.assert_close(got[m], ref, rtol=1e-5, atol=1e-7, msg=f"{aid} {m}")
    # The report: which modules were merged, with their cosines.
    assert {m for m, r in layers[aid].items() if r["projected"]} == merged
    assert {m: r["cos_rounded"] for m, r in layers[aid].items()} == pytest.approx(cos, abs=2e-5)
    cfg = json.loads((out / aid / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is False and cfg["lora_alpha"] == cfg["r"]
    assert cfg["alpha_pattern"] == cfg["rank_pattern"]
    return merged


# ----------------------------------------------------------------------------------------------
# The math alone
# ----------------------------------------------------------------------------------------------


def test_merge_module_both_combinations() -> None:
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    a_f, b_f, a_s, b_s = rnd(3, 10), rnd(7, 3), rnd(3, 10), rnd(7, 3)
    a5, b5 = rnd(5, 10), rnd(7, 5)
    s_f, s_s, w = 2.0, 0.5, (0.7, 0.3)
    a, b = merge_module(a_f, b_f, s_f, a_s, b_s, s_s, True, MergeRule(w, "linear"))
    lin = ((math.sqrt(0.7 * 2) * b_f + math.sqrt(0.3 * 0.5) * b_s)
           @ (math.sqrt(0.7 * 2) * a_f + math.sqrt(0.3 * 0.5) * a_s))
    torch.testing.assert_close(b @ a, lin)
    a, b = merge_module(a_f, b_f, s_f, a5, b5, s_s, True, MergeRule(w, "cat"))
    assert a.shape == (8, 10) and b.shape == (7, 8)
    torch.testing.assert_close(b @ a, 0.7 * 2 * (b_f @ a_f)
                               + 0.3 * 0.5 * (b5 @ a5))
    a, b = merge_module(a_f, b_f, s_f, a5, b5, s_s, False, MergeRule(w, "cat"))
    torch.testing.assert_close(b @ a, 2 * (b_f @ a_f))
    with pytest.raises(ValueError, match="equal ranks"):
        merge_module(a_f, b_f, s_f, a5, b5, s_s, True, MergeRule(w, "linear"))


@pytest.mark.parametrize("bad", ["0.8", "0.8,0.2,0.1", "a,b", "-0.8,0.2", "0.8,0", "nan,1",
                                 "inf,1", ""])
def test_weights_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="--weights must be two positive numbers"):
        parse_weights(bad)


def test_weights_parsed() -> None:
    assert parse_weights("0.8, 0.2") == (0.8, 0.2)
    assert MergeRule().weights == (0.8, 0.2) and MergeRule().combination == "linear"


# ----------------------------------------------------------------------------------------------
# The fleet path
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("combination", ["linear", "cat"])
def test_threshold_matches_reference(world: dict[str, Any], tmp_path: Path,
                                     combination: str) -> None:
    """τ is one of "plain"'s rounded cosines: that module must stay unmerged (cos < τ)."""
    task = ref_factors(world["catalog"] / "plain", SPECS["plain"])
    cos = sorted(round(dense_cos(world["c"][m], a, b), 5) for m, (a, b, _) in task.items())
    tau = cos[len(cos) // 2]
    weights = (0.7, 0.4)
    out = tmp_path / "out"
    res = _run(world, out, threshold=tau, weights="0.7,0.4", combination=combination)
    adapters, layers = _report(out, res.run_id)
    if combination == "linear":  # "patterns" has v_proj of rank 2, the safety adapter 4
        assert res.ok == 2 and res.error == 1
        err = adapters["patterns"]["error"]
        assert "rank 2" in err and "--combination cat" in err and "\n" not in err
    else:
        assert res.ok == 3 and res.error == 0
    for aid, spec in SPECS.items():
        if adapters[aid]["status"] != "ok":
            continue
        merged = _check_adapter(world, out, aid, spec, layers, weights=weights,
                                combination=combination, threshold=tau)
        assert adapters[aid]["projected"] == len(merged)
        if aid == "plain":
            assert 0 < len(merged) < len(task)
            assert not any(r["cos_rounded"] == tau and r["projected"]
                           for r in layers[aid].values())
    summary = json.loads((out / "_reports" / res.run_id / "summary.json").read_text())
    merge = summary["selection"]["merge"]
    assert merge["combination"] == combination and merge["weights"] == [0.7, 0.4]
    assert summary["selection"]["threshold"] == tau
    html = (out / "_reports" / res.run_id / "report.html").read_text()
    assert "merged" in html and "safety adapter" in html


def test_number_mode_cat_matches_reference(world: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = _run(world, out, num_proj_layers=2, combination="cat")
    assert res.ok == 3, res.errors
    _, layers = _report(out, res.run_id)
    for aid, spec in SPECS.items():
        merged = _check_adapter(world, out, aid, spec, layers, weights=(0.8, 0.2),
                                combination="cat", k=2)
        assert len(merged) >= 2
        cfg = json.loads((out / aid / "adapter_config.json").read_text())
        # Merged modules have rank r_f + r_s, named in rank_pattern.
        assert len(cfg["rank_pattern"]) >= len(merged)


def test_incremental_rerun_redoes_when_safety_adapter_changes(world: dict[str, Any],
                                                              tmp_path: Path) -> None:
    safety = tmp_path / "safety"
    _adapter(safety, SAFETY_SPEC, 7)
    out = tmp_path / "out"
    kw = {"safety_adapter": str(safety), "threshold": 0.9, "combination": "cat"}
    first = _run(world, out, **kw)
    assert first.ok == 3
    # The safety adapter's digest in every record's key stays SHA-256 (as before BLAKE3), so
    # an upgrade does not redo a SafeMERGE fleet.
    framed = b"".join([b"adapter_config.json\0", (safety / "adapter_config.json").read_bytes(),
                       b"\0adapter_model.safetensors\0",
                       (safety / "adapter_model.safetensors").read_bytes()])
    record = json.loads((out / "_ledger" / "plain.json").read_text())
    assert json.loads(record["key"]["params"])["merge"]["safety_adapter"] == (
        "sha256:" + hashlib.sha256(framed).hexdigest())
    again = _run(world, out, **kw)
    assert again.skipped == 3 and again.ok == 0
    # Other weights are another key too.
    other = _run(world, out, **{**kw, "weights": "0.5,0.5"})
    assert other.ok == 3
    before = (out / "plain" / "adapter_model.safetensors").read_bytes()
    rewrite_weights(safety, lambda t: {k: v * 2 for k, v in t.items()})
    redo = _run(world, out, **{**kw, "weights": "0.5,0.5"})
    assert redo.ok == 3 and redo.skipped == 0
    assert (out / "plain" / "adapter_model.safetensors").read_bytes() != before


def test_refusals_per_adapter(world: dict[str, Any], tmp_path: Path) -> None:
    cat = tmp_path / "catalog"
    _adapter(cat / "fine", SPECS["plain"], 40)
    _adapter(cat / "with-k", SPECS["plain"], 41, target_modules=["q_proj", "k_proj"])
    _adapter(cat / "other-base", SPECS["plain"], 42, base="another/model")
    _adapter(cat / "negative", {**SPECS["plain"], "alpha_pattern": {"v_proj": -2.0}}, 43)
    out = tmp_path / "out"
    res = _run(world, out, catalog=cat, threshold=0.5)
    adapters, _ = _report(out, res.run_id)
    assert adapters["fine"]["status"] == "ok"
    assert "safety adapter lacks 2 of its module(s)" in adapters["with-k"]["error"]
    assert "k_proj" in adapters["with-k"]["error"]
    assert "'another/model'" in adapters["other-base"]["error"]
    assert "another model" in adapters["other-base"]["error"]
    assert "lora_alpha is -2.0" in adapters["negative"]["error"]
    assert not (out / "with-k").exists() and not (out / "other-base").exists()


def test_safety_adapter_for_another_model_refused(world: dict[str, Any], tmp_path: Path) -> None:
    bad = tmp_path / "gqa-safety"
    make_adapter(bad, gqa=True, target_modules=["k_proj"], r=4)
    with pytest.raises(ConfigError, match=r"k_proj.*another model"):
        _run(world, tmp_path / "out", safety_adapter=str(bad), threshold=0.5)


def test_config_checks(world: dict[str, Any], tmp_path: Path) -> None:
    base = {"alignment": world["set"], "adapters": str(world["catalog"]),
            "out": str(tmp_path / "o"), "threshold": 0.35}
    with pytest.raises(ConfigError, match="--method safemerge needs --safety-adapter"):
        SanitizeConfig(**base, method="safemerge")
    with pytest.raises(ConfigError, match="--combination is only used with --method safemerge"):
        SanitizeConfig(**base, combination="cat")
    with pytest.raises(ConfigError, match="--combination must be one of linear, cat"):
        SanitizeConfig(**base, method="safemerge", safety_adapter=str(world["safety"]),
                       combination="sum")


@pytest.mark.parametrize("extra, message", [
    (["--method", "safemerge", "--weights", "0.8"], "--weights must be two positive numbers"),
    (["--method", "safemerge", "--weights", "1,-1"], "--weights must be two positive numbers"),
    (["--combination", "cat"], "--combination is only used with --method safemerge"),
    (["--method", "safemerge", "--safety-adapter", None], "needs --safety-adapter"),
])
def test_cli_usage_errors_exit_2(world: dict[str, Any], tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str], extra: list[Any],
                                 message: str) -> None:
    argv = ["sanitize", "--alignment", world["set"], "--adapters", str(world["catalog"]),
            "--out", str(tmp_path / "o"), "--threshold", "0.35", "--no-progress"]
    if None in extra or "--method" not in extra:
        argv += [x for x in extra if x not in (None, "--safety-adapter")]
    else:
        argv += ["--safety-adapter", str(world["safety"]), *extra]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_cli_runs(world: dict[str, Any], tmp_path: Path,
                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o"
    code = cli_main(["sanitize", "--method", "safemerge", "--alignment", world["set"],
                     "--adapters", str(world["catalog"]), "--safety-adapter",
                     str(world["safety"]), "--threshold", "0.35", "--weights", "0.8,0.2",
                     "--combination", "cat", "--out", str(out), "--workers", "0",
                     "--no-progress", "--json"])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr()
    assert "merged 9" in printed.out + printed.err
    summary = json.loads(printed.out)
    assert summary["counts"]["ok"] == 3 and summary["projected"] == 9


def test_ray_workers_read_the_safety_adapter_from_s3(world: dict[str, Any], tmp_path: Path,
                                                     ray_local: None, s3_admin_client: Any,
                                                     s3_bucket: str) -> None:
    """On Ray workers, the safety adapter read from s3:// once per worker: the same bytes as
    the in-process run with the local copy."""
    for f in world["safety"].iterdir():
        s3_admin_client.upload_file(str(f), s3_bucket, f"safety/{f.name}")
    kw = {"threshold": 0.5, "combination": "cat", "weights": "0.6,0.4"}
    local = _run(world, tmp_path / "local", **kw)
    remote = sanitize(SanitizeConfig(
        alignment=world["set"], adapters=str(world["catalog"]), out=str(tmp_path / "ray"),
        method="safemerge", safety_adapter=f"s3://{s3_bucket}/safety", workers=1,
        progress=False, **kw))
    assert local.ok == remote.ok == 3, remote.errors
    for aid in SPECS:
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            assert ((tmp_path / "ray" / aid / name).read_bytes()
                    == (tmp_path / "local" / aid / name).read_bytes())


def test_bf16_adapter_written_in_its_dtype(world: dict[str, Any], tmp_path: Path) -> None:
    """A bf16 task adapter (float32 safety adapter): the output's factors are bf16, and its ΔW
    is the reference's up to bf16 rounding of the factors."""
    cat = tmp_path / "catalog"
    spec = SPECS["patterns"]
    spread_b(_adapter(cat / "bf16", spec, 50, dtype=torch.bfloat16), world["v"], 1)
    out = tmp_path / "out"
    res = _run(world, out, catalog=cat, threshold=0.5, combination="cat")
    assert res.ok == 1, res.errors
    written = load_file(str(out / "bf16" / "adapter_model.safetensors"))
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    task = ref_factors(cat / "bf16", spec)
    delta, _, merged = safemerge_dense(world["c"], task, ref_factors(world["safety"],
                                       SAFETY_SPEC), weights=(0.8, 0.2), combination="cat",
                                       threshold=0.5)
    assert merged
    got = peft_deltas(world["base"], out / "bf16")
    for m, ref in delta.items():
        torch.testing.assert_close(got[m], ref, rtol=0.03, atol=3e-3, msg=m)
