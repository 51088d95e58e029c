"""The benchmarks stay runnable: each script at its tiniest size (``--smoke``), in a subprocess
as a user runs it. No timing assertions (the figures are in docs/benchmarks.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _run(script: str, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / f"{script}.json"
    env = {**os.environ, "BENCH_TMPDIR": str(tmp_path)}
    env.pop("RAY_ADDRESS", None)
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):  # the scripts start their own
        env.pop(var, None)
    proc = subprocess.run(
        [sys.executable, str(BENCH / f"{script}.py"), "--smoke", "--out-json", str(out),
         *extra],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "|" in proc.stdout  # the table
    result = json.loads(out.read_text())
    assert result["machine"]["cpu_count"] >= 1 and result["machine"]["torch"]
    return result


@pytest.mark.timeout(180)
def test_bench_build_smoke(tmp_path):
    r = _run("bench_build", tmp_path, "--storage", "s3")  # a moto server started by the script
    assert r["storage"] == "s3"
    s = r["summary"]
    assert s["bytes_read"] >= s["target_bytes"] > 0
    assert s["raw_seq_s_median"] > 0 and s["build_s_median"] > 0
    # --modes auto,ray: the default rule builds in this process (no Ray started), then on Ray
    auto, on_ray = r["modes"]["auto"], r["modes"]["ray"]
    assert auto["summary"]["workers"] == 0 and not auto["ray_started_by_build"]
    assert set(auto["runs"][0]["memory"]["roles"]) == {"driver"}
    roles = on_ray["runs"][0]["memory"]["roles"]
    assert on_ray["summary"]["workers"] >= 1 and "driver" in roles and "SafeLoraWorker" in roles
    for m in (auto, on_ray):  # the start-up share (build call → first read)
        assert 0 <= m["summary"]["startup_share_median"] < 1


@pytest.mark.timeout(180)
def test_bench_fleet_smoke(tmp_path):
    r = _run("bench_fleet", tmp_path, "--modes", "auto,ray,raydata", "--io-floor")
    assert r["equality"]["equal"], r["equality"]
    # the Ray Data pipeline and both of our executors wrote the same bytes
    assert r["outputs_identical_across_modes"] == {"2": True}
    auto, on_ray, raydata = r["results"]
    assert (auto["mode"], on_ray["mode"], raydata["mode"]) == ("auto", "ray", "raydata")
    for res in (auto, on_ray, raydata):
        assert res["n"] == 2 and res["total_s"] > 0 and res["baseline_s"] > 0
        assert res["set_copies"] == 1  # held once: the driver, the node's holder, one actor
        run = res["runs"][0]
        mem = run["memory"]
        # the run's RSS at its peak moment: a sum over processes sampled together
        assert mem["peak_total_rss"] == mem["peak_moment"]["rss"] > 0
        assert mem["peak_total_anon"] >= mem["peak_moment"]["anon"] > 0
        assert sum(x["rss_at_peak"] for x in mem["roles"].values()) == mem["peak_total_rss"]
        floor = run["io_floor"]
        assert floor["files"] == 4 and floor["bytes"] > 0 and floor["s"] > 0
        assert res["sanitize_over_floor_median"] > 0
    # auto: a job this small runs in the driver; ray: holders and I/O workers
    assert auto["executor"] == "cpu" and auto["runs"][0]["build"]["workers"] == 0
    assert set(auto["runs"][0]["memory"]["roles"]) == {"driver"}
    roles = on_ray["runs"][0]["memory"]["roles"]
    # a CPU node: its first I/O worker holds the set ("holder" if it got no batch itself)
    assert {"SafeLoraWorker (holder+io)", "SafeLoraWorker (holder)"} & set(roles), roles
    state = on_ray["runs"][0]["sanitize"]
    assert state["io_workers"] >= 1 and state["set_bytes_per_copy"] > 0
    assert [w["set_bytes"] > 0 for w in state["workers_state"]].count(True) == 1
    assert raydata["runs"][0]["sanitize"]["raydata"]["holders"] == 1
    assert any(k.startswith("MapWorker(MapBatches(Holder") for k in
               raydata["runs"][0]["memory"]["roles"])


@pytest.mark.timeout(180)
def test_raydata_sanitize_same_outputs(tmp_path):
    """The benchmark's Ray Data pipeline writes the product's bytes (a corrupt adapter
    included: reported, the others sanitized)."""
    r = _run("raydata_sanitize", tmp_path)
    assert r["check"]["equal"], r["check"]
    assert r["check"]["ok"] == [5, 5] and r["check"]["error"] == [1, 1]


@pytest.mark.timeout(180)
def test_bench_scale_smoke(tmp_path):
    # The exact projection's path (the fast build is what bench_build's smoke runs).
    r = _run("bench_scale", tmp_path, "--projection", "exact", "--energy", "0.9")
    assert r["inputs"]["fill"] == "holes" and r["inputs"]["files_per_model"] >= 1
    assert r["summary"]["num_modules"] == 4 and r["worker_peak_rss"] > 0
    assert len(r["exact"]["modules"]) == 4
    assert all(m["proj_rank"] >= 1 for m in r["exact"]["modules"])
    assert set(r["exact"]["per_module_s"]) == {"q_proj", "v_proj"}
    # the build bound: build time / max(read the targets, write the set's bytes)
    s = r["summary"]
    assert s["set_bytes"] > 0 and s["raw_write_s_median"] > 0
    assert s["build_over_floor_median"] > 0


@pytest.mark.timeout(180)
def test_bench_finetune_smoke(tmp_path):
    r = _run("bench_finetune", tmp_path)
    run = r["runs"][0]
    assert run["modules"] == 4 and run["bytes_read"] >= run["must_read"] > 0
    assert r["worker_peak_rss"] > 0 and run["workers"] >= 1


@pytest.mark.timeout(180)
def test_bench_salora_smoke(tmp_path):
    r = _run("bench_salora", tmp_path, "--end-to-end", "--workers", "0")
    assert r["sigma_max_rel_diff_whole_vs_layers"] < 1e-6
    assert set(r["summary"]) == {"whole", "layers"}
    assert all(s["tokens_per_s_forward"] > 0 for s in r["summary"].values())
    assert r["end_to_end"]["modules"] == 4


@pytest.mark.timeout(180)
def test_bench_report_smoke(tmp_path):
    r = _run("bench_report", tmp_path, "--no-browser")  # chromium: see docs/benchmarks.md
    first, rerun = r["runs"]
    assert first["adapters"] == 60 and rerun["skipped"] > 0
    # The incremental run reports the whole fleet, not only what it sanitized.
    assert rerun["fleet"]["sanitized"] >= rerun["skipped"] and rerun["near_tau"] > 0
    assert first["report_html_bytes"] > 0 and r["index_html_bytes"] > 0


@pytest.mark.timeout(180)
def test_bench_set_load_smoke(tmp_path):
    r = _run("bench_set_load", tmp_path, "--repeats", "2")
    assert r["set"]["modules"] == 16 and len(r["runs_s"]["old"]) == len(r["runs_s"]["new"]) == 2
    assert r["new_median_s"] > 0 and r["verify_s"] >= 0
