"""The fleet report's sections: fleet state, against the previous run, failures by cause,
near the threshold (or, for a fold of every module, the folded modules), and the tables of
tenants and adapters (bounded: the Parquet files beside the page hold every row).
"""

from __future__ import annotations

import math
from typing import Any

from safelora_ray.reports.aggregate import FINE_OFFSET, NEAR_WIDTH
from safelora_ray.reports.causes import CAUSES, short_message
from safelora_ray.reports.charts import heatmap_svg, hist_svg
from safelora_ray.reports.page import (
    delta,
    esc,
    fmt_f,
    fmt_n,
    fmt_pct,
    fmt_signed,
    href,
    num_cell,
    share_of,
)

STATE_TEXT = {"ok": "✓ sanitized", "failed": "✗ failed (older output kept)",
              "never_sanitized": "✗ never sanitized"}
RUN_TEXT = {"ok": "✓ ok", "skipped": "○ skipped", "error": "✗ failed", "absent": "– not listed"}
CHANGE_TEXT = {"new": "★ new", "re-sanitized": "↻ re-sanitized", "fixed": "▲ fixed",
               "unchanged": "= unchanged", "newly failing": "▼ newly failing",
               "new, failing": "★▼ new, failing", "still failing": "✗ still failing",
               "not listed": "– not listed"}
#: What a failed adapter's row says about its output.
FAILED_OUTPUT = {"failed": "older output kept", "never_sanitized": "✗ none",
                 "ok": "✓ sanitized (another entry of this id)"}


def adapter_links(adapter_id: str, up: str, has_output: bool) -> str:
    if not has_output:
        return ""
    return (f' <a href="{href(up + adapter_id)}/" title="sanitized output">output</a>'
            f' · <a href="{href(up + "_ledger/" + adapter_id)}.json" '
            f'title="ledger record">ledger</a>')


def _tile(label: str, value: str, detail: str = "", bad: bool = False) -> str:
    return (f'<div class="tile{" bad" if bad else ""}">{esc(label)}<b>{esc(value)}</b>'
            f'<span class="note">{esc(detail)}</span></div>')


def verb_of(s: dict[str, Any]) -> str:
    """What the selected modules undergo: SaLoRA folds them, SafeMERGE merges them with a
    safety adapter, Safe LoRA projects them."""
    method = (s.get("selection") or {}).get("method")
    return {"salora": "folded", "safemerge": "merged"}.get(method or "", "projected")


def no_threshold(sel: dict[str, Any]) -> bool:
    """Every module is selected (SaLoRA without --threshold / --num-proj-layers)."""
    return sel.get("threshold") is None and sel.get("num_proj_layers") is None


def merge_text(sel: dict[str, Any]) -> str:
    """SafeMERGE's safety adapter, weights and combination, as a run's selection records them
    (empty for the other methods)."""
    m = sel.get("merge")
    if not m:
        return ""
    w = ",".join(f"{x:g}" for x in m.get("weights") or [])
    return (f"; merged with safety adapter {m.get('safety_uri')} ({m.get('safety_adapter')}), "
            f"weights {w}, combination {m.get('combination')}")


def selection_text(sel: dict[str, Any]) -> str:
    verb = verb_of({"selection": sel})
    if sel.get("mode") == "threshold" or sel.get("threshold") is not None:
        if verb == "merged":  # SafeMERGE's test is strict (SPEC §5)
            return f"threshold τ = {sel.get('threshold')} (merged iff cos < τ){merge_text(sel)}"
        return f"threshold τ = {sel.get('threshold')}"
    if no_threshold(sel):
        return f"every module {verb} (no threshold)"
    return (f"number: the {sel.get('num_proj_layers')} lowest-cosine modules of each adapter"
            + (" (strict)" if sel.get("strict") else " (ties included)") + merge_text(sel))


def state_section(s: dict[str, Any]) -> str:
    f, c, cat = s["fleet"], s["counts"], s["catalog_figures"]
    ch = f.get("changes", {})
    verb = verb_of(s)
    tiles = [
        _tile("✓ Sanitized", fmt_n(f["sanitized"]),
              f"{fmt_pct(f['sanitized'] / f['adapters'] if f['adapters'] else None)} of "
              f"{fmt_n(f['adapters'])} adapters"),
        _tile("✗ Failed", fmt_n(f["failed"]),
              f"{fmt_n(f['failed_older_output'])} older output kept, "
              f"{fmt_n(f['never_sanitized'])} never sanitized", bad=f["failed"] > 0),
        _tile("– Not listed in this run", fmt_n(f["not_listed"]), "state as last seen"),
        _tile(f"Modules {verb}", fmt_pct(f["projected_share"]),
              f"{fmt_n(f['projected'])} of {fmt_n(f['modules'])}"),
        _tile(f"Near τ (±{NEAR_WIDTH:g})", fmt_n(f["near_tau"]),
              "modules a small change of τ would flip"),
        _tile("Pdst median", fmt_f(f["pdst_median"], 3), f"lowest {fmt_f(f['pdst_min'], 3)}"),
    ]
    if no_threshold(s["selection"]):  # no τ: nothing is near it
        del tiles[4]
    change_txt = ", ".join(f"{CHANGE_TEXT.get(k, k)} {fmt_n(ch[k])}" for k in
                           ("new", "re-sanitized", "fixed", "newly failing", "new, failing",
                            "still failing", "unchanged", "not listed") if ch.get(k))
    unknown = ""
    if f.get("figures_unknown"):
        unknown = (f'<p class="note">{fmt_n(f["figures_unknown"])} sanitized adapter(s) have no '
                   "module figures: their ledger records predate them; a run that re-sanitizes "
                   "them (--force, or a changed source) fills them in.</p>")
    return f"""<section id="state"><h2>Fleet state</h2>
<p>Every adapter written under this output, as of this run: those this run skipped keep the
figures of the run that sanitized them, those it did not list keep their last state.</p>
<div class="tiles">{"".join(tiles)}</div>
<p><b>This run</b> listed {fmt_n(c['total'])} adapters: {RUN_TEXT['ok']} {fmt_n(c['ok'])} sanitized
now, {RUN_TEXT['skipped']} {fmt_n(c['skipped'])} (unchanged since the run that sanitized them),
{RUN_TEXT['error']} {fmt_n(c['error'])}. Of its sanitized adapters ({fmt_n(cat['adapters'])} with
module figures), {fmt_n(cat['projected'])} of {fmt_n(cat['modules'])} modules are {verb}
({fmt_pct(cat['projected_share'])}).</p>
<p><b>Changes:</b> {esc(change_txt) or "none"}.</p>{unknown}</section>"""


def previous_section(s: dict[str, Any], page: dict[str, Any], up: str) -> str:
    prev = s.get("previous")
    if not prev:
        return ('<section id="previous"><h2>Against the previous run</h2><p>No earlier run '
                "against this alignment set under this output: this run is the baseline.</p>"
                "</section>")
    pf, f = prev.get("fleet") or {}, s["fleet"]
    pc_, c = prev.get("counts") or {}, s["counts"]
    pcat, cat = prev.get("catalog_figures") or {}, s["catalog_figures"]
    rows = []

    def row(label: str, a: Any, b: Any, share: bool = False) -> None:
        d = None if a is None or b is None else b - a
        fmt = fmt_pct if share else fmt_n
        rows.append(f"<tr><th>{esc(label)}</th><td class='n'>{fmt(a)}</td>"
                    f"<td class='n'>{fmt(b)}</td><td class='n'>{fmt_signed(d, pp=share)}</td></tr>")

    row("adapters listed", pc_.get("total"), c["total"])
    row("✓ ok (sanitized in the run)", pc_.get("ok"), c["ok"])
    row("○ skipped", pc_.get("skipped"), c["skipped"])
    row("✗ failed", pc_.get("error"), c["error"])
    row("fleet: adapters", pf.get("adapters"), f["adapters"])
    row("fleet: ✓ sanitized", pf.get("sanitized"), f["sanitized"])
    row("fleet: ✗ failed", pf.get("failed"), f["failed"])
    row(f"fleet: share of modules {verb_of(s)}", pf.get("projected_share"),
        f["projected_share"], share=True)
    row(f"catalog: share of modules {verb_of(s)}", pcat.get("projected_share"),
        cat["projected_share"], share=True)
    row(f"fleet: modules within ±{NEAR_WIDTH:g} of τ", pf.get("near_tau"), f["near_tau"])
    rows.append(f"<tr><th>fleet: Pdst median</th><td class='n'>{fmt_f(pf.get('pdst_median'))}</td>"
                f"<td class='n'>{fmt_f(f['pdst_median'])}</td><td class='n'>"
                f"{fmt_signed(delta(pf.get('pdst_median'), f['pdst_median']))}</td></tr>")
    notes = []
    if prev.get("selection") != s["selection"]:
        notes.append(f"The selection changed: {selection_text(prev.get('selection') or {})} "
                     f"then, {selection_text(s['selection'])} now (every adapter is redone).")
    if prev.get("alignment_id") != s["alignment"]["content_id"]:
        notes.append(f"The alignment set's content changed: {prev.get('alignment_id')} then, "
                     f"{s['alignment']['content_id']} now.")
    nf = s["fleet"]["changes"]
    failing = page["newly_failing"]
    fixed = page["newly_fixed"]
    n_failing = nf.get("newly failing", 0) + nf.get("new, failing", 0)
    n_fixed = nf.get("fixed", 0)

    def more(shown: int, total: int) -> str:
        return (f'<p class="note">… and {fmt_n(total - shown)} more: fleet.parquet, column '
                f"<code>change</code>.</p>" if total > shown else "")

    fail_rows = "".join(
        f"<tr><td class='id'>{esc(r['adapter_id'])}</td><td>{esc(CHANGE_TEXT[r['change']])}</td>"
        f"<td>{esc(CAUSES[r['cause']].label if r['cause'] in CAUSES else r['cause'] or '')}</td>"
        f"<td>{adapter_links(r['adapter_id'], up, r['state'] == 'failed')}</td></tr>"
        for r in failing)
    fix_rows = "".join(
        f"<tr><td class='id'>{esc(r['adapter_id'])}</td><td>was "
        f"{esc(STATE_TEXT.get(r['prev_state'], r['prev_state'] or ''))}</td>"
        f"<td>{adapter_links(r['adapter_id'], up, True)}</td></tr>" for r in fixed)
    def table(head: str, body: str) -> str:
        return (f'<div class="wrap"><table class="sortable" data-page="10"><thead><tr>{head}'
                f"</tr></thead><tbody>{body}</tbody></table></div>")

    fail_table = table("<th>adapter</th><th>change</th><th>cause</th><th>links</th>",
                       fail_rows) if failing else "<p>None.</p>"
    fix_table = table("<th>adapter</th><th>before</th><th>links</th>",
                      fix_rows) if fixed else "<p>None.</p>"
    link = f'<a href="{href("../" + prev["report"])}">{esc(prev["run_id"])}</a>'
    return f"""<section id="previous"><h2>Against the previous run</h2>
<p>Previous run against this alignment set: {link}
(finished {esc(str(prev.get('finished_at')))}; catalog {esc(str(prev.get('catalog')))}).</p>
{"".join(f'<p><b>{esc(n)}</b></p>' for n in notes)}
<div class="wrap"><table><thead><tr><th></th><th class="n">previous</th><th class="n">this run</th>
<th class="n">change</th></tr></thead><tbody>{"".join(rows)}</tbody></table></div>
<h3>▼ Newly failing ({fmt_n(n_failing)})</h3>
{fail_table}
{more(len(failing), n_failing)}
<h3>▲ Newly fixed ({fmt_n(n_fixed)})</h3>
{fix_table}
{more(len(fixed), n_fixed)}</section>"""


def failures_section(s: dict[str, Any], page: dict[str, Any], up: str) -> str:
    groups = s["failure_groups"]
    total = s["counts"]["error"]
    if not groups:
        return ('<section id="failures"><h2>Failures (0)</h2><p>✓ No adapter failed in this '
                "run.</p></section>")
    head = "".join(
        f"<tr><td><a href='#cause-{esc(g['cause'])}'>{esc(g['label'])}</a></td>"
        f"{num_cell(g['count'])}{num_cell(g['new'])}<td>{esc(g['action'])}</td></tr>"
        for g in groups)
    by: dict[str, list[dict[str, Any]]] = {}
    for r in page["failures"]:
        by.setdefault(r["cause"], []).append(r)
    parts = []
    for g in groups:
        rows = by.get(g["cause"], [])
        body = "".join(
            f"<tr><td class='id'>{esc(r['adapter_id'])}</td><td>{esc(r['tenant'] or '')}</td>"
            f"<td>{'<span class=new>★ new</span>' if r['new'] else 'before too'}</td>"
            f"<td>{esc(FAILED_OUTPUT.get(r['state'] or '', ''))}"
            f"{adapter_links(r['adapter_id'], up, r['state'] in ('ok', 'failed'))}</td>"
            f"<td class='msg'>{esc(short_message(r['adapter_id'], r['error']))}</td></tr>"
            for r in rows)
        cut = (f'<p class="note">{fmt_n(len(rows))} of {fmt_n(g["count"])} listed here; all are in '
               f'<a href="adapters.parquet">adapters.parquet</a> (status = error, cause = '
               f"{esc(g['cause'])}).</p>" if len(rows) < g["count"] else "")
        parts.append(
            f"<details id='cause-{esc(g['cause'])}' {'open' if total <= 20 else ''}><summary>"
            f"{esc(g['label'])}: {fmt_n(g['count'])} adapter(s), {fmt_n(g['new'])} new since the "
            f"previous run</summary><div class='wrap'><table class='sortable' data-page='50'>"
            f"<thead><tr><th>adapter</th><th>tenant</th><th>new?</th><th>output</th>"
            f"<th>message</th></tr></thead><tbody>{body}</tbody></table></div>{cut}</details>")
    return f"""<section id="failures"><h2>Failures by cause ({fmt_n(total)})</h2>
<p>A failed adapter was not written by this run; where an earlier version was sanitized, that
output is still served. "★ new": it did not fail before this run.</p>
<div class="wrap"><table><thead><tr><th>cause</th><th class="n">adapters</th>
<th class="n">new since previous run</th><th>what usually fixes it</th></tr></thead>
<tbody>{head}</tbody></table></div>{"".join(parts)}</section>"""


def _folded_section(s: dict[str, Any]) -> str:
    """A fold of every module (no τ): which modules were folded, by which safety set."""
    al, cat = s["alignment"], s["catalog_figures"]
    kinds: dict[str, list[Any]] = {}
    for c in s["layer_kind"]:
        k = kinds.setdefault(c["kind"], [set(), 0, 0])
        k[0].add(c["layer"])
        k[1] += c["modules"]
        k[2] += c["projected"]
    rows = "".join(
        f"<tr><td class='id'>{esc(kind)}</td><td>{esc(_layers_text(layers))}</td>"
        f"{num_cell(n)}{num_cell(p, ('✓ ' if p == n else '') + fmt_n(p))}</tr>"
        for kind, (layers, n, p) in sorted(kinds.items()))
    title = "Share of modules folded, by layer and module kind (this catalog)"
    table = (f"<div class='wrap'><table><thead><tr><th>module kind</th><th>layers</th>"
             f"<th class='n'>modules</th><th class='n'>folded</th></tr></thead><tbody>{rows}"
             f"</tbody></table></div>" if rows else
             "<p>No module figures: nothing was sanitized in this catalog yet.</p>")
    return (f'<section id="folded"><h2>Folded modules</h2><p>Every module of every sanitized '
            f"adapter is folded with safety set <b>{esc(al['content_id'])}</b> "
            f"({esc(al['uri'])}): B ← (I − V_s V_sᵀ)·B, no threshold. {fmt_n(cat['projected'])} "
            f"of {fmt_n(cat['modules'])} modules of {fmt_n(cat['adapters'])} adapter(s) folded.</p>"
            f"{table}{heatmap_svg(s['layer_kind'], title, 'folded')}</section>")


def _layers_text(layers: set[int | None]) -> str:
    known = sorted(x for x in layers if x is not None)
    return (f"{known[0]}..{known[-1]}" if len(known) > 1 else str(known[0])) if known else "–"


def threshold_section(s: dict[str, Any]) -> str:
    if no_threshold(s["selection"]):
        return _folded_section(s)
    nt = s["near_threshold"]
    hist = s["histograms"]
    tau = nt["tau"]
    cat = s["catalog_figures"]
    fine = hist["cos_fine"]["counts"]
    lo, hi = hist["cos_fine_range"]
    verb = verb_of(s)
    parts = []
    if hi < lo:
        return ('<section id="threshold"><h2>Near the threshold</h2><p>No module figures: '
                "nothing was sanitized in this catalog yet.</p></section>")
    if tau is not None:
        rel = f"of τ = {tau:g}"
        zoom_x0, zlabel = tau - nt["zoom"]["half_width"], "rounded cosine"
        tau_x, tau_label, hatch = tau, f"τ = {tau:g}", tau
    else:
        rel = "of each adapter's own τ (its k-th smallest cosine)"
        zoom_x0, zlabel = -nt["zoom"]["half_width"], "rounded cosine − the adapter's τ"
        tau_x, tau_label, hatch = 0.0, "τ (per adapter)", 0.0
    w = nt["width"]
    parts.append(
        f"<p><b>{fmt_n(nt['within'])}</b> of {fmt_n(cat['modules'])} modules lie within "
        f"±{w:g} {rel}: "
        f"<b>{fmt_n(nt['at_or_below'])}</b> at or below τ ({verb}; a τ lower by up to {w:g} "
        f"would keep them) and <b>{fmt_n(nt['above'])}</b> above it (kept; a τ higher by up to "
        f"{w:g} would project them).</p>")
    parts.append(hist_svg(
        nt["zoom"]["counts"], zoom_x0, nt["zoom"]["step"],
        title=f"Modules near τ (bins of {nt['zoom']['step']:g}; {fmt_n(nt['zoom']['below_range'])} "
              f"below and {fmt_n(nt['zoom']['above_range'])} above this range)",
        xlabel=zlabel, ylabel="modules", tau=tau_x, tau_label=tau_label,
        band=(tau_x - w, tau_x + w, f"±{w:g}: {nt['within']:,} modules"), hatch_upto=hatch,
        verb=verb))
    # The whole distribution, on the range the cosines occupy (and τ), in bins of 0.01.
    first = min(lo, FINE_OFFSET + math.floor((tau - 0.05) * 1000)) if tau is not None else lo
    last = max(hi, FINE_OFFSET + math.ceil((tau + 0.05) * 1000)) if tau is not None else hi
    first = max(0, (first // 10) * 10 - 9)  # start on a 0.01 edge
    last = min(len(fine) - 1, last)
    counts = [sum(fine[i:i + 10]) for i in range(first, last + 1, 10)]
    x0 = (first - FINE_OFFSET) / 1000
    parts.append(hist_svg(
        counts, x0, 0.01,
        title=f"Every module of this catalog's sanitized adapters ({fmt_n(cat['modules'])}), "
              "bins of 0.01",
        xlabel="rounded cosine cos(ΔW, CΔW)", ylabel="modules",
        tau=tau, tau_label=f"τ = {tau:g}" if tau is not None else "",
        hatch_upto=tau, verb=verb))
    rule = "cosine < τ, strictly" if verb == "merged" else "cosine ≤ τ"
    parts.append(f'<p class="note">Hatched bars: {verb} ({rule}); solid: kept as '
                 "trained. Bins are right-closed, like Safe LoRA's ≤.</p>")
    parts.append(heatmap_svg(s["layer_kind"], f"Share of modules {verb}, by layer and "
                                              "module kind (this catalog)", verb))
    pf = hist["pdst_fine"]["counts"]
    nz = [i for i, v in enumerate(pf) if v]
    if nz:
        a = max(0, (nz[0] // 10) * 10)
        parts.append(hist_svg(
            pf[a:], a / 100, 0.01,
            title="Pdst of this catalog's sanitized adapters (bins of 0.01)",
            xlabel="Pdst = mean over modules of 1 / (1 + ‖B_out − C·B_in‖)",
            ylabel="adapters", ref=(0.8, "0.8: the official code's 'better' mark")))
    return f'<section id="threshold"><h2>Near the threshold</h2>{"".join(parts)}</section>'


def near_column(s: dict[str, Any]) -> tuple[str, Any]:
    """The "near τ" column's head and cell (none when there is no τ)."""
    if no_threshold(s["selection"]):
        return "", lambda r: ""
    return '<th class="n">near τ</th>', lambda r: num_cell(r["near_tau"])


def tenants_section(s: dict[str, Any], page: dict[str, Any]) -> str:
    rows = page["tenants"]
    near_th, near = near_column(s)
    body = "".join(
        f"<tr><td class='id'>{esc(t['tenant'])}</td>{num_cell(t['adapters'])}"
        f"{num_cell(t['run_ok'])}"
        f"{num_cell(t['run_skipped'])}{num_cell(t['run_error'])}{num_cell(t['not_listed'])}"
        f"{num_cell(t['failed'], ('✗ ' if t['failed'] else '') + fmt_n(t['failed']))}"
        f"{num_cell(t['newly_failing'])}{num_cell(t['modules'])}{num_cell(t['projected'])}"
        f"{num_cell(t['share'], fmt_pct(t['share']))}"
        f"{num_cell(d := delta(t['prev_share'], t['share']), fmt_signed(d, pp=True))}"
        f"{near(t)}{num_cell(t['min_pdst'], fmt_f(t['min_pdst'], 3))}</tr>" for t in rows)
    cut = (f'<p class="note">The {fmt_n(len(rows))} tenants with the most failures, then the most '
           f'adapters, of {fmt_n(s["tenants_total"])}; all are in '
           f'<a href="tenants.parquet">tenants.parquet</a>.</p>'
           if s["tenants_total"] > len(rows) else "")
    depth = s["tenant_depth"]
    return f"""<section id="tenants"><h2>Tenants ({fmt_n(s['tenants_total'])})</h2>
<p>A tenant is the first {"path component" if depth == 1 else f"{depth} path components"} of
the adapter id (--tenant-depth). Click a column to sort. The first columns are this run's
statuses; "failing now" counts the tenant's adapters whose latest attempt failed (listed in this
run or not); module figures count its sanitized adapters; Δ share is against the previous fleet
state.</p>
<div class="wrap"><table class="sortable" data-page="50"><thead><tr><th>tenant</th>
<th class="n">adapters</th><th class="n">✓ ok</th><th class="n">○ skipped</th>
<th class="n">✗ failed</th><th class="n">– not listed</th><th class="n">failing now</th>
<th class="n">▼ newly failing</th><th class="n">modules</th>
<th class="n">{verb_of(s)}</th><th class="n">share</th><th class="n">Δ share</th>
{near_th}<th class="n">lowest Pdst</th></tr></thead><tbody>{body}</tbody>
</table></div>{cut}</section>"""


def adapter_table(rows: list[dict[str, Any]], up: str, caption: str,
                   verb: str = "projected") -> str:
    body = "".join(
        f"<tr><td class='id'>{esc(r['adapter_id'])}</td>{num_cell(r['projected'])}"
        f"{num_cell(r['modules'])}"
        f"{num_cell(sh := share_of(r['projected'], r['modules']), fmt_pct(sh))}"
        f"{num_cell(r['pdst'], fmt_f(r['pdst']))}"
        f"<td>{adapter_links(r['adapter_id'], up, True)}</td></tr>"
        for r in rows)
    return (f"<h3>{esc(caption)}</h3><div class='wrap'><table class='sortable'><thead><tr>"
            f"<th>adapter</th><th class='n'>{verb}</th><th class='n'>modules</th>"
            f"<th class='n'>share</th><th class='n'>Pdst</th><th>links</th></tr></thead>"
            f"<tbody>{body}</tbody></table></div>")


def adapters_section(s: dict[str, Any], page: dict[str, Any], up: str) -> str:
    verb = verb_of(s)
    near_th, near = near_column(s)
    parts = [
        adapter_table(s["lowest_pdst"], up, f"Lowest Pdst (largest distance left un{verb})",
                       verb),
        adapter_table(s["most_projected"], up, f"Largest share of modules {verb} (ties: "
                                               "more modules, then lower Pdst)", verb),
    ]
    rows = page["adapters"]
    if rows is not None:
        body = "".join(
            f"<tr><td class='id'>{esc(r['adapter_id'])}</td><td>{esc(r['tenant'])}</td>"
            f"<td>{esc(STATE_TEXT.get(r['state'], r['state']))}</td>"
            f"<td>{esc(RUN_TEXT.get(r['run_status'], r['run_status']))}</td>"
            f"<td>{esc(CHANGE_TEXT.get(r['change'], r['change']))}</td>{num_cell(r['modules'])}"
            f"{num_cell(r['projected'])}{num_cell(r['pdst'], fmt_f(r['pdst']))}{near(r)}"
            f"<td>{adapter_links(r['adapter_id'], up, r['state'] in ('ok', 'failed'))}</td></tr>"
            for r in rows)
        parts.append(
            f"<h3>All adapters ({fmt_n(len(rows))})</h3><div class='wrap'><table class='sortable' "
            f"data-page='50'><thead><tr><th>adapter</th><th>tenant</th><th>state</th>"
            f"<th>this run</th><th>change</th><th class='n'>modules</th><th class='n'>{verb}"
            f"</th><th class='n'>Pdst</th>{near_th}<th>links</th></tr></thead>"
            f"<tbody>{body}</tbody></table></div>")
    else:
        parts.append(f'<p class="note">Every adapter ({fmt_n(s["fleet"]["adapters"])}) is in '
                     '<a href="fleet.parquet">fleet.parquet</a> (its state, this run\'s change, '
                     'figures) and <a href="adapters.parquet">adapters.parquet</a> (this run\'s '
                     "rows); each output is at <code>&lt;out&gt;/&lt;adapter id&gt;/</code>, its "
                     "ledger record at <code>&lt;out&gt;/_ledger/&lt;adapter id&gt;.json</code>."
                     "</p>")
    return f'<section id="adapters"><h2>Adapters to look at</h2>{"".join(parts)}</section>'


__all__ = [
    "CHANGE_TEXT",
    "FAILED_OUTPUT",
    "RUN_TEXT",
    "STATE_TEXT",
    "adapter_links",
    "adapters_section",
    "failures_section",
    "no_threshold",
    "previous_section",
    "selection_text",
    "state_section",
    "tenants_section",
    "threshold_section",
    "verb_of",
]
