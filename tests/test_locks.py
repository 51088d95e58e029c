"""Unattended runs (issue 20, items 5 and 6): a stopped job (SIGTERM, SIGHUP) ends as Ctrl-C
does and gives its lease back; a lease whose holder died on this host is taken over at once,
one from another host once its heartbeat stops; two runs into one ``--out`` never interleave
(``sanitize`` and ``project-model`` lease it; ``--wait`` queues), on local storage and S3.

The stop tests run the CLI in a subprocess with a real local Ray (``--workers 1``), as
``ray job stop`` or a pod's deletion meets it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from safelora_ray import BuildConfig, SanitizeConfig, build, sanitize
from safelora_ray.cli.demo import BASE_MODEL_ID, write_model
from safelora_ray.cli.main import main as cli_main
from safelora_ray.core.errors import LeaseHeldError
from safelora_ray.pipelines.sanitize import worker as sanitize_mod
from safelora_ray.storage import open_storage
from safelora_ray.storage.lease import OUT_LEASE, Lease, hold_output, host_id
from tests.factory import Arch, aligned_from, llama_tensors
from tests.test_guardrails import _catalog, _complete, _leftovers, _san, tiny_world

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return tiny_world(tmp_path_factory.mktemp("locks"))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=60)
    return proc.pid


def _left_by(storage: Any, path: str, **fields: Any) -> None:
    """A lease record as a run that is gone left it (taken, never released)."""
    gone = Lease(storage, path, owner="gone", ttl_s=600)
    gone.acquire()
    gone._stop.set()
    assert gone._thread is not None
    gone._thread.join(timeout=30)
    rec = json.loads(storage.read(path))
    storage.put_bytes(path, json.dumps({**rec, **fields}).encode())


# ----------------------------------------------------------------------------------------------
# The lease: takeover of a dead holder, heartbeat expiry, waiting
# ----------------------------------------------------------------------------------------------


def test_a_lease_that_cannot_be_released_is_a_warning(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """The store gone as a run ends (an S3 outage past its window): release() warns, and the
    run's own result is not replaced by the error; the record lapses by itself."""
    from safelora_ray.core.errors import StorageError
    from safelora_ray.storage.local import LocalStorage

    store = LocalStorage(str(tmp_path / "out"))
    lease = Lease(store, "_safelora/lease.json", owner="run-1", ttl_s=600)
    lease.acquire()

    def down(*_: Any, **__: Any) -> Any:
        raise StorageError("HEAD s3://b/out/_safelora/lease.json failed (EndpointConnectionError)")

    with caplog.at_level("WARNING"):
        store.version = down  # type: ignore[method-assign]
        lease.release()
    assert "could not release lease" in caplog.text and "lapses 600 s" in caplog.text
    del store.version  # the store is back: the record is still there, the run's
    assert json.loads(store.read("_safelora/lease.json"))["token"] == lease.token


def test_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(storage):
    _left_by(storage, "_nightly/lock.json", pid=_dead_pid())
    t0 = time.monotonic()
    with Lease(storage, "_nightly/lock.json", owner="next", ttl_s=600):
        assert json.loads(storage.read("_nightly/lock.json"))["owner"] == "next"
    assert time.monotonic() - t0 < 5  # not after ttl_s
    # A pid given to a later process (another start time) is no holder either.
    _left_by(storage, "_nightly/lock.json", pid=os.getpid(), pid_started="1")
    with Lease(storage, "_nightly/lock.json", owner="next", ttl_s=600):
        pass
    # This process itself is alive: its lease is respected.
    _left_by(storage, "_nightly/lock.json")
    with pytest.raises(LeaseHeldError, match=r"held by run 'gone' \(pid \d+ on "):
        Lease(storage, "_nightly/lock.json", owner="next").acquire()


def test_lease_from_another_host_expires_after_its_heartbeat_stops(storage):
    # Its pid means nothing here: only a missed renewal frees it.
    _left_by(storage, "_nightly/lock.json", pid=_dead_pid(), host="elsewhere",
             host_id="elsewhere|boot|1", ttl_s=2, expires_at=time.time() + 2)
    assert host_id() != "elsewhere|boot|1"
    with pytest.raises(LeaseHeldError, match=r"held by run 'gone' .* on elsewhere"):
        Lease(storage, "_nightly/lock.json", owner="next").acquire()
    t0 = time.monotonic()
    lease = Lease(storage, "_nightly/lock.json", owner="next")
    lease.acquire(wait_s=30)  # queues until the holder's heartbeat window has passed
    try:
        assert 0.5 < time.monotonic() - t0 < 10
        assert json.loads(storage.read("_nightly/lock.json"))["owner"] == "next"
    finally:
        lease.release()
    assert not storage.exists("_nightly/lock.json")


def _record(lease: Lease) -> dict[str, Any]:
    """The lease's record, read as another run reads it (renewed meanwhile: read again)."""
    rec, _ = lease._current()
    assert rec is not None
    return rec


def test_a_lease_taken_as_ctrl_c_lands_is_given_back(storage, monkeypatch):
    # The interrupt lands once the record is written but before acquire() returned (its
    # confirming read, the heartbeat's start): no caller holds the lease to release it, so
    # acquire() gives it back itself; the next run takes it at once.
    take = Lease._take

    def taken_then_interrupted(self: Lease, version: str | None) -> bool:
        assert take(self, version)
        assert storage.exists("_safelora/lease.json")
        raise KeyboardInterrupt

    monkeypatch.setattr(Lease, "_take", taken_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        Lease(storage, "_safelora/lease.json", owner="first", ttl_s=600).acquire()
    assert not storage.exists("_safelora/lease.json")
    monkeypatch.setattr(Lease, "_take", take)
    # A lease object given back so may be taken again, and is renewed then.
    again = Lease(storage, "_safelora/lease.json", owner="again", ttl_s=1.2)
    monkeypatch.setattr(Lease, "_take", taken_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        again.acquire()
    monkeypatch.setattr(Lease, "_take", take)
    with again:
        first = _record(again)
        time.sleep(0.6)
        assert _record(again)["renewed_at"] > first["renewed_at"]
    # A run refused because another holds the lease leaves the holder's record alone.
    with Lease(storage, "_safelora/lease.json", owner="holder", ttl_s=600) as held:
        with pytest.raises(LeaseHeldError):
            Lease(storage, "_safelora/lease.json", owner="refused").acquire()
        assert _record(held)["owner"] == "holder"


def test_a_live_lease_is_renewed_within_a_short_heartbeat(storage):
    with Lease(storage, "x/lease.json", owner="live", ttl_s=1.2) as held:
        first = _record(held)
        time.sleep(2.5)  # more than its ttl: renewed meanwhile, so still held
        rec = _record(held)
        assert rec["renewed_at"] > first["renewed_at"] and rec["expires_at"] > time.time()
        # Another run looking while the holder renews (every 0.2 s) always reads a whole
        # record: it is told who holds the lease, never "short read" (a renewal between the
        # reads of a look once made that look fail).
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            with pytest.raises(LeaseHeldError):
                Lease(storage, "x/lease.json", owner="other").acquire()


# ----------------------------------------------------------------------------------------------
# Two runs into one --out
# ----------------------------------------------------------------------------------------------


def test_sanitize_is_refused_while_another_run_holds_its_out(world, tmp_path, capsys, storage):
    cat = _catalog(world, tmp_path / "cat", ["t0/a"])
    lease = hold_output(storage, "sanitize", "first")
    try:
        code = cli_main(_san(world, cat, storage.uri, "--threshold", "0.35", "--workers", "0"))
        err = capsys.readouterr().err
        assert code == 4, err
        assert "another run is in progress" in err and "held by sanitize run 'first'" in err
        assert "--wait" in err and "Traceback" not in err
        assert not storage.exists("_ledger/t0/a.json")
        # --wait 1: it waits a second, then gives up the same way.
        t0 = time.monotonic()
        assert cli_main(_san(world, cat, storage.uri, "--threshold", "0.35", "--workers", "0",
                             "--wait", "1")) == 4
        assert 0.9 < time.monotonic() - t0 < 30
    finally:
        lease.release()
    assert cli_main(_san(world, cat, storage.uri, "--threshold", "0.35", "--workers", "0")) == 0
    assert storage.exists("_ledger/t0/a.json") and not storage.exists(OUT_LEASE)


@pytest.mark.timeout(300)
def test_two_sanitize_runs_into_one_out_never_interleave(world, tmp_path, capsys,
                                                         monkeypatch):
    names = [f"t{i % 2}/a{i}" for i in range(6)]
    cat = _catalog(world, tmp_path / "cat", names)
    out = tmp_path / "out"
    # The first run stops before its first batch until released: a run in progress.
    gate, started = threading.Event(), threading.Event()
    process = sanitize_mod.FleetSanitizer.process

    def held(self, *a, **kw):
        started.set()
        assert gate.wait(120)
        return process(self, *a, **kw)

    monkeypatch.setattr(sanitize_mod.FleetSanitizer, "process", held)
    box: dict[str, Any] = {}
    first = threading.Thread(target=lambda: box.update(res=sanitize(SanitizeConfig(
        alignment=world["set"], adapters=str(cat), out=str(out), threshold=0.35, workers=0,
        run_id="first", progress=False))))
    first.start()
    waiting = None
    try:
        assert started.wait(120)
        live = out / "t0" / ".staging-live"  # what the first run is writing right now
        live.mkdir(parents=True)
        code = cli_main(_san(world, cat, out, "--threshold", "0.35", "--workers", "0",
                             "--run-id", "second"))
        err = capsys.readouterr().err
        assert code == 4 and "held by sanitize run 'first'" in err, err
        assert live.is_dir(), "the second run swept the first run's live staging folder"
        assert not (out / "_reports" / "second").exists()
        # A third run queues (another process, as a second job would be).
        waiting = subprocess.Popen(
            [sys.executable, "-m", "safelora_ray",
             *_san(world, cat, out, "--threshold", "0.35", "--workers", "0", "--run-id",
                   "third", "--wait", "--json")],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(4)
        assert waiting.poll() is None, waiting.communicate()
        assert live.is_dir() and not (out / "_reports" / "third").exists()
        live.rmdir()  # the first run's write completes
        gate.set()
        first.join(timeout=120)
        assert box["res"].ok == len(names)
        stdout, stderr = waiting.communicate(timeout=120)
        assert waiting.returncode == 0, stderr[-3000:]
        # It ran after the first and skipped what was done.
        assert json.loads(stdout)["counts"] == {"total": len(names), "ok": 0,
                                                "skipped": len(names), "error": 0}
    finally:
        gate.set()
        first.join(timeout=120)
        if waiting is not None and waiting.poll() is None:
            waiting.kill()
            waiting.wait()
    assert sorted(_complete(out)) == sorted(names)
    assert not (out / "_safelora" / "lease.json").exists()


def _project_inputs(root: Path) -> dict[str, str]:
    base = llama_tensors(Arch())
    aligned = aligned_from(base)
    write_model(root / "base", base)
    write_model(root / "aligned", aligned)
    g = torch.Generator().manual_seed(1)
    write_model(root / "ft", {n: w + torch.randn(w.shape, generator=g) * 0.01
                              for n, w in aligned.items()})
    res = build(BuildConfig(base=str(root / "base"), aligned=str(root / "aligned"),
                            out=str(root / "set"), workers=0, progress=False))
    return {"set": res.uri, "aligned": str(root / "aligned"), "ft": str(root / "ft")}


def test_project_model_is_refused_while_another_run_holds_its_out(tmp_path, capsys):
    inp = _project_inputs(tmp_path)
    out = tmp_path / "out"
    args = ["project-model", "--alignment", inp["set"], "--aligned", inp["aligned"],
            "--finetuned", inp["ft"], "--out", str(out), "--threshold", "0.35",
            "--workers", "0", "--no-progress"]
    lease = hold_output(open_storage(str(out)), "project-model", "first")
    try:
        code = cli_main(args)
        err = capsys.readouterr().err
        assert code == 4 and "held by project-model run 'first'" in err, err
        assert not (out / "_safelora" / "projection.json").exists()
        # --wait: it runs once the holder is done.
        threading.Timer(2.0, lease.release).start()
        t0 = time.monotonic()
        assert cli_main([*args, "--wait", "60"]) == 0
        assert time.monotonic() - t0 > 1.5
    finally:
        lease.release()
    prov = json.loads((out / "_safelora" / "projection.json").read_text())
    assert prov["status"] == "complete" and not (out / OUT_LEASE).exists()


# ----------------------------------------------------------------------------------------------
# SIGTERM / SIGHUP: what Ctrl-C does, within Kubernetes' 30 s grace
# ----------------------------------------------------------------------------------------------


def _stop_when(proc: subprocess.Popen[str], ready: Any, what: str,
               sig: int = signal.SIGTERM) -> tuple[str, float]:
    """Send ``sig`` once ``ready()``; returns (stderr, seconds from the signal to the exit)."""
    try:
        deadline = time.monotonic() + 180
        while not ready():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, f"the run never {what}"
            time.sleep(0.05)
        proc.send_signal(sig)
        t0 = time.monotonic()
        _stdout, stderr = proc.communicate(timeout=60)
        took = time.monotonic() - t0
        print(f"{signal.Signals(sig).name}: exit {proc.returncode} {took:.1f} s after it")
        return stderr, took
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def _start(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "safelora_ray", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _ledgers(out: Path) -> int:
    return len(list((out / "_ledger").rglob("*.json"))) if (out / "_ledger").exists() else 0


@pytest.mark.timeout(400)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_mid_sanitize_ends_as_ctrl_c_does(world, tmp_path, sig):
    names = [f"t{i % 4}/a{i:03d}" for i in range(240)]
    cat = _catalog(world, tmp_path / "cat", names)
    out = tmp_path / "out"
    proc = _start(_san(world, cat, out, "--threshold", "0.35", "--batch-size", "1",
                       "--workers", "1", "--run-id", "first"))
    stderr, took = _stop_when(proc, lambda: _ledgers(out) >= 3, "started writing", sig)
    assert proc.returncode == 128 + sig, stderr[-3000:]
    assert took < 30, f"took {took:.1f} s to stop"
    name = signal.Signals(sig).name
    assert f"terminated ({name}); nothing partial" in stderr, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert _leftovers(out) == [] and not (out / OUT_LEASE).exists()
    done = _complete(out)
    assert 0 < len(done) < len(names), "the signal came too late to test anything"
    assert not (out / "_reports" / "first").exists()  # no partial report
    # The rerun resumes at once: the lease was given back.
    rerun = subprocess.run([sys.executable, "-m", "safelora_ray",
                            *_san(world, cat, out, "--threshold", "0.35", "--json")],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads(rerun.stdout)["counts"]["skipped"] == len(done)
    assert sorted(_complete(out)) == sorted(names)


@pytest.mark.timeout(400)
def test_sigterm_mid_nightly_marks_the_run_and_frees_the_lock(world, tmp_path):
    names = [f"t{i % 4}/a{i:03d}" for i in range(240)]
    cat = _catalog(world, tmp_path / "cat", names)
    root = Path(world["root"])
    # The pair named "set" is the world's alignment set, built already, copied to an
    # alignment_root apart from the pair's checkpoints (a root around them is refused).
    shutil.copytree(root / "set", tmp_path / "sets" / "set")
    config = {
        "output_root": str(tmp_path / "out"), "alignment_root": str(tmp_path / "sets"),
        "catalogs": [{"name": "main", "uri": str(cat)}],
        "pairs": [{"name": "set", "base": str(root / "base"), "aligned": str(root / "aligned"),
                   "base_model_ids": [BASE_MODEL_ID]}],
        "selection": {"threshold": 0.35},
        "sanitize": {"workers": 1, "batch_size": 1},
    }
    path = tmp_path / "nightly.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out" / "main"
    nightly = tmp_path / "out" / "_nightly"
    proc = _start(["nightly", "--config", str(path), "--run-id", "n1", "--no-progress"])
    stderr, took = _stop_when(proc, lambda: _ledgers(out) >= 3, "started writing")
    assert proc.returncode == 143, stderr[-3000:]
    assert took < 30, f"took {took:.1f} s to stop"
    assert "terminated (SIGTERM)" in stderr and "Traceback" not in stderr, stderr[-3000:]
    rec = json.loads((nightly / "runs" / "n1.json").read_text())
    assert rec["status"] == "interrupted" and rec["failure"] == "terminated (SIGTERM)"
    assert not (nightly / "lock.json").exists() and not (out / OUT_LEASE).exists()
    assert _leftovers(tmp_path / "out") == []
    done = _complete(out)
    assert 0 < len(done) < len(names)
    # The next nightly runs at once and finishes the rest.
    rerun = subprocess.run([sys.executable, "-m", "safelora_ray", "nightly", "--config",
                            str(path), "--run-id", "n2", "--no-progress"], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    rec = json.loads((nightly / "runs" / "n2.json").read_text())
    assert rec["status"] == "success" and rec["counts"]["skipped"] == len(done)
    assert sorted(_complete(out)) == sorted(names)


def test_ctrl_c_marks_the_nightly_run_interrupted(tmp_path, monkeypatch):
    from safelora_ray.cli import nightly_run as nightly  # where _ensure_alignment is used

    root = tmp_path
    (root / "cat" / "a").mkdir(parents=True)
    (root / "cat" / "a" / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": "m"}))
    cfg = nightly.NightlyConfig.from_dict({
        "output_root": str(root / "out"), "alignment_root": str(root / "sets"),
        "catalogs": [{"name": "main", "uri": str(root / "cat")}],
        "pairs": [{"name": "p", "base": str(root / "b"), "aligned": str(root / "al"),
                   "base_model_ids": ["m"]}],
        "selection": {"threshold": 0.35}})

    def interrupted(*a: Any, **kw: Any) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(nightly, "_ensure_alignment", interrupted)
    with pytest.raises(KeyboardInterrupt):
        nightly.run_nightly(cfg, run_id="r1", progress=False)
    rec = json.loads((root / "out" / "_nightly" / "runs" / "r1.json").read_text())
    assert rec["status"] == "interrupted" and rec["failure"] == "interrupted"
    assert not (root / "out" / "_nightly" / "lock.json").exists()


def test_a_lease_directory_removed_under_a_taker_is_made_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A released lease removes the empty ``_safelora`` it made; a run taking the lease at
    that moment (``--wait``) found its directory gone ("No such file or directory"). Now the
    taker makes it again, and the release removes only an empty directory, under the lock
    the taker writes under."""
    from safelora_ray.storage.local import LocalStorage, remove_empty_dir

    st = LocalStorage(str(tmp_path / "out"))
    real = st._makedirs
    made: list[str] = []

    def vanishing(d: str) -> None:  # the releaser's rmdir lands right after the first make
        real(d)
        made.append(d)
        if len(made) == 1:
            os.rmdir(d)

    monkeypatch.setattr(st, "_makedirs", vanishing)
    assert st.put_bytes_if("_safelora/lease.json", b"{}", if_version=None)
    assert len(made) >= 2 and st.read("_safelora/lease.json") == b"{}"
    assert not remove_empty_dir(str(tmp_path / "out" / "_safelora"))  # holds the lease
    st.delete("_safelora/lease.json")
    assert remove_empty_dir(str(tmp_path / "out" / "_safelora"))
