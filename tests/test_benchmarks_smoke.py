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


@pytest.mark.timeout(180)
def test_bench_fleet_cpu_proxy_smoke(tmp_path):
    """The CPU proxy of a GPU node's host path: the null product, a fake GPU, the set built
    once, per-thread CPU of the sanitize and the I/O floor in the JSON."""
    r = _run("bench_fleet", tmp_path, "--modes", "ray", "--null-product", "--fake-gpu",
             "--io-floor")
    assert r["null_product"] and r["fake_gpu"] and r["set_once"]["s"] > 0
    assert r["equality"]["skipped"]  # B unprojected: nothing to compare with the baseline
    (res,) = r["results"]
    run = res["runs"][0]
    assert run["set_once"] and run["sanitize_s"] > 0 and run["io_floor_s"] > 0
    busiest, total = run["max_thread_cpu_ms_per_adapter"], run["total_cpu_ms_per_adapter"]
    assert 0 < busiest <= total
    cpu = run["cpu"]
    assert cpu["adapters"] == 2 and cpu["samples"] >= 2 and cpu["threads_seen"] > 10
    assert cpu["max_thread_cpu_s"] == cpu["threads"][0]["cpu_s"]
    assert sum(p["cpu_s"] for p in cpu["processes"]) == pytest.approx(cpu["total_cpu_s"],
                                                                      abs=0.01)
    roles = {p["role"] for p in cpu["processes"]}
    # a GPU node's topology: the holder apart from the I/O worker
    assert {"driver", "SafeLoraWorker (holder)", "SafeLoraWorker (io)"} <= roles, roles
    assert all(p["busiest_thread_cpu_s"] <= p["cpu_s"] + 0.02 for p in cpu["processes"])
    cost = run["memory"]["cost"]
    assert cost["thread_samples"] == cpu["samples"] and cost["memory_sampling_s"] > 0
    assert res["max_thread_cpu_ms_per_adapter"] == busiest and res["io_floor_s"] > 0


def _benchlib():
    import sys
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    from benchlib import cpu, gil, monitor
    return cpu, gil, monitor


def _burn(cpu_s: float) -> None:
    import time
    t0 = time.thread_time()
    while time.thread_time() - t0 < cpu_s:
        pass


def test_thread_cpu_sampler_finds_the_busiest_thread():
    """A thread born inside the block that burns ~0.3 s of CPU is the busiest, with about
    that CPU; what the main thread burned before the block does not count."""
    import threading
    cpu, _, monitor = _benchlib()
    _burn(0.2)  # before the block: not counted
    mon = monitor.ProcessMonitor(pids=[os.getpid()], thread_interval=0.1)
    done = threading.Event()
    burner = threading.Thread(target=lambda: (_burn(0.3), done.wait(10)), name="burner")
    with mon, mon.block("x") as blk:
        burner.start()
        while burner.is_alive() and not any(t["tid"] == burner.native_id and t["cpu_s"] > 0.25
                                             for t in blk.thread_rows()):
            __import__("time").sleep(0.05)
    done.set()
    burner.join()
    s = cpu.summarize(mon.blocks["x"], 10, mon.role_of, [mon.monitor_tid])
    top = s["threads"][0]
    assert top["tid"] == burner.native_id, s["threads"][:3]
    assert 0.2 <= top["cpu_s"] <= 0.6
    assert top["ms_per_adapter"] == pytest.approx(top["cpu_s"] * 100, rel=0.01)
    assert s["max_thread_cpu_s"] == top["cpu_s"] <= s["total_cpu_s"] < 1.0
    assert all(t["tid"] != mon.monitor_tid for t in s["threads"])
    (proc,) = s["processes"]
    assert proc["role"] == "driver" and proc["busiest_thread_cpu_s"] == top["cpu_s"]


def test_gil_share_from_py_spy_raw():
    _, gil, _ = _benchlib()
    raw = ("thread (101): MainThread;f (a.py:1) 30\n"
           "thread (0x66): worker;g (a.py:2);h (a.py:3) 10\n"
           "thread (101): MainThread;k (a.py:4) 5\n")
    total, per, names = gil.parse_raw(raw)
    assert total == 45 and per == {101: 35, 102: 10}
    assert names == {101: "MainThread", 102: "worker"}


@pytest.mark.timeout(60)
def test_gil_sampler_on_a_python_process(tmp_path):
    """py-spy on a process whose one thread spins in Python: the GIL is held most of the
    time, by that thread."""
    _, gil, _ = _benchlib()
    if gil.py_spy() is None:
        pytest.skip("py-spy is not installed")
    import sys
    import time
    code = ("import threading, time\n"
            "def spin():\n    t = time.time()\n    while time.time() - t < 20: pass\n"
            "threading.Thread(target=spin, name='spinner').start()\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    spies: list[int] = []
    try:
        time.sleep(0.5)
        s = gil.GilSampler(tmp_path, lambda: [(proc.pid, "driver")], gil.python_role,
                           spies.append, rate=50)
        with s:
            time.sleep(2.0)
        res = s.results()[proc.pid]
    finally:
        proc.kill()
        proc.wait()
    if "error" in res or not res.get("gil_samples"):
        pytest.skip(f"py-spy could not sample here (ptrace rights?): {res.get('stderr')}")
    assert len(spies) == 1 and res["samples"] >= 50
    assert res["gil_share"] > 0.5
    spinner = [tid for tid, name in res["thread_names"].items() if name == "spinner"]
    assert spinner and res["threads"][spinner[0]] > 0.5


@pytest.mark.timeout(180)
def test_bench_s3_smoke(tmp_path):
    r = _run("bench_s3", tmp_path, "--modes", "inline")  # SeaweedFS started by the script
    assert r["server"].startswith("seaweedfs") and r["n"] == 8
    (run,) = r["runs"]
    assert run["sanitize_s"] > 0 and run["floor_s"] > 0 and run["ratio"] > 0
    # the floor taken again after the sanitize, and the run held to the mean of both
    assert run["floor_after_s"] > 0
    mean = (run["floor_s"] + run["floor_after_s"]) / 2
    assert run["floor_mean_fraction"] == pytest.approx(mean / run["sanitize_s"])
    # SeaweedFS's own growth, volumes of 4 GiB unless the disk is small
    assert r["server_volumes"]["per_growth"] == 7
    assert 64 <= r["server_volumes"]["size_mb"] <= 4096
    assert r["reader"]["ranges"] > 0 and r["reader"]["ratio"] > 0
