"""``adapter_config.json``: the adapter directory's file names, the config checks (only plain
LoRA is covered by the Safe LoRA rule) and PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup.

PEFT is not needed at runtime: the little of its logic that matters (how ``rank_pattern``
keys select a module's rank) is mirrored in :func:`get_pattern_key` and tested against PEFT.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from safelora_ray.core.errors import AdapterError
from safelora_ray.formats.safetensors import json_type

logger = logging.getLogger(__name__)

#: Turns a reason into the exception to raise (prefixed with the adapter id).
Fail = Callable[[str], AdapterError]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"

#: Largest ``adapter_config.json`` accepted (real ones are a few KiB).
MAX_CONFIG_BYTES = 1024**2

#: LoRA variants (``LoraConfig`` fields) whose weights are not a plain ``ΔW = B A``.
#: (DoRA is checked separately, with its own message.) Variants that only change training
#: or initialization (aLoRA, MiCA, VeLoRA, MonteCLoRA at inference) are not refused here; any
#: extra ``lora_*`` tensor they save is refused by the key check.
_UNCOVERED_VARIANTS = {
    "use_qalora": "QA-LoRA (lora_A acts on group-pooled inputs)",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA)",
    "arrow_config": "Arrow (routing over several LoRA experts)",
    "kasa_config": "KaSA (a learned diagonal between A and B)",
}

#: Caps on rank_pattern / alpha_pattern: their keys are regular expressions from an
#: untrusted file, so bound the work they can cause.
_MAX_PATTERNS = 100_000
_MAX_PATTERN_LEN = 1024


# -- PEFT's rank_pattern / alpha_pattern lookup ------------------------------------------------


def get_pattern_key(pattern_keys: Iterable[str], key_to_match: str) -> str:
    """The first pattern key matching ``key_to_match``, as PEFT resolves ``rank_pattern``.

    Mirrors ``peft.utils.other.get_pattern_key`` (peft 0.21): a pattern key ``k`` (a regular
    expression) matches a module name when ``re.match(rf"(.*\\.)?({k})$", name)`` does, i.e.
    when it matches a dot-separated suffix of the name; the keys are tried in order (the
    order of the saved JSON, which PEFT writes sorted) and the first match wins. When none
    matches, PEFT returns the name itself.

    Args:
        pattern_keys: The keys of ``rank_pattern`` or ``alpha_pattern``, in order.
        key_to_match: Module name, e.g. ``model.layers.0.self_attn.q_proj``.

    Returns:
        The matching key, or ``key_to_match`` when none matches.

    Raises:
        re.error: A key is not a valid regular expression.
    """
    for key in pattern_keys:
        if _pattern(key).match(key_to_match):
            return key
    return key_to_match


_PATTERN_CACHE: dict[str, re.Pattern[str]] = {}


def _pattern(key: str) -> re.Pattern[str]:
    p = _PATTERN_CACHE.get(key)
    if p is None:
        p = re.compile(rf"(.*\.)?({key})$")
        if len(_PATTERN_CACHE) < 4096:
            _PATTERN_CACHE[key] = p
    return p


def resolve_rank_alpha(config: Mapping[str, Any], module: str) -> tuple[int, float]:
    """The ``(r, lora_alpha)`` PEFT gives ``module`` under ``config``.

    As ``LoraModel._create_and_replace``: ``rank_pattern.get(get_pattern_key(...), r)`` and
    likewise for alpha. The config must have been checked by :func:`check_config`.

    Args:
        config: A parsed ``adapter_config.json``.
        module: Module name.

    Returns:
        The rank and alpha.
    """
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config.get("r", 8))
    alpha = alpha_pattern.get(
        get_pattern_key(alpha_pattern.keys(), module), config.get("lora_alpha", 8)
    )
    return r, alpha


def module_scaling(config: Mapping[str, Any], rank: int, alpha: float) -> float:
    """The scaling PEFT applies to a module of rank ``rank`` and alpha ``alpha`` (both as
    :func:`resolve_rank_alpha` gives them): ``alpha / r``, or ``alpha / √r`` with
    ``use_rslora``."""
    if config.get("use_rslora"):
        return float(alpha) / math.sqrt(rank)
    return float(alpha) / rank


def unit_scaling_config(config: Mapping[str, Any], ranks: Mapping[str, int]) -> bytes:
    """``adapter_config.json`` for the same adapter whose modules have ``ranks`` and scaling 1
    (SafeMERGE's output, SPEC §5): ``lora_alpha = r``, no rsLoRA, and every module whose rank
    is not ``r`` named in ``rank_pattern`` and ``alpha_pattern`` with that rank, by its whole
    name escaped (PEFT reads a key as a regular expression matching a name's suffix: an
    escaped whole name matches that module only, whatever order the keys are read in).

    Args:
        config: The task adapter's parsed config (the other fields are kept).
        ranks: Module name → its rank in the output.
    """
    out = dict(config)
    r = int(config.get("r", 8))
    pattern = {re.escape(m): int(k) for m, k in sorted(ranks.items()) if int(k) != r}
    out.update(r=r, lora_alpha=r, use_rslora=False, rank_pattern=pattern,
               alpha_pattern=dict(pattern))
    return (json.dumps(out, indent=2, sort_keys=True) + "\n").encode()


def check_config(config: Mapping[str, Any], fail: Fail | None = None) -> None:
    """Refuse configs the rule does not cover: non-LoRA types, DoRA, other variants.

    Args:
        config: A parsed ``adapter_config.json``.
        fail: Maps a reason to the exception to raise (default: a plain :class:`AdapterError`).

    Raises:
        AdapterError: The config is not a plain LoRA config or has invalid fields.
    """
    if fail is None:

        def fail(reason: str) -> AdapterError:
            return AdapterError(reason)

    peft_type = config.get("peft_type")
    if peft_type is None:
        raise fail(
            f"{CONFIG_NAME} has no peft_type; only LoRA adapters (peft_type LORA) are covered"
        )
    if peft_type != "LORA":
        raise fail(
            f"peft_type {peft_type!r} in {CONFIG_NAME} is not LoRA; only LoRA adapters "
            "are covered by the Safe LoRA rule"
        )
    if config.get("use_dora"):
        raise fail(f"DoRA adapter (use_dora in {CONFIG_NAME}) is not covered by the Safe LoRA rule")
    if config.get("target_parameters"):
        raise fail(
            f"LoRA on nn.Parameter (target_parameters={config['target_parameters']!r}) is not "
            "covered; only Linear LoRA is covered"
        )
    for key, what in _UNCOVERED_VARIANTS.items():
        if config.get(key):
            raise fail(f"LoRA variant {what} ({key} in {CONFIG_NAME}) is not covered")

    r = config.get("r", 8)
    if not _is_pos_int(r):
        raise fail(f"{CONFIG_NAME}: r must be a positive integer, got {r!r}")
    alpha = config.get("lora_alpha", 8)
    if not _is_number(alpha):
        raise fail(f"{CONFIG_NAME}: lora_alpha must be a number, got {alpha!r}")
    for name, check, what in (
        ("rank_pattern", _is_pos_int, "positive integers"),
        ("alpha_pattern", _is_number, "numbers"),
    ):
        pattern = config.get(name)
        if pattern is None:
            continue
        if not isinstance(pattern, dict):
            raise fail(f"{CONFIG_NAME}: {name} must be an object, got {json_type(pattern)}")
        if len(pattern) > _MAX_PATTERNS:
            raise fail(f"{CONFIG_NAME}: {name} has {len(pattern)} keys (limit {_MAX_PATTERNS})")
        for k, v in pattern.items():
            if len(k) > _MAX_PATTERN_LEN:
                raise fail(
                    f"{CONFIG_NAME}: {name} key {k[:80]!r}... is longer than "
                    f"{_MAX_PATTERN_LEN} characters"
                )
            if not check(v):
                raise fail(f"{CONFIG_NAME}: {name}[{k!r}] must be {what}, got {v!r}")
            try:
                _pattern(k)
            except re.error as e:
                raise fail(
                    f"{CONFIG_NAME}: {name} key {k!r} is not a valid regular expression: {e}"
                ) from None
    mts = config.get("modules_to_save")
    if mts is not None and not (isinstance(mts, list) and all(isinstance(m, str) for m in mts)):
        raise fail(f"{CONFIG_NAME}: modules_to_save must be a list of strings, got {mts!r}")
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise fail(f"{CONFIG_NAME}: base_model_name_or_path must be a string, got {base!r}")


def _parse_config(raw: bytes, fail: Fail) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")  # as PEFT reads it; json.loads(bytes) would guess UTF-16/32
    except UnicodeDecodeError as e:
        raise fail(f"{CONFIG_NAME} is not valid JSON: not UTF-8 (byte 0x{raw[e.start]:02x} "
                   f"at offset {e.start})") from None
    try:
        config = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError
        raise fail(f"{CONFIG_NAME} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise fail(f"{CONFIG_NAME} is a JSON {json_type(config)}, not an object")
    return config


def _is_pos_int(v: Any) -> bool:
    return type(v) is int and v > 0  # type() excludes bool


def _is_number(v: Any) -> bool:
    return type(v) in (int, float) and v == v and abs(v) != float("inf")
