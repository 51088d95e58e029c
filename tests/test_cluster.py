"""Distributed correctness (issue #12) on a real multi-node Ray cluster on loopback: a head and
three worker nodes started with ``ray start`` (1 CPU each), the worker nodes on *private
disks* (a mount namespace hides this test's data directory from them, as real nodes do not
share the driver's disk), S3 through the session's SeaweedFS server.

- local paths the nodes do not share are refused up front; a shared one is accepted;
- build and sanitize spread over the nodes and equal the in-process results bit for bit;
- a worker node killed mid-sanitize and mid-build: the run finishes with the workers left
  (every adapter accounted, report written), and a rerun is bit-identical;
- the driver killed mid-run: the rerun resumes.

Slow by nature (each node is a real Ray node): the default run keeps one test per behaviour
(~1.5 min); ``-m slow`` adds the lost node with spare capacity (a successor elsewhere), a
node joining mid-run (an autoscaler) and the driver killed mid-run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from safelora_ray import AlignmentSet, BuildConfig, ConfigError, SanitizeConfig, build, sanitize
from safelora_ray.cli.demo import write_adapter, write_model
from tests.cluster_harness import LocalCluster, can_isolate_disks
from tests.factory import Arch, aligned_from, llama_tensors

pytestmark = [
    pytest.mark.skipif(not can_isolate_disks(), reason="needs root and unshare (mount namespaces)"),
    pytest.mark.timeout(900),
]

REPO = Path(__file__).resolve().parents[1]
#: Nodes are declared dead after ~3 failed health checks a second apart, not ~30 s.
FAST_HEALTH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
               "RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_timeout_ms": "1000"}


def _upload(s3: Any, bucket: str, prefix: str, root: Path) -> None:
    for f in sorted(root.rglob("*")):
        if f.is_file():
            s3.upload_file(str(f), bucket, f"{prefix}/{f.relative_to(root).as_posix()}")


def _objects(s3: Any, bucket: str, prefix: str) -> dict[str, bytes]:
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            out[o["Key"][len(prefix):]] = s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, s3_server: str, s3_admin_client: Any,
          ray_isolation: Path) -> dict[str, Any]:
    """Inputs on S3 (and on this node's disk), and the cluster: head + 3 nodes."""
    data = tmp_path_factory.mktemp("cluster-data")
    base = llama_tensors(Arch(layers=4))
    write_model(data / "base", base)
    write_model(data / "aligned", aligned_from(base))
    bucket = "cluster-" + hashlib.sha1(str(data).encode()).hexdigest()[:10]
    s3_admin_client.create_bucket(Bucket=bucket)
    _upload(s3_admin_client, bucket, "models/base", data / "base")
    _upload(s3_admin_client, bucket, "models/aligned", data / "aligned")

    import ray

    root = Path(ray_isolation) / f"cluster-{os.getpid()}"
    root.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in FAST_HEALTH.items():
            mp.setenv(k, v)
        cluster = LocalCluster(root)
        try:
            cluster.start_head()
            for k in range(3):
                cluster.add_node(f"node{k}", private=[data])
            ray.init(address=cluster.address, log_to_driver=False)
            cluster.wait_for_nodes(4)
            yield {"cluster": cluster, "data": data, "bucket": bucket, "s3": s3_admin_client,
                   "base": base, "b": f"s3://{bucket}"}
        finally:
            with contextlib.suppress(Exception):
                ray.shutdown()
            cluster.stop()


def _adapters(world: dict[str, Any], root: Path, n: int, seed: int = 0) -> Path:
    base = world["base"]
    g = torch.Generator().manual_seed(seed)
    mods = sorted(k[: -len(".weight")] for k in base if k.endswith(("q_proj.weight",
                                                                      "v_proj.weight")))
    for i in range(n):
        lora = {}
        for m in mods:
            d_out, d_in = base[m + ".weight"].shape
            lora[m] = (torch.randn(4, d_in, generator=g), torch.randn(d_out, 4, generator=g))
        write_adapter(root / f"team-{i % 3}" / f"ad-{i:03d}", lora, 4)
    return root


def _restore(world: dict[str, Any]) -> None:
    """Back to 4 live nodes after a test killed one."""
    cluster: LocalCluster = world["cluster"]
    alive = [n for n in cluster.nodes if n.alive()]
    if len(alive) < 4:
        cluster.add_node(f"node{len(cluster.nodes)}", private=[world["data"]])
        cluster.wait_for_nodes(4)


def _set(world: dict[str, Any], name: str) -> str:
    uri = f"{world['b']}/sets/{name}"
    if not _objects(world["s3"], world["bucket"], f"sets/{name}/alignment.json"):
        build(BuildConfig(base=f"{world['b']}/models/base", aligned=f"{world['b']}/models/aligned",
                          out=uri, workers=0, progress=False))
    return uri


# ----------------------------------------------------------------------------------------------


def test_local_paths_not_shared_by_the_nodes_are_refused(world, tmp_path):
    data: Path = world["data"]
    cat = _adapters(world, data / "cat-local", 3)
    set_uri = _set(world, "main")
    for kw, flag in (({"out": str(data / "out-local"), "adapters": str(cat)}, "--out"),):
        with pytest.raises(ConfigError, match=rf"{flag} .* does not share .* s3://"):
            sanitize(SanitizeConfig(alignment=set_uri, threshold=0.35, workers=4,
                                    progress=False, **kw))
    assert not any((data / "out-local").glob("team-*"))  # nothing was written anywhere here
    # A set that only this node has: refused, not "alignment.json not found" on the others.
    local_set = data / "set-local"
    build(BuildConfig(base=str(data / "base"), aligned=str(data / "aligned"),
                      out=str(local_set), workers=0, progress=False))
    with pytest.raises(ConfigError, match=r"--alignment .* does not share"):
        sanitize(SanitizeConfig(alignment=str(local_set), adapters=f"{world['b']}/none",
                                out=f"{world['b']}/out-x", threshold=0.35, workers=4,
                                allow_empty=True, progress=False))
    with pytest.raises(ConfigError, match=r"--out .* does not share"):
        build(BuildConfig(base=f"{world['b']}/models/base",
                          aligned=f"{world['b']}/models/aligned", out=str(data / "set2"),
                          workers=4, progress=False))
    # A directory every node sees (as on a shared filesystem) passes the check.
    shared = Path(os.environ["RAY_TMPDIR"]) / "shared-fs"
    res = build(BuildConfig(base=f"{world['b']}/models/base",
                            aligned=f"{world['b']}/models/aligned", out=str(shared / "set"),
                            workers=4, progress=False))
    assert AlignmentSet.open(res.uri).content_id == AlignmentSet.open(set_uri).content_id


def test_s3_build_and_sanitize_equal_in_process_results(world, tmp_path, caplog):
    b = world["b"]
    caplog.set_level("INFO", logger="safelora_ray")
    res = build(BuildConfig(base=f"{b}/models/base", aligned=f"{b}/models/aligned",
                            out=f"{b}/sets/dist", workers=4, progress=False))
    assert res.workers == 4
    assert "workers: 4 node(s)" in caplog.text  # spread over every node
    ref = _set(world, "main")
    assert res.content_id == AlignmentSet.open(ref).content_id
    dist = _objects(world["s3"], world["bucket"], "sets/dist/shards/")
    here = AlignmentSet.open(ref)
    dist_set = AlignmentSet.open(res.uri)
    for m in dist_set.rows:
        got = dist_set.load(m).tensor
        assert torch.equal(got, here.load(m).tensor), m
    assert dist  # the distributed set's shards are on S3, not on some node's disk

    cat = _adapters(world, tmp_path / "cat", 24, seed=1)
    _upload(world["s3"], world["bucket"], "cat-eq", cat)
    caplog.clear()
    run = sanitize(SanitizeConfig(alignment=res.uri, adapters=f"{b}/cat-eq",
                                  out=f"{b}/out-dist", threshold=0.35, batch_size=2,
                                  progress=False))
    assert (run.ok, run.error) == (24, 0)
    assert "workers: 4 node(s)" in caplog.text
    local = sanitize(SanitizeConfig(alignment=res.uri, adapters=str(cat),
                                    out=str(tmp_path / "out-local"), threshold=0.35,
                                    workers=0, progress=False))
    assert (local.ok, local.error) == (24, 0)
    got = _objects(world["s3"], world["bucket"], "out-dist/")
    for f in (tmp_path / "out-local").rglob("adapter_model.safetensors"):
        rel = f.relative_to(tmp_path / "out-local").as_posix()
        assert got[rel] == f.read_bytes(), rel


def _objects_keys(s3: Any, bucket: str, prefix: str) -> list[str]:
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def _kill_a_worker_node_when(world: dict[str, Any], ready: Any) -> str:
    """Kill a worker node that hosts a worker once ``ready()`` (the run under way). Both are
    looked for together: the head's worker starts first and can be well into the run before
    the worker nodes' workers have started (a worker's process title is also rewritten as it
    takes each task: under load a first look can miss every one)."""
    cluster: LocalCluster = world["cluster"]
    deadline = time.monotonic() + 180
    started = False
    while True:
        started = started or ready()
        victim = next((n for n in cluster.nodes if n.name != "head" and n.alive()
                       and _hosts_a_worker(n.pgid)), None) if started else None
        if victim is not None:
            break
        assert time.monotonic() < deadline, (
            "no worker node hosts a worker" if started else "the run made no progress")
        time.sleep(0.1)
    victim.kill()
    return victim.name


def _hosts_a_worker(sid: int) -> bool:
    """Whether a worker actor's process runs in this node's session."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            if cmd.startswith(b"ray::SafeLoraWorker") and os.getsid(int(pid)) == sid:
                return True
        except (OSError, ProcessLookupError):
            continue
    return False


@pytest.mark.parametrize("spare", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["full-cluster", "spare-capacity"])
def test_a_lost_node_costs_nothing_to_a_sanitize(world, tmp_path, spare, caplog):
    b, s3, bucket = world["b"], world["s3"], world["bucket"]
    set_uri = _set(world, "main")
    n = 200  # enough work that the worker nodes' workers start well before the run ends
    cat = _adapters(world, tmp_path / "cat", n, seed=2)
    prefix = f"cat-lost-{spare}"
    _upload(s3, bucket, prefix, cat)
    out = f"{b}/out-lost-{spare}"
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["run"] = sanitize(SanitizeConfig(
                alignment=set_uri, adapters=f"{b}/{prefix}", out=out, threshold=0.35,
                batch_size=2, workers=2 if spare else None, progress=False))
        except BaseException as e:  # surfaced below
            box["error"] = e

    t = threading.Thread(target=run)
    t.start()
    _kill_a_worker_node_when(world, lambda: len(_objects_keys(
        s3, bucket, f"out-lost-{spare}/_ledger/")) >= 6)
    t.join(timeout=600)
    assert not t.is_alive(), "the run did not finish"
    if "error" in box:
        raise box["error"]
    res = box["run"]
    assert (res.total, res.ok, res.error) == (n, n, 0)
    # With room on the other nodes, the lost worker got a successor there.
    assert ("and a new one" in caplog.text) == spare, caplog.text[-3000:]
    summary = json.loads(_objects(s3, bucket, f"out-lost-{spare}/_reports/{res.run_id}/")[
        "summary.json"])
    assert summary["counts"]["ok"] == n
    configs = [k for k in _objects_keys(s3, bucket, f"out-lost-{spare}/")
               if k.endswith("adapter_config.json")]
    assert len(configs) == n
    _restore(world)


@pytest.mark.slow
def test_nodes_joining_during_a_run_get_workers(world, tmp_path, caplog, monkeypatch):
    """An autoscaler adding a node while a sanitize runs: the node gets workers at once."""
    import safelora_ray.pipelines.sanitize.driver as san

    monkeypatch.setattr(san, "GROW_EVERY_S", 0.5)
    b, s3, bucket = world["b"], world["s3"], world["bucket"]
    set_uri = _set(world, "main")
    _upload(s3, bucket, "cat-grow", _adapters(world, tmp_path / "cat", 60, seed=4))
    caplog.set_level("INFO", logger="safelora_ray")
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["run"] = sanitize(SanitizeConfig(alignment=set_uri, adapters=f"{b}/cat-grow",
                                                 out=f"{b}/out-grow", threshold=0.35,
                                                 batch_size=1, progress=False))
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=run)
    t.start()
    cluster: LocalCluster = world["cluster"]
    extra = cluster.add_node(f"node{len(cluster.nodes)}", private=[world["data"]])
    t.join(timeout=600)
    assert not t.is_alive()
    if "error" in box:
        raise box["error"]
    assert (box["run"].ok, box["run"].error) == (60, 0)
    assert "joined the cluster" in caplog.text
    extra.stop()
    world["cluster"].wait_for_dead(4)


def test_a_lost_node_costs_nothing_to_a_build(world, tmp_path):
    b = world["b"]
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["res"] = build(BuildConfig(base=f"{b}/models/base",
                                           aligned=f"{b}/models/aligned", out=f"{b}/sets/lost",
                                           workers=4, max_file_bytes=20_000, progress=False))
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=run)
    t.start()
    _kill_a_worker_node_when(world, lambda: len(_objects_keys(
        world["s3"], world["bucket"], "sets/lost/shards/")) >= 2)
    t.join(timeout=600)
    assert not t.is_alive()
    if "error" in box:
        raise box["error"]
    res = box["res"]
    # The same set as an in-process build, bit for bit (shards may be laid out differently).
    ref = AlignmentSet.open(_set(world, "main"))
    got = AlignmentSet.open(res.uri)
    assert got.content_id == ref.content_id
    for m in ref.rows:
        assert torch.equal(got.load(m).tensor, ref.load(m).tensor)
    _restore(world)


@pytest.mark.slow  # the single-node version runs by default: tests/test_faults.py
def test_the_driver_killed_then_rerun(world, tmp_path):
    b, s3, bucket = world["b"], world["s3"], world["bucket"]
    set_uri = _set(world, "main")
    cat = _adapters(world, tmp_path / "cat", 40, seed=3)
    _upload(s3, bucket, "cat-driver", cat)
    args = [sys.executable, "-m", "safelora_ray", "sanitize", "--alignment", set_uri,
            "--adapters", f"{b}/cat-driver", "--out", f"{b}/out-driver", "--threshold", "0.35",
            "--batch-size", "2", "--ray-address", world["cluster"].address, "--no-progress"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while len(_objects_keys(s3, bucket, "out-driver/_ledger/")) < 5:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    done = len(_objects_keys(s3, bucket, "out-driver/_ledger/"))
    assert done < 40
    rerun = subprocess.run([*args[:-1], "--json"], cwd=REPO, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    counts = json.loads(rerun.stdout)["counts"]
    assert counts["total"] == 40 and counts["error"] == 0
    assert counts["skipped"] >= done - 2  # those in flight when it died may be redone
    configs = [k for k in _objects_keys(s3, bucket, "out-driver/")
               if k.endswith("adapter_config.json")]
    assert len(configs) == 40
