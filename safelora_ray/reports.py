"""Run reports: Parquet for machines, ``summary.json``, a text summary and an HTML page.

Rows are streamed into Parquet writers on local temp files as batches finish, and only
fixed-size aggregates (histograms, per-layer counts) stay in memory, so a run over 100,000
adapters uses as much driver memory as one over 10. At the end everything is published under
``<out>/_reports/<run_id>/``, ``summary.json`` last.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import heapq
import html
import json
import logging
import math
import os
import shutil
import tempfile
from collections import Counter
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from safelora_ray._version import __version__
from safelora_ray.storage import Storage

if TYPE_CHECKING:
    from safelora_ray.formats.alignment_set import AlignmentSet
    from safelora_ray.pipelines.sanitize import SanitizeResult

logger = logging.getLogger(__name__)

ADAPTERS_SCHEMA = pa.schema([
    ("adapter_id", pa.string()), ("source_uri", pa.string()), ("status", pa.string()),
    ("error", pa.string()), ("modules", pa.int32()), ("projected", pa.int32()),
    ("pdst", pa.float64()), ("source_digest", pa.string()), ("output_digest", pa.string()),
    ("base_model", pa.string()), ("bytes_in", pa.int64()), ("bytes_out", pa.int64()),
    ("read_s", pa.float64()), ("compute_s", pa.float64()), ("write_s", pa.float64()),
    ("batch_s", pa.float64()), ("untouched", pa.int32()), ("note", pa.string()),
])
LAYERS_SCHEMA = pa.schema([
    ("adapter_id", pa.string()), ("module", pa.string()), ("layer", pa.int32()),
    ("kind", pa.string()), ("rank", pa.int32()), ("cos", pa.float64()),
    ("cos_rounded", pa.float64()), ("projected", pa.bool_()), ("norm_delta", pa.float64()),
    ("norm_projected", pa.float64()), ("dist", pa.float64()),
])
BINS = 20
#: Rows buffered before one Parquet row group is written. A Parquet writer keeps what it
#: needs of every row group until it closes (~20 KB per batch for the two files, measured), so
#: a row group per batch made the driver grow by ~1 KB per adapter at batch size 32 (issue #5's
#: load test); row groups of a few thousand rows keep it to a few bytes per adapter.
ROW_GROUP_ADAPTERS = 2048
ROW_GROUP_LAYERS = 8192


class ReportWriter:
    """Collects one run's rows and publishes its reports.

    Args:
        run_id: The run's id (report folder name).
        aset: The alignment set used.
        selection: The selection parameters.
        catalog: The catalog URI.
    """

    def __init__(self, run_id: str, aset: AlignmentSet, selection: dict[str, Any],
                 catalog: str):
        self.run_id = run_id
        self.alignment = {"uri": aset.uri, "content_id": aset.content_id,
                          "targets": aset.targets}
        self.selection = selection
        self.catalog = catalog
        self.started_at = _dt.datetime.now(_dt.timezone.utc)
        self._dir = tempfile.mkdtemp(prefix=f"safelora-report-{run_id}-")
        self._adapters = pq.ParquetWriter(os.path.join(self._dir, "adapters.parquet"),
                                          ADAPTERS_SCHEMA, compression="zstd")
        self._layers = pq.ParquetWriter(os.path.join(self._dir, "layers.parquet"),
                                        LAYERS_SCHEMA, compression="zstd")
        self.cos_hist = [0] * BINS
        self.pdst_hist = [0] * BINS
        self.layer_total: Counter[int] = Counter()
        self.layer_projected: Counter[int] = Counter()
        self.status: Counter[str] = Counter()
        self.errors: list[tuple[str, str]] = []  # first 50, for the summaries
        self.most_projected: list[tuple[int, str, float]] = []  # bounded heap, top 20
        # Rows not yet written, as small Arrow tables (compact, unlike the row dicts).
        self._pending_adapters: list[pa.Table] = []
        self._pending_layers: list[pa.Table] = []
        self._pending_rows = [0, 0]

    def add(self, adapters: list[dict[str, Any]], layers: list[dict[str, Any]]) -> None:
        """Append rows (one batch) to the reports and update the aggregates."""
        if adapters:
            self._pending_adapters.append(pa.Table.from_pylist(adapters, schema=ADAPTERS_SCHEMA))
            self._pending_rows[0] += len(adapters)
        if layers:
            self._pending_layers.append(pa.Table.from_pylist(layers, schema=LAYERS_SCHEMA))
            self._pending_rows[1] += len(layers)
        self._flush(force=False)
        for row in adapters:
            self.status[row["status"]] += 1
            if row["status"] == "error" and len(self.errors) < 50:
                self.errors.append((row["adapter_id"], row["error"] or ""))
            p = row.get("pdst")
            if row["status"] == "ok" and p is not None and math.isfinite(p):
                self.pdst_hist[_bin(p, 0.0, 1.0)] += 1
                item = (int(row["projected"]), row["adapter_id"], float(p))
                if len(self.most_projected) < 20:
                    heapq.heappush(self.most_projected, item)
                else:
                    heapq.heappushpop(self.most_projected, item)
        for row in layers:
            c = row["cos"]
            if c is not None and math.isfinite(c):
                self.cos_hist[_bin(c, -1.0, 1.0)] += 1
            layer = row["layer"] if row["layer"] is not None else -1
            self.layer_total[layer] += 1
            self.layer_projected[layer] += bool(row["projected"])

    def _flush(self, force: bool) -> None:
        """Write the buffered rows as one row group per file once there are enough."""
        if self._pending_adapters and (force or self._pending_rows[0] >= ROW_GROUP_ADAPTERS):
            self._adapters.write_table(pa.concat_tables(self._pending_adapters))
            self._pending_adapters, self._pending_rows[0] = [], 0
        if self._pending_layers and (force or self._pending_rows[1] >= ROW_GROUP_LAYERS):
            self._layers.write_table(pa.concat_tables(self._pending_layers))
            self._pending_layers, self._pending_rows[1] = [], 0

    def abort(self) -> None:
        """Drop the partial reports of a run that failed (nothing is published)."""
        for w in (self._adapters, self._layers):
            with contextlib.suppress(Exception):
                w.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def finish(self, out: Storage, prefix: str, result: SanitizeResult) -> dict[str, Any]:
        """Publish ``adapters.parquet``, ``layers.parquet``, ``report.html``, ``summary.json``."""
        self._flush(force=True)
        self._adapters.close()
        self._layers.close()
        summary = {
            "run_id": self.run_id,
            "tool_version": __version__,
            "started_at": self.started_at.isoformat(timespec="seconds"),
            "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "duration_s": round(result.duration_s, 3),
            "catalog": self.catalog,
            "out": result.out,
            "alignment": self.alignment,
            "selection": self.selection,
            "counts": {"total": result.total, "ok": result.ok, "skipped": result.skipped,
                       "error": result.error},
            "modules": result.modules,
            "projected_modules": result.projected,
            "bytes_in": result.bytes_in,
            "bytes_out": result.bytes_out,
            "adapters_per_s": round(result.total / result.duration_s, 3)
            if result.duration_s > 0 else None,
            "errors": [{"adapter_id": a, "error": e} for a, e in self.errors],
            "most_projected": [{"adapter_id": a, "projected": n, "pdst": p}
                               for n, a, p in sorted(self.most_projected, reverse=True)],
            "histograms": {"cos": self.cos_hist, "pdst": self.pdst_hist,
                           "projected_by_layer": {str(k): [self.layer_projected[k], v]
                                                  for k, v in sorted(self.layer_total.items())}},
        }
        try:
            with open(os.path.join(self._dir, "report.html"), "w", encoding="utf-8") as f:
                f.write(render_html(summary))
            for name in ("adapters.parquet", "layers.parquet", "report.html"):
                out.put_file(f"{prefix}/{name}", os.path.join(self._dir, name))
            out.put_bytes(f"{prefix}/summary.json",
                          json.dumps(summary, indent=2, ensure_ascii=False).encode())
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)
        return summary


def _bin(x: float, lo: float, hi: float) -> int:
    return min(BINS - 1, max(0, int((x - lo) / (hi - lo) * BINS)))


def text_summary(result: SanitizeResult, max_errors: int = 10) -> str:
    """The short human summary printed at the end of a run."""
    lines = [
        f"run {result.run_id}: {result.total} adapter(s) in {result.duration_s:.1f} s "
        f"with alignment set {result.alignment_id}",
        f"  ok {result.ok}   skipped {result.skipped}   failed {result.error}",
        f"  modules scored {result.modules}, projected {result.projected}",
        f"  outputs  {result.out}/<adapter id>/",
        f"  reports  {result.report_uri}/ (adapters.parquet, layers.parquet, summary.json, "
        "report.html)",
    ]
    if result.errors:
        lines.append("  failures:")
        for adapter_id, err in result.errors[:max_errors]:
            msg = err if err.startswith("adapter ") else f"{adapter_id}: {err}"
            lines.append(f"    - {msg}")
        if len(result.errors) > max_errors:
            lines.append(f"    ... and {len(result.errors) - max_errors} more in adapters.parquet")
    return "\n".join(lines)


def _bars_svg(values: list[float], labels: list[str], title: str, color: str,
              width: int = 560, height: int = 180, marker: float | None = None) -> str:
    """A bar chart; ``marker`` (a fraction of the x axis) draws a dashed vertical line."""
    top = max(values) if values and max(values) > 0 else 1.0
    n = max(1, len(values))
    bw = (width - 40) / n
    parts = [f'<svg width="{width}" height="{height + 40}" role="img" '
             f'aria-label="{html.escape(title)}"><text x="4" y="14" font-size="13">'
             f"{html.escape(title)}</text>"]
    for i, v in enumerate(values):
        h = 0 if top == 0 else v / top * (height - 30)
        x = 30 + i * bw
        parts.append(f'<rect x="{x:.1f}" y="{height - h:.1f}" width="{max(bw - 2, 1):.1f}" '
                     f'height="{h:.1f}" fill="{color}"><title>{html.escape(labels[i])}: '
                     f"{v:g}</title></rect>")
    step = max(1, n // 10)
    for i in range(0, len(values), step):
        parts.append(f'<text x="{30 + i * bw:.1f}" y="{height + 14}" font-size="10">'
                     f"{html.escape(labels[i])}</text>")
    parts.append(f'<text x="0" y="{height - (height - 30) + 4}" font-size="10">{top:.3g}</text>')
    if marker is not None:
        mx = 30 + marker * (width - 40)
        parts.append(f'<line x1="{mx:.1f}" y1="24" x2="{mx:.1f}" y2="{height}" stroke="#a4161a" '
                     'stroke-dasharray="4 3"><title>threshold</title></line>')
    parts.append("</svg>")
    return "".join(parts)


def render_html(summary: dict[str, Any]) -> str:
    """A self-contained HTML page (inline SVG plots, no scripts) for one run."""
    c = summary["counts"]
    cos_labels = [f"{-1 + 2 * i / BINS:.1f}" for i in range(BINS)]
    pdst_labels = [f"{i / BINS:.2f}" for i in range(BINS)]
    layers = summary["histograms"]["projected_by_layer"]
    layer_keys = sorted(layers, key=int)
    frac = [layers[k][0] / layers[k][1] if layers[k][1] else 0 for k in layer_keys]
    esc = html.escape
    err_rows = "".join(f"<tr><td>{esc(e['adapter_id'])}</td><td>{esc(e['error'] or '')}</td></tr>"
                       for e in summary["errors"])
    sel = ", ".join(f"{k}={v}" for k, v in summary["selection"].items())
    threshold = summary["selection"].get("threshold")
    al = summary["alignment"]
    hist = summary["histograms"]
    targets = ",".join(al["targets"])
    plots = "\n".join([
        _bars_svg(hist["cos"], cos_labels, "cos(ΔW, CΔW) of every scored module"
                  + (" (dashed: threshold)" if threshold is not None else ""), "#3867d6",
                  marker=None if threshold is None else (threshold + 1) / 2),
        _bars_svg(frac, layer_keys, "fraction of modules projected, by layer", "#eb8a1f"),
        _bars_svg(hist["pdst"], pdst_labels, "Pdst per sanitized adapter", "#20bf6b"),
    ])
    fail_cls = "bad" if c["error"] else "ok"
    top_rows = "".join(f"<tr><td>{esc(t['adapter_id'])}</td><td>{t['projected']}</td>"
                       f"<td>{t['pdst']:.4f}</td></tr>" for t in summary["most_projected"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>safelora-ray run {esc(summary['run_id'])}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1000px}}td,th{{padding:2px 8px;
text-align:left;vertical-align:top}}.ok{{color:#17692a}}.bad{{color:#a4161a}}</style></head><body>
<h1>safelora-ray sanitize run {esc(summary['run_id'])}</h1>
<table>
<tr><th>catalog</th><td>{esc(summary['catalog'])}</td></tr>
<tr><th>output</th><td>{esc(summary['out'])}</td></tr>
<tr><th>alignment set</th><td>{esc(al['content_id'])} ({esc(al['uri'])}; targets {esc(targets)})
</td></tr>
<tr><th>selection</th><td>{esc(sel)}</td></tr>
<tr><th>adapters</th><td>{c['total']}: <span class="ok">{c['ok']} ok</span>,
 {c['skipped']} skipped, <span class="{fail_cls}">{c['error']} failed</span></td></tr>
<tr><th>modules</th><td>{summary['modules']} scored, {summary['projected_modules']} projected
</td></tr>
<tr><th>duration</th><td>{summary['duration_s']} s ({summary['adapters_per_s']} adapters/s)
</td></tr>
</table>
<h2>Plots</h2>
{plots}
<h2>Adapters with the most projected modules</h2>
<table><tr><th>adapter</th><th>projected modules</th><th>Pdst</th></tr>{top_rows}</table>
<h2>Failures ({c['error']})</h2>
<table><tr><th>adapter</th><th>error</th></tr>{err_rows}</table>
<p>Machine-readable: adapters.parquet, layers.parquet and summary.json beside this page.</p>
</body></html>
"""


__all__ = ["ReportWriter", "render_html", "text_summary"]
