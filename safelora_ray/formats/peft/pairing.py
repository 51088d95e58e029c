"""Pairing an adapter's lora_A with its lora_B by module name, and refusing what the rule does
not cover (embedding or conv LoRA, DoRA vectors, unknown LoRA tensors, lone or mis-ranked
factors, non-finite values).

PEFT strips the adapter name when saving, so each LoRA module ``M`` (a base-model weight name
without ``.weight``, e.g. ``model.layers.0.self_attn.q_proj``) appears as two tensors::

    base_model.model.M.lora_A.weight    r x d_in
    base_model.model.M.lora_B.weight    d_out x r
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from safelora_ray.formats.peft.config import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    Fail,
    get_pattern_key,
    resolve_rank_alpha,
)
from safelora_ray.formats.safetensors import SafetensorsHeader

logger = logging.getLogger(__name__)

#: Prefix PEFT puts before every module name in a saved adapter.
KEY_PREFIX = "base_model.model."

#: dtypes accepted for lora_A / lora_B.
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


@dataclass
class LoraModule:
    """One LoRA module of an adapter.

    Attributes:
        module: Module name, e.g. ``model.layers.0.self_attn.q_proj`` (the base weight's
            name without ``.weight``).
        a_key: Tensor name of A in the file.
        b_key: Tensor name of B in the file.
        a: A, ``r x d_in`` (a read-only-by-convention view into the adapter's buffer).
        b: B, ``d_out x r``.
        rank: ``r``.
        alpha: ``lora_alpha`` PEFT uses for this module (``alpha_pattern`` applied).
    """

    module: str
    a_key: str
    b_key: str
    a: torch.Tensor
    b: torch.Tensor
    rank: int
    alpha: float | None = None


def _pair_modules(
    config: Mapping[str, Any],
    header: SafetensorsHeader,
    tensors: Mapping[str, torch.Tensor],
    fail: Fail,
    buf: bytearray | memoryview,
) -> tuple[dict[str, LoraModule], list[str]]:
    """Pair lora_A with lora_B by module name and validate each pair. ``buf``: the weights
    file whose views ``tensors`` are (their values are checked where they lie, in runs:
    :func:`_first_non_finite_in`)."""
    a_keys: dict[str, str] = {}
    b_keys: dict[str, str] = {}
    untouched: list[str] = []
    for name in header.tensors:
        parts = name.split(".")
        if any(p.startswith("lora_embedding_") for p in parts):
            raise fail(
                f"tensor {name!r}: embedding LoRA (lora_embedding_A/B) is not covered; "
                "only Linear LoRA is covered"
            )
        if "lora_magnitude_vector" in parts:
            raise fail(f"tensor {name!r}: DoRA magnitude vector; DoRA is not covered")
        if name.endswith(".lora_A.weight") or name.endswith(".lora_B.weight"):
            if not name.startswith(KEY_PREFIX):
                raise fail(
                    f"tensor {name!r} does not start with {KEY_PREFIX!r} (not a PEFT adapter key)"
                )
            module = name[len(KEY_PREFIX) : -len(".lora_A.weight")]
            if not module:
                raise fail(f"tensor {name!r} names no module")
            (a_keys if parts[-2] == "lora_A" else b_keys)[module] = name
        elif name.endswith(".lora_B.bias"):
            untouched.append(name)  # lora_bias=True: kept as is (SPEC §2)
        elif any(p.startswith("lora_") for p in parts):
            # A LoRA-like tensor we do not understand (another variant, an unstripped adapter
            # name): projecting B while ignoring it could silently mis-sanitize.
            raise fail(
                f"tensor {name!r} is not a lora_A/lora_B weight of a Linear LoRA module; "
                "this LoRA variant is not covered"
            )
        else:
            untouched.append(name)  # modules_to_save and other non-LoRA tensors

    for module, key in b_keys.items():
        if module not in a_keys:
            raise fail(f"module {module!r} has lora_B ({key!r}) but no lora_A")
    modules: dict[str, LoraModule] = {}
    for module, a_key in a_keys.items():
        b_key = b_keys.get(module)
        if b_key is None:
            raise fail(f"module {module!r} has lora_A ({a_key!r}) but no lora_B")
        modules[module] = _check_pair(config, header, tensors, module, a_key, b_key, fail)
    if not modules:
        raise fail(f"{WEIGHTS_NAME} has no LoRA modules (no lora_A/lora_B weight pairs)")
    bad = _first_non_finite_in(buf, header, {k: tensors[k] for m in modules.values()
                                             for k in (m.a_key, m.b_key)})
    if bad is not None:
        t = tensors[bad]
        n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        raise fail(f"tensor {bad!r} has non-finite values ({n_nan} NaN, {n_inf} Inf)")
    return modules, untouched


def _check_pair(
    config: Mapping[str, Any],
    header: SafetensorsHeader,
    tensors: Mapping[str, torch.Tensor],
    module: str,
    a_key: str,
    b_key: str,
    fail: Fail,
) -> LoraModule:
    a_info, b_info = header.tensors[a_key], header.tensors[b_key]
    where = f"module {module!r}"
    if len(a_info.shape) != 2 or len(b_info.shape) != 2:
        kind = " (conv LoRA)" if len(a_info.shape) in (3, 4, 5) else ""
        raise fail(
            f"{where}: lora_A has shape {list(a_info.shape)} and lora_B "
            f"{list(b_info.shape)}{kind}; only Linear LoRA (2-D factors) is covered"
        )
    for info in (a_info, b_info):
        if info.dtype not in FLOAT_DTYPES:
            raise fail(
                f"tensor {info.name!r} has dtype {info.dtype}; LoRA factors must be one of "
                f"{', '.join(FLOAT_DTYPES)}"
            )
        if 0 in info.shape:
            raise fail(f"tensor {info.name!r} is empty (shape {list(info.shape)})")
    r_a, _d_in = a_info.shape
    _d_out, r_b = b_info.shape
    if r_a != r_b:
        raise fail(
            f"{where}: rank mismatch: lora_A is {list(a_info.shape)} (r={r_a}) but lora_B "
            f"is {list(b_info.shape)} (r={r_b})"
        )
    expected, alpha = resolve_rank_alpha(config, module)
    if r_a != expected:
        rank_pattern = config.get("rank_pattern") or {}
        key = get_pattern_key(rank_pattern.keys(), module)
        source = f"rank_pattern[{key!r}]" if key in rank_pattern else "r"
        raise fail(
            f"{where}: rank mismatch: the tensors have r={r_a} but {CONFIG_NAME} gives "
            f"r={expected} (from {source}); PEFT would not load this adapter"
        )
    return LoraModule(module, a_key, b_key, tensors[a_key], tensors[b_key], r_a, float(alpha))


#: Per float dtype: the integer view of its bits and its exponent field. A value is NaN or
#: ±Inf exactly when every exponent bit is set.
_EXPONENT: dict[torch.dtype, tuple[torch.dtype, int]] = {
    torch.bfloat16: (torch.int16, 0x7F80),
    torch.float16: (torch.int16, 0x7C00),
    torch.float32: (torch.int32, 0x7F800000),
    torch.float64: (torch.int64, 0x7FF0000000000000),
}


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``, read from the exponent bits: integer work, 3x faster than a
    float32 sum (and 15x faster than ``isfinite``) on a 7B adapter's 8 MB."""
    spec = _EXPONENT.get(t.dtype)
    if spec is None:  # another float dtype: a float64 sum is finite exactly when all are
        return bool(t.sum(dtype=torch.float64).isfinite())
    view, mask = spec
    return int((t.view(view) & mask).max()) != mask


#: Above this many bytes of one dtype, the tensors are checked one by one where they lie
#: rather than joined first: the join's fresh memory costs a page fault per 4 KiB, more than
#: the per-tensor dispatches (a 7B adapter's 8 MB: 2 ms in place against 5-50 ms joined).
_JOIN_MAX_BYTES = 1 << 20


def _first_non_finite(named: Mapping[str, torch.Tensor]) -> str | None:
    """The first key of ``named`` whose tensor has a NaN or an Inf, or None.

    Small tensors are checked together, one check per dtype (a per-tensor check costs a
    dispatch per tensor, most of the time of a small adapter); large ones each in place, by
    their minimum and maximum (NaN propagates to both, ±Inf shows in one), which copies
    nothing. The per-tensor search runs only when something is wrong.
    """
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in named.values():
        if t.numel():
            by_dtype.setdefault(t.dtype, []).append(t)
    for ts in by_dtype.values():
        if sum(t.nbytes for t in ts) <= _JOIN_MAX_BYTES:
            ok = _all_finite(torch.cat([t.reshape(-1) for t in ts]))
        else:
            ok = all(_min_max_finite(t) for t in ts)
        if not ok:
            return next(k for k, t in named.items() if not bool(torch.isfinite(t).all()))
    return None


def _first_non_finite_in(buf: bytearray | memoryview, header: SafetensorsHeader,
                         named: Mapping[str, torch.Tensor]) -> str | None:
    """:func:`_first_non_finite` of tensors that are views into ``buf``, the file ``header``
    describes: those of one dtype lying back to back in the file (a PEFT adapter's A and B
    all do) are checked as one run, in place, by its minimum and maximum. One check per run
    instead of one per tensor: a 16-layer q/v adapter's 64 tensors in 0.3 ms against 1 ms,
    and nothing copied."""
    runs: list[list[str]] = []  # names of tensors lying back to back, of one dtype
    end = -1
    for i in sorted((header.tensors[k] for k, t in named.items() if t.numel()),
                    key=lambda i: i.start):
        if runs and i.start == end and named[i.name].dtype == named[runs[-1][0]].dtype:
            runs[-1].append(i.name)
        else:
            runs.append([i.name])
        end = i.end
    for keys in runs:
        first, start = named[keys[0]], header.tensors[keys[0]].start
        count = (header.tensors[keys[-1]].end - start) // first.element_size()
        if not _min_max_finite(torch.frombuffer(buf, dtype=first.dtype, count=count,
                                                offset=start)):
            return next(k for k in keys if not bool(torch.isfinite(named[k]).all()))
    return None


def _min_max_finite(t: torch.Tensor) -> bool:
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))
