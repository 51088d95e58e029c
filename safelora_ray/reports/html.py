"""The HTML pages: one self-contained report per run, the runs' index, and ``latest.html``.

Everything is inline (CSS, SVG plots, a small script that sorts and pages tables): the page
works offline and from a file. No meaning is carried by colour alone: states have a symbol and
a word, projected bars are hatched, the heatmap prints its numbers and uses one hue's
lightness. Tables are bounded (the Parquet files beside the page hold every row), so the page
stays small and fast at 100,000 adapters.

This module assembles the pages; their pieces are :mod:`.page` (CSS, script, formatting),
:mod:`.charts` (the SVG plots), :mod:`.sections` and :mod:`.tables`.
"""

from __future__ import annotations

from typing import Any

from safelora_ray.reports.charts import DEFS, heatmap_svg, hist_svg
from safelora_ray.reports.page import CSS, JS, esc, fmt_n, fmt_pct, href, num_cell
from safelora_ray.reports.sections import (
    adapters_section,
    failures_section,
    no_threshold,
    previous_section,
    selection_text,
    state_section,
    tenants_section,
    threshold_section,
    verb_of,
)

MEANING = """<section id="meaning"><h2>What these numbers mean</h2><dl class="meaning">
<dt>cosine, cos(ΔW, CΔW)</dt><dd>For each LoRA module, ΔW = B·A is the fine-tune's update and
C is the alignment matrix built from (aligned − base) weights. The cosine measures how much of
the update lies along the alignment direction: near 1, the update keeps to what alignment
changed; low, it moves elsewhere, which the paper links to lost safety. It is rounded to 5
decimals, as the official code does.</dd>
"""
#: What the τ entry says (left out when no τ was used).
MEANING_TAU = """<dt>τ (threshold)</dt><dd>Modules with cosine ≤ τ are <em>projected</em>: B ← C·B.
The paper uses τ ≈ 0.35, which projects about 11 % of Llama-2-7B-chat's 64 q/v modules (τ 0.3 → 6
%, 0.4 → 22 %, 0.5 → 48 %). On Dialog Summary + 100 harmful examples, τ = 0.35 (7 of 64 layers)
took harmfulness from 2.63 to 1.297 at Rouge-1 50.66 % → 49.79 %; projecting every layer on PureBad
took it from 4.66 to 1.055. In number mode (k), τ is each adapter's k-th smallest cosine. Modules
within ±0.05 of τ are the ones a small change of τ would flip.</dd>
"""
MEANING += MEANING_TAU + """<dt>Pdst</dt><dd>Mean over an adapter's modules of 1 / (1 + ‖B_out −
C·B_in‖_F): 1.0 for a projected module, lower the further an unprojected module's B is from its
projection. The official code reports it and calls &gt; 0.8 better; a low Pdst means large updates
left unprojected.</dd>
<dt>States</dt><dd>✓ sanitized: the output matches the current source. ✗ failed (older output
kept): the current source failed, an earlier sanitized version is still served. ✗ never
sanitized: every attempt failed; there is no output. – not listed: the adapter was not in this
run's catalog; its state is the last one seen. This run: ✓ ok (sanitized now), ○ skipped
(unchanged since the run that sanitized it), ✗ failed.</dd></dl></section>"""


FOLD_MEANING = """<section id="fold"><h2>What a fold is (SaLoRA)</h2><p>This run folded
adapters with a SaLoRA safety set (<code>--method salora</code>, SPEC §4): for each module,
V_s holds the top safety directions of the aligned model's W·Σ·Wᵀ over a calibration set, and
a folded module's B becomes (I − V_s V_sᵀ)·B, so the update keeps no component along them. A
"folded" module below is what a Safe LoRA run calls "projected"; the cosine is that of ΔW with
its folded update.</p></section>"""


MERGE_MEANING = """<section id="merge"><h2>What a merge is (SafeMERGE)</h2><p>This run
merged adapters with a safety adapter (<code>--method safemerge</code>, SPEC §5): each module is
scored with Safe LoRA's cosine cos(ΔW, CΔW), and a module whose rounded cosine is below τ
(strictly) is <em>merged</em>: its update becomes w_f·ΔW_task + w_s·ΔW_safety (<code>cat</code>,
exact) or PEFT's "linear" combination of the factors (<code>linear</code>, as the official
code). The others keep their update. A "merged" module below is what a Safe LoRA run calls
"projected"; the output adapter's scaling is 1 (lora_alpha = r).</p></section>"""


def _files_section(up: str) -> str:
    items = [
        ("summary.json", "this page's figures for dashboards (per tenant, failure groups, "
                         "histograms)"),
        ("fleet.parquet", "one row per adapter known under this output: state, this run's "
                          "change, modules, projected, Pdst, near τ, cause"),
        ("tenants.parquet", "one row per tenant"),
        ("adapters.parquet", "this run's rows: status, error, cause, digests, timings"),
        ("layers.parquet", "every module scored in this run: layer, kind, cosine, projected"),
        ("../index.html", "every run under this output (latest marked)"),
        ("../latest.html", "the latest report"),
        (up, "the sanitized adapters (<id>/)"),
        (up + "_ledger/", "the ledger (<id>.json per adapter)"),
    ]
    li = "".join(f'<li><a href="{href(p)}">{esc(p)}</a>: {esc(d)}</li>' for p, d in items)
    return f'<section id="files"><h2>Files</h2><ul>{li}</ul></section>'


def render_report(s: dict[str, Any], page: dict[str, Any], out_prefix: str = "../../") -> str:
    """The run's self-contained report page.

    Args:
        s: The summary (``summary.json``).
        page: The lists the page shows beyond the summary (see ``ReportWriter._page``).
        out_prefix: Relative path from the page to ``--out`` (links to outputs and ledger).
    """
    up = out_prefix
    al = s["alignment"]
    f = s["fleet"]
    status = ("✗ failures" if s["counts"]["error"] else "✓ all sanitized or unchanged")
    fold = verb_of(s) == "folded"
    near = ("folded", "Folded modules") if no_threshold(s["selection"]) else ("threshold",
                                                                              "Near τ")
    used = (f"folded with safety set {esc(al['content_id'])} ({esc(al['uri'])}; targets "
            f"{esc(', '.join(al['targets']))})" if fold else
            f"alignment set {esc(al['content_id'])} ({esc(al['uri'])}; targets "
            f"{esc(', '.join(al['targets']))})")
    meaning = MEANING.replace(MEANING_TAU, "") if near[0] == "folded" else MEANING
    nav = "".join(f'<a href="#{i}">{t}</a>' for i, t in (
        ("state", "Fleet state"), ("previous", "Against previous"),
        ("failures", f"Failures ({s['counts']['error']:,})"), near,
        ("tenants", "Tenants"), ("adapters", "Adapters"), ("meaning", "What it means"),
        ("files", "Files")))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(status)} · safelora-ray run {esc(s['run_id'])}</title>
<style>{CSS}</style></head><body>
<nav>{nav}<a href="../index.html">All runs</a><a href="summary.json">summary.json</a></nav>
<main>{DEFS}
<h1>Safe LoRA fleet report · {esc(s['catalog'])}</h1>
<p class="meta">Run <b>{esc(s['run_id'])}</b> · {esc(status)} · finished {esc(s['finished_at'])}
in {s['duration_s']:,} s ({fmt_n(s['adapters_per_s'])} adapters/s) ·
safelora-ray {esc(s['tool_version'])}</p>
<p class="meta">Output {esc(s['out'])} · {used} · selection: {esc(selection_text(s['selection']))}
· {fmt_n(f['adapters'])} adapters in the fleet</p>
{state_section(s)}
{previous_section(s, page, up)}
{failures_section(s, page, up)}
{threshold_section(s)}
{tenants_section(s, page)}
{adapters_section(s, page, up)}
{FOLD_MEANING if fold else ""}{MERGE_MEANING if verb_of(s) == "merged" else ""}{meaning}
{_files_section(up)}
</main><script>{JS}</script></body></html>
"""


def render_index(runs: list[dict[str, Any]], latest: str) -> str:
    """``_reports/index.html``: every run, newest first, the latest marked."""
    rows = []
    for r in reversed(runs):
        c = r.get("counts") or {}
        fl = r.get("fleet") or {}
        mark = "★ latest" if r["run_id"] == latest else ""
        rows.append(
            f"<tr><td class='id'><a href='{href(r['report'])}'>{esc(r['run_id'])}</a></td>"
            f"<td>{esc(mark)}</td><td>{esc(str(r.get('finished_at') or ''))}</td>"
            f"<td class='msg'>{esc(str(r.get('catalog') or ''))}</td>"
            f"<td class='msg'>{esc(str(r.get('alignment_uri') or ''))}</td>"
            f"{num_cell(c.get('total'))}{num_cell(c.get('ok'))}{num_cell(c.get('skipped'))}"
            f"{num_cell(c.get('error'), ('✗ ' if c.get('error') else '') + fmt_n(c.get('error')))}"
            f"{num_cell(fl.get('sanitized'))}{num_cell(fl.get('failed'))}"
            f"{num_cell(fl.get('projected_share'), fmt_pct(fl.get('projected_share')))}</tr>")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>safelora-ray runs</title>
<style>{CSS}</style></head><body><main>
<h1>safelora-ray runs under this output</h1>
<p><a href="latest.html">★ The latest report ({esc(latest)})</a> ·
<a href="index.json">index.json</a> · <a href="latest.json">latest.json</a></p>
<div class="wrap"><table class="sortable" data-page="100"><thead><tr><th>run</th><th></th>
<th>finished</th><th>catalog</th><th>alignment set</th><th class="n">listed</th>
<th class="n">✓ ok</th><th class="n">○ skipped</th><th class="n">✗ failed</th>
<th class="n">fleet sanitized</th><th class="n">fleet failed</th><th class="n">projected</th>
</tr></thead><tbody>{"".join(rows)}</tbody></table></div></main><script>{JS}</script>
</body></html>
"""


def render_latest(run_id: str) -> str:
    """``_reports/latest.html``: sends the browser to the latest run's report."""
    target = href(f"{run_id}/report.html")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="0; url={target}">
<title>latest safelora-ray report</title></head><body>
<p>The latest report is <a href="{target}">{esc(run_id)}</a>; <a href="index.html">all runs</a>.</p>
</body></html>
"""


__all__ = ["heatmap_svg", "hist_svg", "render_index", "render_latest", "render_report"]
