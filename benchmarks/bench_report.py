"""The fleet report at scale: rows of N synthetic adapters through ``ReportWriter``, a first run
and its incremental rerun, then the page's size and its render time in a headless browser.

No sanitization runs: the rows are synthesized as the workers send them (an ``ok`` row with one
row per module, an ``error`` row with a real message of each kind, a ``skipped`` row carrying
its ledger figures), and go through the same ``ReportWriter.add`` / ``finish`` path as a real
run, fleet state and index included, onto local storage. The rerun is a normal nightly: most
adapters skipped, a few re-sanitized, newly failing, fixed, new and removed.

Measured per run: seconds in ``add`` (the driver's share of a run) and in ``finish``, the
driver's RSS (growth during ``add``, per adapter, and the peak during ``finish``), the sizes of
the published files, and, with Debian's ``chromium``, the page's load + layout time in a fresh
headless browser (``performance.now()`` at the load event after forcing layout; median of
``--repeats``) and the wall time of a whole ``chromium --screenshot`` process. ``--screenshot
DIR`` keeps a full-page PNG of each run's report.

    .venv/bin/python benchmarks/bench_report.py --n 100000
    .venv/bin/python benchmarks/bench_report.py --n 10000 --screenshot docs/
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from benchlib.runs import emit, machine_info, median, mib, setup_logging, workdir

from safelora_ray.pipelines.sanitize.driver import SanitizeResult
from safelora_ray.reports import ReportWriter
from safelora_ray.storage import open_storage

TAU = 0.35
# Real messages, as the code words them (formats/peft_adapter.py, sanitize.py, catalog.py).
ERRORS = (
    "DoRA adapter (use_dora in adapter_config.json) is not covered by the Safe LoRA rule",
    "module 'model.layers.0.self_attn.q_proj' has A [8, 5120] and B [5120, 8], but the "
    "alignment set's weight is 4096x4096 (an adapter for another base model?)",
    "tensor 'base_model.model.model.layers.3.self_attn.v_proj.lora_B.weight' has non-finite "
    "values (12 NaN, 0 Inf)",
    "adapter_config.json is not valid JSON: Expecting value: line 1 column 1 (char 0)",
    "pickle-only adapter: /tenants/x has adapter_model.bin but no adapter_model.safetensors; "
    "pickles are never unpickled; convert the adapter to safetensors",
    "adapter_model.safetensors is missing in /tenants/x",
    "2 module(s) have no entry in alignment set als-0123 (targets q_proj,v_proj): "
    "model.layers.0.self_attn.k_proj, model.layers.1.self_attn.k_proj",
)


@dataclass(frozen=True)
class _Row:
    layer: int
    kind: str


@dataclass
class FakeSet:
    """What ``ReportWriter`` reads of an alignment set."""

    layers: int
    kinds: tuple[str, ...]
    uri: str = "/sets/llama2-7b-qv"
    content_id: str = "als-bench"
    rows: dict[str, _Row] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for layer in range(self.layers):
            for k in self.kinds:
                self.rows[f"model.layers.{layer}.self_attn.{k}"] = _Row(layer, k)

    @property
    def targets(self) -> list[str]:
        return list(self.kinds)


def _scores(aset: FakeSet, seed: int) -> dict[str, float]:
    """Rounded cosines of one adapter: mostly near 1, deeper layers drifting more (~12 % at or
    below 0.35, as the paper's τ = 0.35 projects ~11 %)."""
    rng = random.Random(seed)
    out = {}
    for m, r in aset.rows.items():
        sigma = 0.3 + 0.25 * r.layer / max(1, aset.layers - 1)
        out[m] = round(max(-0.3, min(1.0, 1 - abs(rng.gauss(0, sigma)))), 5)
    return out


def _ok(aid: str, aset: FakeSet, seed: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    sc = _scores(aset, seed)
    rng = random.Random(seed + 1)
    layers, dists = [], []
    for m, c in sc.items():
        proj = c <= TAU
        d = 0.0 if proj else (1 - c) * rng.uniform(0.5, 3.0)
        dists.append(d)
        r = aset.rows[m]
        layers.append({"adapter_id": aid, "module": m, "layer": r.layer, "kind": r.kind,
                       "rank": 8, "cos": c, "cos_rounded": c, "projected": proj,
                       "norm_delta": 1.0, "norm_projected": 1.0, "dist": d})
    pdst = sum(1 / (1 + d) for d in dists) / len(dists)
    proj = sum(1 for lr in layers if lr["projected"])
    row = _base(aid) | {"status": "ok", "modules": len(sc), "projected": proj, "pdst": pdst,
                        "output_digest": f"sha256:{seed:016x}", "bytes_in": 16_000_000,
                        "bytes_out": 16_000_000}
    return row, layers


def _skip(aid: str, aset: FakeSet, seed: int, run_id: str) -> dict[str, Any]:
    row, layers = _ok(aid, aset, seed)
    chosen = [lr["module"] for lr in layers if lr["projected"]]
    return _base(aid) | {"status": "skipped", "projected": len(chosen),
                         "output_digest": row["output_digest"],
                         "note": "unchanged since the last run (ledger)",
                         "prior": {"run_id": run_id, "modules": row["modules"],
                                   "projected": chosen, "pdst": row["pdst"],
                                   "scores": {lr["module"]: lr["cos_rounded"] for lr in layers}}}


def _error(aid: str, seed: int) -> dict[str, Any]:
    return _base(aid) | {"error": f"adapter {aid!r}: {ERRORS[seed % len(ERRORS)]}"}


def _base(aid: str) -> dict[str, Any]:
    return {"adapter_id": aid, "source_uri": f"/tenants/{aid}", "status": "error", "error": None,
            "modules": 0, "projected": 0, "pdst": None, "source_digest": None,
            "output_digest": None, "base_model": "meta-llama/Llama-2-7b-chat-hf", "bytes_in": 0,
            "bytes_out": 0, "read_s": 0.0, "compute_s": 0.0, "write_s": 0.0, "batch_s": 0.0,
            "untouched": 0, "note": None}


def fleet_ids(n: int, tenants: int, seed: int) -> list[str]:
    """``tenant-XXXX/adapter-XXXXXX`` ids; a few tenants own many adapters (skewed)."""
    rng = random.Random(seed)
    return [f"tenant-{int(tenants * rng.random() ** 2):04d}/adapter-{i:06d}" for i in range(n)]


class Rss:
    """Peak RSS of this process, sampled every 20 ms while active."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._t: threading.Thread | None = None

    def __enter__(self) -> Rss:
        self.peak = self.proc.memory_info().rss
        self._stop.clear()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._t is not None
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def run_report(out: Path, run_id: str, rows: Any, aset: FakeSet, n_rows: int,
               batch: int) -> dict[str, Any]:
    """Feed ``rows`` (an iterator of (adapter row, layer rows)) through one ReportWriter."""
    res = SanitizeResult(run_id, str(out), str(out / "_reports" / run_id), alignment_id="bench")
    w = ReportWriter(run_id, aset, {"mode": "threshold", "threshold": TAU}, "/tenants",
                     tenant_depth=1)
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    rss_10 = None
    t0 = time.perf_counter()
    done = 0
    a_batch: list[dict[str, Any]] = []
    l_batch: list[dict[str, Any]] = []
    with Rss() as add_rss:
        for row, layers in rows:
            res.total += 1
            setattr(res, row["status"], getattr(res, row["status"]) + 1)
            res.modules += row["modules"]
            res.projected += row["projected"] if row["status"] == "ok" else 0
            a_batch.append(row)
            l_batch.extend(layers)
            if len(a_batch) == batch:
                w.add(a_batch, l_batch)
                done += len(a_batch)
                a_batch, l_batch = [], []
                if rss_10 is None and done >= n_rows // 10:
                    rss_10 = (done, proc.memory_info().rss)
        if a_batch:
            w.add(a_batch, l_batch)
    add_s = time.perf_counter() - t0
    rss_add_end = proc.memory_info().rss
    res.duration_s = add_s
    with Rss() as fin_rss:
        t0 = time.perf_counter()
        w.finish(open_storage(str(out)), f"_reports/{run_id}", res)
        finish_s = time.perf_counter() - t0
    rdir = out / "_reports" / run_id
    sizes = {p.name: p.stat().st_size for p in sorted(rdir.iterdir())}
    growth = None
    if rss_10 is not None and n_rows > rss_10[0]:
        growth = (rss_add_end - rss_10[1]) / (n_rows - rss_10[0])
    return {
        "run_id": run_id, "adapters": res.total, "ok": res.ok, "skipped": res.skipped,
        "error": res.error, "add_s": round(add_s, 2), "finish_s": round(finish_s, 2),
        "rss_start_mib": mib(rss0), "rss_add_end_mib": mib(rss_add_end),
        "rss_peak_add_mib": mib(add_rss.peak), "rss_peak_finish_mib": mib(fin_rss.peak),
        "finish_extra_mib": mib(fin_rss.peak - rss_add_end),
        "add_growth_bytes_per_adapter_after_10pct": None if growth is None else round(growth, 1),
        "files": sizes, "report_html_bytes": sizes.get("report.html"),
        "report": str(rdir / "report.html"),
    }


def first_run(ids: list[str], aset: FakeSet, fail_rate: float, seed: int) -> Any:
    rng = random.Random(seed)
    for i, aid in enumerate(ids):
        if rng.random() < fail_rate:
            yield _error(aid, i), []
        else:
            yield _ok(aid, aset, seed * 1_000_003 + i)


def rerun(ids: list[str], aset: FakeSet, fail_rate: float, seed: int, prev_run: str) -> Any:
    """The nightly after: 0.5 % re-sanitized (new versions), 0.2 % newly failing, a third of
    the failures fixed, 0.2 % removed from the catalog, 0.5 % new adapters; the rest skipped."""
    rng = random.Random(seed)
    change = random.Random(seed + 7)
    for i, aid in enumerate(ids):
        failed_before = rng.random() < fail_rate
        u = change.random()
        if u < 0.002:
            continue  # removed from the catalog
        if failed_before:
            if u < 0.33:
                yield _ok(aid, aset, seed * 1_000_003 + i + 17)  # fixed
            else:
                yield _error(aid, i), []
        elif u < 0.004:
            yield _error(aid, i + 3), []  # newly failing
        elif u < 0.009:
            yield _ok(aid, aset, seed * 1_000_003 + i + 29)  # a new version, re-sanitized
        else:
            yield _skip(aid, aset, seed * 1_000_003 + i, prev_run), []
    extra = max(1, len(ids) // 200)
    for j in range(extra):
        aid = f"tenant-new/adapter-{j:06d}"
        yield _ok(aid, aset, seed * 7_000_003 + j)


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--hide-scrollbars"]
PROBE = ("<script>addEventListener('load',function(){var h=document.body.offsetHeight;"
         "document.documentElement.setAttribute('data-render-ms',performance.now().toFixed(1));"
         "});</script>")


def _chrome(exe: str, *args: str, timeout: float = 120) -> tuple[float, str]:
    profile = tempfile.mkdtemp(prefix="bench-chromium-")
    try:
        t0 = time.perf_counter()
        p = subprocess.run([exe, *CHROME_FLAGS, f"--user-data-dir={profile}", *args],
                           capture_output=True, text=True, timeout=timeout)
        return time.perf_counter() - t0, p.stdout
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def render(exe: str, report: str, repeats: int, shot: Path | None,
           width: int = 1280) -> dict[str, Any]:
    """Load + layout time of the page in headless Chromium; a screenshot when asked."""
    html = Path(report).read_text(encoding="utf-8")
    probe = Path(tempfile.mkdtemp(prefix="bench-page-")) / "report.html"
    probe.write_text(html.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    blank = probe.parent / "blank.html"
    blank.write_text("<!doctype html><p>blank</p>" + PROBE)
    ms, blank_ms, wall = [], [], []
    try:
        for _ in range(repeats):
            for page, acc in ((probe, ms), (blank, blank_ms)):
                secs, dom = _chrome(exe, "--dump-dom", page.as_uri())
                m = re.search(r'data-render-ms="([0-9.]+)"', dom)
                acc.append(float(m.group(1)) if m else math.nan)
                if page is probe:
                    wall.append(secs)
        height = None
        if shot is not None:
            # The page's height, then one full-page screenshot at that height.
            hprobe = probe.parent / "height.html"
            hprobe.write_text(html.replace("</body>", (
                "<script>addEventListener('load',function(){document.documentElement"
                ".setAttribute('data-h',document.documentElement.scrollHeight);});</script>"
                "</body>")), encoding="utf-8")
            _, dom = _chrome(exe, f"--window-size={width},900", "--dump-dom", hprobe.as_uri())
            m = re.search(r'data-h="([0-9]+)"', dom)
            height = min(16000, int(m.group(1)) if m else 4000)
            shot.parent.mkdir(parents=True, exist_ok=True)
            _chrome(exe, f"--window-size={width},{height}", f"--screenshot={shot}",
                    Path(report).as_uri())
    finally:
        shutil.rmtree(probe.parent, ignore_errors=True)
    return {"load_layout_ms_median": median(ms), "load_layout_ms_runs": ms,
            "blank_page_ms_median": median(blank_ms), "chromium_process_s_median":
            round(median(wall), 2), "screenshot": str(shot) if shot else None,
            "screenshot_height": height}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000, help="adapters (default 100000)")
    p.add_argument("--tenants", type=int, default=None, help="default: n / 40")
    p.add_argument("--layers", type=int, default=32, help="layers (default 32, Llama-2-7B)")
    p.add_argument("--kinds", default="q_proj,v_proj", help="module kinds per layer")
    p.add_argument("--fail-rate", type=float, default=0.02)
    p.add_argument("--batch-size", type=int, default=32, help="adapters per add() call")
    p.add_argument("--no-rerun", action="store_true", help="only the first run")
    p.add_argument("--repeats", type=int, default=3, help="browser loads per page")
    p.add_argument("--no-browser", action="store_true", help="skip the headless browser")
    p.add_argument("--screenshot", default=None,
                   help="folder for report-<n>-run.png and report-<n>-rerun.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--out-json", default=None)
    p.add_argument("--smoke", action="store_true", help="tiniest sizes (for the smoke test)")
    args = p.parse_args(argv)
    setup_logging()
    if args.smoke:
        args.n, args.layers, args.repeats = 60, 2, 1
    tenants = args.tenants or max(1, args.n // 40)
    aset = FakeSet(args.layers, tuple(args.kinds.split(",")))
    ids = sorted(fleet_ids(args.n, tenants, args.seed))
    exe = None if args.no_browser else _chromium()
    shots = Path(args.screenshot) if args.screenshot else None
    runs = []
    with workdir(args.workdir, args.keep, "bench-report-") as wd:
        out = wd / "out"
        r1 = run_report(out, "run-1", first_run(ids, aset, args.fail_rate, args.seed), aset,
                        args.n, args.batch_size)
        runs.append(r1)
        if not args.no_rerun:
            runs.append(run_report(out, "run-2", rerun(ids, aset, args.fail_rate, args.seed,
                                                       "run-1"), aset, args.n,
                                   args.batch_size))
        for r, name in zip(runs, ("run", "rerun"), strict=False):
            r["render"] = (render(exe, r["report"], args.repeats,
                                  shots / f"report-{args.n}-{name}.png" if shots else None)
                           if exe else None)
            summary = json.loads((Path(r["report"]).parent / "summary.json").read_text())
            r["fleet"] = summary["fleet"]
            r["failure_groups"] = {g["cause"]: g["count"] for g in summary["failure_groups"]}
            r["tenants_total"] = summary["tenants_total"]
            r["near_tau"] = summary["near_threshold"]["within"]
        index_bytes = (out / "_reports" / "index.html").stat().st_size
    result = {
        "benchmark": "report", "machine": machine_info(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "inputs": {"n": args.n, "tenants": tenants, "layers": args.layers,
                   "kinds": aset.targets, "modules_per_adapter": len(aset.rows),
                   "fail_rate": args.fail_rate, "batch_size": args.batch_size},
        "chromium": None if exe is None else subprocess.run(
            [exe, "--version"], capture_output=True, text=True).stdout.strip(),
        "runs": runs, "index_html_bytes": index_bytes,
    }
    rows = [[r["run_id"], r["adapters"], r["ok"], r["skipped"], r["error"], r["add_s"],
             r["finish_s"], r["add_growth_bytes_per_adapter_after_10pct"],
             r["finish_extra_mib"], round(r["report_html_bytes"] / 1e6, 3),
             round(sum(r["files"].values()) / 1e6, 2),
             (r["render"] or {}).get("load_layout_ms_median"),
             (r["render"] or {}).get("chromium_process_s_median")] for r in runs]
    emit(result, [(f"Report of {args.n:,} adapters ({len(aset.rows)} modules each, "
                   f"{tenants:,} tenants)",
                   ["run", "adapters", "ok", "skipped", "failed", "add s", "finish s",
                    "add B/adapter", "finish +MiB", "report.html MB", "run files MB",
                    "load+layout ms", "chromium s"], rows)], args.out_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
