"""The fleet report's tables of tenants and adapters (bounded: the Parquet files beside the
page hold every row)."""

from __future__ import annotations

from typing import Any

from safelora_ray.reports.page import (
    delta,
    esc,
    fmt_f,
    fmt_n,
    fmt_pct,
    fmt_signed,
    num_cell,
    share_of,
)
from safelora_ray.reports.sections import (
    CHANGE_TEXT,
    RUN_TEXT,
    STATE_TEXT,
    adapter_links,
    no_threshold,
    verb_of,
)


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


__all__ = ["adapters_section", "tenants_section"]
