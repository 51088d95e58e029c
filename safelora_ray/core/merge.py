"""SafeMERGE's merge of a task adapter's module with a safety adapter's (SPEC §5): the factors
of the output module, given which modules the cosine test selected. Pure tensor math, no I/O.

Both combinations write the output with scaling 1 (its ``lora_alpha`` equals its rank, no
rsLoRA), so the module's update is ΔW' = B' A':

- ``linear`` (the official code, PEFT's "linear" combination; equal ranks):
  A' = √(w_f s_f) A_f + √(w_s s_s) A_s, B' = √(w_f s_f) B_f + √(w_s s_s) B_s on a merged
  module (the cross terms B_f A_s, B_s A_f belong to this combination), A' = √s_f A_f,
  B' = √s_f B_f elsewhere;
- ``cat`` (the exact weighted sum, any ranks): A' = [√(w_f s_f) A_f ; √(w_s s_s) A_s] and
  B' = [√(w_f s_f) B_f, √(w_s s_s) B_s] (rank r_f + r_s), so that
  ΔW' = w_f s_f B_f A_f + w_s s_s B_s A_s; unmerged modules as in ``linear``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from safelora_ray.core.errors import ConfigError

logger = logging.getLogger(__name__)

COMBINATIONS = ("linear", "cat")
#: (w_f, w_s) of the paper's runs and the official code's default.
DEFAULT_WEIGHTS = (0.8, 0.2)


def lora_scaling(alpha: float, rank: int, rslora: bool = False) -> float:
    """PEFT's scaling of a module: ``alpha / r``, or ``alpha / √r`` with rsLoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def parse_weights(value: Any) -> tuple[float, float]:
    """``--weights w_f,w_s``: two positive, finite numbers (a string ``"0.8,0.2"`` or a pair).

    Raises:
        ConfigError: anything else, in one line.
    """
    parts: list[Any]
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        raise ConfigError(f"--weights must be two positive numbers w_f,w_s (e.g. 0.8,0.2), "
                          f"got {value!r}")
    try:
        nums = [float(p) for p in parts if not isinstance(p, bool)]
    except (TypeError, ValueError):
        nums = []
    if len(parts) != 2 or len(nums) != 2 or not all(math.isfinite(x) and x > 0 for x in nums):
        shown = value if isinstance(value, str) else ",".join(map(str, parts))
        raise ConfigError(f"--weights must be two positive numbers w_f,w_s (the task adapter's "
                          f"and the safety adapter's, e.g. 0.8,0.2), got {shown!r}")
    return nums[0], nums[1]


@dataclass(frozen=True)
class MergeRule:
    """How merged modules are combined (SPEC §5).

    Attributes:
        weights: (w_f, w_s): the task adapter's and the safety adapter's weights.
        combination: ``linear`` or ``cat``.
    """

    weights: tuple[float, float] = DEFAULT_WEIGHTS
    combination: str = "linear"

    def __post_init__(self) -> None:
        if self.combination not in COMBINATIONS:
            raise ConfigError(f"--combination must be one of {', '.join(COMBINATIONS)}, got "
                              f"{self.combination!r}")
        object.__setattr__(self, "weights", parse_weights(self.weights))

    def record(self) -> dict[str, Any]:
        """The rule as ledgers and reports record it."""
        return {"weights": list(self.weights), "combination": self.combination}


def merge_module(a_f: torch.Tensor, b_f: torch.Tensor, s_f: float,
                 a_s: torch.Tensor, b_s: torch.Tensor, s_s: float,
                 merged: bool, rule: MergeRule) -> tuple[torch.Tensor, torch.Tensor]:
    """The output factors (A', B') of one module, in float64, for scaling 1: ΔW' = B' A'.

    Args:
        a_f: The task adapter's A (r_f x d_in); ``b_f`` its B (d_out x r_f); ``s_f`` its scaling.
        a_s: The safety adapter's A (r_s x d_in); ``b_s`` its B; ``s_s`` its scaling.
        merged: The cosine test selected this module.
        rule: Weights and combination.

    Raises:
        ValueError: shapes that do not fit (the caller checks them first, with a message).
    """
    af, bf = a_f.to(torch.float64), b_f.to(torch.float64)
    c_f = math.sqrt(s_f) if not merged else math.sqrt(rule.weights[0] * s_f)
    if not merged:
        return c_f * af, c_f * bf
    as_, bs = a_s.to(torch.float64), b_s.to(torch.float64)
    if as_.shape[1] != af.shape[1] or bs.shape[0] != bf.shape[0]:
        raise ValueError(f"ΔW shapes differ: {bf.shape[0]}x{af.shape[1]} and "
                         f"{bs.shape[0]}x{as_.shape[1]}")
    c_s = math.sqrt(rule.weights[1] * s_s)
    if rule.combination == "linear":
        if as_.shape != af.shape or bs.shape != bf.shape:
            raise ValueError(f"linear needs equal ranks, got {af.shape[0]} and {as_.shape[0]}")
        return c_f * af + c_s * as_, c_f * bf + c_s * bs
    return torch.cat([c_f * af, c_s * as_], dim=0), torch.cat([c_f * bf, c_s * bs], dim=1)


def merged_rank(rank_f: int, rank_s: int, merged: bool, combination: str) -> int:
    """The output module's rank: r_f, or r_f + r_s for a merged module under ``cat``."""
    return rank_f + rank_s if merged and combination == "cat" else rank_f


__all__ = ["COMBINATIONS", "DEFAULT_WEIGHTS", "MergeRule", "lora_scaling", "merge_module",
           "merged_rank", "parse_weights"]
