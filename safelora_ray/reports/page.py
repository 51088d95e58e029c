"""What the report pages share: the CSS, the script that sorts and pages tables, escaping,
number formatting and links.

Everything is inline: a page works offline and from a file.
"""

from __future__ import annotations

import html
import math
from typing import Any
from urllib.parse import quote

esc = html.escape

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


def fmt_n(x: Any) -> str:
    return "–" if x is None else f"{x:,}" if isinstance(x, int) else f"{x:,.4g}"


def fmt_pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f} %"


def fmt_f(x: float | None, digits: int = 4) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else \
        f"{x:.{digits}f}"


def num_cell(x: Any, text: str | None = None) -> str:
    """A numeric cell (sortable by value)."""
    v = "" if x is None else f"{x}"
    return f'<td class="n" data-v="{v}">{esc(text if text is not None else fmt_n(x))}</td>'


def delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


def share_of(part: int | None, whole: int | None) -> float | None:
    return part / whole if part is not None and whole else None


def fmt_signed(x: float | None, pp: bool = False) -> str:
    if x is None:
        return "–"
    if pp:
        return "±0 pp" if abs(x) < 5e-5 else f"{100 * x:+.2f} pp"
    if isinstance(x, int):
        return "±0" if x == 0 else f"{x:+,}"
    return "±0" if abs(x) < 5e-5 else f"{x:+.4f}"


def href(path: str) -> str:
    return quote(path, safe="/._-~+=@")


__all__ = ["CSS", "JS", "delta", "esc", "fmt_f", "fmt_n", "fmt_pct", "fmt_signed", "href",
           "num_cell", "share_of"]
