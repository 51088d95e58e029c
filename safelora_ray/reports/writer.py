"""The run's report writer: Parquet for machines, ``summary.json``, an HTML page for people.

Rows are streamed into Parquet writers on local temp files as batches finish, and only
fixed-size aggregates (histograms, (layer, kind) counts, failure counts by cause) stay in
memory, so a run over 100,000 adapters uses as much driver memory during the run as one over
10. At the end the run's rows are merged with the previous fleet state (one Parquet table per
side, tens of MB at 100,000 adapters), and everything is published under
``<out>/_reports/<run_id>/``, ``summary.json`` last; then the runs' index and the
``latest.json`` pointer, which makes this run's fleet state the current one.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import math
import os
import posixpath
import shutil
import tempfile
from collections import Counter
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from safelora_ray._version import __version__
from safelora_ray.core.selection import Selection
from safelora_ray.reports import html as _html
from safelora_ray.reports.aggregate import FINE_BINS, ModuleStats
from safelora_ray.reports.causes import CAUSES, classify
from safelora_ray.reports.fleet import (
    INDEX_KEEP,
    NEW_FAILURES,
    OK,
    RUN_FLEET_SCHEMA,
    fleet_figures,
    index_entry,
    merge_fleet,
    previous_run,
    read_fleet,
    read_index,
    read_json,
    tenant_of,
    tenant_table,
)
from safelora_ray.storage import Storage

if TYPE_CHECKING:
    from safelora_ray.formats.alignment_set import AlignmentSet

logger = logging.getLogger(__name__)


class RunResult(Protocol):
    """What the reports read of a run's result (a sanitize's ``RunResult``): the reports
    know no pipeline."""

    run_id: str
    out: str
    report_uri: str
    alignment_id: str
    total: int
    ok: int
    skipped: int
    error: int
    modules: int
    projected: int
    bytes_in: int
    bytes_out: int
    duration_s: float
    errors: list[tuple[str, str]]

ADAPTERS_SCHEMA = pa.schema([
    ("adapter_id", pa.string()), ("source_uri", pa.string()), ("status", pa.string()),
    ("error", pa.string()), ("modules", pa.int32()), ("projected", pa.int32()),
    ("pdst", pa.float64()), ("source_digest", pa.string()), ("output_digest", pa.string()),
    ("base_model", pa.string()), ("bytes_in", pa.int64()), ("bytes_out", pa.int64()),
    ("read_s", pa.float64()), ("compute_s", pa.float64()), ("write_s", pa.float64()),
    ("batch_s", pa.float64()), ("untouched", pa.int32()), ("note", pa.string()),
    ("tenant", pa.string()), ("cause", pa.string()),
])
LAYERS_SCHEMA = pa.schema([
    ("adapter_id", pa.string()), ("module", pa.string()), ("layer", pa.int32()),
    ("kind", pa.string()), ("rank", pa.int32()), ("cos", pa.float64()),
    ("cos_rounded", pa.float64()), ("projected", pa.bool_()), ("norm_delta", pa.float64()),
    ("norm_projected", pa.float64()), ("dist", pa.float64()),
])
#: Rows buffered before one Parquet row group is written. A Parquet writer keeps what it
#: needs of every row group until it closes (~20 KB per batch for the two files, measured), so
#: a row group per batch made the driver grow by ~1 KB per adapter at batch size 32 (issue #5's
#: load test); row groups of a few thousand rows keep it to a few bytes per adapter.
ROW_GROUP_ADAPTERS = 2048
ROW_GROUP_LAYERS = 8192
PDST_BINS = 100  # 0.01 wide over [0, 1]

#: What ``summary.json`` lists in full up to these sizes (the Parquet files hold everything).
SUMMARY_TENANTS = 1000
SUMMARY_CHANGES = 100
SUMMARY_ERRORS = 50
TOP = 20
#: What the page lists (more would slow the page down; the rest is in the Parquet files).
PAGE_FAILURES = 5000
PAGE_TENANTS = 500
PAGE_ADAPTERS = 2000
PAGE_CHANGES = 200


def ledger_figures(ledger: dict[str, Any]) -> dict[str, Any]:
    """What a skipped adapter's row carries from its ledger record to the report: its figures
    from the run that sanitized it (``scores`` and ``pdst`` are absent from records written
    before 0.2; the report then keeps the fleet state's figures). Values of the wrong type are
    dropped, so a damaged record cannot break the run's report."""
    def number(v: Any) -> float | None:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        return float(v) if ok else None

    scores = ledger.get("scores")
    projected = ledger.get("projected")
    modules = ledger.get("modules")
    run_id = ledger.get("run_id")
    return {
        "run_id": run_id if isinstance(run_id, str) else None,
        "modules": modules if isinstance(modules, int) and not isinstance(modules, bool)
        else None,
        "projected": [m for m in projected if isinstance(m, str)]
        if isinstance(projected, list) else [],
        "pdst": number(ledger.get("pdst")),
        "scores": {str(m): number(c) for m, c in scores.items()}
        if isinstance(scores, dict) else None,
    }


class ReportWriter:
    """Collects one run's rows and publishes its reports.

    Args:
        run_id: The run's id (report folder name).
        aset: The alignment set used.
        selection: The run's selection (or its record, as ``summary.json`` holds it).
        catalog: The catalog URI.
        tenant_depth: Path components of an adapter id that name its tenant.
    """

    def __init__(self, run_id: str, aset: AlignmentSet,
                 selection: Selection | dict[str, Any], catalog: str, tenant_depth: int = 1):
        if tenant_depth < 1:
            raise ValueError(f"tenant_depth must be ≥ 1, got {tenant_depth}")
        self.run_id = run_id
        self.alignment = {"uri": aset.uri, "content_id": aset.content_id,
                          "targets": list(aset.targets)}
        self.selection = (selection.record() if isinstance(selection, Selection)
                          else selection)
        self.catalog = catalog
        self.tenant_depth = tenant_depth
        self.started_at = _dt.datetime.now(_dt.timezone.utc)
        self._cells = {m: (r.layer, r.kind) for m, r in aset.rows.items()}
        self._dir = tempfile.mkdtemp(prefix=f"safelora-report-{run_id}-")
        self._adapters = pq.ParquetWriter(self._path("adapters.parquet"), ADAPTERS_SCHEMA,
                                          compression="zstd")
        self._layers = pq.ParquetWriter(self._path("layers.parquet"), LAYERS_SCHEMA,
                                        compression="zstd")
        self._fleet = pq.ParquetWriter(self._path("run-fleet.parquet"), RUN_FLEET_SCHEMA,
                                       compression="zstd")
        self.stats = ModuleStats(self.selection)
        self.pdst_hist = [0] * PDST_BINS
        self.status: Counter[str] = Counter()
        self.causes: Counter[str] = Counter()
        self.errors: list[tuple[str, str, str]] = []  # first few, for the summaries
        self.figures_unknown = 0  # sanitized adapters whose module figures nobody recorded
        self._fails: pa.Table | None = None  # this run's failures, read back once at the end
        # Rows not yet written, as small Arrow tables (compact, unlike the row dicts).
        self._pending: list[list[pa.Table]] = [[], [], []]
        self._pending_rows = [0, 0, 0]

    def _path(self, name: str) -> str:
        return os.path.join(self._dir, name)

    # -- streaming ---------------------------------------------------------------------------
    def add(self, adapters: list[dict[str, Any]], layers: list[dict[str, Any]]) -> None:
        """Append rows (one batch) to the reports and update the aggregates.

        ``layers`` holds the modules scored in this run; an adapter row without any (a skipped
        adapter) brings its figures in ``row["prior"]`` (:func:`ledger_figures`).
        """
        mods: dict[str, list[tuple[int | None, str, float | None, bool]]] = {}
        for r in layers:
            mods.setdefault(r["adapter_id"], []).append(
                (r["layer"], r["kind"], r["cos_rounded"], bool(r["projected"])))
        fleet_rows = []
        for row in adapters:
            fleet_rows.append(self._adapter(row, mods.get(row["adapter_id"])))
        self._append(0, adapters, ADAPTERS_SCHEMA)
        self._append(1, layers, LAYERS_SCHEMA)
        self._append(2, fleet_rows, RUN_FLEET_SCHEMA)
        self._flush(force=False)

    def _adapter(self, row: dict[str, Any],
                 mods: list[tuple[int | None, str, float | None, bool]] | None
                 ) -> dict[str, Any]:
        """Aggregate one adapter row; returns its fleet-state row."""
        aid, status = row["adapter_id"], row["status"]
        self.status[status] += 1
        row["tenant"] = tenant_of(aid, self.tenant_depth)
        fleet = {"adapter_id": aid, "run_status": status, "error": row.get("error"),
                 "output_digest": row.get("output_digest")}
        if status == "error":
            cause = row["cause"] = classify(row.get("error")).key
            self.causes[cause] += 1
            if len(self.errors) < SUMMARY_ERRORS:
                self.errors.append((aid, row.get("error") or "", cause))
            fleet["cause"] = cause
            return fleet
        prior = row.get("prior") or {}
        if mods is None:
            mods = self._prior_modules(prior)
        pdst = row.get("pdst")
        if pdst is None:
            pdst = prior.get("pdst")
        if mods:
            fig = self.stats.add_adapter(mods)
            fleet.update(modules=fig.modules, projected=fig.projected, near_tau=fig.near,
                         tau=fig.tau, min_cos=fig.min_cos)
        else:
            self.figures_unknown += 1
            fleet.update(modules=row.get("modules") or prior.get("modules"),
                         projected=row.get("projected"))
        if isinstance(pdst, (int, float)) and math.isfinite(pdst):
            self.pdst_hist[min(PDST_BINS - 1, max(0, int(pdst * PDST_BINS)))] += 1
            fleet["pdst"] = float(pdst)
        fleet["result_run"] = prior.get("run_id") or (self.run_id if status == "ok" else None)
        return fleet

    def _prior_modules(self, prior: dict[str, Any]
                       ) -> list[tuple[int | None, str, float | None, bool]] | None:
        scores = prior.get("scores")
        if not isinstance(scores, dict) or not scores:
            return None
        chosen = set(prior.get("projected") or ())
        out = []
        for m, c in scores.items():
            layer, kind = self._cells.get(m, (None, m.rsplit(".", 1)[-1]))
            out.append((layer, kind, c if isinstance(c, (int, float)) else None, m in chosen))
        return out

    def _append(self, i: int, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
        if rows:
            self._pending[i].append(pa.Table.from_pylist(rows, schema=schema))
            self._pending_rows[i] += len(rows)

    def _flush(self, force: bool) -> None:
        """Write the buffered rows as one row group per file once there are enough."""
        for i, (writer, size) in enumerate(((self._adapters, ROW_GROUP_ADAPTERS),
                                            (self._layers, ROW_GROUP_LAYERS),
                                            (self._fleet, ROW_GROUP_ADAPTERS))):
            if self._pending[i] and (force or self._pending_rows[i] >= size):
                writer.write_table(pa.concat_tables(self._pending[i]))
                self._pending[i], self._pending_rows[i] = [], 0

    def abort(self) -> None:
        """Drop the partial reports of a run that failed (nothing is published)."""
        for w in (self._adapters, self._layers, self._fleet):
            with contextlib.suppress(Exception):
                w.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    # -- publishing --------------------------------------------------------------------------
    def finish(self, out: Storage, prefix: str, result: RunResult) -> dict[str, Any]:
        """Publish the run's files under ``prefix`` (``summary.json`` last), then the index
        and the ``latest.json`` pointer beside it.

        Returns:
            The summary (as in ``summary.json``).
        """
        self._flush(force=True)
        for w in (self._adapters, self._layers, self._fleet):
            w.close()
        root = posixpath.dirname(prefix.rstrip("/"))
        try:
            return self._publish(out, prefix, root, result)
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._fails = None
            # The merge's buffers go back to the system, not to the allocator's free lists.
            pa.default_memory_pool().release_unused()

    def _publish(self, out: Storage, prefix: str, root: str,
                 result: RunResult) -> dict[str, Any]:
        index = read_index(out, root or ".")
        index = [e for e in index if e.get("run_id") != self.run_id]
        latest = read_json(out, f"{root}/latest.json" if root else "latest.json")
        prev_fleet = None
        if latest and isinstance(latest.get("fleet"), str):
            prev_fleet = read_fleet(out, posixpath.join(root, latest["fleet"]))
        # ParquetFile, not read_table: no dataset machinery (~10 MB of driver memory).
        fleet = merge_fleet(prev_fleet, pq.ParquetFile(self._path("run-fleet.parquet")).read(),
                            self.run_id, self.tenant_depth)
        tenants = tenant_table(fleet, prev_fleet, self.tenant_depth)
        del prev_fleet
        prev = previous_run(index, self.alignment["uri"])
        summary = self._summary(result, fleet, tenants, prev)
        page = self._page(fleet, tenants, summary)
        pq.write_table(fleet, self._path("fleet.parquet"), compression="zstd")
        pq.write_table(tenants, self._path("tenants.parquet"), compression="zstd")
        del fleet, tenants
        # Relative links from the page to the outputs and the ledger under --out.
        up = "../" * (prefix.strip("/").count("/") + 1)
        with open(self._path("report.html"), "w", encoding="utf-8") as f:
            f.write(_html.render_report(summary, page, out_prefix=up))
        files: list[tuple[str, str | bytes | bytearray]] = [
            (name, self._path(name)) for name in ("adapters.parquet", "layers.parquet",
                                                  "fleet.parquet", "tenants.parquet",
                                                  "report.html")]
        files.append(("summary.json", json.dumps(summary, indent=1, ensure_ascii=False).encode()))
        try:
            # One tree, summary.json last: on a local root one rename (never a partial report).
            out.put_tree(prefix, files, move=True)
        except BaseException:
            if out.remote:  # objects put one by one: this run's go, none without its summary
                for name, _ in files:
                    with contextlib.suppress(Exception):
                        out.delete(f"{prefix}/{name}")
            raise
        # The index, then the pointer that makes this run's fleet state current.
        index = [*index, index_entry(summary)][-INDEX_KEEP:]
        where = (lambda name: f"{root}/{name}") if root else (lambda name: name)
        out.put_bytes(where("index.json"), json.dumps({"runs": index}, indent=1,
                                                      ensure_ascii=False).encode())
        out.put_bytes(where("index.html"), _html.render_index(index, self.run_id).encode())
        out.put_bytes(where("latest.html"), _html.render_latest(self.run_id).encode())
        rel = posixpath.relpath(prefix, root or ".")
        out.put_bytes(where("latest.json"), json.dumps({
            "run_id": self.run_id, "finished_at": summary["finished_at"],
            "report": f"{rel}/report.html", "summary": f"{rel}/summary.json",
            "fleet": f"{rel}/fleet.parquet", "alignment_uri": self.alignment["uri"],
            "catalog": self.catalog}, indent=1).encode())
        return summary

    def _summary(self, result: RunResult, fleet: pa.Table, tenants: pa.Table,
                 prev: dict[str, Any] | None) -> dict[str, Any]:
        st = self.stats
        lo, hi = st.fine_range()
        groups = self._failure_groups(fleet)
        changed = fleet.filter(pc.is_in(fleet["change"],
                                        value_set=pa.array([*NEW_FAILURES, "fixed"])))
        figs = fleet_figures(fleet)
        return {
            "run_id": self.run_id,
            "tool_version": __version__,
            "started_at": self.started_at.isoformat(timespec="seconds"),
            "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "duration_s": round(result.duration_s, 3),
            "catalog": self.catalog,
            "out": result.out,
            "alignment": self.alignment,
            "selection": self.selection,
            "tenant_depth": self.tenant_depth,
            "counts": {"total": result.total, "ok": result.ok, "skipped": result.skipped,
                       "error": result.error},
            "modules": result.modules,
            "projected_modules": result.projected,
            "bytes_in": result.bytes_in,
            "bytes_out": result.bytes_out,
            "adapters_per_s": round(result.total / result.duration_s, 3)
            if result.duration_s > 0 else None,
            "errors": [{"adapter_id": a, "error": e, "cause": c} for a, e, c in self.errors],
            "failure_groups": groups,
            # Every sanitized adapter of this catalog: this run's and the skipped ones (their
            # figures from the ledger).
            "catalog_figures": {
                "adapters": st.adapters, "modules": st.modules, "projected": st.projected,
                "projected_share": st.projected / st.modules if st.modules else None,
                "unscored_modules": st.unscored, "figures_unknown": self.figures_unknown,
            },
            "near_threshold": st.near_threshold(),
            "layer_kind": st.layer_kind(),
            "fleet": figs,
            "newly_failing": _rows(changed.filter(pc.is_in(
                changed["change"], value_set=pa.array(NEW_FAILURES))).slice(0, SUMMARY_CHANGES),
                ["adapter_id", "cause", "change"]),
            "newly_fixed": _rows(changed.filter(pc.equal(changed["change"], "fixed"))
                                 .slice(0, SUMMARY_CHANGES), ["adapter_id", "prev_state"]),
            "previous": prev,
            "tenants": _rows(tenants.slice(0, SUMMARY_TENANTS), tenants.column_names),
            "tenants_total": tenants.num_rows,
            "most_projected": _rows(_most_projected(fleet).slice(0, TOP),
                                    ["adapter_id", "projected", "modules", "pdst"]),
            "lowest_pdst": _rows(_lowest_pdst(fleet).slice(0, TOP),
                                 ["adapter_id", "projected", "modules", "pdst"]),
            "histograms": {
                "cos": st.legacy_cos_hist(),
                "cos_fine": {"step": 0.001, "first_upper_edge": -1.0, "right_closed": True,
                             "counts": list(st.fine)},
                "cos_fine_range": [lo, hi],
                "pdst": [sum(self.pdst_hist[i:i + 5]) for i in range(0, PDST_BINS, 5)],
                "pdst_fine": {"step": 1 / PDST_BINS, "counts": list(self.pdst_hist)},
                "projected_by_layer": _by_layer(st.layer_kind()),
            },
            "links": {"report": "report.html", "summary": "summary.json",
                      "adapters": "adapters.parquet", "layers": "layers.parquet",
                      "fleet": "fleet.parquet", "tenants": "tenants.parquet",
                      "index": "../index.html", "latest": "../latest.html"},
        }

    def _failures(self, fleet: pa.Table) -> pa.Table:
        """This run's failures (every error row) with the fleet's view of each adapter."""
        if self._fails is not None:
            return self._fails
        rows = pq.ParquetFile(self._path("adapters.parquet")).read(
            columns=["adapter_id", "status", "error", "cause", "tenant"])
        rows = rows.filter(pc.equal(rows["status"], "error")).drop_columns(["status"])
        at = pc.index_in(rows["adapter_id"], value_set=fleet["adapter_id"])
        j = rows.append_column("state", fleet["state"].take(at)).append_column(
            "prev_state", fleet["prev_state"].take(at))
        new = pc.or_(pc.is_null(j["prev_state"]), pc.fill_null(pc.equal(j["prev_state"], OK),
                                                                False))
        self._fails = j.append_column("new", new).sort_by([("cause", "ascending"),
                                                           ("new", "descending"),
                                                           ("adapter_id", "ascending")])
        return self._fails

    def _failure_groups(self, fleet: pa.Table) -> list[dict[str, Any]]:
        if not self.causes:
            return []
        fails = self._failures(fleet)
        groups = []
        for key, n in sorted(self.causes.items(), key=lambda kv: (-kv[1], kv[0])):
            g = fails.filter(pc.equal(fails["cause"], key))
            c = CAUSES[key]
            groups.append({"cause": key, "label": c.label, "action": c.action, "count": n,
                           "new": int(pc.sum(g["new"]).as_py() or 0),
                           "examples": g["adapter_id"].slice(0, 5).to_pylist()})
        return groups

    def _page(self, fleet: pa.Table, tenants: pa.Table,
              summary: dict[str, Any]) -> dict[str, Any]:
        """What the page lists beyond the summary (bounded: see ``PAGE_*``)."""
        fails = self._failures(fleet) if self.causes else None
        changes = fleet.filter(pc.is_in(fleet["change"],
                                        value_set=pa.array([*NEW_FAILURES, "fixed"])))
        page = {
            "failures": _rows(fails.slice(0, PAGE_FAILURES),
                              ["adapter_id", "error", "cause", "tenant", "state", "new"])
            if fails is not None else [],
            "tenants": _rows(tenants.slice(0, PAGE_TENANTS), tenants.column_names),
            "newly_failing": _rows(changes.filter(pc.is_in(
                changes["change"], value_set=pa.array(NEW_FAILURES))).slice(0, PAGE_CHANGES),
                ["adapter_id", "cause", "change", "state"]),
            "newly_fixed": _rows(changes.filter(pc.equal(changes["change"], "fixed"))
                                 .slice(0, PAGE_CHANGES), ["adapter_id", "prev_state"]),
            "adapters": _rows(fleet, ["adapter_id", "tenant", "state", "run_status", "change",
                                      "modules", "projected", "pdst", "near_tau", "cause"])
            if fleet.num_rows <= PAGE_ADAPTERS else None,
            "fine_bins": FINE_BINS,
        }
        return page


def _rows(table: pa.Table, columns: list[str]) -> list[dict[str, Any]]:
    rows = table.select(columns).to_pylist()
    for r in rows:  # JSON has no NaN
        for k, v in r.items():
            if isinstance(v, float) and not math.isfinite(v):
                r[k] = None
    return rows


def _sanitized(fleet: pa.Table) -> pa.Table:
    return fleet.filter(pc.and_(pc.equal(fleet["state"], OK), pc.is_valid(fleet["modules"])))


def _most_projected(fleet: pa.Table) -> pa.Table:
    """Sanitized adapters by share of modules projected (then count, lowest Pdst, id)."""
    ok = _sanitized(fleet)
    ok = ok.filter(pc.greater(ok["modules"], 0))
    share = pc.divide(pc.cast(ok["projected"], pa.float64()), pc.cast(ok["modules"], pa.float64()))
    return ok.append_column("share", share).sort_by([
        ("share", "descending"), ("projected", "descending"), ("pdst", "ascending"),
        ("adapter_id", "ascending")])


def _lowest_pdst(fleet: pa.Table) -> pa.Table:
    """Sanitized adapters by Pdst, lowest first (the least projected onto the aligned
    direction: a lower Pdst means larger unprojected differences)."""
    ok = _sanitized(fleet)
    ok = ok.filter(pc.is_valid(ok["pdst"]))
    return ok.sort_by([("pdst", "ascending"), ("adapter_id", "ascending")])


def _by_layer(cells: list[dict[str, Any]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for c in cells:
        key = str(c["layer"] if c["layer"] is not None else -1)
        v = out.setdefault(key, [0, 0])
        v[0] += c["projected"]
        v[1] += c["modules"]
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


#: What a method does to the selected modules (Safe LoRA: projected).
_VERBS = {"salora": "folded", "safemerge": "merged"}


def text_summary(result: RunResult, max_errors: int = 10) -> str:
    """The short human summary printed at the end of a run."""
    lines = [
        f"run {result.run_id}: {result.total} adapter(s) in {result.duration_s:.1f} s "
        f"with alignment set {result.alignment_id}",
        f"  ok {result.ok}   skipped {result.skipped}   failed {result.error}",
        f"  modules scored {result.modules}, "
        f"{_VERBS.get(getattr(result, 'method', ''), 'projected')} {result.projected}",
        f"  outputs  {result.out}/<adapter id>/",
        f"  reports  {result.report_uri}/ (report.html, summary.json, adapters.parquet, "
        "layers.parquet, fleet.parquet, tenants.parquet)",
    ]
    if result.errors:
        lines.append("  failures:")
        for adapter_id, err in result.errors[:max_errors]:
            msg = err if err.startswith("adapter ") else f"{adapter_id}: {err}"
            lines.append(f"    - {msg}")
        if len(result.errors) > max_errors:
            lines.append(f"    ... and {len(result.errors) - max_errors} more in adapters.parquet")
    return "\n".join(lines)


__all__ = ["ADAPTERS_SCHEMA", "LAYERS_SCHEMA", "ReportWriter", "ledger_figures", "text_summary"]
