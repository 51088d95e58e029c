"""Reports of a ``project-model`` run: ``layers.parquet`` for machines, ``summary.json`` and a
self-contained ``report.html`` (a cosine histogram marking τ, drawn by :mod:`.charts` like the
fleet report's, and the selected modules) for people.

One row per target module (a 70B model has at most a few hundred), so everything is built in
memory and published at the end, ``summary.json`` last.
"""

from __future__ import annotations

import html
import io
import json
import logging
import math
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from safelora_ray.reports.charts import DEFS, hist_svg
from safelora_ray.storage import Storage

logger = logging.getLogger(__name__)

LAYERS_FILE = "layers.parquet"
SUMMARY_FILE = "summary.json"
HTML_FILE = "report.html"

LAYERS_SCHEMA = pa.schema([
    ("module", pa.string()), ("tensor", pa.string()), ("layer", pa.int32()),
    ("kind", pa.string()), ("layout", pa.string()), ("shape", pa.list_(pa.int64())),
    ("dtype", pa.string()), ("file", pa.string()), ("form", pa.string()),
    ("proj_rank", pa.int32()), ("cos", pa.float64()), ("cos_rounded", pa.float64()),
    ("selected", pa.bool_()), ("norm_delta", pa.float64()), ("norm_projected", pa.float64()),
])
#: Histogram of rounded cosines: bins of 0.05 over [-1, 1].
BINS = 40


def histogram(values: Sequence[float], bins: int = BINS, lo: float = -1.0,
              hi: float = 1.0) -> list[int]:
    """Counts of the finite ``values`` in ``bins`` equal bins over [lo, hi] (edges clamped)."""
    counts = [0] * bins
    for v in values:
        if v is None or not math.isfinite(v):
            continue
        i = int((min(max(v, lo), hi) - lo) / (hi - lo) * bins)
        counts[min(i, bins - 1)] += 1
    return counts


def write_reports(storage: Storage, rows: Sequence[dict[str, Any]],
                  summary: dict[str, Any]) -> None:
    """Publish ``layers.parquet``, ``report.html`` and, last, ``summary.json`` (which gains
    the cosine histogram) under ``storage``."""
    table = pa.Table.from_pylist(list(rows), schema=LAYERS_SCHEMA)
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    storage.put_bytes(LAYERS_FILE, sink.getvalue())
    summary = {**summary, "histogram": {
        "range": [-1.0, 1.0], "bins": BINS,
        "counts": histogram([r["cos_rounded"] for r in rows])}}
    storage.put_bytes(HTML_FILE, render_html(rows, summary).encode())
    storage.put_bytes(SUMMARY_FILE,
                      json.dumps(summary, indent=2, ensure_ascii=False).encode())


def render_html(rows: Sequence[dict[str, Any]], summary: dict[str, Any]) -> str:
    """A one-page, dependency-free report of the run."""
    e = html.escape
    c = summary["counts"]
    b = summary["bytes"]
    sel = summary["selection"]
    rule = (f"threshold τ = {sel['threshold']}" if sel["mode"] == "threshold"
            else f"{sel['num_proj_layers']} smallest cosines over all target modules "
                 f"(τ = {summary.get('tau')}{', strict' if sel.get('strict') else ''})")
    facts = [
        ("fine-tune", summary["finetuned"]["uri"]),
        ("aligned", f"{summary['aligned']['uri']} ({summary['aligned']['matches_set']})"),
        ("alignment set", f"{summary['alignment']['uri']} ({summary['alignment']['content_id']}, "
                          f"{summary['alignment']['method'].get('name')})"),
        ("output", summary["out"]),
        ("selection", rule),
        ("modules", f"{c['selected']} of {c['modules']} projected"),
        ("bytes read", f"{b['read']:,} ({b['read_ratio']:.4f} x the {b['must_read']:,} that "
                       "must be read)"),
        ("run", f"{summary['run_id']}: {summary['duration_s']:.1f} s on "
                f"{summary['workers'] or 'in-process'} {summary['device']} worker(s)"),
    ]
    fact_rows = "".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in facts)
    body = []
    for r in rows:
        cos = r["cos_rounded"]
        body.append(
            f"<tr class=\"{'sel' if r['selected'] else ''}\"><td>{e(r['module'])}</td>"
            f"<td>{'' if r['layer'] is None else r['layer']}</td><td>{e(r['kind'])}</td>"
            f"<td>{'x'.join(map(str, r['shape']))}</td>"
            f"<td>{'NaN' if cos is None or math.isnan(cos) else f'{cos:.5f}'}</td>"
            f"<td>{r['norm_delta']:.4g}</td><td>{r['norm_projected']:.4g}</td>"
            f"<td>{'yes' if r['selected'] else ''}</td></tr>")
    counts = summary["histogram"]["counts"]
    tau = summary.get("tau")
    hist = hist_svg(counts, -1.0, 2.0 / len(counts), closed="left", width=640,
                    title=f"Rounded cosines of the {c['modules']} target modules "
                          f"(bins of {2.0 / len(counts):g})",
                    xlabel="rounded cosine cos(ΔW, CΔW)", ylabel="modules", tau=tau,
                    tau_label=f"τ = {tau:g}" if tau is not None else "", hatch_upto=tau)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>safelora-ray project-model
{e(summary['run_id'])}</title>
<style>body{{font:14px system-ui,sans-serif;margin:2em;max-width:1100px}}
table{{border-collapse:collapse}}td,th{{padding:2px 8px;text-align:left;
border-bottom:1px solid #ddd}}tr.sel td{{background:#fdecea}}</style></head><body>
<h1>Projected fine-tune</h1>
<table>{fact_rows}</table>
<h2>Cosines cos(ΔW, CΔW), rounded (hatched: projected)</h2>
{DEFS}{hist}
<h2>Target modules</h2>
<table><tr><th>module</th><th>layer</th><th>kind</th><th>d_out x d_in</th><th>cos</th>
<th>‖ΔW‖</th><th>‖CΔW‖</th><th>projected</th></tr>{"".join(body)}</table>
</body></html>
"""


__all__ = ["LAYERS_SCHEMA", "histogram", "render_html", "write_reports"]
