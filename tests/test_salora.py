"""SaLoRA safety modules (SPEC §4): the calibration pass and V_s against a dense float64
reference, layer by layer against the whole model, data-parallel against one worker, the
fold across adapters, the export of C_s and its use in a PEFT training step, and the CLI.

Tiny real transformers models (Llama with GQA, Phi-3 and GPT-NeoX with fused projections,
GPT-2 with Conv1D) and a tokenizer written by the test (tests/salora_models.py).

Tolerances: a float64 forward agrees with the float64 reference to ~1e-12 relative (Σ is a sum
of exact float64 products; the forward code paths differ: batched with padding, layer by layer,
vs the full model one sample at a time). The set stores V_s in float32 (the alignment-set
format), so subspaces are compared to 1e-6. A float32 forward is compared with itself (layer
by layer vs whole: the same operations on the same values) to 1e-6 relative.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from safelora_ray.cli.main import main as cli_main
from safelora_ray.core.errors import ConfigError
from safelora_ray.formats.alignment_set import AlignmentSet
from safelora_ray.pipelines.salora import forward as fwd
from safelora_ray.pipelines.salora.calibration import (
    TokenizedSamples,
    parse_calibration,
    pretokenized,
    tokenize,
)
from safelora_ray.pipelines.salora.forward import CalibrationJob, CalibrationRunner
from safelora_ray.pipelines.salora.modules import SaloraConfig, salora_modules
from tests.reference import dense_cs, dense_safety_basis, projector, sanitize_dense
from tests.salora_models import (
    ARCHS,
    PROMPTS,
    TARGETS,
    reference_inputs,
    save_model,
    save_tokenizer,
    token_samples,
    write_text_calibration,
    write_token_calibration,
)

RANK = 4


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("salora-models")
    return {a: save_model(root / a, a) for a in ARCHS}


@pytest.fixture(scope="module")
def samples() -> list[tuple[list[int], list[int]]]:
    return token_samples(7)


def _tokenized(samples: list[tuple[list[int], list[int]]]) -> TokenizedSamples:
    return TokenizedSamples.of([(i, [v != -100 for v in lab]) for i, lab in samples],
                               list(range(1, len(samples) + 1)))


def _sigmas(model_dir: Path, ts: TokenizedSamples, targets: tuple[str, ...], mode: str,
            dtype: str = "float64", batch_tokens: int = 40
            ) -> tuple[dict[str, torch.Tensor], dict[str, str], CalibrationRunner]:
    """Σ per module (through its input group) from a runner over both layers."""
    job = CalibrationJob("t", str(model_dir), (model_dir / "config.json").read_text(), targets,
                         dtype, mode, batch_tokens, RANK)
    runner = CalibrationRunner(job, ts, "cpu")
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, str] = {}
    for layer in (0, 1):
        res = runner.run_to(layer)
        assert mode == "auto" or res["mode"] == mode
        for m, info in res["modules"].items():
            out[m] = res["sigmas"][info["group"]]
            groups[m] = info["group"]
    return out, groups, runner


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ---------------------------------------------------------------------------------------------
# Σ against the dense reference; layer by layer against whole; shares against one
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_sigma_matches_dense_reference_whole_and_layers(models, samples, arch):
    targets = TARGETS[arch]
    xs, _ = reference_inputs(models[arch], samples, targets)
    ts = _tokenized(samples)
    whole, g_whole, _ = _sigmas(models[arch], ts, targets, "whole")
    layers, g_layers, _ = _sigmas(models[arch], ts, targets, "layers")
    assert set(whole) == set(xs) == set(layers)
    assert len(xs) == 2 * len(targets)
    for m, x in xs.items():
        ref = x.T @ x
        assert x.shape[0] == ts.tokens  # only the counted (response) tokens
        assert _rel(whole[m], ref) < 1e-11, m
        assert _rel(layers[m], ref) < 1e-11, m
    assert g_whole == g_layers
    shared = {m for m in xs if m.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj")}
    for layer in (0, 1):
        # q/k/v read the same normalized hidden states: one input group, one Σ
        qkv = {g_whole[m] for m in shared if f".{layer}." in m}
        assert len(qkv) == (1 if shared else 0)
        assert qkv <= shared
    assert all(g == m for m, g in g_whole.items() if m not in shared)


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_layers_equal_whole_in_float32(models, samples, arch):
    ts = _tokenized(samples)
    whole, _, _ = _sigmas(models[arch], ts, TARGETS[arch], "whole", dtype="float32")
    layers, _, _ = _sigmas(models[arch], ts, TARGETS[arch], "layers", dtype="float32",
                           batch_tokens=17)  # other batches too
    for m in whole:
        assert _rel(layers[m], whole[m]) < 1e-6, m


def test_shares_add_up_to_one_worker(models, samples):
    ts = _tokenized(samples)
    targets = TARGETS["llama"]
    one, _, _ = _sigmas(models["llama"], ts, targets, "layers")
    shares = ts.split(3)
    assert len(shares) == 3 and sum(len(s) for s in shares) == len(ts)
    assert sum(s.tokens for s in shares) == ts.tokens
    parts = [_sigmas(models["llama"], s, targets, "layers")[0] for s in shares]
    for m in one:
        assert _rel(sum(p[m] for p in parts), one[m]) < 1e-12, m


def test_layers_mode_frees_each_layer(models, samples):
    ts = _tokenized(samples)
    job = CalibrationJob("t", str(models["llama"]),
                         (models["llama"] / "config.json").read_text(), ("q_proj",), "float32",
                         "layers", 64, RANK)
    runner = CalibrationRunner(job, ts, "cpu")

    def on_meta(module: torch.nn.Module) -> bool:
        return all(p.device.type == "meta" for p in module.parameters())

    assert all(on_meta(layer) for layer in runner.layers)
    runner.run_to(0)
    assert on_meta(runner.layers[0]) and on_meta(runner.layers[1])  # used, then freed
    assert on_meta(runner.base.embed_tokens)  # the prelude too
    with pytest.raises(RuntimeError, match="already produced"):
        runner.run_to(0)
    res = runner.run_to(1)
    assert set(res["modules"]) == {"model.layers.1.self_attn.q_proj"}
    runner.close()


def test_auto_mode_follows_free_memory(models, samples, monkeypatch):
    ts = _tokenized(samples)
    assert _sigmas(models["llama"], ts, ("q_proj",), "auto")[2].mode == "whole"
    monkeypatch.setattr(fwd, "WHOLE_MODEL_MAX_SHARE", 0.0)
    assert _sigmas(models["llama"], ts, ("q_proj",), "auto")[2].mode == "layers"


# ---------------------------------------------------------------------------------------------
# The safety-module set against the reference
# ---------------------------------------------------------------------------------------------


def _compute(model: Path, cal: Path, out: Path, **kw: Any):
    params: dict[str, Any] = {"safety_rank": RANK, "workers": 0, "progress": False,
                              "dtype": "float64", **kw}
    return salora_modules(SaloraConfig(model=str(model), calibration=str(cal), out=str(out),
                                       **params))


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt2"])
def test_safety_modules_match_svd_of_wx(models, samples, tmp_path, arch):
    targets = TARGETS[arch]
    cal = write_token_calibration(tmp_path / "cal.jsonl", samples)
    res = _compute(models[arch], cal, tmp_path / "set", targets=",".join(targets),
                   mode="layers")
    xs, ws = reference_inputs(models[arch], samples, targets)
    aset = AlignmentSet.open(res.uri)
    assert aset.method_family == "salora" and res.num_modules == len(xs)
    assert res.tokens == sum(x.shape[0] for x in xs.values()) // len(xs)
    for m, x in xs.items():
        ref_u, ref_s2 = dense_safety_basis(ws[m], x, RANK)
        row = aset.rows[m]
        am = aset.load(m)
        assert (am.form, row.stored_shape, row.shape) == ("N", (ws[m].shape[0], RANK),
                                                          tuple(ws[m].shape))
        torch.testing.assert_close(projector(am.tensor), projector(ref_u), rtol=0, atol=2e-6)
        assert row.energy == pytest.approx(float(ref_s2[:RANK].sum() / ref_s2.sum()),
                                           rel=1e-9)
        assert row.norm == pytest.approx(float(ref_s2.sum()) ** 0.5, rel=1e-9)
        assert (row.safety_rank, row.tokens) == (RANK, res.tokens)
        assert row.calibration_digest.startswith("sha256:")
        # C_s = I − V_s V_sᵀ as the fold applies it
        b = torch.randn(ws[m].shape[0], 3, dtype=torch.float64)
        torch.testing.assert_close(am.apply(b).to(torch.float64), dense_cs(ref_u) @ b,
                                   rtol=0, atol=1e-5)
    md = aset.metadata
    assert md["method"]["name"] == "salora" and md["method"]["safety_rank"] == RANK
    assert md["calibration"]["sha256"] == md["method"]["calibration_sha256"]
    assert "safety modules" in aset.summary()


@pytest.mark.timeout(300)
def test_data_parallel_workers_equal_one_worker(models, samples, tmp_path, ray_local):
    cal = write_token_calibration(tmp_path / "cal.jsonl", samples)
    one = _compute(models["llama"], cal, tmp_path / "one", targets="q_proj,v_proj")
    two = _compute(models["llama"], cal, tmp_path / "two", targets="q_proj,v_proj",
                   workers=2)
    assert (one.workers, two.workers) == (0, 2)
    a, b = AlignmentSet.open(one.uri), AlignmentSet.open(two.uri)
    assert one.content_id == two.content_id  # content-based: same inputs, same id
    for m, row in a.rows.items():
        torch.testing.assert_close(b.load(m).tensor, a.load(m).tensor, rtol=0, atol=1e-6)
        assert b.rows[m].energy == pytest.approx(row.energy, rel=1e-10)


# ---------------------------------------------------------------------------------------------
# Calibration files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content, message", [
    (b"", "holds no sample"),
    (b"\n  \n", "holds no sample"),
    (b"{not json}\n", "line 1: not JSON"),
    (b"[1, 2]\n", "line 1: expected a JSON object"),
    (b'{"id": 3}\n', "needs 'prompt' and 'response'"),
    (b'{"prompt": "a"}\n', "'response' must be a string (missing)"),
    (b'{"prompt": 1, "response": "b"}\n', "'prompt' must be a string"),
    (b'{"prompt": "a", "response": "  "}\n', "the response is empty"),
    (b'{"prompt": "a", "response": "b", "input_ids": [1]}\n', "not both"),
    (b'{"prompt": "a", "response": "b"}\n{"input_ids": [1], "labels": [1]}\n',
     "line 2: a tokens sample in a file of text samples"),
    (b'{"input_ids": [1, 2], "labels": [1]}\n', "'labels' has 1 entries, 'input_ids' 2"),
    (b'{"input_ids": [1, 2], "labels": [-100, -100]}\n', "no token counts"),
    (b'{"input_ids": [], "labels": []}\n', "'input_ids' is empty"),
    (b'{"input_ids": [1, true], "labels": [1, 1]}\n', "holds True, not an integer"),
    (b'{"input_ids": [1, 2.5], "labels": [1, 1]}\n', "holds 2.5"),
    (b'{"input_ids": [1, -3], "labels": [1, 1]}\n', "negative id -3"),
    (b'{"input_ids": "12", "labels": [1]}\n', "'input_ids' must be a list"),
    (b'{"input_ids": [1]}\n', "'labels' must be a list of integers (missing)"),
    (b'\xff\xfe{}', "not UTF-8"),
])
def test_calibration_file_errors_name_file_and_line(content, message):
    with pytest.raises(ConfigError, match=r"s3://b/cal\.jsonl") as info:
        parse_calibration(content, "s3://b/cal.jsonl")
    assert message in str(info.value)


def test_calibration_forms_and_digest():
    raw = (b'{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "id": "x"}\n\n'
           b'{"input_ids": [8], "labels": [8]}\n')
    cal = parse_calibration(raw, "c.jsonl")
    assert cal.form == "tokens" and [r.line for r in cal.records] == [1, 3]
    import hashlib

    assert cal.sha256 == hashlib.sha256(raw).hexdigest()
    ts = pretokenized(cal)
    assert ts.lengths == (3, 1) and ts.tokens == 3 and ts.counted.tolist() == [0, 1, 1, 1]


def test_tokenize_counts_only_the_response(tmp_path):
    from transformers import AutoTokenizer

    save_tokenizer(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    cal = parse_calibration(write_text_calibration(tmp_path / "c.jsonl").read_bytes(), "c")
    ts = tokenize(cal, tok, "m")
    assert len(ts) == len(PROMPTS)
    for i, (prompt, response) in enumerate(PROMPTS):
        ids, counted = ts.sample(i)
        expect_prompt = ["<s>", "[INST]", *prompt.split(), "[/INST]"]
        expect_response = [*response.split(), "</s>"]
        assert tok.convert_ids_to_tokens(ids.tolist()) == expect_prompt + expect_response
        assert counted.tolist() == [False] * len(expect_prompt) + [True] * len(expect_response)
    save_tokenizer(tmp_path / "plain", chat_template=False)
    plain = AutoTokenizer.from_pretrained(str(tmp_path / "plain"))
    with pytest.raises(ConfigError, match="no chat template"):
        tokenize(cal, plain, "m")


# ---------------------------------------------------------------------------------------------
# CLI, reuse, errors; S3
# ---------------------------------------------------------------------------------------------


def test_cli_text_calibration_export_inspect_and_reuse(models, tmp_path, capsys):
    cal = write_text_calibration(tmp_path / "cal.jsonl")
    out = tmp_path / "set"
    args = ["salora-modules", "--model", str(models["llama"]), "--calibration", str(cal),
            "--targets", "q_proj,v_proj", "--safety-rank", str(RANK), "--out", str(out),
            "--workers", "0", "--no-progress", "--export-cs", str(tmp_path / "cs.safetensors")]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert "computed safety-module set als-" in printed and "4 modules" in printed
    assert "tokens/s" in printed and "C_s per module written" in printed
    tokens = sum(len(r.split()) + 1 for _, r in PROMPTS)  # the responses and </s>
    assert AlignmentSet.open(str(out)).metadata["calibration"]["tokens"] == tokens
    assert cli_main(["inspect", str(out), "--modules"]) == 0
    shown = capsys.readouterr().out
    assert "safety modules" in shown and "N" in shown and "energy" in shown
    # Same inputs: reused. Another calibration set: refused (sets are immutable).
    assert cli_main(args) == 0
    assert "reused" in capsys.readouterr().out
    other = write_text_calibration(tmp_path / "other.jsonl", PROMPTS[:3])
    args2 = [a if a != str(cal) else str(other) for a in args]
    assert cli_main(args2) == 1
    assert "immutable" in capsys.readouterr().err


def _cli_err(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = cli_main([*args, "--workers", "0", "--no-progress"])
    return rc, capsys.readouterr().err


def test_cli_errors(models, samples, tmp_path, capsys):
    llama = str(models["llama"])
    cal = str(write_token_calibration(tmp_path / "cal.jsonl", samples))
    base = ["salora-modules", "--model", llama, "--calibration", cal, "--out",
            str(tmp_path / "o"), "--safety-rank", "2"]  # (a later --safety-rank wins)
    rc, err = _cli_err([*base, "--safety-rank", "17"], capsys)  # k/v_proj is 16 x 32
    assert rc == 2 and "safety rank 17 exceeds 16" in err
    few = write_token_calibration(tmp_path / "few.jsonl", [([1, 2, 3], [-100, 2, 3])])
    rc, err = _cli_err([*base[:4], str(few), *base[5:], "--safety-rank", "4"], capsys)
    assert rc == 2 and "2 counted tokens, fewer than the safety rank 4" in err
    big = write_token_calibration(tmp_path / "big.jsonl", [([1, 99], [1, 99])])
    rc, err = _cli_err([*base[:4], str(big), *base[5:], "--safety-rank", "1"], capsys)
    assert rc == 2 and "line 1: token id 99 is outside the model's vocabulary" in err
    rc, err = _cli_err([*base, "--targets", "lm_head", "--safety-rank", "1"], capsys)
    assert rc == 1 and "not inside a numbered decoder layer" in err
    rc, err = _cli_err([*base, "--targets", "nothing"], capsys)
    assert rc == 1 and "matches the targets nothing" in err
    rc, err = _cli_err([*base, "--targets", "q_proj,nothing"], capsys)
    assert rc == 1 and "target(s) nothing match no tensor" in err
    rc, err = _cli_err([*base, "--safety-rank", "0"], capsys)
    assert rc == 2 and "--safety-rank must be ≥ 1" in err
    nocfg = tmp_path / "nocfg"
    shutil.copytree(models["llama"], nocfg)
    (nocfg / "config.json").unlink()
    rc, err = _cli_err(["salora-modules", "--model", str(nocfg), "--calibration", cal,
                        "--out", str(tmp_path / "o2"), "--safety-rank", "2"], capsys)
    assert rc == 1 and "no config.json" in err
    notok = tmp_path / "notok"
    shutil.copytree(models["llama"], notok)
    for f in notok.glob("tokenizer*"):
        f.unlink()
    text = write_text_calibration(tmp_path / "text.jsonl")
    rc, err = _cli_err(["salora-modules", "--model", str(notok), "--calibration", str(text),
                        "--out", str(tmp_path / "o3"), "--safety-rank", "2"], capsys)
    assert rc == 2 and "no tokenizer files" in err
    rc, err = _cli_err([*base[:4], str(tmp_path / "none.jsonl"), *base[5:]], capsys)
    assert rc == 2 and "calibration file not found" in err
    assert not (tmp_path / "o").exists()


def test_model_and_calibration_on_s3(models, tmp_path, s3_admin_client, s3_bucket):
    for f in models["llama"].iterdir():
        s3_admin_client.upload_file(str(f), s3_bucket, f"models/llama/{f.name}")
    cal = write_text_calibration(tmp_path / "cal.jsonl")
    s3_admin_client.upload_file(str(cal), s3_bucket, "cal/safety.jsonl")
    res = salora_modules(SaloraConfig(
        model=f"s3://{s3_bucket}/models/llama", calibration=f"s3://{s3_bucket}/cal/safety.jsonl",
        out=f"s3://{s3_bucket}/sets/llama", targets="v_proj", safety_rank=2, workers=0,
        progress=False))
    local = _compute(models["llama"], cal, tmp_path / "local", targets="v_proj",
                     safety_rank=2, dtype="float32")
    assert res.content_id == local.content_id
    a, b = AlignmentSet.open(res.uri), AlignmentSet.open(local.uri)
    for m in a.rows:
        torch.testing.assert_close(a.load(m).tensor, b.load(m).tensor, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The fold across adapters, and training with C_s
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_set(models, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("salora-set")
    cal = write_token_calibration(root / "cal.jsonl", token_samples(7))
    return Path(_compute(models["llama"], cal, root / "set", targets="q_proj,v_proj",
                         dtype="float32").uri)


def _catalog(root: Path) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    from tests.adapters import make_adapter

    lora = {}
    for k in range(3):
        _, weights = make_adapter(root / f"tenant/a{k}", gqa=True, adapter_seed=10 + k,
                                  r=4 + 2 * k)
        lora[f"tenant/a{k}"] = weights
    return lora


# (the cosines of these adapters are 0.74..0.94: τ = 0.9 folds about half the modules)
@pytest.mark.parametrize("selection", [[], ["--threshold", "0.9"], ["--num-proj-layers", "2"]])
def test_fold_matches_dense_reference(llama_set, tmp_path, selection, capsys):
    from tests.adapters import read_weights

    lora = _catalog(tmp_path / "cat")
    out = tmp_path / "out"
    rc = cli_main(["sanitize", "--method", "salora", "--alignment", str(llama_set),
                   "--adapters", str(tmp_path / "cat"), "--out", str(out), "--workers", "0",
                   "--no-progress", *selection])
    assert rc == 0, capsys.readouterr().err
    aset = AlignmentSet.open(str(llama_set))
    cs = {m: dense_cs(aset.load(m).tensor) for m in aset.rows}
    threshold = float(selection[1]) if selection[:1] == ["--threshold"] else (
        1.0 if not selection else None)
    k = int(selection[1]) if selection[:1] == ["--num-proj-layers"] else None
    for adapter_id, weights in lora.items():
        new_b, _cos, chosen, _ = sanitize_dense(cs, weights, threshold=threshold,
                                                num_proj_layers=k)
        if not selection:
            assert chosen == set(weights)  # every module folded
        elif selection[0] == "--threshold":
            assert 0 < len(chosen) < len(weights)
        got, _ = read_weights(out / adapter_id)
        for m in weights:
            key = f"base_model.model.{m}.lora_B.weight"
            torch.testing.assert_close(got[key].to(torch.float64), new_b[m].to(torch.float64),
                                       rtol=0, atol=1e-5)
            if m in chosen:  # folded: no component along the safety directions is left
                v = aset.load(m).tensor.to(torch.float64)
                assert float((v.T @ got[key].to(torch.float64)).abs().max()) < 1e-5
    summary = json.loads(next((out / "_reports").glob("*/summary.json")).read_text())
    assert summary["selection"]["method"] == "salora"


def test_fold_report_inspect_labels_and_project_model_refusal(llama_set, models, tmp_path,
                                                              capsys):
    """Issue 20 (8): a fold's report names the safety set and what was folded, and drops what
    has no τ; inspect labels the norm ‖W Xᵀ‖_F; project-model refuses a SaLoRA set."""
    _catalog(tmp_path / "cat")
    out = tmp_path / "out"
    rc = cli_main(["sanitize", "--method", "salora", "--alignment", str(llama_set),
                   "--adapters", str(tmp_path / "cat"), "--out", str(out), "--workers", "0",
                   "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    content_id = AlignmentSet.open(str(llama_set)).content_id
    page = next((out / "_reports").glob("*/report.html")).read_text()
    assert "None" not in page
    assert "Near the threshold" not in page and 'id="threshold"' not in page
    assert '<th class="n">near τ</th>' not in page and "Near τ" not in page
    assert "τ (threshold)" not in page
    assert "kept as trained" not in page and "e-18" not in page
    assert f"folded with safety set {content_id}" in page
    assert "every module folded (no threshold)" in page
    assert '<section id="folded"><h2>Folded modules</h2>' in page
    # 3 adapters × 2 layers × (q, v): each kind's modules, all folded.
    assert "<td class='id'>q_proj</td><td>0..1</td>" in page and "✓ 6" in page
    assert "Modules folded" in page and "Modules projected" not in page
    summary = json.loads(next((out / "_reports").glob("*/summary.json")).read_text())
    assert summary["near_threshold"]["mode"] == "all"

    assert cli_main(["inspect", str(llama_set), "--modules"]) == 0
    shown = capsys.readouterr().out
    assert "‖W Xᵀ‖_F" in shown and "‖V‖_F" not in shown

    rc = cli_main(["project-model", "--alignment", str(llama_set), "--aligned",
                   str(models["llama"]), "--finetuned", str(models["llama"]), "--out",
                   str(tmp_path / "pm"), "--threshold", "0.35", "--workers", "0",
                   "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "salora safety modules" in err and "sanitize --method salora" in err
    assert not (tmp_path / "pm").exists()


def test_method_must_match_the_set(llama_set, models, tmp_path, capsys):
    from safelora_ray.pipelines.build.config import BuildConfig
    from safelora_ray.pipelines.build.driver import build
    from tests.adapters import save_base_model

    _catalog(tmp_path / "cat")
    aligned = save_base_model(tmp_path / "aligned", seed=5, gqa=True)
    safelora_set = build(BuildConfig(base=str(models["llama"]), aligned=str(aligned),
                                     out=str(tmp_path / "als"), workers=0, progress=False))

    def run(alignment: str, *extra: str) -> int:
        return cli_main(["sanitize", "--alignment", alignment, "--adapters",
                         str(tmp_path / "cat"), "--out", str(tmp_path / "o"), "--workers", "0",
                         "--no-progress", *extra])

    assert run(str(llama_set), "--threshold", "0.35") == 2
    assert "use --method salora" in capsys.readouterr().err
    assert run(safelora_set.uri, "--method", "salora") == 2
    assert "use --method safelora" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="at most one"):
        from safelora_ray.pipelines.sanitize.driver import SanitizeConfig

        SanitizeConfig(alignment="a", adapters="b", out="c", method="salora", threshold=0.3,
                       num_proj_layers=2)


def test_export_and_peft_training_step_with_cs(llama_set, models, tmp_path, capsys):
    """C_s exported for training: one SGD step of a PEFT model with the safety modules on
    keeps every LoRA update in C_s's range; folding the trained adapter (sanitize --method
    salora, every module) gives a plain PEFT adapter with the same outputs."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from safelora_ray.pipelines.salora.training import attach_safety_modules, load_safety_modules
    from tests.adapters import load_base_model

    path = tmp_path / "cs.safetensors"
    assert cli_main(["salora-export", "--alignment", str(llama_set), "--out", str(path)]) == 0
    cs = load_safety_modules(str(path))
    aset = AlignmentSet.open(str(llama_set))
    assert set(cs) == {f"base_model.model.{m}" for m in aset.rows}
    for m in aset.rows:
        torch.testing.assert_close(cs[f"base_model.model.{m}"], aset.load(m).dense())

    torch.manual_seed(0)
    model = get_peft_model(load_base_model(models["llama"]),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    attach_safety_modules(model, cs)
    ids = torch.randint(0, 64, (2, 9))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    # The LoRA output of every module now lies in range(C_s): V_sᵀ (ΔW x) = 0.
    deltas: dict[str, torch.Tensor] = {}
    handles = []
    for name, mod in model.named_modules():
        if name in cs:
            handles.append(mod.lora_B["default"].register_forward_hook(
                lambda _m, _i, out, n=name: deltas.__setitem__(n, out.detach())))
    with torch.no_grad():
        hooked = model(input_ids=ids).logits
    for h in handles:
        h.remove()
    assert len(deltas) == len(cs)
    for name, d in deltas.items():
        v = aset.load(name[len("base_model.model."):]).tensor
        assert float(d.abs().max()) > 1e-4  # training moved B
        assert float((d @ v).abs().max()) < 1e-5 * float(d.abs().max()), name
    # Fold the trained adapter: a plain PEFT adapter with the same outputs.
    model.save_pretrained(str(tmp_path / "cat" / "trained"))
    assert cli_main(["sanitize", "--method", "salora", "--alignment", str(llama_set),
                     "--adapters", str(tmp_path / "cat"), "--out", str(tmp_path / "out"),
                     "--workers", "0", "--no-progress"]) == 0
    plain = PeftModel.from_pretrained(load_base_model(models["llama"]),
                                      str(tmp_path / "out" / "trained")).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, hooked, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="no C_s for"):
        attach_safety_modules(get_peft_model(load_base_model(models["llama"]),
                                             LoraConfig(r=2, target_modules=["o_proj"])), cs)
