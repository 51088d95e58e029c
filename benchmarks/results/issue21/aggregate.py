"""Medians of issue 21's old-against-new runs (docs/benchmarks.md section 13), from the JSON
files beside this script."""

from __future__ import annotations

import glob
import json
import os
import statistics as st
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name: str) -> Any:
    with open(os.path.join(HERE, name)) as f:
        return json.load(f)


def _files(pattern: str) -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(HERE, pattern)))


def main() -> None:
    print("build (7B-shaped, 4 layers, 2 CPU workers, warm): build_s")
    for side in ("old", "new"):
        runs = [r["build_s"] for f in _files(f"build-{side}-*.json") for r in _load(f)["runs"]]
        print(f"  {side}: median {st.median(runs):.2f}, fastest {min(runs):.2f}, {len(runs)} runs")
    print("fleet (134M-shaped, r=8 q/v): sanitize_s")
    rows: dict[tuple[str, int], dict[str, dict[str, list[float]]]] = {}
    for side in ("old", "new"):
        for f in _files(f"fleet-{side}-*.json"):
            for res in _load(f)["results"]:
                cell = rows.setdefault((res["mode"], res["n"]), {}).setdefault(
                    side, {"sanitize": [], "rss": []})
                cell["sanitize"] += [r["sanitize_s"] for r in res["runs"]]
                cell["rss"].append(res["peak_total_rss_median"] / 2**20)
    for (mode, n), sides in sorted(rows.items()):
        for side, cell in sides.items():
            s = cell["sanitize"]
            print(f"  {mode} N={n} {side}: median {st.median(s):.3f}, fastest {min(s):.2f}, "
                  f"RSS {st.median(cell['rss']):.0f} MiB, {len(s)} runs")
    for side in ("old", "new"):
        print(f"project-model {side}: {_load(f'finetune-{side}.json')['summary']['s_median']} s")
        print(f"set load (checked) {side}: {_load(f'setload-{side}.json')['new_median_s']} s")


if __name__ == "__main__":
    main()
