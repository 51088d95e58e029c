"""Where work runs: the in-process choice for small jobs, and worker sessions that share
actors (and the resident alignment set) between build and sanitize calls."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import torch

from safelora_ray import AlignmentSet, BuildConfig, SanitizeConfig, build, sanitize
from safelora_ray.cli.demo import write_adapter, write_model
from safelora_ray.core.errors import ConfigError
from safelora_ray.execution import InlineExecutor, RayExecutor, worker_session
from tests.factory import Arch, aligned_from, llama_tensors

resolve_mod = importlib.import_module("safelora_ray.execution.resolve")


def _inputs(root: Path, n: int) -> tuple[str, str, Path]:
    base = llama_tensors(Arch())
    write_model(root / "b", base)
    write_model(root / "a", aligned_from(base))
    return str(root / "b"), str(root / "a"), root / "cat"


def _catalog(set_uri: str, cat: Path, n: int) -> None:
    rows = AlignmentSet.open(set_uri).rows
    g = torch.Generator().manual_seed(3)
    for i in range(n):
        lora = {m: (torch.randn(2, r.shape[1], generator=g), torch.randn(r.shape[0], 2,
                                                                         generator=g))
                for m, r in rows.items()}
        write_adapter(cat / f"t{i}" / "a", lora, 2)


@pytest.mark.parametrize(
    ("requested", "use_gpu", "address", "small", "ray_up", "cuda", "expected"),
    [
        (0, None, "ray://x:10001", False, True, True, True),  # workers=0: always here
        (None, None, None, True, False, False, True),  # small, no cluster configured
        (None, False, None, True, False, True, True),  # CPU forced: a local GPU is no matter
        (None, None, None, False, False, False, False),  # big: a local Ray pays off
        (None, None, "auto", True, False, False, False),  # a cluster is configured
        (None, None, None, True, True, False, False),  # this process is connected to Ray
        (2, None, None, True, False, False, False),  # workers asked for
        (None, True, None, True, False, True, False),  # GPU workers asked for
        (None, None, None, True, False, True, False),  # a local GPU: Ray's GPU workers
    ],
)
def test_in_process_policy(monkeypatch, requested, use_gpu, address, small, ray_up, cuda,
                           expected):
    """The rule of every job but a build (``shape`` device or pipeline)."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(resolve_mod.ray, "is_initialized", lambda: ray_up)
    monkeypatch.setattr(resolve_mod.torch.cuda, "is_available", lambda: cuda)
    for shape in ("device", "pipeline"):
        assert resolve_mod.in_process(requested, use_gpu, address, small, shape) is expected


@pytest.mark.parametrize(
    ("requested", "use_gpu", "address", "small", "ray_up", "cuda", "session", "expected"),
    [
        (None, None, None, False, False, False, False, True),  # big, CPU only: here
        (None, None, None, False, False, True, False, True),  # big, a local GPU: here, on it
        (None, True, None, False, False, True, False, True),  # --gpu: here, on the local GPU
        (None, False, None, False, False, True, False, True),  # --cpu: here, on the CPU
        (None, None, None, True, False, True, False, True),  # small, a local GPU: here
        (0, None, None, False, False, False, True, True),  # workers=0: always here
        (2, None, None, False, False, False, False, False),  # workers asked for: Ray
        (None, None, "auto", False, False, False, False, False),  # a cluster is configured
        (None, None, None, False, True, False, False, False),  # connected to Ray
        (None, None, None, False, False, False, True, False),  # a session: today's rule, big
        (None, None, None, True, False, False, True, True),  # a session: today's rule, small
        (None, None, None, True, False, True, True, False),  # a session, a local GPU: Ray
    ],
)
def test_build_runs_here_on_a_machine_with_no_cluster(
        monkeypatch, requested, use_gpu, address, small, ray_up, cuda, session, expected):
    """``shape="build"``: on one machine with no cluster and no worker session, a build runs
    in this process whatever its size (``resolve.local_build``)."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(resolve_mod.ray, "is_initialized", lambda: ray_up)
    monkeypatch.setattr(resolve_mod.torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(resolve_mod, "active_session", lambda: object() if session else None)
    assert resolve_mod.in_process(requested, use_gpu, address, small, "build") is expected


@pytest.mark.parametrize(("cpus", "bar"), [(1, 1536), (2, 768), (4, 384), (6, 256),
                                           (64, 256)])
def test_the_in_process_bar_falls_with_the_machines_cpus(monkeypatch, cpus, bar):
    """A private Ray's start is fixed; what its processes add grows with the cores."""
    assert resolve_mod.inline_max_adapters(cpus) == bar
    monkeypatch.setattr(resolve_mod.os, "sched_getaffinity", lambda pid: set(range(cpus)))
    assert resolve_mod.inline_max_adapters() == bar


def test_ray_address_env_counts_as_a_configured_cluster(monkeypatch):
    monkeypatch.setattr(resolve_mod.ray, "is_initialized", lambda: False)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert not resolve_mod.in_process(None, None, None, True)


def test_in_process_gpu_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(resolve_mod.torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA device"):
        InlineExecutor(use_gpu=True)


def test_small_job_without_a_cluster_runs_here_and_starts_no_ray(tmp_path, monkeypatch):
    """The CLI/API default on a machine with no Ray cluster configured: a small build and
    sanitize run in this process, no Ray is started, and the outputs are complete."""
    if ray.is_initialized():  # another module's Ray is still up: not this test's situation
        pytest.skip("a Ray instance is running in this process")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    b, a, cat = _inputs(tmp_path, 3)
    res = build(BuildConfig(base=b, aligned=a, out=str(tmp_path / "set"), progress=False))
    assert res.workers == 0 and not ray.is_initialized()
    assert AlignmentSet.open(res.uri).metadata["build"]["workers"] == 0
    _catalog(res.uri, cat, 3)
    run = sanitize(SanitizeConfig(alignment=res.uri, adapters=str(cat),
                                  out=str(tmp_path / "out"), threshold=0.35, progress=False))
    assert (run.ok, run.error) == (3, 0) and not ray.is_initialized()
    for i in range(3):
        assert (tmp_path / "out" / f"t{i}" / "a" / "adapter_config.json").exists()


@pytest.mark.timeout(300)
def test_session_shares_workers_between_build_and_sanitize(tmp_path, ray_local):
    b, a, cat = _inputs(tmp_path, 4)
    with worker_session() as session:
        res = build(BuildConfig(base=b, aligned=a, out=str(tmp_path / "set"), workers=2,
                                progress=False))
        after_build = [h for _, h in session._actors]
        assert len(after_build) == 2
        _catalog(res.uri, cat, 4)
        runs = [sanitize(SanitizeConfig(alignment=res.uri, adapters=str(cat),
                                        out=str(tmp_path / f"out{k}"), threshold=0.35,
                                        batch_size=1, workers=2, progress=False))
                for k in range(2)]
        assert [(r.ok, r.error) for r in runs] == [(4, 0), (4, 0)]
        # The same worker actors did all three calls, and are still up.
        assert [h for _, h in session._actors] == after_build
        assert ray.get([w.ready.remote() for w in after_build], timeout=60) == ["cpu", "cpu"]
        # Two runs against one set, different outputs: the same files.
        for i in range(4):
            rel = Path(f"t{i}") / "a" / "adapter_model.safetensors"
            assert (tmp_path / "out0" / rel).read_bytes() == (tmp_path / "out1" / rel).read_bytes()
    # Leaving the session stops them (ray.kill is asynchronous: a call made at once may still
    # be answered).
    deadline = time.monotonic() + 60
    while True:
        try:
            ray.get(after_build[0].ready.remote(), timeout=30)
        except ray.exceptions.RayActorError:
            break
        assert time.monotonic() < deadline, "a worker was still up 60 s after its session"
        time.sleep(0.2)


@pytest.mark.timeout(300)
def test_without_a_session_each_call_stops_its_workers(tmp_path, ray_local, monkeypatch):
    b, a, _cat = _inputs(tmp_path, 1)
    seen: list[object] = []
    real = RayExecutor.__init__

    def spy(self, plan):
        real(self, plan)
        seen.extend(s.handle for s in self.slots)

    monkeypatch.setattr(RayExecutor, "__init__", spy)
    build(BuildConfig(base=b, aligned=a, out=str(tmp_path / "set"), workers=1,
                      progress=False))
    assert len(seen) == 1
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(seen[0].ready.remote(), timeout=60)


@pytest.mark.timeout(300)
def test_session_notices_a_set_rebuilt_at_the_same_uri(tmp_path, ray_local):
    """Workers keep a set resident by URI *and* content id: another set built at the same URI
    (the old one deleted) is loaded afresh, never served from the cache."""
    import shutil

    b, a, cat = _inputs(tmp_path, 2)
    set_uri = str(tmp_path / "set")
    with worker_session():
        first = build(BuildConfig(base=b, aligned=a, out=set_uri, workers=1, progress=False))
        _catalog(first.uri, cat, 2)  # q_proj and v_proj modules
        run1 = sanitize(SanitizeConfig(alignment=set_uri, adapters=str(cat),
                                       out=str(tmp_path / "o1"), threshold=0.35, workers=1,
                                       progress=False))
        assert (run1.ok, run1.error) == (2, 0)
        shutil.rmtree(set_uri)
        second = build(BuildConfig(base=b, aligned=a, out=set_uri, targets="q_proj", workers=1,
                                   progress=False))
        assert second.content_id != first.content_id
        run2 = sanitize(SanitizeConfig(alignment=set_uri, adapters=str(cat),
                                       out=str(tmp_path / "o2"), threshold=0.35, workers=1,
                                       progress=False))
    assert run2.alignment_id == second.content_id
    # the new set has no v_proj: every adapter is refused, as it must be
    assert (run2.ok, run2.error) == (0, 2)
    assert all("no entry in alignment set" in msg for _, msg in run2.errors)


def _logs_from_a_helper_thread(ctx: object) -> str:
    """Runs on a worker: a record from the call's thread and one from a thread it starts."""
    import logging
    import threading

    log = logging.getLogger("safelora_ray.tests.helper")
    log.warning("from the call's own thread")
    t = threading.Thread(target=lambda: log.warning("from a helper thread of the call"))
    t.start()
    t.join()
    return "done"


@pytest.mark.timeout(300)
def test_records_of_helper_threads_reach_the_driver(ray_local, caplog):
    from safelora_ray.execution import WorkerPlan
    from safelora_ray.execution.placement import WorkerSpec

    caplog.set_level("WARNING", logger="safelora_ray")
    ex = RayExecutor(WorkerPlan((WorkerSpec(None, 1.0, 0.0, "device"),)))
    try:
        ref = ex.submit(0, _logs_from_a_helper_thread)
        assert ex.result(ref, 120) == "done"
    finally:
        ex.close(True)
    text = caplog.text
    assert "from the call's own thread" in text and "from a helper thread of the call" in text


#: A build in a fresh process with no cluster configured, as ``build`` on one machine runs it:
#: counted as big (the rule holds whatever the size); prints where it ran.
_BUILD_HERE = """
import json, sys
import ray
import safelora_ray.pipelines.build.driver as driver
from safelora_ray import BuildConfig, build
driver.INLINE_MAX_BUILD_BYTES = 0
res = build(BuildConfig(base=sys.argv[1], aligned=sys.argv[2], out=sys.argv[3],
                        progress=False))
print(json.dumps({"workers": res.workers, "ray": ray.is_initialized(),
                  "content_id": res.content_id, "startup_s": res.stats.get("startup_s")}))
"""


@pytest.mark.timeout(300)
def test_build_with_no_cluster_starts_no_ray_and_equals_a_ray_build(tmp_path, ray_local):
    """Issue 22: a build (however big) on a machine with no Ray cluster configured runs in
    its own process and starts no Ray; its set has the bytes of a build on a Ray worker."""
    b, a, _cat = _inputs(tmp_path, 0)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", _BUILD_HERE, b, a, str(tmp_path / "here")],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    here = json.loads(proc.stdout.strip().splitlines()[-1])
    assert here["workers"] == 0 and here["ray"] is False
    assert here["startup_s"] is not None and here["startup_s"] >= 0
    res = build(BuildConfig(base=b, aligned=a, out=str(tmp_path / "ray"), workers=1,
                            progress=False))
    assert res.workers == 1 and res.stats["startup_s"] >= 0
    assert res.content_id == here["content_id"]
    def files(root: Path) -> list[str]:  # the shards and the manifest (not the timings)
        return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                      if p.suffix in (".safetensors", ".parquet"))

    names = files(tmp_path / "here")
    assert any(n.endswith(".safetensors") for n in names) and "manifest.parquet" in names
    assert names == files(tmp_path / "ray")
    for n in names:
        assert (tmp_path / "here" / n).read_bytes() == (tmp_path / "ray" / n).read_bytes(), n
