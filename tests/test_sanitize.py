"""Fleet sanitization (issue #3) on a real local Ray, against the dense float64 reference.

Base and "aligned" models are tiny Llamas saved with transformers ``save_pretrained`` (the
aligned one sharded, with an index); alignment sets are built from them with
:func:`safelora_ray.build`; adapters are written by PEFT itself. Every sanitized B is compared
with :func:`tests.reference.sanitize_dense`, every other byte with the input, and every output
is loaded back with ``peft.PeftModel.from_pretrained``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from html import escape as html_escape
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from safelora_ray import BuildConfig, build
from safelora_ray.cli.main import main as cli_main
from safelora_ray.formats.peft import adapter_digest, read_adapter
from safelora_ray.pipelines.sanitize.driver import SanitizeConfig, SanitizeResult, sanitize
from safelora_ray.pipelines.sanitize.ledger import ledger_path
from safelora_ray.storage import open_storage
from tests.adapters import (
    edit_config,
    load_base_model,
    make_adapter,
    make_ia3_adapter,
    read_weights,
    rewrite_weights,
    save_aligned_pair,
    spread_b,
    tiny_model,
)
from tests.reference import dense_c, dense_cos, sanitize_dense

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("ray_local")

PFX = "base_model.model."
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
HIDDEN = (".tmp-", ".staging-", ".trash-")


# ----------------------------------------------------------------------------------------------
# Models, alignment sets and adapters (built once per module)
# ----------------------------------------------------------------------------------------------


def _state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a ``save_pretrained`` checkpoint (single file or shards)."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _save_pair(root: Path, gqa: bool, shard: bool) -> tuple[Path, Path]:
    """Base = the tiny Llama; aligned = base + a rank-2 update + noise on every layer weight."""
    return save_aligned_pair(root, seed=11 if gqa else 10, gqa=gqa,
                             max_shard_size="30KB" if shard else None)


@dataclass
class Pair:
    """A saved base/aligned pair, its alignment sets and the dense float64 C and V per module."""

    base: Path
    aligned: Path
    sets: dict[str, str]
    c: dict[str, torch.Tensor]
    v: dict[str, torch.Tensor]


def _make_pair(root: Path, gqa: bool, shard: bool, sets: dict[str, tuple[str, ...]]) -> Pair:
    base, aligned = _save_pair(root, gqa, shard)
    sb, sa = _state(base), _state(aligned)
    c, v = {}, {}
    for name, w in sb.items():
        if name.endswith(".weight") and w.dim() == 2 and ".layers." in name:
            module = name[: -len(".weight")]
            c[module] = dense_c(w, sa[name])
            v[module] = sa[name].to(torch.float64) - w.to(torch.float64)
    uris = {}
    for key, targets in sets.items():
        res = build(BuildConfig(base=str(base), aligned=str(aligned), out=str(root / key),
                                targets=list(targets), workers=1, progress=False))
        assert res.num_modules == 2 * len(targets)
        uris[key] = res.uri
    return Pair(base, aligned, uris, c, v)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> Pair:
    """The tiny Llama pair (aligned saved sharded): a q/v set and an all-linear set."""
    p = _make_pair(tmp_path_factory.mktemp("pair"), gqa=False, shard=True,
                   sets={"qv": ("q_proj", "v_proj"), "all": ALL_LINEAR})
    assert (p.aligned / "model.safetensors.index.json").exists()
    assert len(list(p.aligned.glob("model-*.safetensors"))) > 1
    return p


@pytest.fixture(scope="module")
def gqa_pair(tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> Pair:
    """The GQA tiny Llama pair (k/v_proj 16 x 32): a q/k/v set."""
    return _make_pair(tmp_path_factory.mktemp("gqa-pair"), gqa=True, shard=False,
                      sets={"qkv": ("q_proj", "k_proj", "v_proj")})


def _tie(path: Path, c: dict[str, torch.Tensor], modules: list[str]) -> None:
    """Make B of ``modules`` rank one along C's top eigenvector: cos rounds to exactly 1.0."""

    def edit(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for j, m in enumerate(modules):
            k = f"{PFX}{m}.lora_B.weight"
            _, vecs = torch.linalg.eigh(c[m])
            coef = torch.linspace(0.5, 1.5 + j, t[k].shape[1], dtype=torch.float64)
            t[k] = (torch.outer(vecs[:, -1], coef) * 0.1).to(t[k].dtype)
        return t

    rewrite_weights(path, edit)


@dataclass
class Catalog:
    """A catalog directory, the pair its adapters belong to and the alignment set to use."""

    root: Path
    pair: Pair
    alignment: str
    ids: list[str]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory, pair: Pair) -> Catalog:
    """Real PEFT adapters on the tiny Llama, for the all-linear alignment set."""
    root = tmp_path_factory.mktemp("catalog")
    specs: dict[str, dict[str, Any]] = {
        "tenant-a/qv": {},
        "tenant-a/all-linear": {"target_modules": "all-linear", "r": 2,
                                "dtype": torch.bfloat16},
        "tenant-b/patterns": {"target_modules": ["q_proj", "v_proj", "o_proj"],
                              "rank_pattern": {"q_proj": 2, "model.layers.1.self_attn.v_proj": 6},
                              "alpha_pattern": {"o_proj": 3.0}, "dtype": torch.float16},
        "tenant-b/layers": {"target_modules": ["q_proj", "k_proj", "v_proj", "down_proj"],
                            "layers_to_transform": [1]},
        "tenant-c/bias-mts": {"lora_bias": True, "modules_to_save": ["lm_head"]},
        "tenant-c/tie": {},
    }
    for i, (adapter_id, kw) in enumerate(specs.items()):
        path, _ = make_adapter(root / adapter_id, adapter_seed=100 + i, **kw)
        if adapter_id.endswith("/tie"):
            _tie(path, pair.c, ["model.layers.0.self_attn.q_proj",
                                "model.layers.1.self_attn.v_proj"])
        else:
            spread_b(path, pair.v, seed=i)
    return Catalog(root, pair, pair.sets["all"], list(specs))


@pytest.fixture(scope="module")
def gqa_catalog(tmp_path_factory: pytest.TempPathFactory, gqa_pair: Pair) -> Catalog:
    """GQA adapters (k/v B is 16 x r) for the GQA q/k/v set."""
    root = tmp_path_factory.mktemp("gqa-catalog")
    specs: dict[str, dict[str, Any]] = {
        "gqa-qkv": {"target_modules": ["q_proj", "k_proj", "v_proj"], "r": 3},
        "gqa-patterns": {"target_modules": ["q_proj", "v_proj"], "r": 4,
                         "rank_pattern": {"v_proj": 2}, "dtype": torch.bfloat16},
        "gqa-layer0": {"target_modules": ["k_proj", "v_proj"], "layers_to_transform": [0],
                       "lora_bias": True, "modules_to_save": ["lm_head"]},
    }
    for i, (adapter_id, kw) in enumerate(specs.items()):
        path, _ = make_adapter(root / adapter_id, gqa=True, adapter_seed=200 + i, **kw)
        spread_b(path, gqa_pair.v, seed=i + 1)
    return Catalog(root, gqa_pair, gqa_pair.sets["qkv"], list(specs))


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One sanitize run and its reports."""

    result: SanitizeResult
    out: Path
    adapters: dict[str, dict[str, Any]]
    layers: dict[str, dict[str, dict[str, Any]]]
    summary: dict[str, Any]


def _reports(out: Path, result: SanitizeResult) -> Run:
    rdir = out / "_reports" / result.run_id
    adapters = {r["adapter_id"]: r for r in pq.read_table(rdir / "adapters.parquet").to_pylist()}
    layers: dict[str, dict[str, dict[str, Any]]] = {}
    for r in pq.read_table(rdir / "layers.parquet").to_pylist():
        layers.setdefault(r["adapter_id"], {})[r["module"]] = r
    summary = json.loads((rdir / "summary.json").read_text())
    assert (rdir / "report.html").read_text().startswith("<!doctype html>")
    return Run(result, out, adapters, layers, summary)


def _run(alignment: str, adapters: str | Path, out: Path, **kw: Any) -> Run:
    kw.setdefault("workers", 1)
    cfg = SanitizeConfig(alignment=alignment, adapters=str(adapters), out=str(out),
                         progress=False, **kw)
    return _reports(out, sanitize(cfg))


def _lora(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for k, a in tensors.items():
        if k.endswith(".lora_A.weight"):
            m = k[len(PFX): -len(".lora_A.weight")]
            out[m] = (a, tensors[f"{PFX}{m}.lora_B.weight"])
    return out


@dataclass
class Expected:
    """What SPEC §2 gives for one adapter (dense float64 reference)."""

    new_b: dict[str, torch.Tensor]
    cos: dict[str, float]
    cos_rounded: dict[str, float]
    selected: set[str]
    pdst: float


def _expected(c: dict[str, torch.Tensor], lora: dict[str, tuple[torch.Tensor, torch.Tensor]],
              sel: dict[str, Any]) -> Expected:
    cs = {m: c[m] for m in lora}
    if sel.get("strict"):
        # Strict k: exactly k modules, ties broken by module name.
        _, cos_r, _, _ = sanitize_dense(cs, lora, threshold=-math.inf)
        order = sorted(cos_r, key=lambda m: (cos_r[m], m))
        selected = set(order[: sel["num_proj_layers"]])
        new_b, dists = {}, []
        for m, (_a, b) in lora.items():
            cb = cs[m] @ b.to(torch.float64)
            new_b[m] = cb if m in selected else b.to(torch.float64)
            dists.append(0.0 if m in selected else float((b.to(torch.float64) - cb).norm()))
        pdst = sum(1 / (1 + d) for d in dists) / len(dists)
    else:
        k = sel.get("num_proj_layers")
        # The official code takes the last of the k smallest (a slice): k > modules = all.
        new_b, cos_r, selected, pdst = sanitize_dense(
            cs, lora, threshold=sel.get("threshold"),
            num_proj_layers=None if k is None else min(k, len(lora)))
    cos = {m: dense_cos(cs[m], a, b) for m, (a, b) in lora.items()}
    return Expected(new_b, cos, cos_r, selected, pdst)


def _header(path: Path) -> bytes:
    raw = path.read_bytes()
    return raw[: 8 + int.from_bytes(raw[:8], "little")]


def _check_b(got: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype) -> None:
    """B equals the float64 reference cast to the adapter dtype: 1 ulp (half), rtol 1e-5 (f32)."""
    assert got.dtype == dtype
    want = ref64.to(dtype).to(torch.float64)
    rtol = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
    atol = 1e-6 * float(ref64.abs().max())
    torch.testing.assert_close(got.to(torch.float64), want, rtol=rtol, atol=atol)


def _check_adapter(cat: Catalog, run: Run, adapter_id: str, sel: dict[str, Any]) -> Expected:
    """Everything issue #3 asks of one sanitized adapter, against the dense reference."""
    src, dst = cat.root / adapter_id, run.out / adapter_id
    t_in, md_in = read_weights(src)
    t_out, md_out = read_weights(dst)
    lora = _lora(t_in)
    exp = _expected(cat.pair.c, lora, sel)
    assert exp.selected, f"{adapter_id}: nothing selected, the test would be trivial"

    # Bytes: config, extras, header (names, dtypes, shapes, offsets, metadata) and every
    # tensor but the projected B are identical to the input.
    assert (dst / "adapter_config.json").read_bytes() == (src / "adapter_config.json").read_bytes()
    assert (dst / "README.md").read_bytes() == (src / "README.md").read_bytes()
    assert _header(dst / "adapter_model.safetensors") == _header(src / "adapter_model.safetensors")
    assert md_out == md_in and list(t_out) == list(t_in)
    projected_keys = {f"{PFX}{m}.lora_B.weight" for m in exp.selected}
    for k, t in t_in.items():
        if k in projected_keys:
            _check_b(t_out[k], exp.new_b[k[len(PFX): -len(".lora_B.weight")]], t.dtype)
            assert not torch.equal(t_out[k], t)
        else:
            assert t_out[k].dtype == t.dtype
            assert t_out[k].view(torch.uint8).numpy().tobytes() == \
                t.view(torch.uint8).numpy().tobytes(), k

    # Reports: per-module cosines and selection, per-adapter Pdst.
    row = run.adapters[adapter_id]
    assert row["status"] == "ok", row["error"]
    assert row["modules"] == len(lora) and row["projected"] == len(exp.selected)
    assert row["pdst"] == pytest.approx(exp.pdst, rel=1e-6)
    files = dst / "adapter_config.json", dst / "adapter_model.safetensors"
    assert row["output_digest"] == adapter_digest(files[0].read_bytes(), files[1].read_bytes())
    assert row["source_digest"] == adapter_digest((src / "adapter_config.json").read_bytes(),
                                                  (src / "adapter_model.safetensors").read_bytes())
    layers = run.layers[adapter_id]
    assert set(layers) == set(lora)
    assert {m for m, r in layers.items() if r["projected"]} == exp.selected
    for m, r in layers.items():
        assert r["cos"] == pytest.approx(exp.cos[m], abs=1e-5), m
        assert r["cos_rounded"] == exp.cos_rounded[m], m
        assert r["rank"] == lora[m][0].shape[0]
    ledger = json.loads((run.out / ledger_path(adapter_id)).read_text())
    assert set(ledger["projected"]) == exp.selected
    return exp


def _peft_b(model: Any) -> dict[str, torch.Tensor]:
    from peft.tuners.lora import LoraLayer

    return {name.removeprefix(PFX): mod.lora_B["default"].weight.detach()
            for name, mod in model.named_modules()
            if isinstance(mod, LoraLayer) and "default" in mod.lora_B}


def _check_loads_in_peft(base: Path, adapter_dir: Path) -> None:
    """PEFT loads the output and its lora_B weights are exactly the ones in the file."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base_model(base), str(adapter_dir))
    written = _lora(read_weights(adapter_dir)[0])
    loaded = _peft_b(model)
    assert set(loaded) == set(written)
    for m, (_a, b) in written.items():
        # PEFT upcasts half-precision adapters to float32: the values are exact.
        assert torch.equal(loaded[m], b.to(loaded[m].dtype)), m


def _tree_hash(root: Path) -> dict[str, str]:
    """sha256 of every file (symlinks followed) and the target of every symlink under root."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel + " ->"] = os.readlink(p)
        if p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns
            for p in sorted(root.rglob("*")) if p.is_file() and "_reports" not in p.parts}


def _leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.name.startswith(HIDDEN)]


# ----------------------------------------------------------------------------------------------
# 1 + 2: equality with the dense reference, in both modes; outputs load in PEFT
# ----------------------------------------------------------------------------------------------

MODES = {
    "threshold-0.35": {"threshold": 0.35},
    "threshold-mid": {"threshold": None},  # chosen from the reference cosines
    "number-3": {"num_proj_layers": 3},
    "strict-3": {"num_proj_layers": 3, "strict": True},
}


def _mid_threshold(cat: Catalog) -> float:
    """A threshold halfway between two consecutive rounded cosines near the median."""
    values = set()
    for adapter_id in cat.ids:
        lora = _lora(read_weights(cat.root / adapter_id)[0])
        values |= set(sanitize_dense({m: cat.pair.c[m] for m in lora}, lora,
                                     threshold=-math.inf)[1].values())
    ordered = sorted(values)
    i = len(ordered) // 2
    return (ordered[i - 1] + ordered[i]) / 2


@pytest.mark.parametrize("workers", [1, 0], ids=["ray", "in-process"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("which", ["catalog", "gqa_catalog"])
def test_matches_dense_reference(request: pytest.FixtureRequest, tmp_path: Path, which: str,
                                 mode: str, workers: int) -> None:
    cat: Catalog = request.getfixturevalue(which)
    sel = dict(MODES[mode])
    if "threshold" in sel and sel["threshold"] is None:
        sel["threshold"] = _mid_threshold(cat)
    # batch 4: a batch mixes adapters of different dtypes and ranks (batched C B and scores)
    kw: dict[str, Any] = {"batch_size": 4, "workers": workers}
    if "threshold" in sel:
        kw["threshold"] = sel["threshold"]
    else:
        kw.update(num_proj_layers=sel["num_proj_layers"], strict_k=bool(sel.get("strict")))
    run = _run(cat.alignment, cat.root, tmp_path / "out", run_id="r1", **kw)
    assert run.result.error == 0, run.result.errors
    assert run.result.ok == len(cat.ids) and set(run.adapters) == set(cat.ids)

    total = projected = 0
    for adapter_id in cat.ids:
        exp = _check_adapter(cat, run, adapter_id, sel)
        total += len(exp.cos)
        projected += len(exp.selected)
        if sel.get("strict"):
            assert len(exp.selected) == min(sel["num_proj_layers"], len(exp.cos))
        if adapter_id.endswith("/tie") and "num_proj_layers" in sel:
            tied = {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}
            assert all(exp.cos_rounded[m] == 1.0 for m in tied)
            # The k-th smallest cosine is tied: the reference projects both (4 > k = 3);
            # strict k projects exactly 3 and breaks the tie by module name.
            if sel.get("strict"):
                assert exp.selected == set(exp.cos) - {"model.layers.1.self_attn.v_proj"}
            else:
                assert exp.selected == set(exp.cos)
    assert 0 < projected < total  # the selection is not trivial
    assert run.summary["projected_modules"] == projected and run.summary["modules"] == total
    assert run.summary["counts"] == {"total": len(cat.ids), "ok": len(cat.ids), "skipped": 0,
                                     "error": 0}

    if mode == "number-3":  # every output loads in PEFT (once per catalog keeps this quick)
        for adapter_id in cat.ids:
            _check_loads_in_peft(cat.pair.base, run.out / adapter_id)


def test_reused_read_buffers_give_the_reference(tmp_path: Path, catalog: Catalog,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Every read goes into a buffer reused from an earlier batch (a 7B adapter's size and
    up is pooled; here every size): the outputs still match the dense reference, and a
    buffer an adapter still uses is never handed out again."""
    from safelora_ray.execution.buffers import Loans
    from safelora_ray.pipelines.sanitize import worker

    monkeypatch.setattr(worker, "POOLED_MIN_BYTES", 0)
    back: list[int] = []
    give_back = Loans.give_back
    monkeypatch.setattr(Loans, "give_back", lambda self: back.append(give_back(self)) or back[-1])
    sel = {"threshold": _mid_threshold(catalog)}
    run = _run(catalog.alignment, catalog.root, tmp_path / "out", run_id="r1", batch_size=2,
               workers=0, **sel)
    assert run.result.ok == len(catalog.ids), run.result.errors
    for adapter_id in catalog.ids:
        _check_adapter(catalog, run, adapter_id, sel)
    assert len(back) >= len(catalog.ids) // 2 and sum(back) >= len(catalog.ids) - 2


def test_cosines_arespread_b(catalog: Catalog) -> None:
    """The catalog exercises both sides of the paper's threshold."""
    cos = []
    for adapter_id in catalog.ids:
        lora = _lora(read_weights(catalog.root / adapter_id)[0])
        cos += [dense_cos(catalog.pair.c[m], a, b) for m, (a, b) in lora.items()]
    assert min(cos) < 0.35 < 0.8 < max(cos)


# ----------------------------------------------------------------------------------------------
# A small q/v catalog for the CLI, incremental and kill tests
# ----------------------------------------------------------------------------------------------

QV_IDS = ["acme/chat-1", "acme/chat-2", "globex/summarizer", "solo"]


@pytest.fixture(scope="module")
def qv_catalog(tmp_path_factory: pytest.TempPathFactory, pair: Pair) -> Catalog:
    """Four q/v adapters (one with lora_bias + modules_to_save) for the q/v alignment set."""
    root = tmp_path_factory.mktemp("qv-catalog")
    for i, adapter_id in enumerate(QV_IDS):
        kw = {"lora_bias": True, "modules_to_save": ["lm_head"]} if i == 2 else {}
        path, _ = make_adapter(root / adapter_id, adapter_seed=300 + i, **kw)
        spread_b(path, pair.v, seed=i)
    return Catalog(root, pair, pair.sets["qv"], list(QV_IDS))


def _copy_catalog(cat: Catalog, dst: Path) -> Catalog:
    shutil.copytree(cat.root, dst, symlinks=True)
    return Catalog(dst, cat.pair, cat.alignment, list(cat.ids))


def _sanitize_args(alignment: str, adapters: str | Path, out: str | Path, *extra: str) -> list[str]:
    return ["sanitize", "--alignment", alignment, "--adapters", str(adapters), "--out", str(out),
            "--no-progress", "--log-level", "WARNING", *extra]


# ----------------------------------------------------------------------------------------------
# 3: refused inputs inside a catalog
# ----------------------------------------------------------------------------------------------


def _make_loha(path: Path) -> None:
    from peft import LoHaConfig, get_peft_model

    get_peft_model(tiny_model(0), LoHaConfig(r=2, target_modules=["q_proj", "v_proj"])
                   ).save_pretrained(str(path))


def _make_other_base_adapter(path: Path) -> None:
    """A q/v LoRA adapter for another base model (hidden size 48 instead of 32)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=64, vocab_size=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
                   ).save_pretrained(str(path))


def _refused_catalog(root: Path, outside: Path, good: Catalog) -> dict[str, list[str]]:
    """Write one adapter directory per refused case into ``root`` (beside copies of the good
    ones); returns, per bad id, substrings its error must contain."""
    bad: dict[str, list[str]] = {}

    def lora(adapter_id: str, *must: str, **kw: Any) -> Path:
        bad[adapter_id] = list(must)
        return make_adapter(root / adapter_id, adapter_seed=400 + len(bad), **kw)[0]

    lora("bad/dora", "DoRA adapter", "not covered", use_dora=True)
    make_ia3_adapter(root / "bad/ia3")
    bad["bad/ia3"] = ["peft_type 'IA3'", "not LoRA"]
    _make_loha(root / "bad/loha")
    bad["bad/loha"] = ["peft_type 'LOHA'", "not LoRA"]
    lora("bad/embedding", "lora_embedding_A", "not covered",
         target_modules=["embed_tokens", "q_proj"])
    p = lora("bad/pickle", "pickle-only adapter", "adapter_model.bin", "never unpickled")
    torch.save(load_file(str(p / "adapter_model.safetensors")), p / "adapter_model.bin")
    (p / "adapter_model.safetensors").unlink()
    lora("bad/k-proj", "no entry in alignment set", "model.layers.0.self_attn.k_proj",
         target_modules=["q_proj", "k_proj", "v_proj"])
    _make_other_base_adapter(root / "bad/other-base")
    bad["bad/other-base"] = ["alignment set's weight is 32x32", "another base model"]
    p = lora("bad/nan", "non-finite", "lora_B.weight")

    def nan(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        t[f"{PFX}model.layers.1.self_attn.q_proj.lora_B.weight"][3, 1] = float("nan")
        return t

    rewrite_weights(p, nan)
    p = lora("bad/rank", "rank mismatch", "r=4", "r=8")
    edit_config(p, lambda c: c.update(r=8))
    p = lora("bad/not-json", "adapter_config.json is not valid JSON")
    (p / "adapter_config.json").write_text('{"peft_type": "LORA", ')
    # A weights file symlinked to a file outside the catalog is never read.
    p = lora("bad/symlink", "adapter_model.safetensors", "outside")
    target = outside / "adapter_model.safetensors"
    outside.mkdir(parents=True)
    shutil.move(p / "adapter_model.safetensors", target)
    (p / "adapter_model.safetensors").symlink_to(target)
    # Valid adapters whose directory names are not valid ids.
    shutil.copytree(good.root / good.ids[0], root / "bad name")
    bad["bad name"] = ["adapter id 'bad name'", "unsupported characters"]
    shutil.copytree(good.root / good.ids[0], root / "_private")
    bad["_private"] = ["adapter id '_private'", "reserved"]
    return bad


def test_refused_adapters_in_a_catalog(tmp_path: Path, qv_catalog: Catalog,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    cat = _copy_catalog(qv_catalog, tmp_path / "catalog")
    bad = _refused_catalog(cat.root, tmp_path / "outside", cat)
    before = _tree_hash(cat.root), _tree_hash(tmp_path / "outside")
    out = tmp_path / "out"
    rc = cli_main(_sanitize_args(cat.alignment, cat.root, out, "--threshold", "0.35",
                                 "--run-id", "refused", "--workers", "2", "--batch-size", "3"))
    assert rc == 3
    printed = capsys.readouterr().out
    assert f"ok {len(cat.ids)}   skipped 0   failed {len(bad)}" in printed

    run = _reports(out, _result_of(out, "refused"))
    assert set(run.adapters) == set(cat.ids) | set(bad)
    for adapter_id in cat.ids:
        assert run.adapters[adapter_id]["status"] == "ok"
        _check_adapter(cat, run, adapter_id, {"threshold": 0.35})
    for adapter_id, must in bad.items():
        row = run.adapters[adapter_id]
        assert row["status"] == "error", adapter_id
        assert f"'{adapter_id}'" in row["error"], row["error"]
        for text in must:
            assert text in row["error"], (adapter_id, row["error"])
        assert adapter_id not in run.layers
        assert not (out / adapter_id).exists()
        assert not (out / ledger_path(adapter_id)).exists()
    assert run.summary["counts"] == {"total": len(cat.ids) + len(bad), "ok": len(cat.ids),
                                     "skipped": 0, "error": len(bad)}
    assert {e["adapter_id"] for e in run.summary["errors"]} == set(bad)
    # Each refusal is grouped under its cause (reports.causes), from the message the code wrote.
    causes = {a: e["cause"] for a, e in ((e["adapter_id"], e) for e in run.summary["errors"])}
    assert causes == {"bad/dora": "dora", "bad/ia3": "not_lora", "bad/loha": "not_lora",
                      "bad/embedding": "variant", "bad/pickle": "pickle",
                      "bad/k-proj": "no_alignment_entry", "bad/other-base": "shape",
                      "bad/nan": "non_finite", "bad/rank": "shape", "bad/not-json": "unreadable",
                      "bad/symlink": "symlink", "bad name": "invalid_id",
                      "_private": "invalid_id"}
    assert sum(g["count"] for g in run.summary["failure_groups"]) == len(bad)
    html = (out / "_reports" / "refused" / "report.html").read_text()
    assert all(html_escape(b) in html for b in bad)
    assert not (out / "_private").exists() and not (out / "bad").exists()
    # Nothing in the inputs changed (the symlink's target included).
    assert (_tree_hash(cat.root), _tree_hash(tmp_path / "outside")) == before
    # The refused ones are refused again (not "skipped") on a second run.
    rc = cli_main(_sanitize_args(cat.alignment, cat.root, out, "--threshold", "0.35"))
    assert rc == 3
    assert f"ok 0   skipped {len(cat.ids)}   failed {len(bad)}" in capsys.readouterr().out


def _result_of(out: Path, run_id: str) -> SanitizeResult:
    """A result naming the run, to read its reports from ``out``."""
    return SanitizeResult(run_id, str(out), str(out / "_reports" / run_id))


# ----------------------------------------------------------------------------------------------
# 4: end to end through the CLI, local and S3
# ----------------------------------------------------------------------------------------------


def test_cli_local_end_to_end(tmp_path: Path, qv_catalog: Catalog,
                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    rc = cli_main(_sanitize_args(qv_catalog.alignment, qv_catalog.root, out,
                                 "--num-proj-layers", "1", "--run-id", "e2e", "--workers", "2",
                                 "--batch-size", "1"))
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"ok {len(QV_IDS)}   skipped 0   failed 0" in printed and "e2e" in printed
    run = _reports(out, _result_of(out, "e2e"))
    for adapter_id in QV_IDS:
        _check_adapter(qv_catalog, run, adapter_id, {"num_proj_layers": 1})
    s = run.summary
    assert s["run_id"] == "e2e" and s["catalog"] == str(qv_catalog.root)
    assert s["selection"] == {"mode": "number", "num_proj_layers": 1, "strict": False}
    assert s["alignment"]["targets"] == ["q_proj", "v_proj"]
    assert s["counts"] == {"total": 4, "ok": 4, "skipped": 0, "error": 0}
    assert s["modules"] == 16 and s["projected_modules"] == 4
    assert sum(s["histograms"]["cos"]) == 16 and sum(s["histograms"]["pdst"]) == 4
    assert sorted(p.name for p in (out / "_reports" / "e2e").iterdir()) == [
        "adapters.parquet", "fleet.parquet", "layers.parquet", "report.html", "summary.json",
        "tenants.parquet"]
    assert run.adapters["globex/summarizer"]["note"] == (
        "modules_to_save left as is: lm_head; biases left as is: "
        + ",".join(f"model.layers.{i}.self_attn.{m}.lora_B.bias"
                   for i in range(2) for m in ("q_proj", "v_proj")))
    assert run.adapters["globex/summarizer"]["untouched"] == 5
    assert not _leftovers(out)


def _upload_tree(client: Any, bucket: str, prefix: str, root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            client.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(root)}")


def _s3_objects(client: Any, bucket: str, prefix: str) -> dict[str, dict[str, Any]]:
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                   Prefix=prefix + "/"):
        for obj in page.get("Contents", ()):
            out[obj["Key"][len(prefix) + 1:]] = obj
    return out


def test_cli_s3_end_to_end(tmp_path: Path, qv_catalog: Catalog, s3_bucket: str,
                           s3_admin_client: Any, capsys: pytest.CaptureFixture[str]) -> None:
    s3 = s3_admin_client
    _upload_tree(s3, s3_bucket, "catalog", qv_catalog.root)
    _upload_tree(s3, s3_bucket, "sets/qv", Path(qv_catalog.alignment))
    alignment, adapters = f"s3://{s3_bucket}/sets/qv", f"s3://{s3_bucket}/catalog"
    out = f"s3://{s3_bucket}/out"
    args = _sanitize_args(alignment, adapters, out, "--threshold", "0.35", "--workers", "2",
                          "--batch-size", "2")
    assert cli_main([*args, "--run-id", "s3-1"]) == 0
    assert "ok 4   skipped 0   failed 0" in capsys.readouterr().out
    # The same run on local storage gives the same bytes.
    local = tmp_path / "local"
    assert cli_main(_sanitize_args(qv_catalog.alignment, qv_catalog.root, local, "--threshold",
                                   "0.35", "--workers", "2", "--batch-size", "2",
                                   "--run-id", "loc")) == 0
    objs = _s3_objects(s3, s3_bucket, "out")
    for adapter_id in QV_IDS:
        for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
            body = s3.get_object(Bucket=s3_bucket, Key=f"out/{adapter_id}/{name}")["Body"].read()
            assert body == (local / adapter_id / name).read_bytes(), (adapter_id, name)
        assert f"_ledger/{adapter_id}.json" in objs
    rep = {k.split("/")[-1]: k for k in objs if k.startswith("_reports/s3-1/")}
    assert sorted(rep) == ["adapters.parquet", "fleet.parquet", "layers.parquet", "report.html",
                           "summary.json", "tenants.parquet"]
    assert {"_reports/index.html", "_reports/latest.json"} <= set(objs)
    summary = json.loads(s3.get_object(Bucket=s3_bucket, Key="out/_reports/s3-1/summary.json")
                         ["Body"].read())
    assert summary["counts"] == {"total": 4, "ok": 4, "skipped": 0, "error": 0}
    assert summary["out"] == out and summary["alignment"]["uri"] == alignment
    table = pq.read_table(io.BytesIO(s3.get_object(
        Bucket=s3_bucket, Key="out/_reports/s3-1/layers.parquet")["Body"].read()))
    local_layers = pq.read_table(local / "_reports" / "loc" / "layers.parquet")
    cols, order = ["adapter_id", "module", "cos", "projected"], [("adapter_id", "ascending"),
                                                                 ("module", "ascending")]
    assert table.select(cols).sort_by(order).equals(local_layers.select(cols).sort_by(order))
    adapters_rows = pq.read_table(io.BytesIO(s3.get_object(
        Bucket=s3_bucket, Key="out/_reports/s3-1/adapters.parquet")["Body"].read())).to_pylist()
    assert {r["source_uri"] for r in adapters_rows} == {f"{adapters}/{a}" for a in QV_IDS}

    # Incremental on S3: nothing is rewritten (same ETags and times), everything skipped.
    before = {k: (o["ETag"], o["LastModified"]) for k, o in objs.items()
              if not k.startswith("_reports/")}
    assert cli_main([*args, "--run-id", "s3-2"]) == 0
    assert "ok 0   skipped 4   failed 0" in capsys.readouterr().out
    after = {k: (o["ETag"], o["LastModified"])
             for k, o in _s3_objects(s3, s3_bucket, "out").items()
             if not k.startswith("_reports/")}
    assert after == before
    # One adapter changes in the catalog: only it is redone.
    changed = tmp_path / "changed"
    shutil.copytree(qv_catalog.root / "solo", changed)
    _scale_b(changed, 2.0)
    s3.upload_file(str(changed / "adapter_model.safetensors"), s3_bucket,
                   "catalog/solo/adapter_model.safetensors")
    assert cli_main([*args, "--run-id", "s3-3"]) == 0
    assert "ok 1   skipped 3   failed 0" in capsys.readouterr().out
    rows = pq.read_table(io.BytesIO(s3.get_object(
        Bucket=s3_bucket, Key="out/_reports/s3-3/adapters.parquet")["Body"].read())).to_pylist()
    assert {r["adapter_id"]: r["status"] for r in rows} == {
        "acme/chat-1": "skipped", "acme/chat-2": "skipped", "globex/summarizer": "skipped",
        "solo": "ok"}


def _scale_b(path: Path, factor: float) -> None:
    """Change an adapter's bytes: scale lora_B of layer 0's q_proj."""

    def edit(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        k = f"{PFX}model.layers.0.self_attn.q_proj.lora_B.weight"
        t[k] = t[k] * factor
        return t

    rewrite_weights(path, edit)


# ----------------------------------------------------------------------------------------------
# 5: incremental runs and manifests
# ----------------------------------------------------------------------------------------------


def _statuses(run: Run) -> dict[str, str]:
    return {a: r["status"] for a, r in run.adapters.items()}


def test_incremental_runs(tmp_path: Path, qv_catalog: Catalog) -> None:
    cat = _copy_catalog(qv_catalog, tmp_path / "catalog")
    out = tmp_path / "out"
    first = _run(cat.alignment, cat.root, out, threshold=0.35, run_id="r1")
    assert set(_statuses(first).values()) == {"ok"}
    outputs = _mtimes(out)
    digests = {a: r["output_digest"] for a, r in first.adapters.items()}

    again = _run(cat.alignment, cat.root, out, threshold=0.35, run_id="r2")
    assert set(_statuses(again).values()) == {"skipped"}
    assert _mtimes(out) == outputs  # no output (or ledger record) was rewritten
    assert {a: r["output_digest"] for a, r in again.adapters.items()} == digests
    assert all(r["note"] == "unchanged since the last run (ledger)"
               for r in again.adapters.values())
    assert again.summary["counts"] == {"total": 4, "ok": 0, "skipped": 4, "error": 0}
    assert again.layers == {}

    # Same bytes, new mtime (a copy, a touch): the content digest says it is done.
    os.utime(cat.root / "solo" / "adapter_model.safetensors")
    touched = _run(cat.alignment, cat.root, out, threshold=0.35, run_id="r3")
    assert set(_statuses(touched).values()) == {"skipped"}
    assert touched.adapters["solo"]["note"] == (
        "already sanitized with this alignment set and selection")
    # Outputs untouched; only the ledger record learns the new object versions...
    after = _mtimes(out)
    assert {k for k in after if after[k] != outputs[k]} == {"_ledger/solo.json"}
    # ...so the next run skips it again without downloading its weights.
    cheap = _run(cat.alignment, cat.root, out, threshold=0.35, run_id="r3a")
    assert cheap.adapters["solo"]["note"] == "unchanged since the last run (ledger)"
    assert _mtimes(out) == after

    # An output removed by hand is written again (the ledger alone does not make it done).
    shutil.rmtree(out / "globex")
    removed = _run(cat.alignment, cat.root, out, threshold=0.35, run_id="r3b")
    assert _statuses(removed) == {"acme/chat-1": "skipped", "acme/chat-2": "skipped",
                                  "globex/summarizer": "ok", "solo": "skipped"}
    assert _tree_hash(out / "globex") != {}
    outputs = _mtimes(out)

    _scale_b(cat.root / "acme/chat-2", 3.0)
    changed = _run(cat.alignment, cat.root, out, threshold=0.35, run_id="r4")
    assert _statuses(changed) == {"acme/chat-1": "skipped", "acme/chat-2": "ok",
                                  "globex/summarizer": "skipped", "solo": "skipped"}
    _check_adapter(cat, changed, "acme/chat-2", {"threshold": 0.35})
    now = _mtimes(out)
    redone = {k for k in now if now[k] != outputs.get(k)}
    assert redone == {"acme/chat-2/adapter_model.safetensors", "acme/chat-2/README.md",
                      "acme/chat-2/adapter_config.json", "_ledger/acme/chat-2.json"}

    assert cli_main(_sanitize_args(cat.alignment, cat.root, out, "--threshold", "0.35",
                                   "--force", "--run-id", "r5", "--workers", "1")) == 0
    forced = _reports(out, _result_of(out, "r5"))
    assert set(_statuses(forced).values()) == {"ok"}
    for adapter_id in cat.ids:
        _check_adapter(cat, forced, adapter_id, {"threshold": 0.35})

    # Another selection is another result: everything is redone, then skipped.
    other = _run(cat.alignment, cat.root, out, threshold=0.5, run_id="r6")
    assert set(_statuses(other).values()) == {"ok"}
    for adapter_id in cat.ids:
        _check_adapter(cat, other, adapter_id, {"threshold": 0.5})
    number = _run(cat.alignment, cat.root, out, num_proj_layers=2, run_id="r7")
    assert set(_statuses(number).values()) == {"ok"}
    number = _run(cat.alignment, cat.root, out, num_proj_layers=2, run_id="r8")
    assert set(_statuses(number).values()) == {"skipped"}
    strict = _run(cat.alignment, cat.root, out, num_proj_layers=2, strict_k=True, run_id="r9")
    assert set(_statuses(strict).values()) == {"ok"}
    # Another alignment set is another result too.
    other_set = _run(cat.pair.sets["all"], cat.root, out, num_proj_layers=2, strict_k=True,
                     run_id="r10")
    assert set(_statuses(other_set).values()) == {"ok"}
    assert not _leftovers(out)


def _framed_sha256(adapter_dir: Path) -> str:
    """An adapter's content digest as records were keyed before BLAKE3: SHA-256 over the
    framed config and weights (computed here, apart from the product's code)."""
    h = hashlib.sha256(b"adapter_config.json\0")
    h.update((adapter_dir / "adapter_config.json").read_bytes())
    h.update(b"\0adapter_model.safetensors\0")
    h.update((adapter_dir / "adapter_model.safetensors").read_bytes())
    return "sha256:" + h.hexdigest()


def test_records_keyed_by_sha256_still_count(tmp_path: Path, qv_catalog: Catalog) -> None:
    """A ledger written before BLAKE3 digests: its adapters are not redone for the new scheme
    alone, a rewrite with the same bytes is recognised by a SHA-256 taken beside the BLAKE3
    one (and the record re-keyed), and a changed adapter is redone."""
    cat = _copy_catalog(qv_catalog, tmp_path / "catalog")
    out = tmp_path / "out"
    first = _run(cat.alignment, cat.root, out, threshold=0.35, workers=0, run_id="r1")
    assert set(_statuses(first).values()) == {"ok"}
    for aid in cat.ids:  # as the version before wrote them
        assert first.adapters[aid]["source_digest"] == adapter_digest(
            (cat.root / aid / "adapter_config.json").read_bytes(),
            (cat.root / aid / "adapter_model.safetensors").read_bytes())
        path = out / ledger_path(aid)
        record = json.loads(path.read_text())
        assert record["key"]["content_digest"].startswith("blake3:")
        record["key"]["content_digest"] = _framed_sha256(cat.root / aid)
        path.write_text(json.dumps(record))
    outputs = _mtimes(out)

    again = _run(cat.alignment, cat.root, out, threshold=0.35, workers=0, run_id="r2")
    assert set(_statuses(again).values()) == {"skipped"}
    assert _mtimes(out) == outputs

    os.utime(cat.root / "solo" / "adapter_model.safetensors")  # same bytes, new version
    _scale_b(cat.root / "acme/chat-2", 3.0)  # other bytes
    later = _run(cat.alignment, cat.root, out, threshold=0.35, workers=0, run_id="r3")
    assert _statuses(later) == {"acme/chat-1": "skipped", "acme/chat-2": "ok",
                                "globex/summarizer": "skipped", "solo": "skipped"}
    assert later.adapters["solo"]["note"] == (
        "already sanitized with this alignment set and selection")
    _check_adapter(cat, later, "acme/chat-2", {"threshold": 0.35})
    keys = {aid: json.loads((out / ledger_path(aid)).read_text())["key"]["content_digest"]
            for aid in cat.ids}
    for aid in ("solo", "acme/chat-2"):  # re-keyed in today's scheme
        assert keys[aid] == later.adapters[aid]["source_digest"]
        assert keys[aid].startswith("blake3:")
    assert keys["acme/chat-1"] == _framed_sha256(cat.root / "acme/chat-1")
    assert set(_statuses(_run(cat.alignment, cat.root, out, threshold=0.35, workers=0,
                              run_id="r4")).values()) == {"skipped"}


def test_manifest_catalogs(tmp_path: Path, qv_catalog: Catalog) -> None:
    root = qv_catalog.root
    by_dir = _run(qv_catalog.alignment, root, tmp_path / "by-dir", threshold=0.35, run_id="d")
    assert set(_statuses(by_dir).values()) == {"ok"}

    jsonl = tmp_path / "catalog.jsonl"
    lines = [{"uri": str(root / "acme/chat-1"), "id": "m/chat-1"},
             {"uri": str(root / "acme/chat-2") + "/"},
             {"uri": str(root / "solo"), "id": "m/solo", "owner": "x"}]
    jsonl.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    out = tmp_path / "out-jsonl"
    run = _run(qv_catalog.alignment, jsonl, out, threshold=0.35, run_id="j")
    assert _statuses(run) == {"m/chat-1": "ok", "chat-2": "ok", "m/solo": "ok"}
    for new, old in (("m/chat-1", "acme/chat-1"), ("chat-2", "acme/chat-2"), ("m/solo", "solo")):
        assert _tree_hash(out / new) == _tree_hash(tmp_path / "by-dir" / old)
        assert run.adapters[new]["source_uri"] == str(root / old)
    run = _run(qv_catalog.alignment, jsonl, out, threshold=0.35, run_id="j2")
    assert set(_statuses(run).values()) == {"skipped"}

    parquet = tmp_path / "catalog.parquet"
    pq.write_table(pa.table({"uri": [str(root / a) for a in QV_IDS]}), parquet)
    out = tmp_path / "out-parquet"
    run = _run(qv_catalog.alignment, parquet, out, threshold=0.35, run_id="p")
    # Ids without an 'id' column: the path below the entries' common folder (issue #20).
    assert _statuses(run) == {"acme/chat-1": "ok", "acme/chat-2": "ok",
                              "globex/summarizer": "ok", "solo": "ok"}
    assert _tree_hash(out / "globex/summarizer") == _tree_hash(tmp_path / "by-dir" /
                                                               "globex/summarizer")
    # A manifest with duplicate or invalid ids reports those entries and does the rest.
    pq.write_table(pa.table({"id": ["a", "a", "../x"],
                             "uri": [str(root / "solo"), str(root / "acme/chat-1"),
                                     str(root / "acme/chat-2")]}), parquet)
    run = _run(qv_catalog.alignment, parquet, tmp_path / "out-dup", threshold=0.35, run_id="q")
    assert run.result.ok == 1 and run.result.error == 2
    assert not (tmp_path / "x").exists()
    errors = sorted(e for _, e in run.result.errors)
    assert "appears twice" in errors[0] + errors[1] and ".." in errors[0] + errors[1]


# ----------------------------------------------------------------------------------------------
# 6: kill -9 in the middle of a run, then rerun
# ----------------------------------------------------------------------------------------------


def _run_pids(marker: str) -> set[int]:
    """Live processes whose environment holds ``marker``: the driver of the run and every
    Ray process it started (GCS, raylet, agents, and workers, which Ray puts in their own
    process groups; all inherit the driver's environment)."""
    pids = set()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue  # a zombie is dead, only not reaped yet
            with open(f"/proc/{d}/environ", "rb") as f:
                if marker.encode() in f.read().split(b"\0"):
                    pids.add(int(d))
        except (OSError, IndexError):
            pass
    return pids


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _wait_gone(check: Any, timeout: float = 30.0) -> set[int]:
    deadline = time.monotonic() + timeout
    left = check()
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = check()
    return left


@pytest.mark.timeout(240)
def test_kill_and_rerun(tmp_path: Path, qv_catalog: Catalog) -> None:
    n = 32
    cat = tmp_path / "catalog"
    src = qv_catalog.root / "solo"
    for i in range(n):
        dst = cat / f"t{i % 4}" / f"a{i:02d}"
        shutil.copytree(src, dst)
        g = torch.Generator().manual_seed(1000 + i)

        def edit(t: dict[str, torch.Tensor], g: torch.Generator = g) -> dict[str, torch.Tensor]:
            return {k: torch.randn(v.shape, generator=g, dtype=v.dtype) * 0.1
                    if k.endswith("lora_B.weight") else v for k, v in t.items()}

        rewrite_weights(dst, edit)
    ids = sorted(f"t{i % 4}/a{i:02d}" for i in range(n))
    before = _tree_hash(cat)
    out = tmp_path / "out"
    args = _sanitize_args(qv_catalog.alignment, cat, out, "--threshold", "0.35",
                          "--workers", "1", "--batch-size", "1", "--max-in-flight", "1")
    ray_tmp = Path(tempfile.mkdtemp(prefix="slr-", dir="/tmp"))  # short: AF_UNIX path limit
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = str(ray_tmp)
    log = open(tmp_path / "killed.log", "wb")  # noqa: SIM115 - closed in finally
    marker = f"RAY_TMPDIR={ray_tmp}"
    assert not _run_pids(marker)
    proc = subprocess.Popen([sys.executable, "-m", "safelora_ray.cli.main", *args], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        done = 0
        while proc.poll() is None and time.monotonic() < deadline:
            ledger = out / "_ledger"
            done = sum(1 for _ in ledger.rglob("*.json")) if ledger.exists() else 0
            if done >= 3:
                break
            time.sleep(0.005)
        assert proc.poll() is None, (done, (tmp_path / "killed.log").read_text()[-3000:])
        assert done >= 3, "the run did not start in time"
        alive = _run_pids(marker)
        own_groups = {pid for pid in alive if _pgid(pid) not in (None, proc.pid)}
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
        # Every process of the killed run (driver, GCS, raylet, workers) is gone.
        left = _wait_gone(lambda: _run_pids(marker))
        for pid in left:  # never leak them, even when the assertion below fails
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not left, f"processes of the killed run still alive: {sorted(left)}"
    # The check saw the run's processes, workers in their own process groups included.
    assert proc.pid in alive and len(alive) >= 4 and own_groups, alive

    # What the killed run left: only complete adapters are visible.
    finished = sorted(p.parent.relative_to(out).as_posix()
                      for p in out.glob("t*/*/adapter_config.json")
                      if not p.parent.name.startswith(HIDDEN))
    assert 3 <= len(finished) < n, finished
    storage = open_storage(str(out))
    for adapter_id in finished:
        read_adapter(storage, adapter_id, adapter_id)  # validates: header, shapes, finiteness
    for d in out.glob("t*/*"):
        if not d.name.startswith(HIDDEN):
            assert (d / "adapter_config.json").is_file(), f"half-written adapter {d}"

    # A kill inside a write leaves these (which moment the SIGKILL hits is luck): plant one of
    # each so that the rerun's clean-up is always exercised.
    (out / "t0" / ".staging-0123abcd").mkdir(parents=True, exist_ok=True)
    (out / "t0" / ".staging-0123abcd" / "adapter_model.safetensors").write_bytes(b"partial")
    (out / "t1" / ".trash-0123abcd").mkdir(parents=True, exist_ok=True)
    (out / "t1" / ".trash-0123abcd" / "adapter_config.json").write_text("{}")
    (out / "_ledger" / "t2").mkdir(parents=True, exist_ok=True)
    (out / "_ledger" / "t2" / ".tmp-0123abcd").write_text("{")

    rc = cli_main(args)
    assert rc == 0
    rerun_reports = sorted(p for p in (out / "_reports").iterdir() if p.is_dir())
    assert len(rerun_reports) == 1  # the killed run never published a report
    rows = pq.read_table(rerun_reports[0] / "adapters.parquet").to_pylist()
    statuses = {r["adapter_id"]: r["status"] for r in rows}
    assert sorted(statuses) == ids and set(statuses.values()) <= {"ok", "skipped"}
    assert sum(s == "skipped" for s in statuses.values()) >= 3
    assert not _leftovers(out), _leftovers(out)

    clean = tmp_path / "clean"
    run = _run(qv_catalog.alignment, cat, clean, threshold=0.35, workers=1, batch_size=1)
    assert set(_statuses(run).values()) == {"ok"}
    for adapter_id in ids:
        assert _tree_hash(out / adapter_id) == _tree_hash(clean / adapter_id), adapter_id
    assert _tree_hash(cat) == before


# ----------------------------------------------------------------------------------------------
# 7: exit codes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [
    ["--threshold", "0.3", "--num-proj-layers", "2"],  # both
    ["--threshold", "abc"],
    ["--num-proj-layers", "1.5"],
])
def test_exit_code_2_argparse(tmp_path: Path, qv_catalog: Catalog, extra: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli_main(_sanitize_args(qv_catalog.alignment, qv_catalog.root, tmp_path / "o", *extra))
    assert info.value.code == 2
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra, message", [
    # neither (allowed with --method salora only: it folds every module)
    ([], "give exactly one of --threshold or --num-proj-layers"),
    (["--num-proj-layers", "0"], "--num-proj-layers must be ≥ 1"),
    (["--num-proj-layers", "-2"], "--num-proj-layers must be ≥ 1"),
    (["--threshold", "nan"], "--threshold must be a finite number"),
    (["--threshold", "inf"], "--threshold must be a finite number"),
    (["--threshold", "0.3", "--strict-k"], "--strict-k needs --num-proj-layers"),
    (["--threshold", "0.3", "--batch-size", "0"], "--batch-size must be ≥ 1"),
    (["--threshold", "0.3", "--max-in-flight", "0"], "--max-in-flight must be ≥ 1"),
    (["--threshold", "0.3", "--workers", "-1"], "--workers must be ≥ 0"),
    (["--threshold", "0.3", "--run-id", "../x"], "--run-id"),
])
def test_exit_code_2_bad_values(tmp_path: Path, qv_catalog: Catalog, extra: list[str],
                                message: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli_main(_sanitize_args(qv_catalog.alignment, qv_catalog.root, tmp_path / "o", *extra))
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_exit_code_1_alignment_set_missing_or_incomplete(
        tmp_path: Path, qv_catalog: Catalog, capsys: pytest.CaptureFixture[str]) -> None:
    def run(alignment: Path) -> int:
        return cli_main(_sanitize_args(str(alignment), qv_catalog.root, tmp_path / "o",
                                       "--threshold", "0.35"))

    assert run(tmp_path / "nowhere") == 1
    assert "no alignment set" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(qv_catalog.alignment, broken)
    (broken / "alignment.json").unlink()  # as an interrupted build leaves it
    assert run(broken) == 1
    assert "incomplete alignment set" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_exit_codes_0_and_3(tmp_path: Path, qv_catalog: Catalog) -> None:
    cat = _copy_catalog(qv_catalog, tmp_path / "catalog")
    out = tmp_path / "out"
    args = _sanitize_args(cat.alignment, cat.root, out, "--threshold", "0.35")
    assert cli_main(args) == 0
    assert cli_main(args) == 0  # all skipped is success
    (cat.root / "solo" / "adapter_config.json").write_text("[]")
    assert cli_main(args) == 3
    result = json.loads(max((out / "_reports").glob("*/summary.json"),
                            key=lambda p: p.stat().st_mtime_ns).read_text())
    assert result["counts"] == {"total": 4, "ok": 0, "skipped": 3, "error": 1}


def test_a_batch_run_again_in_the_same_run_reports_ok(tmp_path: Path,
                                                      qv_catalog: Catalog) -> None:
    """Ray reruns a batch whose reply was lost with its worker: the adapters it finds done by
    this same run are reported ok (sanitized once, now), not skipped; another run skips them."""
    from safelora_ray.pipelines.sanitize.worker import FleetSanitizer
    from safelora_ray.planning.catalog import iter_catalog

    refs = [r for r in iter_catalog(str(qv_catalog.root)) if not isinstance(r, tuple)]
    sel = SanitizeConfig(alignment="/x", adapters="/y", out="/z", threshold=0.35).selection
    out = str(tmp_path / "out")

    def process(run_id: str) -> list[dict[str, Any]]:
        return FleetSanitizer(qv_catalog.alignment, out, sel, run_id=run_id).process(refs)[
            "adapters"]

    first = process("run-a")
    assert {r["status"] for r in first} == {"ok"}
    retried = process("run-a")
    assert {r["status"] for r in retried} == {"ok"}
    assert all("earlier attempt" in r["note"] for r in retried)
    assert [(r["projected"], r["modules"], r["output_digest"]) for r in retried] == [
        (r["projected"], r["modules"], r["output_digest"]) for r in first]
    assert {r["status"] for r in process("run-b")} == {"skipped"}


def test_batches_in_flight_default_by_storage() -> None:
    """Two batches in flight per worker on local storage, three where the catalog or the
    output is on an object store (round trips to hide); an explicit value wins; zero is a
    one-line error naming the flag."""
    from safelora_ray.core.errors import ConfigError

    cfg = SanitizeConfig(alignment="/x", adapters="/y", out="/z", threshold=0.35)
    assert cfg.max_in_flight is None
    assert cfg.in_flight(remote=False) == 2 and cfg.in_flight(remote=True) == 3
    pinned = SanitizeConfig(alignment="/x", adapters="/y", out="/z", threshold=0.35,
                            max_in_flight=1)
    assert pinned.in_flight(remote=True) == 1 and pinned.in_flight(remote=False) == 1
    with pytest.raises(ConfigError, match="max-in-flight"):
        SanitizeConfig(alignment="/x", adapters="/y", out="/z", threshold=0.35, max_in_flight=0)
