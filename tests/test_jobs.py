"""Ray Jobs against a real head (`ray start --head` on 127.0.0.1) and S3 (SeaweedFS):
build_alignment.py, sanitize_catalog.py and nightly.py submitted with JobSubmissionClient."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import torch
import yaml

from safelora_ray.cli.demo import write_adapter, write_model
from tests.cluster_harness import PortPlan
from tests.factory import Arch, aligned_from, llama_tensors

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def ray_head(s3_server, tmp_path_factory):
    """A real Ray head started with the CLI; yields the dashboard (job server) address."""
    ports = PortPlan().node(head=True)  # every component's port explicit and distinct
    dash = ports["dashboard-port"]
    # Ray 2.60 token auth, as the README describes it: the head and this client share the
    # token of this test run (RAY_AUTH_TOKEN_PATH, set by conftest), never ~/.ray/auth_token.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "token"
    # A job's `python` is looked up on the head's PATH: make it this interpreter (CI runs
    # `.venv/bin/python -m pytest` without activating the venv).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    temp = tmp_path_factory.mktemp("rayhead")
    log = open(temp / "ray-start.log", "w")  # noqa: SIM115 - closed at teardown
    # Every port explicit, free and distinct (tests/cluster_harness.py's plan): another Ray
    # on this machine (defaults 52365, ...) must not keep this head's agents from starting,
    # nor may two components draw the same port.
    cmd = [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--num-cpus", "2", "--object-store-memory",
           str(150 * 1024**2), "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
           "--disable-usage-stats", "--temp-dir", str(temp), *PortPlan.args(ports)]
    # Its own session: teardown kills exactly this cluster (not `ray stop`, which would kill
    # every Ray on the machine).
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while _ray_cli(address, "job", "list").returncode != 0:
            if time.time() > deadline or proc.poll() is not None:
                pytest.fail("the Ray head did not come up:\n"
                            + (temp / "ray-start.log").read_text()[-3000:])
            time.sleep(2)
        yield address
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        # The whole process group (GCS, raylet, dashboard, workers): nothing of it may linger.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        log.close()


def _ray_cli(address: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the ``ray`` CLI against the head, with the token auth a user would have."""
    env = dict(os.environ, RAY_ADDRESS=address, RAY_AUTH_MODE="token")
    return subprocess.run([RAY, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _submit(address: str, entrypoint: str, submission_id: str, timeout: float = 400) -> str:
    """``ray job submit`` exactly as the README shows it; returns the job's logs."""
    runtime_env = {"excludes": [".venv", ".git", "safelora-demo", "**/__pycache__"]}
    for _ in range(30):
        proc = _ray_cli(address, "job", "submit", "--submission-id", submission_id,
                        "--working-dir", str(REPO), "--runtime-env-json",
                        json.dumps(runtime_env), "--", *shlex.split(entrypoint),
                        timeout=timeout)
        logs = proc.stdout + proc.stderr
        if "No available agent to submit job" not in logs:  # the head's agent is still starting
            break
        time.sleep(2)
    status = _ray_cli(address, "job", "status", submission_id)
    assert f"Job '{submission_id}' succeeded" in status.stdout + status.stderr, (
        f"{submission_id}:\n{logs[-8000:]}")
    return logs


def _upload_tree(s3, bucket: str, prefix: str, root: Path) -> None:
    for f in sorted(root.rglob("*")):
        if f.is_file():
            s3.upload_file(str(f), bucket, f"{prefix}/{f.relative_to(root).as_posix()}")


def _adapters(root: Path, base: dict[str, torch.Tensor], n: int, base_model: str,
              seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    mods = sorted(k[: -len(".weight")] for k in base
                  if k.endswith(("q_proj.weight", "v_proj.weight")))
    for i in range(n):
        lora = {}
        for m in mods:
            d_out, d_in = base[m + ".weight"].shape
            lora[m] = (torch.randn(4, d_in, generator=g), torch.randn(d_out, 4, generator=g))
        path = root / f"team-{i % 2}" / f"ad-{i:02d}"
        write_adapter(path, lora, 4)
        cfg = json.loads((path / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = base_model
        (path / "adapter_config.json").write_text(json.dumps(cfg, indent=2))


def test_jobs_build_sanitize_and_nightly(ray_head, s3_bucket, tmp_path):
    s3 = boto3.client("s3")
    base = llama_tensors(Arch())
    write_model(tmp_path / "base", base)
    write_model(tmp_path / "aligned", aligned_from(base))
    _upload_tree(s3, s3_bucket, "models/base", tmp_path / "base")
    _upload_tree(s3, s3_bucket, "models/aligned", tmp_path / "aligned")
    _adapters(tmp_path / "cat", base, 6, "acme/llama-chat")
    _adapters(tmp_path / "cat-other", base, 1, "someone/else", seed=9)
    shutil.copytree(tmp_path / "cat-other", tmp_path / "cat", dirs_exist_ok=True,
                    copy_function=shutil.copy2)  # team-0/ad-00 replaced: base model unknown
    _upload_tree(s3, s3_bucket, "catalog", tmp_path / "cat")
    b = f"s3://{s3_bucket}"

    # 1. build_alignment.py, then sanitize_catalog.py, as `ray job submit` would run them.
    logs = _submit(ray_head, f"python jobs/build_alignment.py --base {b}/models/base "
                   f"--aligned {b}/models/aligned --out {b}/sets/pair-a --no-progress",
                   "build-pair-a-20261123")
    assert "built alignment set als-" in logs
    logs = _submit(ray_head, f"python jobs/sanitize_catalog.py --alignment {b}/sets/pair-a "
                   f"--adapters {b}/catalog --out {b}/manual --threshold 0.5 --no-progress "
                   "--run-id manual1", "sanitize-catalog-20261123")
    assert "ok 6   skipped 0   failed 0" in logs
    summary = json.loads(s3.get_object(Bucket=s3_bucket,
                                       Key="manual/_reports/manual1/summary.json")["Body"].read())
    assert summary["counts"]["ok"] == 6

    # 2. nightly.py: groups by base model, reuses the built set, reports the unmatched one.
    config = {
        "output_root": f"{b}/nightly-out", "alignment_root": f"{b}/sets",
        "catalogs": [{"name": "tenants", "uri": f"{b}/catalog"}],
        "pairs": [{"name": "pair-a", "base": f"{b}/models/base",
                   "aligned": f"{b}/models/aligned", "targets": ["q_proj", "v_proj"],
                   "base_model_ids": ["acme/llama-chat"]}],
        "selection": {"threshold": 0.5}, "lock": {"ttl_s": 600},
        "sanitize": {"batch_size": 2},
    }
    s3.put_object(Bucket=s3_bucket, Key="config/nightly.yaml", Body=yaml.safe_dump(config))
    nightly = f"python jobs/nightly.py --config {b}/config/nightly.yaml --no-progress"

    def record(run_id: str) -> dict:
        return json.loads(s3.get_object(
            Bucket=s3_bucket, Key=f"nightly-out/_nightly/runs/{run_id}.json")["Body"].read())

    # The unmatched adapter makes the run "partial" (exit 3): the job itself FAILS, which is
    # what an operator alerts on. So the catalog is first cleaned of it for the happy path.
    s3.delete_object(Bucket=s3_bucket, Key="catalog/team-0/ad-00/adapter_config.json")
    s3.delete_object(Bucket=s3_bucket, Key="catalog/team-0/ad-00/adapter_model.safetensors")
    _submit(ray_head, nightly + " --run-id n1", "nightly-20261123")
    r1 = record("n1")
    assert r1["status"] == "success"
    assert r1["counts"] == {"adapters": 5, "ok": 5, "skipped": 0, "error": 0, "unmatched": 0}
    assert r1["alignment_ids"]["pair-a"].startswith("als-")

    # (Incremental nightlies, changed adapters and the lease are tested in-process in
    # tests/test_nightly.py: here, the job entrypoints as `ray job submit` runs them.)
    latest = json.loads(s3.get_object(Bucket=s3_bucket,
                                      Key="nightly-out/_nightly/latest.json")["Body"].read())
    assert latest["run_id"] == "n1"
    # The lease was given back.
    listed = s3.list_objects_v2(Bucket=s3_bucket, Prefix="nightly-out/_nightly/lock")
    assert listed.get("KeyCount", 0) == 0
