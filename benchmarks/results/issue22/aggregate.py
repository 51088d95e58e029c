"""Issue 22's old-against-new tables (docs/benchmarks.md section 14) from run.sh's JSON."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).parent


def load(tag: str) -> dict | None:
    p = HERE / f"{tag}.json"
    return json.loads(p.read_text()) if p.exists() else None


def proxy() -> None:
    print("| run | code | sanitize s | I/O floor s | ratio | busiest thread ms/adapter (where) | "
          "all processes ms/adapter | floor's own CPU ms/adapter | holder CPU s | "
          "I/O workers CPU s | peak PSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in ("1", "2", "3", "gil"):
        for side in ("old", "new"):
            d = load(f"proxy-{side}-{r}")
            if d is None:
                continue
            res = d["results"][0]
            run = res["runs"][0]
            procs = run.get("cpu", {}).get("processes", [])
            by_role: dict[str, float] = {}
            for p in procs:
                by_role[p["role"]] = by_role.get(p["role"], 0.0) + p["cpu_s"]
            threads = run.get("cpu", {}).get("threads") or [{}]
            busiest = max(threads, key=lambda t: t.get("cpu_s", 0))
            holder = sum(v for k, v in by_role.items() if "holder" in k)
            io = sum(v for k, v in by_role.items() if "(io)" in k)
            print(f"| {r} | {side} | {res['sanitize_s']:.1f} | {res['io_floor_s_median']:.1f} | "
                  f"{res['sanitize_over_floor_median']:.2f} | "
                  f"{res['max_thread_cpu_ms_per_adapter']:.1f} ({busiest.get('role', '?')}) | "
                  f"{res['total_cpu_ms_per_adapter']:.1f} | "
                  f"{res.get('io_floor_cpu_ms_per_adapter', '-')} | {holder:.1f} | {io:.1f} | "
                  f"{res['peak_total_pss_median'] / 2**20:,.0f} |")


def cpu_nodes() -> None:
    rows: dict[tuple[str, int, str], list[float]] = {}
    for side in ("old", "new"):
        for r in ("1", "2"):
            d = load(f"cpu-{side}-{r}")
            if d is None:
                continue
            for res in d["results"]:
                for run in res["runs"]:
                    rows.setdefault((res["mode"], res["n"], side), []).append(run["sanitize_s"])
    print("| mode | N | old: sanitize s (runs) | new: sanitize s (runs) | new / old (medians) |")
    print("|---|---|---|---|---|")
    for mode in ("auto", "ray"):
        for n in (64, 256):
            old, new = rows.get((mode, n, "old"), []), rows.get((mode, n, "new"), [])
            if not old or not new:
                continue
            mo, mn = statistics.median(old), statistics.median(new)
            print(f"| {mode} | {n} | {mo:.2f} ({', '.join(f'{x:.2f}' for x in old)}) | "
                  f"{mn:.2f} ({', '.join(f'{x:.2f}' for x in new)}) | {mn / mo:.2f} |")


if __name__ == "__main__":
    {"proxy": proxy, "cpu": cpu_nodes}.get(sys.argv[1] if len(sys.argv) > 1 else "", lambda: (
        proxy(), print(), cpu_nodes()))()
