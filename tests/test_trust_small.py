"""Issue #20, items 3 and 7: an unreadable tenant is a failed entry, never a silent skip; and
the smaller cases (an existing --run-id, manifest ids, ``inspect`` of manifests and of
LoRA-less adapters, a closed pipe, the threshold hint, the nightly's config and catalog
entries, ``-q`` and Ray's start-up chatter, absolute URIs in the summaries).

Runs are small and run in this process, except where the case is about the process itself
(permissions, a closed pipe, Ray's output): those run the CLI in a subprocess.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch

from safelora_ray import AlignmentSet
from safelora_ray.cli.demo import write_model
from tests.factory import Arch, aligned_from, llama_tensors
from tests.test_guardrails import _catalog, _run, tiny_world

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return tiny_world(tmp_path_factory.mktemp("small"))


def _san(world: dict[str, Any], adapters: Path | str, out: Path | str, *extra: str) -> list[str]:
    return ["sanitize", "--alignment", world["set"], "--adapters", str(adapters),
            "--out", str(out), "--no-progress", "--threshold", "0.35", *extra]


def _cli(args: list[str], env: dict[str, str] | None = None, timeout: float = 180,
         prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*(prefix or []), sys.executable, "-m", "safelora_ray", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


# ----------------------------------------------------------------------------------------------
# 3. An unreadable tenant is a failed entry with its cause, exit 3
# ----------------------------------------------------------------------------------------------


def _without_dac_override() -> list[str]:
    """A command prefix that runs without the capabilities that bypass file permissions (as
    root, like CI, a ``chmod 000`` folder is readable otherwise); nothing for another user."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv"):
        return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
    if shutil.which("capsh"):  # pragma: no cover - where util-linux's setpriv is missing
        return ["capsh", "--drop=cap_dac_override,cap_dac_read_search", "--"]
    pytest.skip("neither setpriv nor capsh: cannot drop CAP_DAC_OVERRIDE as root")


def _check_denied(prefix: list[str], path: Path) -> None:
    probe = subprocess.run([*prefix, "ls", str(path)], capture_output=True, text=True,
                           timeout=30)
    if probe.returncode == 0:  # pragma: no cover - a container that keeps the capability
        pytest.skip("permissions are not enforced for this process here")


@pytest.mark.parametrize("mode", [0o000, 0o400], ids=["chmod-000", "read-not-search"])
def test_unreadable_tenant_is_a_failed_entry(world, tmp_path, mode):
    cat = _catalog(world, tmp_path / "cat", ["acme/chat-0", "globex/chat-0", "initech/chat-0",
                                             "umbrella/chat-0"])
    prefix = _without_dac_override()
    (cat / "globex").chmod(mode)
    try:
        _check_denied(prefix, cat / "globex" / "chat-0")
        proc = _cli(_san(world, cat, tmp_path / "out", "--json", "-v"), prefix=prefix)
        code = proc.returncode
        summary = json.loads(proc.stdout) if proc.stdout.strip() else {}
        insp = _cli(["inspect", str(cat), "--json"], prefix=prefix)
    finally:
        (cat / "globex").chmod(0o755)
    assert code == 3, proc.stderr[-3000:]
    assert summary["counts"] == {"total": 4, "ok": 3, "skipped": 0, "error": 1}
    [err] = summary["errors"]
    assert err["adapter_id"] in ("globex", "globex/chat-0")
    assert "permission denied" in err["error"] and "globex" in err["error"]
    assert "permission denied" in proc.stderr  # said, not only in the report
    [table] = (tmp_path / "out" / "_reports").glob("*/adapters.parquet")
    rows = pq.read_table(table).to_pylist()
    assert any(r["status"] == "error" and "permission denied" in (r["error"] or "")
               for r in rows), rows
    # inspect says so too, instead of counting the readable adapters as the catalog.
    assert insp.returncode == 0, insp.stderr
    d = json.loads(insp.stdout)
    assert d["kind"] == "catalog" and d["adapters"] == "3"
    assert [u["entry"] for u in d["unreadable"]] in (["globex"], ["globex/chat-0"])


def test_access_denied_tenant_on_s3_is_a_failed_entry(world, tmp_path, capsys, s3_server,
                                                      s3_bucket, s3_admin_client, monkeypatch):
    from tests.s3_fault_proxy import FaultSchedule, S3FaultProxy

    cat = _catalog(world, tmp_path / "cat", ["acme/chat-0", "globex/chat-0", "initech/chat-0"])
    for f in sorted(cat.rglob("*")):
        if f.is_file():
            s3_admin_client.upload_file(str(f), s3_bucket, f"tenants/{f.relative_to(cat)}")
    # A bucket policy that denies globex's keys (objects and listings of its prefix).
    schedule = FaultSchedule(max_faults=0, deny_prefixes=(f"{s3_bucket}/tenants/globex/",))
    with S3FaultProxy(s3_server, schedule, lifetime_s=300) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        code, out, err = _run(_san(world, f"s3://{s3_bucket}/tenants", tmp_path / "out",
                                   "--json"), capsys)
        code_i, _, err_i = _run(["inspect", f"s3://{s3_bucket}/tenants/globex/chat-0"],
                                    capsys)
    assert proxy.stats.denied > 0
    assert code == 3, err
    summary = json.loads(out)
    assert summary["counts"]["ok"] == 2 and summary["counts"]["error"] == 1
    [e] = summary["errors"]
    assert e["adapter_id"] == "globex/chat-0" and "access denied" in e["error"]
    assert code_i == 1 and "access denied" in err_i and "Traceback" not in err_i


def test_quiet_silences_rays_start_up(world, tmp_path):
    """``-q`` on a new local Ray with no token configured (Ray then enables token auth and
    says so): nothing but the run's own warnings and errors (here: none)."""
    cat = _catalog(world, tmp_path / "cat", ["acme/chat-0"])
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN_PATH",
                                                            "RAY_AUTH_MODE")}
    proc = subprocess.run(
        [sys.executable, "-m", "safelora_ray", *_san(world, cat, tmp_path / "out"), "-q",
         "--workers", "1"], capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**env, "PYTHONPATH": str(REPO), "HOME": str(home)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.strip() == "", proc.stderr
    assert "Ray" not in proc.stdout and proc.stdout.startswith("run "), proc.stdout  # the summary


# ----------------------------------------------------------------------------------------------
# 7. Smaller cases
# ----------------------------------------------------------------------------------------------


def test_an_existing_run_id_is_refused(world, tmp_path, capsys):
    cat = _catalog(world, tmp_path / "cat", ["acme/chat-0"])
    out = tmp_path / "out"
    assert _run(_san(world, cat, out, "--run-id", "r1"), capsys)[0] == 0
    summary = out / "_reports" / "r1" / "summary.json"
    before = summary.read_bytes()
    code, _, err = _run(_san(world, cat, out, "--run-id", "r1", "--force"), capsys)
    assert code == 2 and "--run-id r1" in err and "already holds" in err, err
    assert summary.read_bytes() == before  # that run's report is untouched
    assert _run(_san(world, cat, out, "--run-id", "r2"), capsys)[0] == 0


def test_nightly_refuses_an_existing_run_id(tmp_path, capsys):
    cfg = tmp_path / "nightly.yaml"
    cfg.write_text(json.dumps({
        "output_root": str(tmp_path / "out"), "alignment_root": str(tmp_path / "sets"),
        "catalogs": [{"name": "main", "uri": str(tmp_path / "cat")}],
        "pairs": [{"name": "p", "base": str(tmp_path / "b"), "aligned": str(tmp_path / "a")}],
        "selection": {"threshold": 0.35}}))
    record = tmp_path / "out" / "_nightly" / "runs" / "n1.json"
    record.parent.mkdir(parents=True)
    record.write_text('{"run_id": "n1"}')
    code, _, err = _run(["nightly", "--config", str(cfg), "--run-id", "n1", "--no-progress"],
                        capsys)
    assert code == 2 and "--run-id n1" in err and "already holds" in err, err
    assert record.read_text() == '{"run_id": "n1"}'
    assert not (tmp_path / "out" / "_nightly" / "lock.json").exists()


def test_manifest_ids_keep_the_tenant_prefix(world, tmp_path, capsys):
    from safelora_ray.planning.catalog import AdapterRef, iter_catalog

    cat = _catalog(world, tmp_path / "cat", ["acme/chat-0", "globex/chat-0"])
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"uri": str(cat / n)}) + "\n"
                                for n in ("acme/chat-0", "globex/chat-0")))
    assert list(iter_catalog(str(manifest))) == [
        AdapterRef("acme/chat-0", str(cat / "acme/chat-0"), ""),
        AdapterRef("globex/chat-0", str(cat / "globex/chat-0"), "")]
    code, out, err = _run(_san(world, manifest, tmp_path / "out", "--json"), capsys)
    assert code == 0, err
    assert json.loads(out)["counts"]["ok"] == 2
    for n in ("acme/chat-0", "globex/chat-0"):
        assert (tmp_path / "out" / n / "adapter_model.safetensors").is_file()
    # Ids that would still collide (one folder listed twice, or a derived id that is
    # another entry's id) are refused before any work: no output, no report.
    for lines in ([{"uri": str(cat / "acme/chat-0")}, {"uri": str(cat / "acme/chat-0") + "/"}],
                  [{"uri": str(cat / "acme/chat-0"), "id": "globex/chat-0"},
                   {"uri": str(cat / "globex/chat-0")}, {"uri": str(cat / "acme/chat-0")}]):
        manifest.write_text("".join(json.dumps(r) + "\n" for r in lines))
        out2 = tmp_path / "out2"
        code, _, err = _run(_san(world, manifest, out2), capsys)
        assert code == 2 and "would both be adapter" in err and "distinct 'id'" in err, err
        assert not out2.exists()


def test_inspect_a_manifest_and_an_adapter_without_lora(world, tmp_path, capsys):
    import pyarrow as pa

    cat = _catalog(world, tmp_path / "cat", ["acme/chat-0", "globex/chat-0"])
    jsonl, parquet = tmp_path / "m.jsonl", tmp_path / "m.parquet"
    jsonl.write_text(json.dumps({"uri": str(cat / "acme/chat-0")}) + "\n"
                     + json.dumps({"uri": str(cat / "globex/chat-0"), "id": "../x"}) + "\n")
    pq.write_table(pa.table({"uri": [str(cat / "acme/chat-0"), str(cat / "globex/chat-0")]}),
                   parquet)
    code, out, _ = _run(["inspect", str(jsonl), "--json"], capsys)
    d = json.loads(out)
    assert code == 0 and d["kind"] == "catalog" and d["format"] == "manifest"
    assert d["adapters"] == "1" and d["invalid"][0]["entry"] == "../x"
    code, out, _ = _run(["inspect", str(parquet)], capsys)
    assert code == 0 and out.startswith("catalog manifest") and "adapters       2" in out
    assert "not a catalog" not in out
    # An adapter whose weights hold no lora_A/lora_B: the reader refuses it; so does inspect.
    from safetensors.torch import save_file

    bare = cat / "acme" / "chat-0"
    save_file({"base_model.model.lm_head.weight": torch.zeros(2, 2)},
              str(bare / "adapter_model.safetensors"))
    code, out, _ = _run(["inspect", str(bare)], capsys)
    assert code == 0 and "can be sanitized" not in out
    assert "would be refused" in out and "no LoRA modules" in out, out
    code, out, _ = _run(_san(world, bare, tmp_path / "o3"), capsys)
    assert code == 3 and "no LoRA modules" in out  # the same verdict as the run's


def test_closed_stdout_exits_141_without_a_traceback(world, tmp_path):
    """``inspect … --json | head -c 10``: the reader is gone before the output is written
    (here closed at once, so it always is): exit 141 (128 + SIGPIPE), no traceback (stderr
    holds the human text, as always with --json). A catalog and an alignment set (whose
    Parquet manifest starts pyarrow's thread pool: see the next test)."""
    cat = _catalog(world, tmp_path / "cat", ["acme/chat-0", "globex/chat-0"])
    for path, kind in [(cat, "catalog"), (cat, "catalog"), (world["set"], "alignment set")]:
        r, w = os.pipe()
        os.close(r)
        try:
            proc = subprocess.run([sys.executable, "-m", "safelora_ray", "inspect", str(path),
                                   "--json"], stdout=w, stderr=subprocess.PIPE, text=True,
                                  timeout=120, cwd=REPO,
                                  env={**os.environ, "PYTHONPATH": str(REPO)})
        finally:
            os.close(w)
        assert proc.returncode == 141, proc.stderr
        assert proc.stderr.startswith(kind) and "Error" not in proc.stderr, proc.stderr
    # A reader that takes everything: exit 0 as always.
    proc = _cli(["inspect", str(cat), "--json"])
    assert proc.returncode == 0 and json.loads(proc.stdout)["adapters"] == "2", proc.stderr


def test_a_command_that_succeeded_exits_0_every_time(world):
    """pyarrow's thread pool, torn down at the interpreter's exit, aborted about one
    ``inspect`` of a set in three ("terminate called without an active exception", exit 134,
    apache/arrow#34314): the command line now exits without that teardown. Ten at once, each
    reading the set's manifest; every one exits 0 with its whole output."""
    procs = [subprocess.Popen([sys.executable, "-m", "safelora_ray", "inspect", world["set"],
                               "--modules", "--json"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
             for _ in range(10)]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        assert "terminate called" not in err and json.loads(out)["modules"], err[-2000:]


@pytest.mark.parametrize(("value", "hint"), [
    ("35", "did you mean 0.35?"), ("-50", "did you mean -0.5?"), ("-2", None), ("3.5", None),
    ("150", None),
])
def test_threshold_hint_only_for_a_percentage(world, tmp_path, capsys, value, hint):
    cat = _catalog(world, tmp_path / "cat", ["a"])
    argv = [a for a in _san(world, cat, tmp_path / "out") if a != "0.35"]
    argv[argv.index("--threshold") + 1:argv.index("--threshold") + 1] = [value]
    code, _, err = _run(argv, capsys)
    assert code == 2 and "outside [-1, 1]" in err, err
    assert (hint in err) if hint else ("did you mean" not in err), err


def test_nightly_threshold_hint_and_config_errors(tmp_path, capsys, caplog):
    from safelora_ray.cli.nightly import NightlyConfig
    from safelora_ray.core.errors import ConfigError

    config = {
        "output_root": str(tmp_path / "out"), "alignment_root": str(tmp_path / "sets"),
        "catalogs": [{"name": "main", "uri": str(tmp_path / "cat")}],
        "pairs": [{"name": "p", "base": str(tmp_path / "b"), "aligned": str(tmp_path / "a")}],
        "selection": {"threshold": 0.35}}
    NightlyConfig.from_dict(config)
    with pytest.raises(ConfigError, match=r"selection.threshold 3.5 is outside") as e:
        NightlyConfig.from_dict({**config, "selection": {"threshold": 3.5}})
    assert "did you mean" not in str(e.value)
    bad = [
        ({**config, "catalogs": [{"name": "main", "urii": "/x"}]},
         "catalogs[main]: unknown key 'urii' (did you mean 'uri'?)"),
        ({**config, "pairs": [{**config["pairs"][0], "base_model_id": ["x"]}]},
         "pairs[p]: unknown key 'base_model_id' (did you mean 'base_model_ids'?)"),
        ({**config, "models": [{"name": "m", "uri": "/m", "pair": "p", "allow_emtpy": True}]},
         "models[m]: unknown key 'allow_emtpy'"),
        ({**config, "lock": {"ttl": 5}}, "lock: unknown key 'ttl'"),
    ]
    for cfg, message in bad:
        with pytest.raises(ConfigError, match=re.escape(message)):
            NightlyConfig.from_dict(cfg)
    # An old config's ttl_s of hours (when it was the run's whole length) is said.
    with caplog.at_level(logging.WARNING, logger="safelora_ray.cli.nightly"):
        assert NightlyConfig.from_dict({**config, "lock": {"ttl_s": 21600}}).lock_ttl_s == 21600
    assert "a run that dies on another host keeps the lock that long" in caplog.text
    # A missing --config is a usage error (2), as documented, with a one-line message.
    code, _, err = _run(["nightly", "--config", str(tmp_path / "missing.yaml")], capsys)
    assert code == 2 and "--config" in err and "missing.yaml" in err, err
    assert "Traceback" not in err


def test_summaries_record_absolute_uris(world, tmp_path, capsys, monkeypatch):
    """Inputs given as relative paths are recorded as absolute ones (a summary read later,
    elsewhere, must say where its inputs were); the set's content id does not depend on it."""
    root = world["root"]
    aligned = aligned_from(llama_tensors(Arch()))
    write_model(root / "ft", aligned_from(aligned, seed=3))
    _catalog(world, root / "cat", ["acme/chat-0"])
    monkeypatch.chdir(root)
    code, out, err = _run(["build", "--base", "base", "--aligned", "aligned", "--out", "set2",
                           "--json"], capsys)
    assert code == 0, err
    meta = json.loads((root / "set2" / "alignment.json").read_text())
    assert meta["base"]["uri"] == str(root / "base")
    assert meta["aligned"]["uri"] == str(root / "aligned")
    assert json.loads(out)["content_id"] == AlignmentSet.open(world["set"]).content_id
    code, _, err = _run(["sanitize", "--alignment", "set", "--adapters", "cat", "--out", "o",
                         "--threshold", "0.35", "--run-id", "r", "--no-progress"], capsys)
    assert code == 0, err
    summary = json.loads((root / "o" / "_reports" / "r" / "summary.json").read_text())
    assert summary["catalog"] == str(root / "cat")
    assert summary["alignment"]["uri"] == str(root / "set")
    code, _, err = _run(["project-model", "--alignment", "set", "--aligned", "aligned",
                         "--finetuned", "ft", "--out", "pm", "--threshold", "0.35",
                         "--no-progress"], capsys)
    assert code == 0, err
    summary = json.loads((root / "pm" / "_safelora" / "summary.json").read_text())
    assert summary["aligned"]["uri"] == str(root / "aligned")
    assert summary["finetuned"]["uri"] == str(root / "ft")
    assert summary["aligned"]["matches_set"] == "same"
