"""What ``bench_fleet.py`` reads back from each run (the report's timings, the outputs'
digest), the inputs it can reuse, and its per-run CPU tables.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

from benchlib.cpu import PROCESS_HEADERS, THREAD_HEADERS, process_rows, thread_rows


def report_timings(out_uri: str, run_id: str, batch_size: int) -> dict[str, float]:
    """Sum the per-adapter timings of a sanitize run's adapters.parquet."""
    import pyarrow.parquet as pq

    from safelora_ray.storage import open_storage

    raw = open_storage(out_uri).read(f"_reports/{run_id}/adapters.parquet")
    t = pq.read_table(io.BytesIO(raw)).to_pydict()
    n = len(t["adapter_id"])
    return {"adapters": n, "read_s": round(sum(t["read_s"]), 3),
            "compute_s": round(sum(t["compute_s"]), 3), "write_s": round(sum(t["write_s"]), 3),
            # every row of a batch carries the batch's time: Σ rows / batch size ≈ Σ batches
            "batch_s_sum": round(sum(t["batch_s"]) / min(batch_size, max(n, 1)), 3)}


def cpu_tables(mode: str, n: int, run: dict[str, Any]
               ) -> list[tuple[str, list[str], list[list[Any]]]]:
    """The per-process and per-thread CPU tables of one run's sanitize."""
    gil = run.get("gil")
    return [(f"CPU by process inside the sanitize ({mode}, N={n}, median run"
             + ("; GIL held: share of py-spy's samples" if gil else "") + ")",
             PROCESS_HEADERS, process_rows(run["cpu"], gil)),
            (f"the busiest threads inside the sanitize ({mode}, N={n}, median run)",
             THREAD_HEADERS, thread_rows(run["cpu"], gil))]


def reuse_inputs(root: Path, n: int) -> tuple[dict[str, Any], Path, list[Path]]:
    """The pair and the first ``n`` adapters of a pool written before by this script (the
    same names: ``tenant-T/adapter-NNNNN``)."""
    pair = {"base": str(root / "models" / "base"), "aligned": str(root / "models" / "aligned"),
            "reused": str(root)}
    pool_root = root / "pool"
    pool = [pool_root / f"tenant-{k % 8}" / f"adapter-{k:05d}" for k in range(n)]
    missing = [p for p in pool if not (p / "adapter_model.safetensors").is_file()]
    if missing or not Path(pair["base"]).is_dir() or not Path(pair["aligned"]).is_dir():
        raise SystemExit(f"--inputs {root}: no pair under models/, or {len(missing)} of the "
                         f"{n} adapters missing under pool/ (first: {missing[:1]})")
    return pair, pool_root, pool


def median_run(rs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median wall time."""
    return sorted(rs, key=lambda r: r["s"])[len(rs) // 2]


def output_digests(out_uri: str, run_id: str) -> str:
    """One digest over every adapter's output digest (from the run's ``adapters.parquet``):
    equal between two runs exactly when they wrote the same bytes for the same adapters."""
    import pyarrow.parquet as pq

    from safelora_ray.storage import open_storage

    raw = open_storage(out_uri).read(f"_reports/{run_id}/adapters.parquet")
    t = pq.read_table(io.BytesIO(raw), columns=["adapter_id", "output_digest"]).to_pydict()
    pairs = sorted(zip(t["adapter_id"], t["output_digest"], strict=True))
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:16]
