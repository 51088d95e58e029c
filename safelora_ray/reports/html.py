"""The HTML pages: one self-contained report per run, the runs' index, and ``latest.html``.

Everything is inline (CSS, SVG plots, a small script that sorts and pages tables): the page
works offline and from a file. No meaning is carried by colour alone: states have a symbol and
a word, projected bars are hatched, the heatmap prints its numbers and uses one hue's
lightness. Tables are bounded (the Parquet files beside the page hold every row), so the page
stays small and fast at 100,000 adapters.
"""

from __future__ import annotations

import html
import math
from typing import Any
from urllib.parse import quote

from safelora_ray.reports.aggregate import FINE_OFFSET, NEAR_WIDTH
from safelora_ray.reports.causes import CAUSES, short_message

esc = html.escape

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
PROJ = "#D55E00"  # Okabe-Ito vermillion (projected), hatched
KEPT = "#0072B2"  # Okabe-Ito blue (kept)

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1b1b1b}
main{max-width:1180px;margin:0 auto;padding:12px 20px 40px}
h1{font-size:22px;margin:8px 0 2px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ccc}
h3{font-size:15px;margin:16px 0 6px}.meta{color:#444;margin:2px 0}
nav{position:sticky;top:0;background:#fff;border-bottom:1px solid #ddd;padding:6px 20px;z-index:2}
nav a{margin-right:14px}a{color:#0050a0}
.tiles{display:flex;flex-wrap:wrap;gap:10px;margin:10px 0}
.tile{border:1px solid #bbb;border-radius:6px;padding:8px 12px;flex:1 1 140px;max-width:220px}
.tile b{display:block;font-size:22px}.tile.bad{border:2px solid #a4161a}
.wrap{overflow-x:auto}table{border-collapse:collapse;margin:6px 0}
th,td{padding:3px 7px;text-align:left;vertical-align:top;border-bottom:1px solid #e3e3e3}
table{font-size:13px}
th{background:#f3f3f3;white-space:nowrap}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums;
white-space:nowrap}figure{margin:10px 0;overflow-x:auto}
td.id{white-space:nowrap;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px}
td.msg{max-width:620px;overflow-wrap:anywhere;font-size:13px}
table.sortable th{cursor:pointer}table.sortable th[aria-sort=ascending]::after{content:" ▲"}
table.sortable th[aria-sort=descending]::after{content:" ▼"}
details{margin:4px 0}summary{cursor:pointer;font-weight:600}
.pager button{margin:2px 4px}.note{color:#555;font-size:13px}
.new{font-weight:700}svg text{font-family:inherit}
dl.meaning dt{font-weight:700;margin-top:8px}dl.meaning dd{margin-left:18px}
"""

JS = """
(function(){
function key(td){var v=td.getAttribute('data-v');
if(v===null)return td.textContent.trim().toLowerCase();return v===''?NaN:parseFloat(v);}
function pager(t){var n=+t.getAttribute('data-page');var rows=t.tBodies[0].rows;
var pages=Math.ceil(rows.length/n);if(pages<2)return;var p=0;
var nav=document.createElement('div');nav.className='pager';
var prev=document.createElement('button'),next=document.createElement('button');
var info=document.createElement('span');
prev.textContent='\\u2039 previous';next.textContent='next \\u203a';
function show(){for(var i=0;i<rows.length;i++){rows[i].style.display=(i>=p*n&&i<(p+1)*n)?'':'none';}
info.textContent=' page '+(p+1)+' of '+pages+' ('+rows.length+' rows) ';
prev.disabled=p===0;next.disabled=p===pages-1;}
prev.onclick=function(){p--;show();};next.onclick=function(){p++;show();};
nav.appendChild(prev);nav.appendChild(info);nav.appendChild(next);
t.parentNode.insertBefore(nav,t.nextSibling);
t.resetPage=function(){p=0;show();};show();}
document.querySelectorAll('table[data-page]').forEach(pager);
document.querySelectorAll('table.sortable').forEach(function(t){
var ths=t.tHead.rows[0].cells;Array.prototype.forEach.call(ths,function(th,i){th.tabIndex=0;
function go(){var tb=t.tBodies[0];var rows=Array.prototype.slice.call(tb.rows);
var asc=th.getAttribute('aria-sort')!=='ascending';
Array.prototype.forEach.call(ths,function(h){h.removeAttribute('aria-sort');});
th.setAttribute('aria-sort',asc?'ascending':'descending');
rows.sort(function(a,b){var x=key(a.cells[i]),y=key(b.cells[i]);
if(typeof x==='number'||typeof y==='number'){
var xn=typeof x==='number'&&!isNaN(x),yn=typeof y==='number'&&!isNaN(y);
if(!xn||!yn)return xn?-1:(yn?1:0);return asc?x-y:y-x;}
return asc?(x<y?-1:x>y?1:0):(x<y?1:x>y?-1:0);});
rows.forEach(function(r){tb.appendChild(r);});if(t.resetPage)t.resetPage();}
th.addEventListener('click',go);th.addEventListener('keydown',function(e){if(e.key==='Enter')go();});});});
function reveal(){var h=location.hash.slice(1);var d=h&&document.getElementById(h);
if(d&&d.tagName==='DETAILS'){d.open=true;}}
window.addEventListener('hashchange',reveal);reveal();
})();
"""

DEFS = (f'<svg width="0" height="0" style="position:absolute" aria-hidden="true"><defs>'
        f'<pattern id="hatch" patternUnits="userSpaceOnUse" width="6" height="6" '
        f'patternTransform="rotate(45)"><rect width="6" height="6" fill="{PROJ}"/>'
        f'<line x1="0" y1="0" x2="0" y2="6" stroke="#fff" stroke-width="2.2"/></pattern>'
        f'<pattern id="band" patternUnits="userSpaceOnUse" width="8" height="8" '
        f'patternTransform="rotate(-45)"><rect width="8" height="8" fill="#f1f1f1"/>'
        f'<line x1="0" y1="0" x2="0" y2="8" stroke="#d0d0d0" stroke-width="2"/></pattern>'
        f"</defs></svg>")


# ---------------------------------------------------------------------------------------------
# Small formatting helpers
# ---------------------------------------------------------------------------------------------


def _n(x: Any) -> str:
    return "–" if x is None else f"{x:,}" if isinstance(x, int) else f"{x:,.4g}"


def _pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f} %"


def _f(x: float | None, digits: int = 4) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else \
        f"{x:.{digits}f}"


def _num(x: Any, text: str | None = None) -> str:
    """A numeric cell (sortable by value)."""
    v = "" if x is None else f"{x}"
    return f'<td class="n" data-v="{v}">{esc(text if text is not None else _n(x))}</td>'


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


def _share(part: int | None, whole: int | None) -> float | None:
    return part / whole if part is not None and whole else None


def _signed(x: float | None, pp: bool = False) -> str:
    if x is None:
        return "–"
    if pp:
        return "±0 pp" if abs(x) < 5e-5 else f"{100 * x:+.2f} pp"
    if isinstance(x, int):
        return "±0" if x == 0 else f"{x:+,}"
    return "±0" if abs(x) < 5e-5 else f"{x:+.4f}"


def _href(path: str) -> str:
    return quote(path, safe="/._-~+=@")


def _adapter_links(adapter_id: str, up: str, has_output: bool) -> str:
    if not has_output:
        return ""
    return (f' <a href="{_href(up + adapter_id)}/" title="sanitized output">output</a>'
            f' · <a href="{_href(up + "_ledger/" + adapter_id)}.json" '
            f'title="ledger record">ledger</a>')


def _nice_step(span: float, target: int = 8) -> float:
    raw = span / max(1, target)
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def hist_svg(counts: list[int], x0: float, step: float, *, title: str, xlabel: str,
             ylabel: str, tau: float | None = None, tau_label: str = "",
             band: tuple[float, float, str] | None = None, hatch_upto: float | None = None,
             ref: tuple[float, str] | None = None, width: int = 900, height: int = 230,
             verb: str = "projected") -> str:
    """A histogram with axes, axis titles, y ticks and gridlines.

    Args:
        counts: Bin counts; bin ``i`` covers ``(x0 + i*step, x0 + (i+1)*step]``.
        tau: Draw τ as a dashed line labelled ``tau_label``.
        band: ``(lo, hi, label)``: a patterned band behind the bars.
        hatch_upto: Bars whose upper edge is ≤ this are hatched (``verb``: projected).
        ref: ``(x, label)``: a dotted reference line.
    """
    ml, mr, mt, mb = 64, 16, 44, 46
    pw, ph = width - ml - mr, height - mt - mb
    n = max(1, len(counts))
    x1 = x0 + n * step
    top = max(counts) if counts and max(counts) > 0 else 1

    def X(x: float) -> float:
        return ml + (x - x0) / (x1 - x0) * pw

    def Y(v: float) -> float:
        return mt + ph - v / top * ph

    p = [f'<figure><svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
         f'role="img" aria-label="{esc(title)}"><title>{esc(title)}</title>',
         f'<text x="{ml}" y="16" font-size="13" font-weight="600">{esc(title)}</text>']
    if band is not None:
        bx0, bx1 = X(max(x0, band[0])), X(min(x1, band[1]))
        p.append(f'<rect x="{bx0:.1f}" y="{mt}" width="{max(0, bx1 - bx0):.1f}" height="{ph}" '
                 f'fill="url(#band)"><title>{esc(band[2])}</title></rect>')
        p.append(f'<text x="{bx0 + 4:.1f}" y="{mt + 14}" font-size="11">{esc(band[2])}</text>')
    # y axis: 0, half, top with gridlines
    for v in sorted({0, top // 2 if top >= 2 else 0, top}):
        y = Y(v)
        p.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                 f'<text x="{ml - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">'
                 f"{v:,}</text>")
    bw = pw / n
    for i, c in enumerate(counts):
        if not c:
            continue
        lo, hi = x0 + i * step, x0 + (i + 1) * step
        proj = hatch_upto is not None and hi <= hatch_upto + 1e-12
        fill = "url(#hatch)" if proj else KEPT
        h = c / top * ph
        p.append(f'<rect x="{X(lo) + 0.5:.1f}" y="{Y(c):.1f}" width="{max(bw - 1, 1):.1f}" '
                 f'height="{h:.1f}" fill="{fill}" stroke="{PROJ if proj else KEPT}" '
                 f'stroke-width="0.5"><title>({lo:.3f}, {hi:.3f}]: {c:,}'
                 f'{f" ({verb})" if proj else ""}</title></rect>')
    # x axis ticks
    tstep = _nice_step(x1 - x0)
    # Ticks as whole multiples of the step (a running sum drifts: "-6.94e-18" for 0).
    k = math.ceil(x0 / tstep - 1e-9)
    while (t := round(k * tstep, 12)) <= x1 + 1e-9:
        x = X(t)
        p.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{mt + ph}" y2="{mt + ph + 4}" '
                 f'stroke="#333"/><text x="{x:.1f}" y="{mt + ph + 16}" font-size="11" '
                 f'text-anchor="middle">{t + 0.0:.3g}</text>')
        k += 1
    p.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{mt + ph}" y2="{mt + ph}" stroke="#333"/>'
             f'<line x1="{ml}" x2="{ml}" y1="{mt}" y2="{mt + ph}" stroke="#333"/>')
    p.append(f'<text x="{ml + pw / 2:.1f}" y="{height - 6}" font-size="12" '
             f'text-anchor="middle">{esc(xlabel)}</text>')
    p.append(f'<text transform="translate(14,{mt + ph / 2:.1f}) rotate(-90)" font-size="12" '
             f'text-anchor="middle">{esc(ylabel)}</text>')
    if ref is not None and x0 <= ref[0] <= x1:
        x = X(ref[0])
        p.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{mt}" y2="{mt + ph}" stroke="#333" '
                 f'stroke-dasharray="1 3"/><text x="{x - 4:.1f}" y="{mt + 24}" font-size="11" '
                 f'text-anchor="end">{esc(ref[1])}</text>')
    if tau is not None and x0 <= tau <= x1:
        x = X(tau)
        p.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{mt - 6}" y2="{mt + ph}" stroke="#000" '
                 f'stroke-width="1.5" stroke-dasharray="6 3"/><text x="{x + 4:.1f}" '
                 f'y="{mt - 9}" font-size="12" font-weight="600">{esc(tau_label)}</text>')
    p.append("</svg></figure>")
    return "".join(p)


def _ramp(share: float) -> tuple[str, str]:
    """Fill (light to dark blue, one hue) and a readable text colour for a share in [0, 1]."""
    a, b = (247, 251, 255), (8, 48, 107)
    s = min(1.0, max(0.0, share)) ** 0.8
    rgb = tuple(round(a[i] + (b[i] - a[i]) * s) for i in range(3))
    return "#{:02x}{:02x}{:02x}".format(*rgb), ("#fff" if s > 0.5 else "#000")


def heatmap_svg(cells: list[dict[str, Any]], title: str, verb: str = "projected") -> str:
    """Share of modules projected (``verb``) per (layer, module kind); each cell prints its
    percentage."""
    if not cells:
        return '<p class="note">No module figures in this run.</p>'
    layers = sorted({c["layer"] if c["layer"] is not None else -1 for c in cells})
    kinds = sorted({c["kind"] for c in cells})
    by = {(c["layer"] if c["layer"] is not None else -1, c["kind"]): c for c in cells}
    ml, mt = 90, 34
    cw = max(14, min(56, 1060 // max(1, len(layers))))
    ch = 24
    width = max(ml + cw * len(layers) + 10, 640)
    height = mt + ch * len(kinds) + 70
    p = [f'<figure><svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
         f'role="img" aria-label="{esc(title)}"><title>{esc(title)}</title>',
         f'<text x="4" y="16" font-size="13" font-weight="600">{esc(title)}</text>']
    for j, kind in enumerate(kinds):
        p.append(f'<text x="{ml - 6}" y="{mt + j * ch + ch / 2 + 4}" font-size="12" '
                 f'text-anchor="end">{esc(kind)}</text>')
        for i, layer in enumerate(layers):
            c = by.get((layer, kind))
            x, y = ml + i * cw, mt + j * ch
            if c is None or not c["modules"]:
                p.append(f'<rect x="{x}" y="{y}" width="{cw - 1}" height="{ch - 1}" '
                         f'fill="#fff" stroke="#ddd"><title>no modules</title></rect>')
                continue
            share = c["projected"] / c["modules"]
            fill, ink = _ramp(share)
            label = "–" if layer < 0 else str(layer)
            p.append(f'<rect x="{x}" y="{y}" width="{cw - 1}" height="{ch - 1}" fill="{fill}" '
                     f'stroke="#999" stroke-width="0.3"><title>layer {label} {esc(kind)}: '
                     f'{c["projected"]:,} of {c["modules"]:,} {verb} ({_pct(share)})'
                     f"</title></rect>")
            if cw >= 22:
                p.append(f'<text x="{x + cw / 2:.1f}" y="{y + ch / 2 + 4:.1f}" font-size="10" '
                         f'text-anchor="middle" fill="{ink}">{round(100 * share)}</text>')
    step = max(1, math.ceil(len(layers) * 24 / max(1, cw * len(layers))))
    for i, layer in enumerate(layers):
        if i % step == 0:
            p.append(f'<text x="{ml + i * cw + cw / 2:.1f}" y="{mt + len(kinds) * ch + 14}" '
                     f'font-size="11" text-anchor="middle">{"–" if layer < 0 else layer}</text>')
    yl = mt + len(kinds) * ch
    p.append(f'<text x="{ml + cw * len(layers) / 2:.1f}" y="{yl + 30}" font-size="12" '
             f'text-anchor="middle">layer (cells: % of modules {verb}; hover for counts)'
             f"</text>")
    for k, s in enumerate((0, 0.25, 0.5, 0.75, 1.0)):
        fill, ink = _ramp(s)
        x = ml + k * 52
        p.append(f'<rect x="{x}" y="{yl + 40}" width="50" height="16" fill="{fill}" '
                 f'stroke="#999"/><text x="{x + 25}" y="{yl + 52}" font-size="10" '
                 f'text-anchor="middle" fill="{ink}">{round(100 * s)} %</text>')
    p.append("</svg></figure>")
    return "".join(p)


# ---------------------------------------------------------------------------------------------
# The report page
# ---------------------------------------------------------------------------------------------


def _tile(label: str, value: str, detail: str = "", bad: bool = False) -> str:
    return (f'<div class="tile{" bad" if bad else ""}">{esc(label)}<b>{esc(value)}</b>'
            f'<span class="note">{esc(detail)}</span></div>')


def _verb(s: dict[str, Any]) -> str:
    """What the selected modules undergo: SaLoRA folds them, Safe LoRA projects them."""
    return "folded" if (s.get("selection") or {}).get("method") == "salora" else "projected"


def _no_threshold(sel: dict[str, Any]) -> bool:
    """Every module is selected (SaLoRA without --threshold / --num-proj-layers)."""
    return sel.get("threshold") is None and sel.get("num_proj_layers") is None


def _selection_text(sel: dict[str, Any]) -> str:
    verb = _verb({"selection": sel})
    if sel.get("mode") == "threshold" or sel.get("threshold") is not None:
        return f"threshold τ = {sel.get('threshold')}"
    if _no_threshold(sel):
        return f"every module {verb} (no threshold)"
    return (f"number: the {sel.get('num_proj_layers')} lowest-cosine modules of each adapter"
            + (" (strict)" if sel.get("strict") else " (ties included)"))


def _state_section(s: dict[str, Any]) -> str:
    f, c, cat = s["fleet"], s["counts"], s["catalog_figures"]
    ch = f.get("changes", {})
    verb = _verb(s)
    tiles = [
        _tile("✓ Sanitized", _n(f["sanitized"]),
              f"{_pct(f['sanitized'] / f['adapters'] if f['adapters'] else None)} of "
              f"{_n(f['adapters'])} adapters"),
        _tile("✗ Failed", _n(f["failed"]), f"{_n(f['failed_older_output'])} older output kept, "
              f"{_n(f['never_sanitized'])} never sanitized", bad=f["failed"] > 0),
        _tile("– Not listed in this run", _n(f["not_listed"]), "state as last seen"),
        _tile(f"Modules {verb}", _pct(f["projected_share"]),
              f"{_n(f['projected'])} of {_n(f['modules'])}"),
        _tile(f"Near τ (±{NEAR_WIDTH:g})", _n(f["near_tau"]),
              "modules a small change of τ would flip"),
        _tile("Pdst median", _f(f["pdst_median"], 3), f"lowest {_f(f['pdst_min'], 3)}"),
    ]
    if _no_threshold(s["selection"]):  # no τ: nothing is near it
        del tiles[4]
    change_txt = ", ".join(f"{CHANGE_TEXT.get(k, k)} {_n(ch[k])}" for k in
                           ("new", "re-sanitized", "fixed", "newly failing", "new, failing",
                            "still failing", "unchanged", "not listed") if ch.get(k))
    unknown = ""
    if f.get("figures_unknown"):
        unknown = (f'<p class="note">{_n(f["figures_unknown"])} sanitized adapter(s) have no '
                   "module figures: their ledger records predate them; a run that re-sanitizes "
                   "them (--force, or a changed source) fills them in.</p>")
    return f"""<section id="state"><h2>Fleet state</h2>
<p>Every adapter written under this output, as of this run: those this run skipped keep the
figures of the run that sanitized them, those it did not list keep their last state.</p>
<div class="tiles">{"".join(tiles)}</div>
<p><b>This run</b> listed {_n(c['total'])} adapters: {RUN_TEXT['ok']} {_n(c['ok'])} sanitized
now, {RUN_TEXT['skipped']} {_n(c['skipped'])} (unchanged since the run that sanitized them),
{RUN_TEXT['error']} {_n(c['error'])}. Of its sanitized adapters ({_n(cat['adapters'])} with
module figures), {_n(cat['projected'])} of {_n(cat['modules'])} modules are {verb}
({_pct(cat['projected_share'])}).</p>
<p><b>Changes:</b> {esc(change_txt) or "none"}.</p>{unknown}</section>"""


def _previous_section(s: dict[str, Any], page: dict[str, Any], up: str) -> str:
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
        fmt = _pct if share else _n
        rows.append(f"<tr><th>{esc(label)}</th><td class='n'>{fmt(a)}</td>"
                    f"<td class='n'>{fmt(b)}</td><td class='n'>{_signed(d, pp=share)}</td></tr>")

    row("adapters listed", pc_.get("total"), c["total"])
    row("✓ ok (sanitized in the run)", pc_.get("ok"), c["ok"])
    row("○ skipped", pc_.get("skipped"), c["skipped"])
    row("✗ failed", pc_.get("error"), c["error"])
    row("fleet: adapters", pf.get("adapters"), f["adapters"])
    row("fleet: ✓ sanitized", pf.get("sanitized"), f["sanitized"])
    row("fleet: ✗ failed", pf.get("failed"), f["failed"])
    row(f"fleet: share of modules {_verb(s)}", pf.get("projected_share"),
        f["projected_share"], share=True)
    row(f"catalog: share of modules {_verb(s)}", pcat.get("projected_share"),
        cat["projected_share"], share=True)
    row(f"fleet: modules within ±{NEAR_WIDTH:g} of τ", pf.get("near_tau"), f["near_tau"])
    rows.append(f"<tr><th>fleet: Pdst median</th><td class='n'>{_f(pf.get('pdst_median'))}</td>"
                f"<td class='n'>{_f(f['pdst_median'])}</td><td class='n'>"
                f"{_signed(_diff(pf.get('pdst_median'), f['pdst_median']))}</td></tr>")
    notes = []
    if prev.get("selection") != s["selection"]:
        notes.append(f"The selection changed: {_selection_text(prev.get('selection') or {})} "
                     f"then, {_selection_text(s['selection'])} now (every adapter is redone).")
    if prev.get("alignment_id") != s["alignment"]["content_id"]:
        notes.append(f"The alignment set's content changed: {prev.get('alignment_id')} then, "
                     f"{s['alignment']['content_id']} now.")
    nf = s["fleet"]["changes"]
    failing = page["newly_failing"]
    fixed = page["newly_fixed"]
    n_failing = nf.get("newly failing", 0) + nf.get("new, failing", 0)
    n_fixed = nf.get("fixed", 0)

    def more(shown: int, total: int) -> str:
        return (f'<p class="note">… and {_n(total - shown)} more: fleet.parquet, column '
                f"<code>change</code>.</p>" if total > shown else "")

    fail_rows = "".join(
        f"<tr><td class='id'>{esc(r['adapter_id'])}</td><td>{esc(CHANGE_TEXT[r['change']])}</td>"
        f"<td>{esc(CAUSES[r['cause']].label if r['cause'] in CAUSES else r['cause'] or '')}</td>"
        f"<td>{_adapter_links(r['adapter_id'], up, r['state'] == 'failed')}</td></tr>"
        for r in failing)
    fix_rows = "".join(
        f"<tr><td class='id'>{esc(r['adapter_id'])}</td><td>was "
        f"{esc(STATE_TEXT.get(r['prev_state'], r['prev_state'] or ''))}</td>"
        f"<td>{_adapter_links(r['adapter_id'], up, True)}</td></tr>" for r in fixed)
    def table(head: str, body: str) -> str:
        return (f'<div class="wrap"><table class="sortable" data-page="10"><thead><tr>{head}'
                f"</tr></thead><tbody>{body}</tbody></table></div>")

    fail_table = table("<th>adapter</th><th>change</th><th>cause</th><th>links</th>",
                       fail_rows) if failing else "<p>None.</p>"
    fix_table = table("<th>adapter</th><th>before</th><th>links</th>",
                      fix_rows) if fixed else "<p>None.</p>"
    link = f'<a href="{_href("../" + prev["report"])}">{esc(prev["run_id"])}</a>'
    return f"""<section id="previous"><h2>Against the previous run</h2>
<p>Previous run against this alignment set: {link}
(finished {esc(str(prev.get('finished_at')))}; catalog {esc(str(prev.get('catalog')))}).</p>
{"".join(f'<p><b>{esc(n)}</b></p>' for n in notes)}
<div class="wrap"><table><thead><tr><th></th><th class="n">previous</th><th class="n">this run</th>
<th class="n">change</th></tr></thead><tbody>{"".join(rows)}</tbody></table></div>
<h3>▼ Newly failing ({_n(n_failing)})</h3>
{fail_table}
{more(len(failing), n_failing)}
<h3>▲ Newly fixed ({_n(n_fixed)})</h3>
{fix_table}
{more(len(fixed), n_fixed)}</section>"""


def _failures_section(s: dict[str, Any], page: dict[str, Any], up: str) -> str:
    groups = s["failure_groups"]
    total = s["counts"]["error"]
    if not groups:
        return ('<section id="failures"><h2>Failures (0)</h2><p>✓ No adapter failed in this '
                "run.</p></section>")
    head = "".join(
        f"<tr><td><a href='#cause-{esc(g['cause'])}'>{esc(g['label'])}</a></td>"
        f"{_num(g['count'])}{_num(g['new'])}<td>{esc(g['action'])}</td></tr>" for g in groups)
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
            f"{_adapter_links(r['adapter_id'], up, r['state'] in ('ok', 'failed'))}</td>"
            f"<td class='msg'>{esc(short_message(r['adapter_id'], r['error']))}</td></tr>"
            for r in rows)
        cut = (f'<p class="note">{_n(len(rows))} of {_n(g["count"])} listed here; all are in '
               f'<a href="adapters.parquet">adapters.parquet</a> (status = error, cause = '
               f"{esc(g['cause'])}).</p>" if len(rows) < g["count"] else "")
        parts.append(
            f"<details id='cause-{esc(g['cause'])}' {'open' if total <= 20 else ''}><summary>"
            f"{esc(g['label'])}: {_n(g['count'])} adapter(s), {_n(g['new'])} new since the "
            f"previous run</summary><div class='wrap'><table class='sortable' data-page='50'>"
            f"<thead><tr><th>adapter</th><th>tenant</th><th>new?</th><th>output</th>"
            f"<th>message</th></tr></thead><tbody>{body}</tbody></table></div>{cut}</details>")
    return f"""<section id="failures"><h2>Failures by cause ({_n(total)})</h2>
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
        f"{_num(n)}{_num(p, ('✓ ' if p == n else '') + _n(p))}</tr>"
        for kind, (layers, n, p) in sorted(kinds.items()))
    title = "Share of modules folded, by layer and module kind (this catalog)"
    table = (f"<div class='wrap'><table><thead><tr><th>module kind</th><th>layers</th>"
             f"<th class='n'>modules</th><th class='n'>folded</th></tr></thead><tbody>{rows}"
             f"</tbody></table></div>" if rows else
             "<p>No module figures: nothing was sanitized in this catalog yet.</p>")
    return (f'<section id="folded"><h2>Folded modules</h2><p>Every module of every sanitized '
            f"adapter is folded with safety set <b>{esc(al['content_id'])}</b> "
            f"({esc(al['uri'])}): B ← (I − V_s V_sᵀ)·B, no threshold. {_n(cat['projected'])} "
            f"of {_n(cat['modules'])} modules of {_n(cat['adapters'])} adapter(s) folded.</p>"
            f"{table}{heatmap_svg(s['layer_kind'], title, 'folded')}</section>")


def _layers_text(layers: set[int | None]) -> str:
    known = sorted(x for x in layers if x is not None)
    return (f"{known[0]}..{known[-1]}" if len(known) > 1 else str(known[0])) if known else "–"


def _threshold_section(s: dict[str, Any]) -> str:
    if _no_threshold(s["selection"]):
        return _folded_section(s)
    nt = s["near_threshold"]
    hist = s["histograms"]
    tau = nt["tau"]
    cat = s["catalog_figures"]
    fine = hist["cos_fine"]["counts"]
    lo, hi = hist["cos_fine_range"]
    verb = _verb(s)
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
        f"<p><b>{_n(nt['within'])}</b> of {_n(cat['modules'])} modules lie within ±{w:g} {rel}: "
        f"<b>{_n(nt['at_or_below'])}</b> at or below τ ({verb}; a τ lower by up to {w:g} "
        f"would keep them) and <b>{_n(nt['above'])}</b> above it (kept; a τ higher by up to "
        f"{w:g} would project them).</p>")
    parts.append(hist_svg(
        nt["zoom"]["counts"], zoom_x0, nt["zoom"]["step"],
        title=f"Modules near τ (bins of {nt['zoom']['step']:g}; {_n(nt['zoom']['below_range'])} "
              f"below and {_n(nt['zoom']['above_range'])} above this range)",
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
        title=f"Every module of this catalog's sanitized adapters ({_n(cat['modules'])}), "
              "bins of 0.01",
        xlabel="rounded cosine cos(ΔW, CΔW)", ylabel="modules",
        tau=tau, tau_label=f"τ = {tau:g}" if tau is not None else "",
        hatch_upto=tau, verb=verb))
    parts.append(f'<p class="note">Hatched bars: {verb} (cosine ≤ τ); solid: kept as '
                 "trained. Bins are right-closed, like the rule's ≤.</p>")
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


def _near_column(s: dict[str, Any]) -> tuple[str, Any]:
    """The "near τ" column's head and cell (none when there is no τ)."""
    if _no_threshold(s["selection"]):
        return "", lambda r: ""
    return '<th class="n">near τ</th>', lambda r: _num(r["near_tau"])


def _tenants_section(s: dict[str, Any], page: dict[str, Any]) -> str:
    rows = page["tenants"]
    near_th, near = _near_column(s)
    body = "".join(
        f"<tr><td class='id'>{esc(t['tenant'])}</td>{_num(t['adapters'])}{_num(t['run_ok'])}"
        f"{_num(t['run_skipped'])}{_num(t['run_error'])}{_num(t['not_listed'])}"
        f"{_num(t['failed'], ('✗ ' if t['failed'] else '') + _n(t['failed']))}"
        f"{_num(t['newly_failing'])}{_num(t['modules'])}{_num(t['projected'])}"
        f"{_num(t['share'], _pct(t['share']))}"
        f"{_num(d := _diff(t['prev_share'], t['share']), _signed(d, pp=True))}"
        f"{near(t)}{_num(t['min_pdst'], _f(t['min_pdst'], 3))}</tr>" for t in rows)
    cut = (f'<p class="note">The {_n(len(rows))} tenants with the most failures, then the most '
           f'adapters, of {_n(s["tenants_total"])}; all are in '
           f'<a href="tenants.parquet">tenants.parquet</a>.</p>'
           if s["tenants_total"] > len(rows) else "")
    depth = s["tenant_depth"]
    return f"""<section id="tenants"><h2>Tenants ({_n(s['tenants_total'])})</h2>
<p>A tenant is the first {"path component" if depth == 1 else f"{depth} path components"} of
the adapter id (--tenant-depth). Click a column to sort. The first columns are this run's
statuses; "failing now" counts the tenant's adapters whose latest attempt failed (listed in this
run or not); module figures count its sanitized adapters; Δ share is against the previous fleet
state.</p>
<div class="wrap"><table class="sortable" data-page="50"><thead><tr><th>tenant</th>
<th class="n">adapters</th><th class="n">✓ ok</th><th class="n">○ skipped</th>
<th class="n">✗ failed</th><th class="n">– not listed</th><th class="n">failing now</th>
<th class="n">▼ newly failing</th><th class="n">modules</th>
<th class="n">{_verb(s)}</th><th class="n">share</th><th class="n">Δ share</th>
{near_th}<th class="n">lowest Pdst</th></tr></thead><tbody>{body}</tbody>
</table></div>{cut}</section>"""


def _adapter_table(rows: list[dict[str, Any]], up: str, caption: str,
                   verb: str = "projected") -> str:
    body = "".join(
        f"<tr><td class='id'>{esc(r['adapter_id'])}</td>{_num(r['projected'])}"
        f"{_num(r['modules'])}"
        f"{_num(_share(r['projected'], r['modules']), _pct(_share(r['projected'], r['modules'])))}"
        f"{_num(r['pdst'], _f(r['pdst']))}<td>{_adapter_links(r['adapter_id'], up, True)}</td></tr>"
        for r in rows)
    return (f"<h3>{esc(caption)}</h3><div class='wrap'><table class='sortable'><thead><tr>"
            f"<th>adapter</th><th class='n'>{verb}</th><th class='n'>modules</th>"
            f"<th class='n'>share</th><th class='n'>Pdst</th><th>links</th></tr></thead>"
            f"<tbody>{body}</tbody></table></div>")


def _adapters_section(s: dict[str, Any], page: dict[str, Any], up: str) -> str:
    verb = _verb(s)
    near_th, near = _near_column(s)
    parts = [
        _adapter_table(s["lowest_pdst"], up, f"Lowest Pdst (largest distance left un{verb})",
                       verb),
        _adapter_table(s["most_projected"], up, f"Largest share of modules {verb} (ties: "
                                               "more modules, then lower Pdst)", verb),
    ]
    rows = page["adapters"]
    if rows is not None:
        body = "".join(
            f"<tr><td class='id'>{esc(r['adapter_id'])}</td><td>{esc(r['tenant'])}</td>"
            f"<td>{esc(STATE_TEXT.get(r['state'], r['state']))}</td>"
            f"<td>{esc(RUN_TEXT.get(r['run_status'], r['run_status']))}</td>"
            f"<td>{esc(CHANGE_TEXT.get(r['change'], r['change']))}</td>{_num(r['modules'])}"
            f"{_num(r['projected'])}{_num(r['pdst'], _f(r['pdst']))}{near(r)}"
            f"<td>{_adapter_links(r['adapter_id'], up, r['state'] in ('ok', 'failed'))}</td></tr>"
            for r in rows)
        parts.append(
            f"<h3>All adapters ({_n(len(rows))})</h3><div class='wrap'><table class='sortable' "
            f"data-page='50'><thead><tr><th>adapter</th><th>tenant</th><th>state</th>"
            f"<th>this run</th><th>change</th><th class='n'>modules</th><th class='n'>{verb}"
            f"</th><th class='n'>Pdst</th>{near_th}<th>links</th></tr></thead>"
            f"<tbody>{body}</tbody></table></div>")
    else:
        parts.append(f'<p class="note">Every adapter ({_n(s["fleet"]["adapters"])}) is in '
                     '<a href="fleet.parquet">fleet.parquet</a> (its state, this run\'s change, '
                     'figures) and <a href="adapters.parquet">adapters.parquet</a> (this run\'s '
                     "rows); each output is at <code>&lt;out&gt;/&lt;adapter id&gt;/</code>, its "
                     "ledger record at <code>&lt;out&gt;/_ledger/&lt;adapter id&gt;.json</code>."
                     "</p>")
    return f'<section id="adapters"><h2>Adapters to look at</h2>{"".join(parts)}</section>'


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
    li = "".join(f'<li><a href="{_href(p)}">{esc(p)}</a>: {esc(d)}</li>' for p, d in items)
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
    fold = _verb(s) == "folded"
    near = ("folded", "Folded modules") if _no_threshold(s["selection"]) else ("threshold",
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
in {s['duration_s']:,} s ({_n(s['adapters_per_s'])} adapters/s) ·
safelora-ray {esc(s['tool_version'])}</p>
<p class="meta">Output {esc(s['out'])} · {used} · selection: {esc(_selection_text(s['selection']))}
· {_n(f['adapters'])} adapters in the fleet</p>
{_state_section(s)}
{_previous_section(s, page, up)}
{_failures_section(s, page, up)}
{_threshold_section(s)}
{_tenants_section(s, page)}
{_adapters_section(s, page, up)}
{FOLD_MEANING if fold else ""}{meaning}
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
            f"<tr><td class='id'><a href='{_href(r['report'])}'>{esc(r['run_id'])}</a></td>"
            f"<td>{esc(mark)}</td><td>{esc(str(r.get('finished_at') or ''))}</td>"
            f"<td class='msg'>{esc(str(r.get('catalog') or ''))}</td>"
            f"<td class='msg'>{esc(str(r.get('alignment_uri') or ''))}</td>"
            f"{_num(c.get('total'))}{_num(c.get('ok'))}{_num(c.get('skipped'))}"
            f"{_num(c.get('error'), ('✗ ' if c.get('error') else '') + _n(c.get('error')))}"
            f"{_num(fl.get('sanitized'))}{_num(fl.get('failed'))}"
            f"{_num(fl.get('projected_share'), _pct(fl.get('projected_share')))}</tr>")
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
    target = _href(f"{run_id}/report.html")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="0; url={target}">
<title>latest safelora-ray report</title></head><body>
<p>The latest report is <a href="{target}">{esc(run_id)}</a>; <a href="index.html">all runs</a>.</p>
</body></html>
"""


__all__ = ["heatmap_svg", "hist_svg", "render_index", "render_latest", "render_report"]
