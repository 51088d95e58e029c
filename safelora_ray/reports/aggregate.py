"""Module-level aggregates of a run, in fixed memory: cosine histograms, the count near τ, and
the share projected per (layer, module kind).

Cosines are compared with τ after rounding to 5 decimals (SPEC §2), so they are counted here as
exact integers in units of 1e-5: bin edges and the ±0.05 band then fall exactly where the rule
puts them, with no float ties. Bins are right-closed, ``(lo, hi]``, like the rule's ``≤ τ``:
with τ on a bin edge, every module in a bin left of τ is projected and none right of it is.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

#: Cosines in integer units (5 decimals, SPEC §2).
UNIT = 100_000
#: The fine histogram: right-closed bins 0.001 wide, bin ``i`` = ``((i-1001)/1000, (i-1000)/1000]``.
FINE_STEP = 100
FINE_BINS = 2001
FINE_OFFSET = 1001
#: The zoom around τ: ±0.1 in bins of 0.005, relative to each adapter's τ.
ZOOM_HALF = 10_000
ZOOM_STEP = 500
ZOOM_BINS = 2 * ZOOM_HALF // ZOOM_STEP
#: "Near τ": within ±0.05 (a change of τ by this much flips these modules).
NEAR = 5_000
NEAR_WIDTH = NEAR / UNIT


def cos_units(c: float | None) -> int | None:
    """A rounded cosine as an integer number of 1e-5 (None when missing or not finite)."""
    if c is None or not math.isfinite(c):
        return None
    return round(c * UNIT)


def tau_units(tau: float) -> int:
    """τ in units: the largest integer ``u`` with ``u/1e5 ≤ τ`` (``cos ≤ τ`` ⇔ ``units ≤ this``)."""
    return math.floor(tau * UNIT + 1e-6)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class AdapterFigures:
    """One adapter's module figures.

    Attributes:
        modules: Modules scored.
        projected: Modules projected.
        tau: The τ its selection used (the threshold, or its k-th smallest cosine).
        near: Modules within ±0.05 of ``tau``.
        near_below: Of those, the projected (at or below τ; a lower τ would keep them).
        near_above: Of those, the kept (above τ, or at it where the selection is strict).
        min_cos: Its smallest rounded cosine.
    """

    modules: int
    projected: int
    tau: float | None
    near: int
    near_below: int
    near_above: int
    min_cos: float | None


class ModuleStats:
    """Streaming aggregates over modules (memory independent of the number of adapters).

    Args:
        selection: The run's selection (``mode`` ``threshold`` with ``threshold``, or
            ``number`` with ``num_proj_layers``).
    """

    def __init__(self, selection: dict[str, Any]):
        self.threshold: float | None = selection.get("threshold")
        self.k: int | None = selection.get("num_proj_layers")
        self.fine = [0] * FINE_BINS
        self.zoom = [0] * ZOOM_BINS
        self.zoom_outside = [0, 0]  # below τ-0.1, above τ+0.1
        self.cells: dict[tuple[int, str], list[int]] = {}  # (layer, kind) -> [modules, projected]
        self.adapters = 0
        self.modules = 0
        self.projected = 0
        self.unscored = 0  # cosine not finite (a zero update)
        self.near = 0
        self.near_below = 0
        self.near_above = 0

    def _tau(self, units: list[int]) -> int | None:
        if self.threshold is not None:
            return tau_units(self.threshold)
        if not units or self.k is None:
            return None
        return sorted(units)[min(self.k, len(units)) - 1]

    def add_adapter(self, modules: Iterable[tuple[int | None, str, float | None, bool]]
                    ) -> AdapterFigures:
        """Count one adapter's modules: ``(layer, kind, rounded cosine, projected)`` each."""
        mods = list(modules)
        units = [cos_units(c) for _, _, c, _ in mods]
        finite = [u for u in units if u is not None]
        tau = self._tau(finite)
        near = below = above = projected = 0
        for (layer, kind, _, proj), u in zip(mods, units, strict=True):
            cell = self.cells.get((layer if layer is not None else -1, kind))
            if cell is None:
                cell = self.cells[(layer if layer is not None else -1, kind)] = [0, 0]
            cell[0] += 1
            cell[1] += bool(proj)
            projected += bool(proj)
            if u is None:
                self.unscored += 1
                continue
            self.fine[min(FINE_BINS - 1, max(0, _ceil_div(u, FINE_STEP) - 1 + FINE_OFFSET))] += 1
            if tau is None:
                continue
            d = u - tau
            if d <= -ZOOM_HALF:
                self.zoom_outside[0] += 1
            elif d > ZOOM_HALF:
                self.zoom_outside[1] += 1
            else:
                self.zoom[_ceil_div(d + ZOOM_HALF, ZOOM_STEP) - 1] += 1
            # Counted by what the selection did (not d <= 0): SafeMERGE's τ is strict, and a
            # strict k breaks ties, so a module at τ itself may have been kept.
            if -NEAR <= d <= NEAR:
                if proj:
                    below += 1
                else:
                    above += 1
        near = below + above
        self.adapters += 1
        self.modules += len(mods)
        self.projected += projected
        self.near += near
        self.near_below += below
        self.near_above += above
        return AdapterFigures(
            modules=len(mods), projected=projected,
            tau=None if tau is None else tau / UNIT, near=near, near_below=below,
            near_above=above, min_cos=min(finite) / UNIT if finite else None)

    # -- views ---------------------------------------------------------------------------------
    def fine_range(self) -> tuple[int, int]:
        """First and last non-empty fine bins (0, -1 when empty)."""
        nz = [i for i, n in enumerate(self.fine) if n]
        return (nz[0], nz[-1]) if nz else (0, -1)

    def coarse(self, step: int, lo: int, hi: int) -> list[int]:
        """Counts in bins of ``step`` fine bins from fine bin ``lo`` to ``hi`` (inclusive)."""
        return [sum(self.fine[i:min(i + step, hi + 1)]) for i in range(lo, hi + 1, step)]

    def legacy_cos_hist(self) -> list[int]:
        """20 bins of 0.1 over [-1, 1] (``summary.json``'s ``histograms.cos`` since 0.1)."""
        out = [0] * 20
        for i, n in enumerate(self.fine):
            if n:  # by the fine bin's middle
                out[min(19, max(0, math.floor(((i - 1000.5) / 1000 + 1) * 10)))] += n
        return out

    def layer_kind(self) -> list[dict[str, Any]]:
        """``[{layer, kind, modules, projected}]`` sorted by layer then kind."""
        return [{"layer": None if layer < 0 else layer, "kind": kind, "modules": n,
                 "projected": p}
                for (layer, kind), (n, p) in sorted(self.cells.items())]

    def near_threshold(self) -> dict[str, Any]:
        """The ±0.05 counts and the zoom histogram, as ``summary.json`` carries them."""
        return {
            "mode": "threshold" if self.threshold is not None else (
                "number" if self.k is not None else "all"),
            "tau": self.threshold,
            "width": NEAR_WIDTH,
            "within": self.near, "at_or_below": self.near_below, "above": self.near_above,
            "zoom": {"step": ZOOM_STEP / UNIT, "half_width": ZOOM_HALF / UNIT,
                     "counts": list(self.zoom), "below_range": self.zoom_outside[0],
                     "above_range": self.zoom_outside[1]},
        }


__all__ = ["NEAR_WIDTH", "UNIT", "AdapterFigures", "ModuleStats", "cos_units", "tau_units"]
