"""The SPEC §2 selection as one typed value, from the command line to the math and reports.

A :class:`Selection` is made (and checked) once, where a run's config is made; the same frozen
value travels to the workers, picks each adapter's modules, and is written to ledgers and
reports by :meth:`Selection.record` (the on-disk form those files have always had).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from safelora_ray.core.validate import check_selection

logger = logging.getLogger(__name__)

#: The method whose selection records carry no ``method`` key (ledgers made before SaLoRA).
DEFAULT_METHOD = "safelora"


@dataclass(frozen=True)
class Selection:
    """Which modules to project: by τ, by k, or every one (SaLoRA's fold, neither given).

    Attributes:
        threshold: τ: every module whose rounded cosine is ≤ τ.
        num_proj_layers: k: the k modules with the smallest cosines (ties included).
        strict_k: With k: exactly k modules, ties broken by module name.
        method: ``safelora``, ``salora`` or ``safemerge``; SaLoRA may give neither τ nor k
            (every module); SafeMERGE selects by cos < τ, strictly (SPEC §5).

    Raises:
        ConfigError: at construction, naming the flag (see
            :func:`~safelora_ray.core.validate.check_selection`).
    """

    threshold: float | None = None
    num_proj_layers: int | None = None
    strict_k: bool = False
    method: str = DEFAULT_METHOD

    def __post_init__(self) -> None:
        # SaLoRA folds every module when no selection is given (τ = 1).
        check_selection(self.threshold, self.num_proj_layers, self.strict_k,
                        allow_none=self.method == "salora")

    @property
    def mode(self) -> Literal["threshold", "number", "all"]:
        if self.threshold is not None:
            return "threshold"
        return "all" if self.num_proj_layers is None else "number"

    def record(self) -> dict[str, Any]:
        """The selection as ledgers, provenance and reports record it (``mode`` first)."""
        if self.threshold is not None:
            rec: dict[str, Any] = {"mode": "threshold", "threshold": self.threshold}
        elif self.num_proj_layers is None:
            rec = {"mode": "all"}
        else:
            rec = {"mode": "number", "num_proj_layers": self.num_proj_layers,
                   "strict": self.strict_k}
        if self.method != DEFAULT_METHOD:  # (Safe LoRA ledgers keep their key)
            rec["method"] = self.method
        return rec

    def pick(self, cos_rounded: Mapping[str, float]) -> set[str]:
        """The modules to project (SafeMERGE: merge), given each one's rounded cosine (SPEC §2,
        §5); ``all``: every module, a zero update's (NaN) too."""
        if self.mode == "all":
            return set(cos_rounded)
        # Imported here: the math needs torch, a config or a report reading this does not.
        from safelora_ray.core.scores import select_modules

        return select_modules(cos_rounded, threshold=self.threshold,
                              num_proj_layers=self.num_proj_layers, strict=self.strict_k,
                              below=self.method == "safemerge")


__all__ = ["Selection"]
