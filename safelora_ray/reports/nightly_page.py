"""The nightly's own pages: ``_nightly/runs/<run_id>.html`` (one run: what every catalog did,
the catalogs that could not be listed, the adapters that match no model pair) and
``_nightly/index.html`` (every run, newest first, linking to those pages).

The per-catalog sanitize reports cover the adapters a run sanitized; what never reached a
sanitize (an unlistable catalog, an adapter of an unknown base model) is only on this page.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from safelora_ray.core.errors import SafeLoraError
from safelora_ray.reports.fleet import read_json
from safelora_ray.reports.page import CSS, JS, esc, fmt_n, href, num_cell
from safelora_ray.storage import Storage

logger = logging.getLogger(__name__)

#: Rows of the index (``index.json``) kept; the run records themselves are all kept.
NIGHTLY_INDEX_KEEP = 1000
STATUS_TEXT = {"success": "✓ success", "partial": "▲ partial", "failed": "✗ failed",
               "running": "… running", "dry-run": "○ dry run"}


def index_entry(record: dict[str, Any]) -> dict[str, Any]:
    """What ``_nightly/index.json`` keeps of one run record."""
    c = record.get("counts") or {}
    return {"run_id": record["run_id"], "status": record.get("status"),
            "started_at": record.get("started_at"), "finished_at": record.get("finished_at"),
            "counts": c, "catalog_errors": len(record.get("catalog_errors") or []),
            "models_error": (record.get("models") or {}).get("error", 0),
            "page": f"runs/{record['run_id']}.html"}


def _table(head: list[str], rows: list[str], page: int = 50) -> str:
    th = "".join(f"<th{' class=n' if h.startswith('#') else ''}>{esc(h.lstrip('#'))}</th>"
                 for h in head)
    return (f"<div class='wrap'><table class='sortable' data-page='{page}'><thead><tr>{th}"
            f"</tr></thead><tbody>{''.join(rows)}</tbody></table></div>")


def _more(shown: int, total: int) -> str:
    return (f"<p class='note'>{fmt_n(shown)} of {fmt_n(total)} listed (the run record lists "
            f"at most {fmt_n(shown)}).</p>" if total > shown else "")


def render_run(record: dict[str, Any], report_link: Any = None) -> str:
    """One nightly run's page.

    Args:
        record: The run record (``_nightly/runs/<run_id>.json``).
        report_link: Maps a group's report URI to the link the page uses (relative when the
            report lies under the output root); default: the URI as it is.
    """
    link = report_link or (lambda uri: uri)
    c = record.get("counts") or {}
    status = STATUS_TEXT.get(record.get("status") or "", record.get("status") or "")
    cat_errs = record.get("catalog_errors") or []
    unmatched = record.get("unmatched") or []
    n_unmatched = c.get("unmatched", len(unmatched))
    ok, skipped, failed = (fmt_n(c.get(k)) for k in ("ok", "skipped", "error"))
    parts = [f"""<h1>safelora-ray nightly · run {esc(record['run_id'])}</h1>
<p class="meta">{esc(status)} · started {esc(str(record.get('started_at')))} · finished
{esc(str(record.get('finished_at')))} ({fmt_n(record.get('duration_s'))} s)</p>
<p>{fmt_n(c.get('adapters'))} adapter(s) listed: ✓ {ok} sanitized, ○
{skipped} skipped, ✗ {failed} failed, <b>{fmt_n(n_unmatched)} matching
no model pair</b>; <b>{fmt_n(len(cat_errs))} catalog(s) could not be listed</b>.</p>"""]
    if record.get("failure"):
        parts.append(f"<p><b>✗ The run failed:</b> {esc(str(record['failure']))}</p>")
    rows = [f"<tr><td class='id'>{esc(str(e.get('catalog')))}</td>"
            f"<td class='msg'>{esc(str(e.get('error')))}</td></tr>" for e in cat_errs]
    parts.append(f"<section id='catalogs'><h2>Catalogs not listed ({fmt_n(len(cat_errs))})</h2>"
                 + (("<p>Missing, unreadable or empty: nothing of these catalogs was "
                     "sanitized or projected; the run fails (exit 1) until they are fixed or "
                     "removed from the config.</p>" + _table(["catalog", "error"], rows))
                    if rows else "<p>✓ Every catalog was listed.</p>") + "</section>")
    rows = [f"<tr><td class='id'>{esc(str(u.get('catalog')))}</td>"
            f"<td class='id'>{esc(str(u.get('adapter_id')))}</td>"
            f"<td class='id'>{esc(str(u.get('base_model')))}</td></tr>" for u in unmatched]
    parts.append(
        f"<section id='unmatched'><h2>Adapters matching no model pair ({fmt_n(n_unmatched)})</h2>"
        + (("<p>Their <code>base_model_name_or_path</code> is in no pair's "
            "<code>base_model_ids</code>: they were not sanitized (never guessed). Add the id "
            "to a pair of the config, or fix the adapter's config.</p>"
            + _table(["catalog", "adapter", "base model"], rows) + _more(len(rows), n_unmatched))
           if rows else "<p>✓ Every adapter matched a model pair.</p>") + "</section>")
    rows = [f"<tr><td class='id'>{esc(str(g.get('catalog')))}</td>"
            f"<td class='id'>{esc(str(g.get('pair')))}</td>{num_cell(g.get('adapters'))}"
            f"{num_cell(g.get('ok'))}{num_cell(g.get('skipped'))}{num_cell(g.get('error'))}"
            f"<td><a href='{esc(link(str(g.get('report_html'))))}'>report</a></td></tr>"
            for g in record.get("groups") or []]
    parts.append("<section id='groups'><h2>Sanitize runs</h2>"
                 + (_table(["catalog", "model pair", "#adapters", "#✓ ok", "#○ skipped",
                            "#✗ failed", "report"], rows) if rows else "<p>None.</p>")
                 + "</section>")
    models = record.get("models") or {}
    rows = [f"<tr><td class='id'>{esc(str(m.get('catalog')))}</td>"
            f"<td class='id'>{esc(str(m.get('model_id')))}</td>"
            f"<td>{esc(str(m.get('status')))}</td>"
            f"<td class='msg'>{esc(str(m.get('error') or m.get('out') or ''))}</td></tr>"
            for m in models.get("items") or []]
    if rows:
        parts.append(f"<section id='models'><h2>Full fine-tunes ({fmt_n(models.get('total'))})"
                     "</h2>" + _table(["catalog", "model", "status", "output or error"], rows)
                     + "</section>")
    errors = record.get("errors") or []
    rows = [f"<tr><td class='id'>{esc(str(e.get('catalog')))}</td>"
            f"<td class='id'>{esc(str(e.get('adapter_id') or e.get('model_id')))}</td>"
            f"<td class='msg'>{esc(str(e.get('error')))}</td></tr>" for e in errors]
    if rows:
        parts.append(f"<section id='errors'><h2>Failures ({fmt_n(len(rows))} listed)</h2>"
                     "<p>Each catalog's report groups them by cause.</p>"
                     + _table(["catalog", "adapter or model", "error"], rows) + "</section>")
    return _page(f"{status} · safelora-ray nightly {record['run_id']}",
                 "<nav><a href='../index.html'>All nightly runs</a>"
                 f"<a href='{href(record['run_id'])}.json'>run record (JSON)</a></nav>",
                 "".join(parts))


def render_index(runs: list[dict[str, Any]]) -> str:
    """``_nightly/index.html``: every nightly run, newest first."""
    rows = []
    for r in reversed(runs):
        c = r.get("counts") or {}
        ce = r.get("catalog_errors") or 0
        un = c.get("unmatched") or 0
        rows.append(
            f"<tr><td class='id'><a href='{href(r['page'])}'>{esc(r['run_id'])}</a></td>"
            f"<td>{esc(STATUS_TEXT.get(r.get('status') or '', str(r.get('status'))))}</td>"
            f"<td>{esc(str(r.get('finished_at') or ''))}</td>{num_cell(c.get('adapters'))}"
            f"{num_cell(c.get('ok'))}{num_cell(c.get('skipped'))}{num_cell(c.get('error'))}"
            f"{num_cell(un, ('✗ ' if un else '') + fmt_n(un))}"
            f"{num_cell(ce, ('✗ ' if ce else '') + fmt_n(ce))}"
            f"{num_cell(r.get('models_error'))}</tr>")
    latest = (f"<p><a href='{href(runs[-1]['page'])}'>The latest run ({esc(runs[-1]['run_id'])})"
              "</a> · <a href='latest.json'>latest.json</a></p>" if runs else "")
    return _page("safelora-ray nightly runs", "", f"""<h1>safelora-ray nightly runs</h1>{latest}
<p>Each run's page lists the catalogs it could not list and the adapters that match no model
pair, which no catalog report shows.</p>
{_table(["run", "status", "finished", "#adapters", "#✓ ok", "#○ skipped", "#✗ failed",
         "#no model pair", "#catalogs not listed", "#models failed"], rows, 100)}""")


def _page(title: str, nav: str, body: str) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title><style>{CSS}</style></head><body>{nav}<main>{body}</main>
<script>{JS}</script></body></html>
"""


def publish(out: Storage, prefix: str, record: dict[str, Any]) -> None:
    """Write the run's page ``<prefix>/runs/<run_id>.html``, then ``<prefix>/index.html``
    (and ``index.json``) listing it. A page that cannot be written is logged, never raised:
    the run record is what counts."""
    root = out.uri.rstrip("/") + "/"

    def link(uri: str) -> str:  # a report under the output root: relative to runs/
        return "../../" + href(uri[len(root):]) if uri.startswith(root) else uri

    try:
        out.put_bytes(f"{prefix}/runs/{record['run_id']}.html",
                      render_run(record, link).encode())
        index = read_json(out, f"{prefix}/index.json") or {}
        runs = [r for r in index.get("runs") or [] if isinstance(r, dict) and r.get("run_id")
                and r.get("page") and r["run_id"] != record["run_id"]]
        runs = [*runs, index_entry(record)][-NIGHTLY_INDEX_KEEP:]
        out.put_bytes(f"{prefix}/index.json", json.dumps({"runs": runs}, indent=1,
                                                         ensure_ascii=False).encode())
        out.put_bytes(f"{prefix}/index.html", render_index(runs).encode())
    except SafeLoraError as e:
        logger.warning("could not write the nightly's pages under %s: %s",
                       out.describe(prefix), e)


__all__ = ["NIGHTLY_INDEX_KEEP", "index_entry", "publish", "render_index", "render_run"]
