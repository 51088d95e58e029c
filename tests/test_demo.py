"""The README's first command: ``safelora-ray demo`` on a local Ray, twice (the second run
shows the incremental path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from safelora_ray.cli.main import main as cli_main

pytestmark = pytest.mark.usefixtures("ray_local")
REPO = Path(__file__).resolve().parents[1]


def test_demo_runs_and_reruns_incrementally(tmp_path, capsys):
    root = tmp_path / "demo"
    assert cli_main(["demo", "--dir", str(root), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "ok 12   skipped 0   failed 1" in out
    assert "report.html" in out and "dora-adapter" in out
    reports = sorted(p for p in (root / "sanitized" / "_reports").iterdir() if p.is_dir())
    assert len(reports) == 1
    summary = json.loads((reports[0] / "summary.json").read_text())
    assert summary["counts"] == {"total": 13, "ok": 12, "skipped": 0, "error": 1}
    assert (root / "sanitized" / "tenant-1" / "adapter-03" / "adapter_config.json").exists()
    html = (reports[0] / "report.html").read_text()
    assert "<svg" in html and "tenant-0/dora-adapter" in html

    # --json: stdout is one JSON record (the human lines go to stderr).
    assert cli_main(["demo", "--dir", str(root), "--no-progress", "--json"]) == 0
    captured = capsys.readouterr()
    record = json.loads(captured.out)
    assert (record["command"], record["ok"], record["skipped"], record["error"]) == (
        "demo", 0, 12, 1)
    assert record["unexpected"] == [] and record["report_html"].endswith("report.html")
    assert "ok 0   skipped 12   failed 1" in captured.err
    # The incremental run's report shows the fleet, not an empty run.
    latest = json.loads((root / "sanitized" / "_reports" / "latest.json").read_text())
    again = json.loads((root / "sanitized" / "_reports" / latest["summary"]).read_text())
    assert again["fleet"]["sanitized"] == 12 and again["fleet"]["modules"] == 96
    assert again["fleet"]["projected"] == summary["projected_modules"]
    assert again["previous"]["run_id"] == reports[0].name


def test_demo_leaves_no_ray_token_in_the_users_home(tmp_path):
    """Issue 20 (10): the local Ray the demo starts keeps its token out of ``~/.ray`` (Ray 2.60
    writes ``~/.ray/auth_token`` for a new local instance with no token configured; a later
    ``ray start --head`` then uses token auth and ``ray job submit`` fails). Run as a user
    would: a fresh process, a fresh HOME, no Ray token settings."""
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE", "RAY_ADDRESS")}
    env.update(HOME=str(home), TMPDIR=str(tmp), PYTHONPATH=str(REPO))  # (RAY_TMPDIR kept)
    proc = subprocess.run(
        [sys.executable, "-m", "safelora_ray", "demo", "--dir", str(tmp_path / "demo"),
         "--no-progress", "--workers", "1"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ok 12" in proc.stdout
    assert not (home / ".ray").exists(), sorted(str(p) for p in home.rglob("*"))
    assert not list(tmp.glob("safelora-ray-auth-*"))  # the private token is gone too
