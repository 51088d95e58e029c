"""Figures of docs/reliability.md §6: a 4-node Ray cluster on loopback (tests/cluster_harness.py:
a head and 3 worker nodes of 1 CPU each, the worker nodes on private disks), S3 through a real
S3 server on loopback (SeaweedFS, tests/seaweedfs.py); sanitize and build timed without faults,
with a worker node killed mid-run (on a full cluster and with spare capacity), with the S3
server restarted mid-run and with the driver killed mid-run.

    .venv/bin/python -m tests.cluster_figures \
        --out-json benchmarks/results/issue23/cluster-4nodes-seaweedfs.json

Not a test (pytest does not collect it): it measures what tests/test_cluster.py checks.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


class _Drops(logging.Handler):
    """Times of the executor's 'dropping worker' and successor messages."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg.startswith("dropping worker"):
            self.events.append((time.monotonic(), msg))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapters", type=int, default=120)
    p.add_argument("--out-json", default=None)
    p.add_argument("--ray-default-health", action="store_true",
                   help="keep Ray's default node health checks (a lost node is declared dead "
                        "after ~30 s instead of ~3 s)")
    args = p.parse_args(argv)

    load_start = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="slr-fig-", dir="/tmp"))
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    os.environ.update(RAY_AUTH_TOKEN_PATH=str(token), RAY_AUTH_MODE="token",
                      RAY_TMPDIR=str(root))
    if not args.ray_default_health:
        os.environ.update(RAY_health_check_period_ms="1000",
                          RAY_health_check_failure_threshold="3",
                          RAY_health_check_initial_delay_ms="1000",
                          RAY_health_check_timeout_ms="1000")
    from tests.seaweedfs import SeaweedFS

    server = SeaweedFS(root / "seaweedfs").start()
    os.environ.update(server.env())
    import boto3
    import ray
    import torch

    from safelora_ray import BuildConfig, SanitizeConfig, build, sanitize
    from safelora_ray.cli.demo import write_adapter, write_model
    from tests.cluster_harness import LocalCluster
    from tests.factory import Arch, aligned_from, llama_tensors

    drops = _Drops()
    logging.getLogger("safelora_ray").addHandler(drops)
    logging.getLogger("safelora_ray").setLevel(logging.INFO)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="fig")
    data = root / "data"
    base = llama_tensors(Arch(layers=4, hidden=64, intermediate=96))
    write_model(data / "base", base)
    write_model(data / "aligned", aligned_from(base))

    def upload(prefix: str, path: Path) -> None:
        for f in sorted(path.rglob("*")):
            if f.is_file():
                s3.upload_file(str(f), "fig", f"{prefix}/{f.relative_to(path).as_posix()}")

    def keys(prefix: str) -> int:
        n = 0
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket="fig", Prefix=prefix):
            n += len(page.get("Contents", []))
        return n

    upload("models/base", data / "base")
    upload("models/aligned", data / "aligned")
    # A bigger pair for the build that loses a node (the small one builds in a blink).
    big = llama_tensors(Arch(layers=24, hidden=256, intermediate=64, vocab=64))
    write_model(data / "big-base", big)
    write_model(data / "big-aligned", aligned_from(big))
    upload("models/big-base", data / "big-base")
    upload("models/big-aligned", data / "big-aligned")
    mods = sorted(k[: -len(".weight")] for k in base if k.endswith(("q_proj.weight",
                                                                      "v_proj.weight")))
    g = torch.Generator().manual_seed(0)
    for i in range(args.adapters):
        lora = {m: (torch.randn(4, base[m + ".weight"].shape[1], generator=g),
                    torch.randn(base[m + ".weight"].shape[0], 4, generator=g)) for m in mods}
        write_adapter(data / "cat" / f"t{i % 4}" / f"a{i:04d}", lora, 4)
    upload("cat", data / "cat")
    b = "s3://fig"

    cluster = LocalCluster(root)
    figures: dict[str, Any] = {"adapters": args.adapters, "nodes": 4, "cpus_per_node": 1,
                               "s3_server": "SeaweedFS " + server.version(),
                               "fast_health_checks": not args.ray_default_health}
    t0 = time.monotonic()
    cluster.start_head()
    for k in range(3):
        cluster.add_node(f"node{k}", private=[data])
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes(4)
    figures["cluster_start_s"] = round(time.monotonic() - t0, 1)

    def restore() -> None:
        if sum(1 for n in cluster.nodes if n.alive()) < 4:
            cluster.add_node(f"node{len(cluster.nodes)}", private=[data])
            cluster.wait_for_nodes(4)

    def busy_node() -> Any:
        for node in cluster.nodes:
            if node.name == "head" or not node.alive():
                continue
            for pid in node.pids():
                try:
                    if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(
                            b"ray::SafeLoraWorker"):
                        return node
                except OSError:
                    continue
        return None

    def timed_sanitize(name: str, kill_at: int | None, workers: int | None,
                       restart_s3: bool = False) -> dict[str, Any]:
        drops.events.clear()
        out = f"{b}/out-{name}"
        box: dict[str, Any] = {}

        def run() -> None:
            box["res"] = sanitize(SanitizeConfig(alignment=f"{b}/set", adapters=f"{b}/cat",
                                                 out=out, threshold=0.35, batch_size=2,
                                                 workers=workers, progress=False))

        t = threading.Thread(target=run)
        start = time.monotonic()
        t.start()
        killed = None
        if kill_at is not None:
            while keys(f"out-{name}/_ledger/") < kill_at:
                time.sleep(0.05)
            killed = time.monotonic()
            if restart_s3:
                server.restart(down_s=2.0)
            else:
                busy_node().kill()
        restarted_s = time.monotonic() - killed if restart_s3 and killed else None
        t.join()
        res = box["res"]
        fig = {"wall_s": round(time.monotonic() - start, 2), "ok": res.ok, "error": res.error,
               "adapters_per_s": round(res.total / res.duration_s, 2),
               "report": keys(f"out-{name}/_reports/{res.run_id}/summary.json") == 1}
        if restarted_s is not None:
            fig["s3_restarted_after_adapters"] = kill_at
            fig["s3_down_s"] = round(restarted_s, 2)  # killed until it answered again
        elif killed is not None:
            fig["killed_after_adapters"] = kill_at
            fig["drops"] = len(drops.events)
            fig["first_drop_after_kill_s"] = (round(drops.events[0][0] - killed, 2)
                                              if drops.events else None)
            fig["successor"] = any("and a new one" in m for _, m in drops.events)
        print(name, fig, flush=True)
        return fig

    try:
        t = time.monotonic()
        build(BuildConfig(base=f"{b}/models/base", aligned=f"{b}/models/aligned",
                          out=f"{b}/set", workers=4, progress=False))
        figures["build_4_workers_s"] = round(time.monotonic() - t, 2)
        figures["sanitize_no_fault"] = timed_sanitize("plain", None, None)
        figures["sanitize_node_lost_full"] = timed_sanitize("full", args.adapters // 4, None)
        restore()
        figures["sanitize_node_lost_spare"] = timed_sanitize("spare", args.adapters // 4, 2)
        restore()
        # The S3 server restarted mid-run (killed, 2 s down, started on the same data): the
        # requests meanwhile are retried (storage/s3_outage); then the same command again.
        figures["sanitize_s3_restarted"] = timed_sanitize("s3restart", args.adapters // 4,
                                                          None, restart_s3=True)
        rerun = sanitize(SanitizeConfig(alignment=f"{b}/set", adapters=f"{b}/cat",
                                        out=f"{b}/out-s3restart", threshold=0.35,
                                        batch_size=2, progress=False))
        figures["sanitize_s3_restarted"]["rerun"] = {"ok": rerun.ok, "skipped": rerun.skipped,
                                                     "error": rerun.error,
                                                     "wall_s": round(rerun.duration_s, 2)}
        # A build losing a node: its shards go elsewhere; the set is the same set.
        drops.events.clear()
        box: dict[str, Any] = {}

        def run_build(out: str) -> None:
            box["res"] = build(BuildConfig(base=f"{b}/models/big-base",
                                           aligned=f"{b}/models/big-aligned", out=out,
                                           workers=4, max_file_bytes=300_000, progress=False))

        start = time.monotonic()
        run_build(f"{b}/set-big")
        figures["build_big_4_workers_s"] = round(time.monotonic() - start, 2)
        ref_id = box["res"].content_id
        th = threading.Thread(target=run_build, args=(f"{b}/set-lost",))
        start = time.monotonic()
        th.start()
        victim = None
        while victim is None or keys("set-lost/shards/") < 1:
            victim = victim or busy_node()
            time.sleep(0.02)
        killed = time.monotonic()
        victim.kill()
        th.join()
        figures["build_node_lost"] = {
            "wall_s": round(time.monotonic() - start, 2),
            "first_drop_after_kill_s": (round(drops.events[0][0] - killed, 2)
                                        if drops.events else None),
            "same_content_id": box["res"].content_id == ref_id}
        print("build_node_lost", figures["build_node_lost"], flush=True)
        restore()
        # The driver killed mid-run, then the same command again.
        cmd = [sys.executable, "-m", "safelora_ray", "sanitize", "--alignment", f"{b}/set",
               "--adapters", f"{b}/cat", "--out", f"{b}/out-driver", "--threshold", "0.35",
               "--batch-size", "2", "--ray-address", cluster.address, "--no-progress"]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        while keys("out-driver/_ledger/") < args.adapters // 3:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        done = keys("out-driver/_ledger/")
        start = time.monotonic()
        rerun = subprocess.run([*cmd, "--json"], cwd=REPO, capture_output=True, text=True)
        counts = json.loads(rerun.stdout)["counts"]
        figures["driver_killed_then_rerun"] = {
            "done_before_kill": done, "rerun_s": round(time.monotonic() - start, 2),
            "rerun_counts": counts}
        print("driver_killed_then_rerun", figures["driver_killed_then_rerun"], flush=True)
    finally:
        ray.shutdown()
        cluster.stop()
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    figures["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "load_avg_start": load_start,
                          "load_avg_end": os.getloadavg()}
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
