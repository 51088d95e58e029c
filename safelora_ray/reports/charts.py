"""The SVG charts of the report pages: a histogram (with τ, a band, hatched selected bars) and
a heatmap of a share per (layer, module kind).

No meaning is carried by colour alone: selected bars are hatched (the page embeds
:data:`DEFS`, which holds the patterns), the heatmap prints its numbers and uses one hue's
lightness.
"""

from __future__ import annotations

import math
from typing import Any

from safelora_ray.reports.page import esc, fmt_pct

PROJ = "#D55E00"  # Okabe-Ito vermillion (projected), hatched
KEPT = "#0072B2"  # Okabe-Ito blue (kept)

DEFS = (f'<svg width="0" height="0" style="position:absolute" aria-hidden="true"><defs>'
        f'<pattern id="hatch" patternUnits="userSpaceOnUse" width="6" height="6" '
        f'patternTransform="rotate(45)"><rect width="6" height="6" fill="{PROJ}"/>'
        f'<line x1="0" y1="0" x2="0" y2="6" stroke="#fff" stroke-width="2.2"/></pattern>'
        f'<pattern id="band" patternUnits="userSpaceOnUse" width="8" height="8" '
        f'patternTransform="rotate(-45)"><rect width="8" height="8" fill="#f1f1f1"/>'
        f'<line x1="0" y1="0" x2="0" y2="8" stroke="#d0d0d0" stroke-width="2"/></pattern>'
        f"</defs></svg>")


def _nice_step(span: float, target: int = 8) -> float:
    raw = span / max(1, target)
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def hist_svg(counts: list[int], x0: float, step: float, *, title: str, xlabel: str,
             ylabel: str, tau: float | None = None, tau_label: str = "",
             band: tuple[float, float, str] | None = None, hatch_upto: float | None = None,
             ref: tuple[float, str] | None = None, width: int = 900, height: int = 230,
             verb: str = "projected", closed: str = "right") -> str:
    """A histogram with axes, axis titles, y ticks and gridlines.

    Args:
        counts: Bin counts; bin ``i`` covers ``(x0 + i*step, x0 + (i+1)*step]``
            (``[x0 + i*step, x0 + (i+1)*step)`` with ``closed="left"``: what the hover text
            says).
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
    opening, closing = ("[", ")") if closed == "left" else ("(", "]")
    for i, c in enumerate(counts):
        if not c:
            continue
        lo, hi = x0 + i * step, x0 + (i + 1) * step
        proj = hatch_upto is not None and hi <= hatch_upto + 1e-12
        fill = "url(#hatch)" if proj else KEPT
        h = c / top * ph
        p.append(f'<rect x="{X(lo) + 0.5:.1f}" y="{Y(c):.1f}" width="{max(bw - 1, 1):.1f}" '
                 f'height="{h:.1f}" fill="{fill}" stroke="{PROJ if proj else KEPT}" '
                 f'stroke-width="0.5"><title>{opening}{lo:.3f}, {hi:.3f}{closing}: {c:,}'
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
                     f'{c["projected"]:,} of {c["modules"]:,} {verb} ({fmt_pct(share)})'
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


__all__ = ["DEFS", "KEPT", "PROJ", "heatmap_svg", "hist_svg"]
