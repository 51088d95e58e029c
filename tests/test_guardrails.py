"""Guardrails (issue #10): inputs are never overwritten, and every mistake a person at a
terminal or a nightly job makes gets a clear, prompt answer.

Most runs here are small and run in this process (the default without a Ray cluster); the
ones that need Ray's workers (interrupts, log relaying) run the CLI in a subprocess with
``--workers 1``, as a user would.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from safelora_ray import AlignmentSet, BuildConfig, ConfigError, SanitizeConfig, build
from safelora_ray.cli.demo import BASE_MODEL_ID, write_adapter, write_model
from safelora_ray.cli.main import main as cli_main
from safelora_ray.core.validate import check_selection
from safelora_ray.storage.uri import check_uri, overlap
from tests.factory import Arch, aligned_from, llama_tensors

REPO = Path(__file__).resolve().parents[1]
HIDDEN = (".tmp-", ".staging-", ".trash-")


# ----------------------------------------------------------------------------------------------
# Fixtures: a tiny pair, its alignment set, and catalogs of adapters for it
# ----------------------------------------------------------------------------------------------


def tiny_world(root: Path) -> dict[str, Any]:
    """A tiny pair under ``root`` and its alignment set (shared by the modules of issue 20's
    tests)."""
    base = llama_tensors(Arch())
    write_model(root / "base", base)
    write_model(root / "aligned", aligned_from(base))
    res = build(BuildConfig(base=str(root / "base"), aligned=str(root / "aligned"),
                            out=str(root / "set"), workers=0, progress=False))
    return {"root": root, "set": res.uri, "rows": AlignmentSet.open(res.uri).rows}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return tiny_world(tmp_path_factory.mktemp("guard"))


def _catalog(world: dict[str, Any], root: Path, names: list[str], seed: int = 0,
             dora: tuple[str, ...] = ()) -> Path:
    g = torch.Generator().manual_seed(seed)
    for name in names:
        lora = {m: (torch.randn(2, r.shape[1], generator=g), torch.randn(r.shape[0], 2,
                                                                         generator=g))
                for m, r in world["rows"].items()}
        write_adapter(root / name, lora, 2, use_dora=name in dora)
    return root


def _digest_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli_main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _san(world: dict[str, Any], adapters: Path | str, out: Path | str, *extra: str) -> list[str]:
    return ["sanitize", "--alignment", world["set"], "--adapters", str(adapters),
            "--out", str(out), "--no-progress", *extra]


# ----------------------------------------------------------------------------------------------
# 1. --out never equals, contains or lies inside an input
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["same", "inside", "contains", "symlink"])
def test_out_overlapping_the_catalog_is_refused(world, tmp_path, capsys, where):
    cat = _catalog(world, tmp_path / "wrap" / "cat", ["t0/a", "t1/b"])
    before = _digest_tree(tmp_path / "wrap")
    out = {"same": cat, "inside": cat / "sanitized", "contains": tmp_path / "wrap",
           "symlink": tmp_path / "link"}[where]
    if where == "symlink":
        out.symlink_to(cat, target_is_directory=True)
    code, _, err = _run(_san(world, cat, out, "--threshold", "0.35"), capsys)
    assert code == 2, err
    assert "--out" in err and "--adapters" in err and "choose an --out apart" in err
    assert _digest_tree(tmp_path / "wrap") == before  # nothing written, nothing touched


def test_out_overlapping_the_catalog_is_refused_on_s3(world, tmp_path, capsys, s3_bucket,
                                                      s3_admin_client):
    cat = _catalog(world, tmp_path / "cat", ["t0/a"])
    for f in cat.rglob("*"):
        if f.is_file():
            s3_admin_client.upload_file(str(f), s3_bucket, f"tenants/{f.relative_to(cat)}")
    for out in (f"s3://{s3_bucket}/tenants", f"s3://{s3_bucket}/tenants/out/",
                f"s3://{s3_bucket}"):
        code, _, err = _run(_san(world, f"s3://{s3_bucket}/tenants/", out, "--threshold",
                                 "0.35"), capsys)
        assert code == 2 and "choose an --out apart" in err, (out, err)
    keys = [o["Key"] for o in s3_admin_client.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert sorted(keys) == ["tenants/t0/a/adapter_config.json",
                            "tenants/t0/a/adapter_model.safetensors"]
    # A sibling prefix sharing the name's beginning is apart: not refused.
    assert overlap(f"s3://{s3_bucket}/tenants-out", f"s3://{s3_bucket}/tenants") is None


def test_python_api_and_build_refuse_overlaps(world, tmp_path):
    cat = _catalog(world, tmp_path / "cat", ["a"])
    with pytest.raises(ConfigError, match="lies inside --adapters"):
        SanitizeConfig(alignment=world["set"], adapters=str(cat), out=str(cat / "o"),
                       threshold=0.35)
    with pytest.raises(ConfigError, match="--alignment"):
        SanitizeConfig(alignment=world["set"], adapters=str(cat), out=world["set"],
                       threshold=0.35)
    root = world["root"]
    for out in (root / "base", root / "aligned" / "set", root):
        with pytest.raises(ConfigError, match="source checkout"):
            BuildConfig(base=str(root / "base"), aligned=str(root / "aligned"), out=str(out))


def test_manifest_entries_inside_out_fail_alone(world, tmp_path, capsys):
    cat = _catalog(world, tmp_path / "cat", ["a", "b"])
    out = tmp_path / "out"
    _catalog(world, out / "stray", ["c"])  # an adapter that lives inside --out
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "a", "uri": str(cat / "a")}, {"id": "b", "uri": str(cat / "b")},
        {"id": "c", "uri": str(out / "stray" / "c")}]))
    before = _digest_tree(out / "stray")
    code, out_text, _ = _run(_san(world, manifest, out, "--threshold", "0.35"), capsys)
    assert code == 3
    assert "ok 2" in out_text and "failed 1" in out_text
    assert "lies inside --out" in out_text
    assert _digest_tree(out / "stray") == before


def test_nightly_refuses_an_output_root_around_a_catalog(world, tmp_path, capsys):
    cat = _catalog(world, tmp_path / "data" / "cat", ["a"])
    cfg = {"output_root": str(tmp_path / "data"), "alignment_root": str(tmp_path / "sets"),
           "catalogs": [{"name": "c", "uri": str(cat)}],
           "pairs": [{"name": "p", "base": str(world["root"] / "base"),
                      "aligned": str(world["root"] / "aligned"), "base_model_ids": ["x"]}],
           "selection": {"threshold": 0.35}}
    path = tmp_path / "n.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, _, err = _run(["nightly", "--config", str(path), "--no-progress"], capsys)
    assert code == 2 and "output_root" in err and "catalogs[c].uri" in err


# ----------------------------------------------------------------------------------------------
# 2-3. Catalogs that do not exist, are empty, or are URIs mistyped
# ----------------------------------------------------------------------------------------------


def test_missing_or_mistyped_catalogs_are_errors(world, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    code, _, err = _run(_san(world, tmp_path / "no-such-catalog", out, "--threshold", "0.35"),
                        capsys)
    assert code == 2 and "does not exist" in err
    code, _, err = _run(_san(world, "s3:/bucket/tenants", out, "--threshold", "0.35"), capsys)
    assert code == 2 and "did you mean 's3://bucket/tenants'" in err
    code, _, err = _run(_san(world, tmp_path / "cat", "s3:/bucket/out", "--threshold", "0.35"),
                        capsys)
    assert code == 2 and "--out" in err and "did you mean 's3://bucket/out'" in err
    code, _, err = _run(_san(world, tmp_path / "cat", out, "--threshold", "0.35", "--alignment",
                             "s3:set"), capsys)
    assert code == 2 and "--alignment" in err
    assert not (tmp_path / "s3:").exists() and not out.exists()


def test_empty_catalog_needs_allow_empty(world, tmp_path, capsys, s3_bucket):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.md").write_text("no adapters yet")
    code, _, err = _run(_san(world, empty, tmp_path / "out", "--threshold", "0.35"), capsys)
    assert code == 2 and "no adapters found" in err and "--allow-empty" in err
    code, out_text, _ = _run(_san(world, empty, tmp_path / "out", "--threshold", "0.35",
                                  "--allow-empty"), capsys)
    assert code == 0 and "0 adapter(s)" in out_text
    code, _, err = _run(_san(world, f"s3://{s3_bucket}/nothing-here", tmp_path / "out2",
                             "--threshold", "0.35"), capsys)
    assert code == 2 and "no adapters found" in err


def test_nightly_with_a_missing_catalog_fails_after_the_others(world, tmp_path, capsys):
    good = _catalog(world, tmp_path / "good", ["a"])
    cfg = {"output_root": str(tmp_path / "out"), "alignment_root": str(tmp_path / "sets"),
           "catalogs": [{"name": "good", "uri": str(good)},
                        {"name": "typo", "uri": str(tmp_path / "goood")}],
           "pairs": [{"name": "p", "base": str(world["root"] / "base"),
                      "aligned": str(world["root"] / "aligned"),
                      "base_model_ids": [BASE_MODEL_ID]}],
           "selection": {"threshold": 0.35}, "sanitize": {"workers": 0},
           "build": {"workers": 0}}
    path = tmp_path / "n.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, out_text, err = _run(["nightly", "--config", str(path), "--no-progress", "--json"],
                               capsys)
    assert code == 1, err
    record = json.loads(out_text)
    assert record["status"] == "failed" and record["counts"]["ok"] == 1
    assert "typo" in record["catalog_errors"][0]["error"]
    assert "does not exist" in record["catalog_errors"][0]["error"]


@pytest.mark.parametrize(("uri", "hint"), [
    ("s3:/b/x", "s3://b/x"), ("s3:b/x", "s3://b/x"), ("hf:/org/m", "hf://org/m"),
    ("file://tmp/x", "file:///tmp/x"), ("file:/tmp/x", "file:///tmp/x"),
])
def test_uri_near_misses_get_a_hint(uri, hint):
    with pytest.raises(ConfigError, match=re.escape(f"did you mean {hint!r}")):
        check_uri(uri, "--out")


def test_valid_uris_and_paths_pass():
    for uri in ("/abs/path", "rel/path", "./data:2024", "s3://b", "s3://b/p/", "hf://o/m@v1",
                "file:///tmp/x"):
        assert check_uri(uri) == uri
    with pytest.raises(ConfigError, match="unsupported URI scheme 'gs'"):
        check_uri("gs://bucket/x")


# ----------------------------------------------------------------------------------------------
# 4. Selection values out of range
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "message"), [
    ("2", "outside \\[-1, 1\\]"), ("-1.5", "outside \\[-1, 1\\]"),
    ("35", "did you mean 0.35"), ("nan", "finite"),
])
def test_threshold_out_of_range_is_refused(world, tmp_path, capsys, value, message):
    cat = _catalog(world, tmp_path / "cat", ["a"])
    code, _, err = _run(_san(world, cat, tmp_path / "out", "--threshold", value), capsys)
    assert code == 2 and re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_selection_bounds_and_flag_names():
    check_selection(1.0, None, False)
    check_selection(-1.0, None, False)
    with pytest.raises(ConfigError, match="--num-proj-layers must be ≥ 1, got 0"):
        check_selection(None, 0, False)
    with pytest.raises(ConfigError, match="--strict-k needs --num-proj-layers"):
        check_selection(0.3, None, True)
    with pytest.raises(ConfigError, match="--batch-size must be ≥ 1"):
        SanitizeConfig(alignment="/a", adapters="/b", out="/c", threshold=0.3, batch_size=0)


def test_num_proj_layers_at_least_the_module_count_warns(world, tmp_path, capsys, caplog):
    cat = _catalog(world, tmp_path / "cat", ["a", "b"])
    n_mod = len(world["rows"])
    code, _, _ = _run(_san(world, cat, tmp_path / "out", "--num-proj-layers", str(n_mod)),
                      capsys)
    assert code == 0
    assert f"2 adapter(s) have at most --num-proj-layers {n_mod} modules" in caplog.text
    import pyarrow.parquet as pq

    rows = pq.read_table(next((tmp_path / "out" / "_reports").glob("*/adapters.parquet")))
    notes = rows.column("note").to_pylist()
    assert all("every module was projected (the number is per adapter)" in n for n in notes)


# ----------------------------------------------------------------------------------------------
# 5. Two catalogs into one --out
# ----------------------------------------------------------------------------------------------


def test_two_catalogs_into_one_out_never_overwrite_each_other(world, tmp_path, capsys):
    cat0 = _catalog(world, tmp_path / "tenant-0", ["x", "only0"], seed=1)
    cat1 = _catalog(world, tmp_path / "tenant-1", ["x", "only1"], seed=2)
    out = tmp_path / "out"
    code, _, _ = _run(_san(world, cat0, out, "--threshold", "0.35"), capsys)
    assert code == 0
    first = (out / "x" / "adapter_model.safetensors").read_bytes()
    ledger = json.loads((out / "_ledger" / "x.json").read_text())
    code, out_text, _ = _run(_san(world, cat1, out, "--threshold", "0.35"), capsys)
    assert code == 3
    assert "already holds the sanitized output of" in out_text and "--force" in out_text
    assert (out / "x" / "adapter_model.safetensors").read_bytes() == first
    assert json.loads((out / "_ledger" / "x.json").read_text()) == ledger
    assert (out / "only1" / "adapter_config.json").exists()  # no collision: written
    code, _, _ = _run(_san(world, cat1, out, "--threshold", "0.35", "--force"), capsys)
    assert code == 0
    assert json.loads((out / "_ledger" / "x.json").read_text())["source"] == str(cat1 / "x")


# ----------------------------------------------------------------------------------------------
# 6. A bad --ray-address fails fast, naming it
# ----------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(args: list[str], env: dict[str, str] | None = None, timeout: float = 120,
         **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "safelora_ray", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})},
                          cwd=REPO, **kw)


def test_bad_ray_address_fails_fast(world, tmp_path):
    cat = _catalog(world, tmp_path / "cat", ["a"])
    port = _free_port()
    t0 = time.monotonic()
    proc = _cli([*_san(world, cat, tmp_path / "out", "--threshold", "0.35"), "--ray-address",
                 f"127.0.0.1:{port}"])
    assert proc.returncode == 1, proc.stderr
    assert f"cannot reach the Ray cluster at '127.0.0.1:{port}'" in proc.stderr
    proc = _cli([*_san(world, cat, tmp_path / "out", "--threshold", "0.35"), "--ray-address",
                 "http://127.0.0.1:8265"])
    assert proc.returncode == 1 and "dashboard / job-server URL" in proc.stderr
    # Something that accepts connections but is no Ray head: bounded by the connect timeout.
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    try:
        proc = _cli([*_san(world, cat, tmp_path / "out", "--threshold", "0.35"),
                     "--ray-address", f"127.0.0.1:{srv.getsockname()[1]}"],
                    env={"SAFELORA_RAY_CONNECT_TIMEOUT_S": "4"})
    finally:
        srv.close()
    assert proc.returncode == 1 and "within 4 s" in proc.stderr, proc.stderr[-2000:]
    assert time.monotonic() - t0 < 90
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# 7. Ctrl-C with Ray workers: nothing partial, exit 130, the rerun resumes
# ----------------------------------------------------------------------------------------------


def _leftovers(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*")
            if any(p.name.startswith(h) for h in HIDDEN)]


def _complete(out: Path) -> list[str]:
    """Ids of the adapters whose output is complete (config, weights and ledger record)."""
    done = []
    for cfg in out.rglob("adapter_config.json"):
        d = cfg.parent
        rel = str(d.relative_to(out))
        assert (d / "adapter_model.safetensors").exists(), f"{rel}: config without weights"
        assert (out / "_ledger" / f"{rel}.json").exists(), f"{rel}: output without ledger"
        done.append(rel)
    return done


@pytest.mark.timeout(300)
def test_ctrl_c_with_ray_workers_leaves_nothing_partial(world, tmp_path):
    # Enough adapters that the interrupt, sent once 3 are done, lands mid-run (160 took 3 s).
    names = [f"t{i % 4}/a{i:03d}" for i in range(480)]
    cat = _catalog(world, tmp_path / "cat", names)
    out = tmp_path / "out"
    args = [*_san(world, cat, out, "--threshold", "0.35", "--batch-size", "1", "--workers",
                  "1", "--run-id", "first")]
    # Ctrl-C as a terminal sends it. A shell starts background commands with SIGINT ignored,
    # and a child inherits that (Python then installs no KeyboardInterrupt handler): the CLI
    # gets Python's default handler back, as it has when run from a terminal.
    as_from_a_terminal = (
        "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "sys.argv[0] = 'safelora-ray'; runpy.run_module('safelora_ray', run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", as_from_a_terminal, *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "_ledger").exists() or len(list((out / "_ledger").rglob("*.json"))) < 3:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run never started writing"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _stdout, stderr = proc.communicate(timeout=90)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stderr[-3000:]
    assert "interrupted" in stderr and "Traceback" not in stderr, stderr[-3000:]
    assert _leftovers(out) == []
    done = _complete(out)
    assert 0 < len(done) < len(names), "the interrupt came too late to test anything"
    assert not (out / "_reports" / "first").exists()  # no partial report
    # The process group (driver, its Ray and the workers) is gone.
    with pytest.raises(ProcessLookupError):
        for _ in range(100):
            os.killpg(proc.pid, 0)
            time.sleep(0.1)
    # The rerun resumes: what was done is skipped, the rest is sanitized.
    rerun = _cli([*_san(world, cat, out, "--threshold", "0.35", "--json")], timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    counts = json.loads(rerun.stdout)["counts"]
    assert counts == {"total": len(names), "ok": len(names) - len(done), "skipped": len(done),
                      "error": 0}
    assert sorted(_complete(out)) == sorted(names)


# ----------------------------------------------------------------------------------------------
# 8. Logs and progress for people and for log files
# ----------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_logs_and_progress_in_a_log_file(world, tmp_path):
    cat = _catalog(world, tmp_path / "cat", [f"t/a{i}" for i in range(12)] + ["t/dora"],
                   dora=("t/dora",))
    args = _san(world, cat, tmp_path / "out", "--threshold", "0.35", "--workers", "1",
                "--batch-size", "2")
    args.remove("--no-progress")
    proc = _cli([*args, "--log-level", "DEBUG"], env={"SAFELORA_PROGRESS_INTERVAL_S": "0"},
                timeout=240)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 3, text[-3000:]
    assert "\x1b[" not in text and "\r" not in text  # no colours, no bar redraws in a file
    assert re.search(r"sanitize: \d+/13 adapters \(\d+%\), [\d.,]+/s, .* ETA", proc.stderr)
    # --log-level reaches the worker: its DEBUG record of the refusal is relayed here.
    assert re.search(r"DEBUG safelora_ray\.pipelines\.sanitize: adapter 't/dora'", proc.stderr)
    # At the default level each failure is printed once, in the summary, and the summary is
    # the last thing printed.
    proc = _cli([*args, "--force"], env={"SAFELORA_PROGRESS_INTERVAL_S": "3600"}, timeout=240)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 3
    assert text.count("DoRA adapter") == 1, text[-3000:]
    assert proc.stdout.rstrip().splitlines()[-1].strip().startswith("- adapter 't/dora'")
    assert "(SafeLoraWorker" not in text and "pid=" not in text


def test_quiet_shows_warnings_only(world, tmp_path):
    cat = _catalog(world, tmp_path / "cat", ["a", "d"], dora=("d",))
    quiet = _cli([*_san(world, cat, tmp_path / "out", "--threshold", "0.35"), "-q"])
    assert quiet.returncode == 3 and " INFO " not in quiet.stderr
    assert "failed 1" in quiet.stdout  # the summary is still printed
    both = _cli([*_san(world, cat, tmp_path / "out2", "--threshold", "0.35"), "-q", "-v"])
    assert both.returncode == 2 and "exclude each other" in both.stderr


def test_progress_line_has_total_rate_and_eta():
    from safelora_ray.execution.progress import Progress

    class Pipe:
        def isatty(self) -> bool:
            return False

    p = Progress("sanitize", "adapter", enabled=True, stream=Pipe(), interval_s=3600)  # type: ignore[arg-type]
    p.update(25)
    assert "(total not known yet)" in p.line()
    p.set_total(100)
    line = p.line()
    assert line.startswith("sanitize: 25/100 adapters (25%)") and "ETA" in line
    b = Progress("build", "B", total=4 * 10**9, unit_scale=True, stream=Pipe())  # type: ignore[arg-type]
    b.update(10**9)
    assert b.line().startswith("build: 1.0 GB/4.0 GB (25%)")


# ----------------------------------------------------------------------------------------------
# 10. Conventions
# ----------------------------------------------------------------------------------------------


def test_help_and_usage_errors_do_not_load_torch_or_ray():
    code = ("import sys\nfrom safelora_ray.cli.main import main\n"
            "for argv in (['--help'], ['sanitize', '--help'], ['sanitize', '--threshold', '1']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout + proc.stderr


def test_python_dash_m_version_and_nightly_subcommand(world, tmp_path):
    proc = _cli(["--version"])
    assert proc.returncode == 0 and proc.stdout.startswith("safelora-ray ")
    cat = _catalog(world, tmp_path / "cat", ["a"])
    cfg = {"output_root": str(tmp_path / "out"), "alignment_root": str(tmp_path / "sets"),
           "catalogs": [{"name": "c", "uri": str(cat)}],
           "pairs": [{"name": "p", "base": str(world["root"] / "base"),
                      "aligned": str(world["root"] / "aligned"),
                      "base_model_ids": [BASE_MODEL_ID]}],
           "selection": {"threshold": 0.35}}
    (tmp_path / "n.yaml").write_text(yaml.safe_dump(cfg))
    proc = _cli(["nightly", "--config", str(tmp_path / "n.yaml"), "--dry-run", "--json"])
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["status"] == "dry-run"
    assert record["groups"] == [{"catalog": "c", "pair": "p", "adapters": 1}]


def test_json_summaries(world, tmp_path, capsys):
    cat = _catalog(world, tmp_path / "cat", ["a", "b"])
    code, out_text, err = _run([*_san(world, cat, tmp_path / "out", "--threshold", "0.35"),
                                "--json"], capsys)
    assert code == 0
    summary = json.loads(out_text)  # stdout is the JSON alone; the human summary is on stderr
    assert summary["counts"] == {"total": 2, "ok": 2, "skipped": 0, "error": 0}
    assert summary["report"].endswith(summary["run_id"]) and "ok 2" in err
    code, out_text, _ = _run(["build", "--base", str(world["root"] / "base"), "--aligned",
                              str(world["root"] / "aligned"), "--out", world["set"], "--json",
                              "--no-progress"], capsys)
    assert code == 0 and json.loads(out_text)["status"] == "reused"


def test_inspect_says_what_a_path_is(world, tmp_path, capsys):
    cat = _catalog(world, tmp_path / "cat", ["t/a", "t/d"], dora=("t/d",))
    code, out_text, _ = _run(["inspect", str(cat / "t" / "a")], capsys)
    assert code == 0
    assert "PEFT adapter" in out_text and "peft type      LORA" in out_text
    assert f"modules        {len(world['rows'])} (r=2 x{len(world['rows'])})" in out_text
    assert "can be sanitized" in out_text
    code, out_text, _ = _run(["inspect", str(cat / "t" / "d"), "--json"], capsys)
    d = json.loads(out_text)
    assert d["kind"] == "adapter" and d["covered"] is False and "DoRA" in d["reason"]
    code, out_text, _ = _run(["inspect", str(world["root"] / "base")], capsys)
    assert code == 0 and "checkpoint" in out_text and "not an alignment set" in out_text
    code, out_text, _ = _run(["inspect", str(cat)], capsys)
    assert code == 0 and "catalog" in out_text and "adapters       2" in out_text
    code, out_text, _ = _run(["inspect", world["set"], "--json"], capsys)
    assert json.loads(out_text)["kind"] == "alignment-set"


# ----------------------------------------------------------------------------------------------
# 11. The README and the method's statement live in the repository
# ----------------------------------------------------------------------------------------------


def test_readme_links_stay_inside_the_repository():
    readme = (REPO / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        if "://" in target:
            continue
        path = (REPO / target).resolve()
        assert path.is_relative_to(REPO), f"README links outside the repository: {target}"
        assert path.exists(), f"README links to a missing file: {target}"
    method = (REPO / "docs" / "method.md").read_text()
    for needle in ("round(cos, 5)", "Pdst", "C = V Vᵀ / ‖V‖_F", "num_proj_layers"):
        assert needle in method
    for needle in ("Pdst", "0.35", "per adapter", "download.pytorch.org/whl/cpu",
                   "RAY_AUTH_MODE=token"):
        assert needle in readme, needle


def test_no_thread_left_behind_by_a_small_run(world, tmp_path, capsys):
    """The in-process path joins its threads: the CLI returns with only the threads it had."""
    before = {t.ident for t in threading.enumerate()}
    cat = _catalog(world, tmp_path / "cat", ["a"])
    code, _, _ = _run(_san(world, cat, tmp_path / "out", "--threshold", "0.35"), capsys)
    assert code == 0
    alive = [t for t in threading.enumerate() if t.ident not in before and not t.daemon]
    assert alive == []
