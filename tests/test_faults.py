"""Faults during a fleet run (issue #5): killed workers and drivers, S3 errors, full disks.

Each test runs the fleet once with the fault and once without, and checks that the faulty run
completed (or failed only the adapters the fault hit, cleanly), that its outputs are byte for
byte those of the clean run (no bytes lost), that nothing was reported or written twice and
that no temporary file was left behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from safelora_ray import BuildConfig, build
from safelora_ray.execution.ray_utils import worker_runtime_env
from safelora_ray.pipelines.sanitize.driver import SanitizeResult
from tests.s3_fault_proxy import KINDS, FaultSchedule, S3FaultProxy, wait_for
from tests.test_reliability import (
    World,
    bytes_lost,
    check_sanitized,
    good_modules,
    leftovers,
    make_world,
    outputs_under,
    record_figures,
    report_rows,
    run_sanitize,
    tree_hash,
)

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> World:
    return make_world(tmp_path_factory.mktemp("world"))


def _catalog(root: Path, world: World, n: int, tenants: int = 4) -> list[str]:
    """``n`` small q/v adapters spread over ``tenants`` tenants; returns their ids."""
    from safelora_ray.cli.demo import write_adapter

    ids = []
    for i in range(n):
        adapter_id = f"t{i % tenants}/a{i:03d}"
        write_adapter(root / adapter_id, good_modules(world, seed=1000 + i), 4)
        ids.append(adapter_id)
    return sorted(ids)


def _outputs(out: Path, ids: list[str]) -> dict[str, Path]:
    return {i: out / i for i in ids}


def _same_outputs(out: Path, clean: Path, ids: list[str]) -> None:
    for adapter_id in ids:
        assert tree_hash(out / adapter_id) == tree_hash(clean / adapter_id), adapter_id
    assert bytes_lost(_outputs(clean, ids), out) == 0


# ----------------------------------------------------------------------------------------------
# A Ray worker killed mid-run
# ----------------------------------------------------------------------------------------------


def _descendants(pid: int) -> dict[int, str]:
    """Live descendants of ``pid`` and their command lines (from /proc, no psutil)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != b"Z":
            children.setdefault(int(fields[1]), []).append(int(d))
    out: dict[int, str] = {}
    todo = [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            with contextlib.suppress(OSError), open(f"/proc/{c}/cmdline", "rb") as f:
                out[c] = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            todo.append(c)
    return out


def _sanitize_actor_pids() -> set[int]:
    """The SafeLoraWorker processes of this test process's own Ray instance."""
    return {p for p, cmd in _descendants(os.getpid()).items()
            if cmd.startswith("ray::SafeLoraWorker")}


def _ledger_count(out: Path) -> int:
    d = out / "_ledger"
    return sum(len(f) for _, _, f in os.walk(d)) if d.exists() else 0


@pytest.mark.timeout(300)
def test_worker_killed_mid_run(tmp_path: Path, world: World) -> None:
    n = 48
    cat = tmp_path / "catalog"
    ids = _catalog(cat, world, n)
    before = tree_hash(cat)
    kw: dict[str, Any] = {"workers": 2, "batch_size": 1, "max_in_flight": 2}
    clean = tmp_path / "clean"
    res_clean = run_sanitize(world.alignment, cat, clean, run_id="clean", **kw)
    assert res_clean.ok == n

    out = tmp_path / "out"
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = run_sanitize(world.alignment, cat, out, run_id="killed", **kw)
        except BaseException as e:  # surfaced below
            box["error"] = e

    t = threading.Thread(target=run, name="sanitize-under-fault")
    t.start()
    killed: list[int] = []
    try:
        assert wait_for(lambda: _ledger_count(out) >= 4 or not t.is_alive(), timeout=120)
        assert t.is_alive(), "the run ended before a worker could be killed"
        # A worker's process, killed as soon as one is seen: waiting for the second one too
        # (it may still be starting when the first outputs land) let a fast run finish first.
        wait_for(lambda: bool(_sanitize_actor_pids()) or not t.is_alive(), timeout=30)
        victims = sorted(_sanitize_actor_pids())
        assert victims, ("no sanitize worker process found" if t.is_alive()
                         else "the run ended before a worker could be killed")
        os.kill(victims[0], signal.SIGKILL)
        killed.append(victims[0])
        done_at_kill = _ledger_count(out)
        # Ray restarts the actor (max_restarts) and retries its batches (max_task_retries).
        restarted = wait_for(lambda: len(_sanitize_actor_pids() - set(killed)) >= 2
                             or not t.is_alive(), timeout=120)
    finally:
        t.join(timeout=240)
    assert not t.is_alive(), "the run did not finish"
    assert "error" not in box, box.get("error")
    res: SanitizeResult = box["result"]
    assert restarted
    assert done_at_kill < n, "the kill came after the run's last adapter"
    # Every adapter exactly once, none failed; those finished before the kill and retried may
    # be reported as skipped (already done), the rest ok.
    rows = report_rows(out, "killed")
    assert sorted(rows) == ids and res.error == 0 and res.ok + res.skipped == n
    assert outputs_under(out) == set(ids)
    _same_outputs(out, clean, ids)
    for adapter_id in ids[:3]:
        check_sanitized(cat / adapter_id, out / adapter_id, world)
    assert not leftovers(out) and tree_hash(cat) == before
    record_figures("worker_killed", adapters=n, workers_killed=len(killed),
                   done_at_kill=done_at_kill, ok=res.ok, skipped=res.skipped, error=res.error,
                   bytes_lost=bytes_lost(_outputs(clean, ids), out), runs_completed=2)


# ----------------------------------------------------------------------------------------------
# The driver killed mid-run, then the run again
# ----------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_driver_killed_then_rerun(tmp_path: Path, world: World) -> None:
    """A driver attached to this module's Ray cluster is SIGKILLed mid-run; its workers die
    with it (they belong to its job). Running again resumes: what was finished is skipped, the
    rest is done, every adapter is reported once, and no temporary file is left."""
    import ray

    n = 40
    cat = tmp_path / "catalog"
    ids = _catalog(cat, world, n)
    before = tree_hash(cat)
    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    args = [sys.executable, "-m", "safelora_ray.cli.main", "sanitize", "--alignment",
            world.alignment, "--adapters", str(cat), "--out", str(out), "--threshold", "0.35",
            "--workers", "1", "--batch-size", "1", "--max-in-flight", "1", "--run-id", "killed",
            "--no-progress", "--log-level", "WARNING"]
    with open(tmp_path / "driver.log", "wb") as log:
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            started = wait_for(lambda: _ledger_count(out) >= 3 or proc.poll() is not None,
                               timeout=150, interval=0.005)
            running = proc.poll() is None
            os.killpg(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    assert started and running, (tmp_path / "driver.log").read_text()[-3000:]
    finished = outputs_under(out)
    assert 3 <= len(finished) < n, len(finished)
    # Only complete adapters are visible; the killed run published no report.
    assert not (out / "_reports" / "killed").exists()
    rerun = run_sanitize(world.alignment, cat, out, run_id="rerun", workers=1, batch_size=1,
                         max_in_flight=1)
    rows = report_rows(out, "rerun")
    assert sorted(rows) == ids and rerun.error == 0
    assert rerun.skipped >= len(finished) and rerun.ok + rerun.skipped == n
    assert all(rows[i]["status"] == "skipped" for i in finished)
    assert not leftovers(out)
    assert sorted(p.name for p in (out / "_reports").iterdir() if p.is_dir()) == ["rerun"]
    clean = tmp_path / "clean"
    assert run_sanitize(world.alignment, cat, clean, run_id="clean", workers=1,
                        batch_size=1).ok == n
    _same_outputs(out, clean, ids)
    assert tree_hash(cat) == before
    record_figures("driver_killed", adapters=n, finished_before_kill=len(finished),
                   rerun_ok=rerun.ok, rerun_skipped=rerun.skipped, rerun_error=rerun.error,
                   bytes_lost=bytes_lost(_outputs(clean, ids), out), runs_completed=2)


# ----------------------------------------------------------------------------------------------
# S3 errors and throttling (through the fault proxy)
# ----------------------------------------------------------------------------------------------


def _upload(client: Any, bucket: str, prefix: str, root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            client.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(root).as_posix()}")


def _objects(client: Any, bucket: str, prefix: str) -> dict[str, bytes]:
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                   Prefix=prefix + "/"):
        for obj in page.get("Contents", ()):
            out[obj["Key"][len(prefix) + 1:]] = client.get_object(
                Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


@pytest.mark.timeout(400)
def test_s3_errors_and_throttling_are_retried(tmp_path: Path, world: World, s3_bucket: str,
                                              s3_server: str, s3_admin_client: Any,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    s3 = s3_admin_client
    n = 6
    cat = tmp_path / "catalog"
    ids = _catalog(cat, world, n, tenants=2)
    _upload(s3, s3_bucket, "models/base", world.base)
    _upload(s3, s3_bucket, "models/aligned", world.aligned)
    _upload(s3, s3_bucket, "tenants", cat)
    b = f"s3://{s3_bucket}"
    bkw: dict[str, Any] = {"base": f"{b}/models/base", "aligned": f"{b}/models/aligned",
                           "targets": ["q_proj", "v_proj"], "workers": 2, "progress": False,
                           "task_timeout_s": 300}
    skw: dict[str, Any] = {"workers": 2, "batch_size": 2, "max_in_flight": 2}

    # Fault-free reference runs, straight to the S3 server.
    clean_set = build(BuildConfig(out=f"{b}/set-clean", **bkw))
    clean = run_sanitize(f"{b}/set-clean", f"{b}/tenants", f"{b}/out-clean", run_id="clean",
                         **skw)  # type: ignore[arg-type]
    assert clean.ok == n

    schedule = FaultSchedule(every=3, kinds=KINDS)
    with S3FaultProxy(s3_server, schedule, lifetime_s=380) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        # The workers get the endpoint from the driver's environment.
        assert worker_runtime_env()["env_vars"]["AWS_ENDPOINT_URL"] == proxy.endpoint
        t0 = time.perf_counter()
        faulty_set = build(BuildConfig(out=f"{b}/set-faulty", **bkw))
        res = run_sanitize(f"{b}/set-faulty", f"{b}/tenants", f"{b}/out-faulty",
                           run_id="faulty", **skw)  # type: ignore[arg-type]
        elapsed = time.perf_counter() - t0
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    stats = proxy.stats
    # The run completed with every adapter ok, and the set is the same set.
    assert (res.ok, res.error) == (n, 0), res.errors
    assert faulty_set.content_id == clean_set.content_id
    sets = (_objects(s3, s3_bucket, "set-clean"), _objects(s3, s3_bucket, "set-faulty"))
    assert sets[0].keys() == sets[1].keys()
    for key in sets[0]:
        if key != "alignment.json":  # holds timings; the content id is compared above
            assert sets[0][key] == sets[1][key], key
    outs = (_objects(s3, s3_bucket, "out-clean"), _objects(s3, s3_bucket, "out-faulty"))
    lost = 0
    for adapter_id in ids:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            key = f"{adapter_id}/{name}"
            if outs[1].get(key) != outs[0][key]:
                lost += len(outs[0][key])
    assert lost == 0
    # The faults really happened, of every kind, on driver and worker requests, and every
    # faulted request was retried until it went through.
    assert all(stats.injected[k] >= 3 for k in KINDS), stats.as_dict()
    # (a truncated 404 is a 404 all the same: the client rightly does not ask again)
    assert stats.retried_ok | stats.error_answered == stats.faulted_keys
    assert any(p.endswith("/adapter_model.safetensors") for p in stats.paths)  # worker reads
    assert any(p.startswith(f"/{s3_bucket}/set-faulty/shards/") for p in stats.paths)
    record_figures("s3_faults", requests=stats.requests, injected=dict(stats.injected),
                   total_injected=stats.total_injected, retried_ok=len(stats.retried_ok),
                   adapters=n, ok=res.ok, error=res.error, bytes_lost=lost,
                   faulty_runs_s=round(elapsed, 1), runs_completed=2)


# ----------------------------------------------------------------------------------------------
# A full disk and a denied write under one tenant's output prefix
# ----------------------------------------------------------------------------------------------


def _run(cmd: list[str]) -> bool:
    return subprocess.run(cmd, capture_output=True, timeout=60).returncode == 0


@contextlib.contextmanager
def _full_disk(path: Path) -> Any:
    """A tiny tmpfs at ``path``, filled up: every write there fails with ENOSPC."""
    path.mkdir(parents=True)
    if os.geteuid() != 0 or not _run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs",
                                      str(path)]):
        yield None
        return
    try:
        with open(path / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
        yield "tmpfs"
    finally:
        if not _run(["umount", str(path)]):
            _run(["umount", "-l", str(path)])


@contextlib.contextmanager
def _read_only(path: Path) -> Any:
    """``path`` made unwritable: a read-only bind mount as root (root ignores permission
    bits), mode 0555 otherwise."""
    path.mkdir(parents=True)
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield "chmod 0555"
        finally:
            path.chmod(0o755)
        return
    if not (_run(["mount", "--bind", str(path), str(path)])
            and _run(["mount", "-o", "remount,ro,bind", str(path)])):
        _run(["umount", str(path)])
        yield None
        return
    try:
        yield "read-only bind mount"
    finally:
        if not _run(["umount", str(path)]):
            _run(["umount", "-l", str(path)])


@pytest.mark.timeout(300)
def test_full_disk_and_denied_write_fail_only_that_tenant(tmp_path: Path, world: World
                                                          ) -> None:
    cat = tmp_path / "catalog"
    from safelora_ray.cli.demo import write_adapter

    tenants = {"ok": 3, "full": 2, "denied": 2, "blocked": 2}
    ids = []
    for t, k in tenants.items():
        for i in range(k):
            write_adapter(cat / t / f"a{i}", good_modules(world, seed=500 + 10 * len(ids) + i), 4)
            ids.append(f"{t}/a{i}")
    before = tree_hash(cat)
    out = tmp_path / "out"
    out.mkdir()
    (out / "blocked").write_text("a file where the tenant's directory would go\n")
    with _full_disk(out / "full") as full, _read_only(out / "denied") as denied:
        res = run_sanitize(world.alignment, cat, out, run_id="faults", batch_size=2)
        rows = report_rows(out, "faults")
        full_listing = sorted(p.name for p in (out / "full").iterdir())
        denied_listing = sorted(p.name for p in (out / "denied").iterdir())
    expect = {"ok": ("ok", None), "blocked": ("error", "a file is in the way")}
    if full:
        expect["full"] = ("error", "No space left on device")
    if denied:
        expect["denied"] = ("error", "Read-only file system" if denied.startswith("read-only")
                            else "Permission denied")
    for adapter_id, row in rows.items():
        tenant = adapter_id.split("/")[0]
        if tenant not in expect:
            continue  # that mechanism is not available here (not root, no tmpfs)
        status, text = expect[tenant]
        assert row["status"] == status, (adapter_id, row["error"])
        if text:
            assert text in row["error"] and repr(adapter_id) in row["error"], row["error"]
    # The others were written, correctly; nothing partial or temporary anywhere.
    for i in range(tenants["ok"]):
        check_sanitized(cat / f"ok/a{i}", out / f"ok/a{i}", world)
    if full:
        assert full_listing == ["filler"]
    if denied:
        assert denied_listing == []
    assert (out / "blocked").read_text().startswith("a file")
    assert not leftovers(out)
    assert not [p for t in ("full", "denied", "blocked") for p in (out / "_ledger").glob(f"{t}/*")]
    assert tree_hash(cat) == before
    assert res.ok == tenants["ok"] + sum(tenants[t] for t in ("full", "denied")
                                         if t not in expect)
    record_figures("disk_faults", mechanisms={"full": full, "denied": denied,
                                              "blocked": "file in the way"},
                   adapters=len(ids), ok=res.ok, error=res.error,
                   errors={a: r["error"] for a, r in rows.items() if r["status"] == "error"},
                   failed_cleanly=res.error, bytes_lost=0, runs_completed=1)


def test_fault_proxy_stops_itself() -> None:
    """The proxy is bounded: it shuts down after its lifetime even if nobody stops it."""
    import urllib.request

    proxy = S3FaultProxy("http://127.0.0.1:9", FaultSchedule(every=1, kinds=("503",)),
                         lifetime_s=0.5)
    endpoint = proxy.start()
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(endpoint + "/bucket/key", timeout=5)
    assert info.value.code == 503 and b"SlowDown" in info.value.read()
    assert wait_for(lambda: proxy._server is None, timeout=10)
    with pytest.raises(OSError):
        urllib.request.urlopen(endpoint + "/bucket/key", timeout=2)
    assert proxy.stats.injected["503"] == 1
