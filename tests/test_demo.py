"""The README's first command: ``safelora-ray demo`` on a local Ray, twice (the second run
shows the incremental path)."""

from __future__ import annotations

import json

import pytest

from safelora_ray.cli import main as cli_main

pytestmark = pytest.mark.usefixtures("ray_local")


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
