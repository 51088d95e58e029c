"""The fleet state: every adapter ever written under one ``--out``, as of the latest run.

A run lists only its catalog, and an incremental run mostly skips; neither says what state the
fleet is in. Each run therefore publishes ``_reports/<run_id>/fleet.parquet``: the previous
run's fleet state merged with this run's rows, one row per adapter. Skipped adapters keep their
figures (the worker sends the ledger record's figures with the skip row), adapters not listed
in this run keep their last state, and every row says what this run changed. The pointer
``_reports/latest.json``, written last, names the run whose state is current; a run that dies
before it leaves the previous state in force. Reading the state is one Parquet file, never the
100,000 ledger records.

Runs, newest last, are kept in ``_reports/index.json`` (what ``index.html`` lists).
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from safelora_ray.core.errors import NotFoundError, SafeLoraError
from safelora_ray.storage import Storage

logger = logging.getLogger(__name__)

#: What one run contributes to the fleet state, one row per adapter row of the run.
RUN_FLEET_SCHEMA = pa.schema([
    ("adapter_id", pa.string()), ("run_status", pa.string()), ("modules", pa.int32()),
    ("projected", pa.int32()), ("pdst", pa.float64()), ("near_tau", pa.int32()),
    ("tau", pa.float64()), ("min_cos", pa.float64()), ("cause", pa.string()),
    ("error", pa.string()), ("output_digest", pa.string()), ("result_run", pa.string()),
])
#: ``fleet.parquet``: the state of every adapter known under ``--out``.
FLEET_SCHEMA = pa.schema([
    ("adapter_id", pa.string()), ("tenant", pa.string()), ("state", pa.string()),
    ("run_status", pa.string()), ("change", pa.string()), ("prev_state", pa.string()),
    ("modules", pa.int32()), ("projected", pa.int32()), ("pdst", pa.float64()),
    ("near_tau", pa.int32()), ("tau", pa.float64()), ("min_cos", pa.float64()),
    ("cause", pa.string()), ("error", pa.string()), ("output_digest", pa.string()),
    ("result_run", pa.string()), ("first_seen", pa.string()), ("last_seen", pa.string()),
])
TENANTS_SCHEMA = pa.schema([
    ("tenant", pa.string()), ("adapters", pa.int64()), ("run_ok", pa.int64()),
    ("run_skipped", pa.int64()), ("run_error", pa.int64()), ("not_listed", pa.int64()),
    ("sanitized", pa.int64()), ("failed", pa.int64()), ("newly_failing", pa.int64()),
    ("modules", pa.int64()), ("projected", pa.int64()), ("share", pa.float64()),
    ("prev_share", pa.float64()), ("near_tau", pa.int64()), ("min_pdst", pa.float64()),
])

#: Adapter states. ``failed``: the last attempt failed and an earlier sanitized output is
#: still served; ``never_sanitized``: it failed every time, no output exists.
OK, FAILED, NEVER = "ok", "failed", "never_sanitized"
STATES = (OK, FAILED, NEVER)
#: This run's changes, by (previous state known and what, this run's status).
CHANGES = ("new", "re-sanitized", "fixed", "unchanged", "newly failing", "new, failing",
           "still failing", "not listed")
NEW_FAILURES = ("newly failing", "new, failing")
ABSENT = "not listed"
TOP_LEVEL = "(top level)"
#: Status priority when an id has several rows in one run (a duplicate manifest entry): the
#: sanitized row describes the adapter; the refusal stays in the run's failures.
_PRIORITY = {"ok": 0, "skipped": 1, "error": 2}
INDEX_KEEP = 1000  # runs listed in index.json


def tenant_of(adapter_id: str, depth: int) -> str:
    """The tenant of an id: its first ``depth`` path components (``(top level)`` if none)."""
    parts = adapter_id.split("/")
    return "/".join(parts[:depth]) if len(parts) > depth else TOP_LEVEL


def tenants_of(ids: pa.Array | pa.ChunkedArray, depth: int) -> pa.Array:
    """:func:`tenant_of` over a column."""
    parts = pc.split_pattern(ids, "/")
    head = pc.binary_join(pc.list_slice(parts, 0, depth), "/")
    return pc.if_else(pc.greater(pc.list_value_length(parts), depth), head,
                      pa.scalar(TOP_LEVEL))


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with exactly ``schema``'s columns (missing ones null: an older state file)."""
    cols = []
    for f in schema:
        if f.name in table.column_names:
            cols.append(table[f.name].cast(f.type))
        else:
            cols.append(pa.nulls(table.num_rows, f.type))
    return pa.table(cols, schema=schema)


def _dedupe(cur: pa.Table) -> pa.Table:
    """One row per adapter id (the best status wins: ok, then skipped, then error)."""
    if cur.num_rows == pc.count_distinct(cur["adapter_id"]).as_py():
        return cur
    prio = pc.fill_null(pc.cast(pc.index_in(cur["run_status"], pa.array(list(_PRIORITY))),
                                pa.int32()), 9)
    t = cur.append_column("_p", prio).sort_by([("adapter_id", "ascending"), ("_p", "ascending")])
    ids = t["adapter_id"].combine_chunks()
    first = pc.not_equal(ids.slice(1), ids.slice(0, len(ids) - 1))
    keep = pa.concat_arrays([pa.array([True]), pc.fill_null(first, True)])
    return t.filter(keep).drop_columns(["_p"])


def merge_fleet(prev: pa.Table | None, cur: pa.Table, run_id: str, depth: int) -> pa.Table:
    """The fleet state after this run.

    Args:
        prev: The previous fleet state (``fleet.parquet``), or None.
        cur: This run's rows (:data:`RUN_FLEET_SCHEMA`).
        run_id: This run.
        depth: Tenant depth (path components of the id).

    Returns:
        One row per adapter (:data:`FLEET_SCHEMA`), sorted by id.
    """
    cur = _dedupe(_conform(cur, RUN_FLEET_SCHEMA))
    prev = _conform(prev if prev is not None else FLEET_SCHEMA.empty_table(), FLEET_SCHEMA)
    keep = ["state", "modules", "projected", "pdst", "near_tau", "tau", "min_cos",
            "output_digest", "result_run", "first_seen"]
    # A left join by position: each run row's index in the previous state (null: new). A hash
    # lookup kernel, not a join engine: a fraction of the memory, and the row order is kept.
    at = pc.index_in(cur["adapter_id"], value_set=prev["adapter_id"])
    j = cur
    for k in keep:
        j = j.append_column(f"p_{k}", prev[k].take(at))
    # Column by column (no Python object per row: this runs over the whole fleet).
    s, ps = j["run_status"], j["p_state"]

    def b(x: Any) -> Any:
        return pc.fill_null(x, False)

    sanitized = b(pc.is_in(s, value_set=pa.array(["ok", "skipped"])))
    done_now = b(pc.equal(s, "ok"))
    skipped = b(pc.equal(s, "skipped"))
    known = pc.is_valid(ps)
    was_ok = b(pc.equal(ps, OK))
    had_output = b(pc.is_in(ps, value_set=pa.array([OK, FAILED])))
    null_str = pa.scalar(None, pa.string())
    state = pc.if_else(sanitized, OK, pc.if_else(had_output, FAILED, NEVER))
    change = pc.case_when(
        pc.make_struct(
            pc.and_(sanitized, pc.invert(known)), pc.and_(done_now, was_ok),
            pc.and_(skipped, was_ok), sanitized, pc.invert(known), was_ok,
            field_names=[str(i) for i in range(6)]),
        pc.if_else(done_now, "new", "unchanged"), "re-sanitized", "unchanged", "fixed",
        "new, failing", "newly failing", "still failing")
    out_digest = pc.if_else(sanitized, pc.coalesce(j["output_digest"], j["p_output_digest"]),
                            pc.if_else(had_output, j["p_output_digest"], null_str))
    result_run = pc.if_else(done_now, run_id, pc.if_else(
        skipped, pc.coalesce(j["result_run"], j["p_result_run"]),
        pc.if_else(had_output, j["p_result_run"], null_str)))
    # A skipped adapter whose ledger record predates the figures keeps the state's (when the
    # state's output is the one the ledger names).
    same = pc.and_(skipped, b(pc.or_kleene(pc.is_null(j["output_digest"]),
                                           pc.equal(j["output_digest"], j["p_output_digest"]))))
    is_err = pc.invert(sanitized)
    cols: dict[str, Any] = {"adapter_id": j["adapter_id"], "state": state, "run_status": s,
                            "change": change, "prev_state": ps}
    for name in ("modules", "projected", "pdst", "near_tau", "tau", "min_cos"):
        filled = pc.if_else(pc.and_(pc.is_null(j[name]), same), j[f"p_{name}"], j[name])
        cols[name] = pc.if_else(is_err, pa.scalar(None, filled.type), filled)
    cols["cause"] = j["cause"]
    cols["error"] = j["error"]
    cols["output_digest"] = out_digest
    cols["result_run"] = result_run
    cols["first_seen"] = pc.coalesce(j["p_first_seen"], pa.scalar(run_id))
    cols["last_seen"] = pa.nulls(j.num_rows, pa.string()).fill_null(run_id)
    cols["tenant"] = pa.nulls(j.num_rows, pa.string())
    merged = pa.table({f.name: cols[f.name] for f in FLEET_SCHEMA}, schema=FLEET_SCHEMA)
    gone = prev.filter(pc.invert(pc.is_in(prev["adapter_id"], value_set=cur["adapter_id"])))
    if gone.num_rows:
        gone = gone.set_column(gone.schema.get_field_index("prev_state"), "prev_state",
                               gone["state"])
        gone = gone.set_column(gone.schema.get_field_index("run_status"), "run_status",
                               pa.nulls(gone.num_rows, pa.string()).fill_null("absent"))
        gone = gone.set_column(gone.schema.get_field_index("change"), "change",
                               pa.nulls(gone.num_rows, pa.string()).fill_null(ABSENT))
        merged = pa.concat_tables([merged, gone])
    merged = merged.set_column(1, "tenant", tenants_of(merged["adapter_id"], depth))
    return merged.sort_by("adapter_id")


def _count(table: pa.Table, column: str) -> dict[str, int]:
    if not table.num_rows:
        return {}
    return {r["values"]: r["counts"] for r in pc.value_counts(table[column]).to_pylist()}


def fleet_figures(fleet: pa.Table) -> dict[str, Any]:
    """Counts and module figures of the fleet state (``summary.json``'s ``fleet``)."""
    states = _count(fleet, "state")
    ok = fleet.filter(pc.equal(fleet["state"], OK))
    modules = pc.sum(ok["modules"]).as_py() or 0
    projected = pc.sum(ok["projected"]).as_py() or 0
    pdst = ok["pdst"].drop_null()
    pdst = pdst.filter(pc.is_finite(pdst)) if len(pdst) else pdst
    # Module figures come from the module scores (ledger records before 0.2 have none).
    known = pc.sum(pc.is_valid(ok["near_tau"])).as_py() or 0
    return {
        "adapters": fleet.num_rows,
        "sanitized": states.get(OK, 0),
        "failed": states.get(FAILED, 0) + states.get(NEVER, 0),
        "failed_older_output": states.get(FAILED, 0),
        "never_sanitized": states.get(NEVER, 0),
        "not_listed": int(pc.sum(pc.equal(fleet["run_status"], "absent")).as_py() or 0),
        "figures_unknown": ok.num_rows - known,
        "modules": modules,
        "projected": projected,
        "projected_share": projected / modules if modules else None,
        "near_tau": pc.sum(ok["near_tau"]).as_py() or 0,
        "pdst_min": pc.min(pdst).as_py() if len(pdst) else None,
        "pdst_median": pc.approximate_median(pdst).as_py() if len(pdst) else None,
        "changes": {c: n for c, n in sorted(_count(fleet, "change").items())},
    }


def tenant_table(fleet: pa.Table, prev: pa.Table | None, depth: int) -> pa.Table:
    """Per-tenant counts (:data:`TENANTS_SCHEMA`), most failures first, then most adapters."""
    def ind(mask: pa.ChunkedArray | pa.Array) -> pa.Array:
        return pc.cast(pc.fill_null(mask, False), pa.int64())

    def aggregate(t: pa.Table) -> pa.Table:
        ok = pc.equal(t["state"], OK)
        cols = {
            "tenant": t["tenant"],
            "one": pa.nulls(t.num_rows, pa.int64()).fill_null(1),
            "run_ok": ind(pc.equal(t["run_status"], "ok")),
            "run_skipped": ind(pc.equal(t["run_status"], "skipped")),
            "run_error": ind(pc.equal(t["run_status"], "error")),
            "not_listed": ind(pc.equal(t["run_status"], "absent")),
            "sanitized": ind(ok),
            "failed": ind(pc.invert(ok)),
            "newly_failing": ind(pc.is_in(t["change"], value_set=pa.array(NEW_FAILURES))),
            "modules": pc.if_else(ok, pc.cast(t["modules"], pa.int64()), 0),
            "projected": pc.if_else(ok, pc.cast(t["projected"], pa.int64()), 0),
            "near_tau": pc.if_else(ok, pc.cast(t["near_tau"], pa.int64()), 0),
            "pdst": pc.if_else(ok, t["pdst"], None),
        }
        g = pa.table(cols).group_by("tenant").aggregate(
            [("one", "sum")] + [(c, "sum") for c in ("run_ok", "run_skipped", "run_error",
                                                     "not_listed", "sanitized", "failed",
                                                     "newly_failing", "modules", "projected",
                                                     "near_tau")] + [("pdst", "min")])
        return g

    if fleet.num_rows == 0:
        return TENANTS_SCHEMA.empty_table()
    g = aggregate(fleet)
    modules = pc.fill_null(g["modules_sum"], 0)
    projected = pc.fill_null(g["projected_sum"], 0)
    share = pc.if_else(pc.greater(modules, 0),
                       pc.divide(pc.cast(projected, pa.float64()), pc.cast(modules, pa.float64())),
                       None)
    out = pa.table({
        "tenant": g["tenant"], "adapters": g["one_sum"],
        **{c: pc.fill_null(g[f"{c}_sum"], 0) for c in ("run_ok", "run_skipped", "run_error",
                                                       "not_listed", "sanitized", "failed",
                                                       "newly_failing")},
        "modules": modules, "projected": projected, "share": share,
        "prev_share": pa.nulls(g.num_rows, pa.float64()),
        "near_tau": pc.fill_null(g["near_tau_sum"], 0), "min_pdst": g["pdst_min"],
    })
    if prev is not None and prev.num_rows:
        prev = _conform(prev, FLEET_SCHEMA)
        prev = prev.set_column(1, "tenant", tenants_of(prev["adapter_id"], depth))
        pg = aggregate(prev)
        pm, pp = pc.fill_null(pg["modules_sum"], 0), pc.fill_null(pg["projected_sum"], 0)
        ps = pa.table({"tenant": pg["tenant"], "p": pc.if_else(
            pc.greater(pm, 0), pc.divide(pc.cast(pp, pa.float64()), pc.cast(pm, pa.float64())),
            None)})
        out = out.drop_columns(["prev_share"]).join(ps, "tenant", join_type="left outer")
        out = out.rename_columns([*out.column_names[:-1], "prev_share"])
    out = _conform(out, TENANTS_SCHEMA)
    return out.sort_by([("failed", "descending"), ("adapters", "descending"),
                        ("tenant", "ascending")])


# ---------------------------------------------------------------------------------------------
# Previous run, index, latest pointer
# ---------------------------------------------------------------------------------------------


def read_json(out: Storage, path: str) -> dict[str, Any] | None:
    """A JSON object under ``out`` (None when missing or unreadable, with a warning)."""
    try:
        data = json.loads(out.read(path, max_bytes=64 * 1024**2))
    except NotFoundError:
        return None
    except (SafeLoraError, ValueError) as e:
        logger.warning("ignoring unreadable %s: %s", out.describe(path), e)
        return None
    return data if isinstance(data, dict) else None


def read_fleet(out: Storage, path: str) -> pa.Table | None:
    """A previous ``fleet.parquet`` (None when missing or unreadable, with a warning)."""
    try:
        raw = out.read(path, max_bytes=4 * 1024**3)
        return pq.ParquetFile(io.BytesIO(raw)).read()
    except NotFoundError:
        logger.warning("the previous fleet state %s is gone: this report's fleet view starts "
                       "from this run", out.describe(path))
    except Exception as e:  # a damaged state must not fail the run that would replace it
        logger.warning("ignoring unreadable fleet state %s: %s", out.describe(path), e)
    return None


def read_index(out: Storage, root: str) -> list[dict[str, Any]]:
    """The runs listed in ``<root>/index.json``; rebuilt from the runs' ``summary.json``
    files when there is none (reports written before the index existed)."""
    index = read_json(out, f"{root}/index.json")
    if index is not None and isinstance(index.get("runs"), list):
        return [r for r in index["runs"] if isinstance(r, dict) and r.get("run_id")]
    runs = []
    try:
        paths = [o.path for o in out.list(root) if posixpath.basename(o.path) == "summary.json"]
    except SafeLoraError as e:
        logger.warning("cannot list %s: %s", out.describe(root), e)
        return []
    for path in paths:
        s = read_json(out, path)
        if s and s.get("run_id"):
            runs.append(index_entry(s))
    return sorted(runs, key=lambda r: str(r.get("finished_at") or ""))


def index_entry(summary: dict[str, Any]) -> dict[str, Any]:
    """What ``index.json`` keeps of one run's summary."""
    fleet = summary.get("fleet") or {}
    return {
        "run_id": summary["run_id"],
        "started_at": summary.get("started_at"),
        "finished_at": summary.get("finished_at"),
        "catalog": summary.get("catalog"),
        "alignment_uri": (summary.get("alignment") or {}).get("uri"),
        "alignment_id": (summary.get("alignment") or {}).get("content_id"),
        "selection": summary.get("selection"),
        "counts": summary.get("counts"),
        "modules": summary.get("modules"),
        "projected_modules": summary.get("projected_modules"),
        "fleet": {k: fleet.get(k) for k in ("adapters", "sanitized", "failed",
                                            "never_sanitized", "not_listed", "modules",
                                            "projected", "projected_share", "near_tau",
                                            "pdst_min", "pdst_median")} if fleet else None,
        "catalog_figures": summary.get("catalog_figures"),
        "failure_groups": {g["cause"]: g["count"] for g in summary.get("failure_groups", [])},
        "report": f"{summary['run_id']}/report.html",
    }


def previous_run(index: list[dict[str, Any]], alignment_uri: str) -> dict[str, Any] | None:
    """The latest run in ``index`` against the same alignment set URI (the same model pair:
    a nightly output shared by several pairs alternates between them), else None."""
    for entry in reversed(index):
        if entry.get("alignment_uri") == alignment_uri:
            return entry
    return None


__all__ = ["ABSENT", "CHANGES", "FAILED", "FLEET_SCHEMA", "NEVER", "NEW_FAILURES", "OK",
           "RUN_FLEET_SCHEMA", "STATES", "TENANTS_SCHEMA", "TOP_LEVEL", "fleet_figures",
           "index_entry", "merge_fleet", "previous_run", "read_fleet", "read_index",
           "read_json", "tenant_of", "tenant_table", "tenants_of"]
