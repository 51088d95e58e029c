"""Reading and writing PEFT LoRA adapters, refusing everything the Safe LoRA rule does not cover.

A PEFT LoRA adapter is a directory holding ``adapter_config.json`` and
``adapter_model.safetensors``. PEFT strips the adapter name when saving, so each LoRA module
``M`` (a base-model weight name without ``.weight``, e.g.
``model.layers.0.self_attn.q_proj``) appears as two tensors::

    base_model.model.M.lora_A.weight    r x d_in
    base_model.model.M.lora_B.weight    d_out x r

:func:`read_adapter` reads both files with one whole-object read each, validates them strictly
(SPEC §2: DoRA, non-LoRA PEFT types, embedding/conv LoRA, pickle-only adapters, lone or
mis-ranked factors and non-finite values are refused with a message naming the adapter and
the culprit) and pairs A with B by name. :func:`write_adapter` writes the sanitized copy:
the same tensors, dtypes and metadata with some B replaced, the config byte for byte, and
the adapter's other non-weight files.

PEFT is not needed at runtime: the little of its logic that matters (how ``rank_pattern``
keys select a module's rank) is mirrored in :func:`get_pattern_key` and tested against PEFT.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from safelora_ray.core.errors import (
    AdapterError,
    NotFoundError,
    SafeLoraError,
    SafetensorsFormatError,
)
from safelora_ray.formats.safetensors import (
    MAX_HEADER_BYTES,
    SafetensorsHeader,
    SafetensorsWriter,
    TensorInfo,
    json_type,
    parse_header,
    require_little_endian,
    torch_dtype_of,
    torch_shape_of,
)
from safelora_ray.storage.base import Storage, normalize_relpath

logger = logging.getLogger(__name__)

#: Turns a reason into the exception to raise (prefixed with the adapter id).
Fail = Callable[[str], AdapterError]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"

#: Largest ``adapter_config.json`` accepted (real ones are a few KiB).
MAX_CONFIG_BYTES = 1024**2

#: Default cap on ``adapter_model.safetensors`` (read whole into memory).
DEFAULT_MAX_ADAPTER_BYTES = 4 * 1024**3

#: Prefix PEFT puts before every module name in a saved adapter.
KEY_PREFIX = "base_model.model."

#: Suffixes of files that hold weights; they are listed as skipped and never opened (a pickle
#: is code, and an unsanitized copy of the weights must not travel with the sanitized one).
WEIGHT_SUFFIXES = (
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".pkl",
    ".pickle",
    ".safetensors",
    ".gguf",
    ".h5",
    ".msgpack",
)

#: dtypes accepted for lora_A / lora_B.
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")

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


@dataclass
class Adapter:
    """A validated PEFT LoRA adapter held in memory.

    Attributes:
        adapter_id: Identifier used in messages and reports.
        uri: The adapter directory's URI.
        config: Parsed ``adapter_config.json``.
        config_bytes: Its raw bytes (written back unchanged).
        metadata: The safetensors ``__metadata__`` map, or None.
        tensors: Every tensor of ``adapter_model.safetensors`` by name, in file order; views
            into one buffer holding the file.
        modules: LoRA modules by module name, in file order of their A tensor.
        untouched: Names of tensors kept as they are (LoRA biases, ``modules_to_save``
            weights, anything else that is not a lora_A/lora_B pair).
        modules_to_save: Module names from the config's ``modules_to_save``.
        extra_files: ``(path relative to the adapter, size)`` of the other non-weight files.
        skipped_files: Relative paths of other weight files (never opened, never copied).
        digest: ``sha256:<hex>`` over the config and weights bytes (see :func:`adapter_digest`).
        base_model: The config's ``base_model_name_or_path`` (may be None).
        nbytes: Size of ``adapter_model.safetensors`` in bytes.
        tensor_infos: The header entry of every tensor (dtype string, shape, offsets).
    """

    adapter_id: str
    uri: str
    config: dict[str, Any]
    config_bytes: bytes
    metadata: dict[str, str] | None
    tensors: dict[str, torch.Tensor]
    modules: dict[str, LoraModule]
    untouched: list[str]
    modules_to_save: list[str]
    extra_files: list[tuple[str, int]]
    skipped_files: list[str]
    digest: str
    base_model: str | None
    nbytes: int
    tensor_infos: dict[str, TensorInfo] = field(default_factory=dict, repr=False)


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


# -- reading -------------------------------------------------------------------------------


def read_adapter(
    storage: Storage,
    prefix: str,
    adapter_id: str,
    *,
    max_bytes: int = DEFAULT_MAX_ADAPTER_BYTES,
) -> Adapter:
    """Read, validate and pair one PEFT LoRA adapter.

    Args:
        storage: Where the adapter lives.
        prefix: The adapter directory inside ``storage`` (``""`` for its root).
        adapter_id: Name used in every message.
        max_bytes: Largest ``adapter_model.safetensors`` accepted.

    Returns:
        The adapter, its tensors views into a single buffer holding the weights file.

    Raises:
        AdapterError: The adapter is missing, malformed or not covered by the rule; the
            message starts with ``adapter '<adapter_id>':`` and names the file, tensor or
            module at fault.
    """
    require_little_endian()
    prefix = prefix.strip("/")
    uri = storage.describe(prefix)

    def fail(reason: str) -> AdapterError:
        return AdapterError(f"adapter {adapter_id!r}: {reason}")

    # One listing gives every file and its size; no per-file existence probes.
    try:
        listed = _list_dir(storage, prefix)
    except SafeLoraError as e:
        raise fail(f"cannot list {uri}: {e}") from e
    sizes = dict(listed)

    if CONFIG_NAME not in sizes:
        raise fail(f"{CONFIG_NAME} is missing in {uri}")
    config_path = posixpath.join(prefix, CONFIG_NAME)
    try:
        config_bytes = storage.read(config_path, max_bytes=MAX_CONFIG_BYTES)
    except SafeLoraError as e:
        raise fail(f"cannot read {CONFIG_NAME}: {e}") from e
    config = _parse_config(config_bytes, fail)
    check_config(config, fail)

    if WEIGHTS_NAME not in sizes:
        if PICKLE_WEIGHTS_NAME in sizes:
            raise fail(
                f"pickle-only adapter: {uri} has {PICKLE_WEIGHTS_NAME} but no {WEIGHTS_NAME}; "
                "pickles are never unpickled; convert the adapter to safetensors"
            )
        # Listings skip what the storage refuses to serve (a symlink out of its root): name
        # the reason rather than calling the file missing.
        try:
            storage.size(posixpath.join(prefix, WEIGHTS_NAME))
        except NotFoundError:
            pass
        except SafeLoraError as e:
            raise fail(f"cannot read {WEIGHTS_NAME}: {e}") from e
        raise fail(f"{WEIGHTS_NAME} is missing in {uri}")

    weights_path = posixpath.join(prefix, WEIGHTS_NAME)
    weights_uri = storage.describe(weights_path)
    size = sizes[WEIGHTS_NAME]
    if size > max_bytes:
        raise fail(f"{WEIGHTS_NAME} is {size} bytes, more than the {max_bytes} allowed")
    # A bytearray (not bytes) so the tensor views are writable; filled by one read.
    buf = bytearray(size)
    try:
        if size:
            storage.read_into(weights_path, 0, memoryview(buf))
    except SafeLoraError as e:
        raise fail(f"cannot read {WEIGHTS_NAME}: {e}") from e
    try:
        header = _parse_buffer_header(buf, weights_path, weights_uri)
    except SafeLoraError as e:
        raise fail(f"{WEIGHTS_NAME} is not a valid safetensors file: {e}") from e

    tensors: dict[str, torch.Tensor] = {}
    for name, info in header.tensors.items():
        try:
            tensors[name] = _view(buf, weights_uri, info)
        except SafeLoraError as e:
            raise fail(f"{WEIGHTS_NAME}: {e}") from e

    modules, untouched = _pair_modules(config, header, tensors, fail)

    extra_files: list[tuple[str, int]] = []
    skipped_files: list[str] = []
    for rel, n in listed:
        if rel in (CONFIG_NAME, WEIGHTS_NAME):
            continue
        if is_weight_file(rel):
            skipped_files.append(rel)
        else:
            extra_files.append((rel, n))
    if skipped_files:
        logger.info(
            "adapter %r: not opening weight file(s) %s (only %s is read)",
            adapter_id,
            ", ".join(skipped_files),
            WEIGHTS_NAME,
        )

    return Adapter(
        adapter_id=adapter_id,
        uri=uri,
        config=config,
        config_bytes=config_bytes,
        metadata=header.metadata,
        tensors=tensors,
        modules=modules,
        untouched=untouched,
        modules_to_save=list(config.get("modules_to_save") or []),
        extra_files=extra_files,
        skipped_files=skipped_files,
        digest=adapter_digest(config_bytes, buf),
        base_model=config.get("base_model_name_or_path"),
        nbytes=size,
        tensor_infos=dict(header.tensors),
    )


def is_weight_file(path: str) -> bool:
    """Whether ``path`` names a weights file (by suffix, case-insensitively)."""
    return path.lower().endswith(WEIGHT_SUFFIXES)


def adapter_digest(config_bytes: bytes | memoryview, weights_bytes: bytes | bytearray) -> str:
    """``sha256:<hex>`` over the framed config and weights bytes.

    The framing (``adapter_config.json\\0`` + config + ``\\0adapter_model.safetensors\\0`` +
    weights) keeps the two parts from being confused with each other.
    """
    h = hashlib.sha256()
    h.update(CONFIG_NAME.encode() + b"\0")
    h.update(config_bytes)
    h.update(b"\0" + WEIGHTS_NAME.encode() + b"\0")
    h.update(memoryview(weights_bytes))
    return "sha256:" + h.hexdigest()


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


def _list_dir(storage: Storage, prefix: str) -> list[tuple[str, int]]:
    """``(path relative to prefix, size)`` of every object under the directory ``prefix``."""
    out: list[tuple[str, int]] = []
    cut = len(prefix) + 1 if prefix else 0
    for obj in storage.list(prefix):
        if prefix and not obj.path.startswith(prefix + "/"):
            continue  # a sibling that merely shares the name's beginning
        out.append((obj.path[cut:], obj.size))
    return out


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


def _parse_buffer_header(buf: bytearray, path: str, uri: str) -> SafetensorsHeader:
    """Validate the header of the safetensors file held whole in ``buf``."""
    size = len(buf)
    if size < 8:
        raise SafetensorsFormatError(
            f"{uri}: file is {size} bytes, too short to hold the 8-byte header length"
        )
    n = int.from_bytes(buf[:8], "little")
    if n == 0:
        raise SafetensorsFormatError(f"{uri}: header length is 0 (the header must be JSON)")
    if n > MAX_HEADER_BYTES:
        raise SafetensorsFormatError(
            f"{uri}: header length {n} exceeds the limit of {MAX_HEADER_BYTES} bytes"
        )
    if 8 + n > size:
        raise SafetensorsFormatError(
            f"{uri}: header length {n} runs past the end of the file ({size} bytes)"
        )
    return parse_header(bytes(buf[8 : 8 + n]), file_size=size, path=path, uri=uri)


def _view(buf: bytearray, uri: str, info: TensorInfo) -> torch.Tensor:
    """Tensor ``info`` as a view into ``buf`` (no copy)."""
    dtype = torch_dtype_of(uri, info)
    shape = torch_shape_of(uri, info)
    if info.nbytes == 0:
        return torch.empty(shape, dtype=dtype)  # frombuffer rejects empty ranges
    itemsize = torch.empty((), dtype=dtype).element_size()
    t = torch.frombuffer(buf, dtype=dtype, count=info.nbytes // itemsize, offset=info.start)
    return t.reshape(shape)


def _pair_modules(
    config: Mapping[str, Any],
    header: SafetensorsHeader,
    tensors: Mapping[str, torch.Tensor],
    fail: Fail,
) -> tuple[dict[str, LoraModule], list[str]]:
    """Pair lora_A with lora_B by module name and validate each pair."""
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
    bad = _first_non_finite({k: tensors[k] for m in modules.values()
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


def _first_non_finite(named: Mapping[str, torch.Tensor]) -> str | None:
    """The first key of ``named`` whose tensor has a NaN or an Inf, or None.

    One float64 sum per dtype over all the tensors: it is finite exactly when every value is
    (NaN and ±Inf propagate; finite half/float32 values cannot overflow a float64 sum), and a
    per-tensor ``isfinite`` costs a dispatch per tensor, most of the time of a small adapter.
    The per-tensor search runs only when something is wrong.
    """
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in named.values():
        if t.numel():
            by_dtype.setdefault(t.dtype, []).append(t.reshape(-1))
    if all(bool(torch.cat(ts).sum(dtype=torch.float64).isfinite())
           for ts in by_dtype.values()):
        return None
    return next(k for k, t in named.items() if not bool(torch.isfinite(t).all()))


# -- writing -------------------------------------------------------------------------------


def write_adapter(
    adapter: Adapter,
    new_b: Mapping[str, torch.Tensor],
    out_dir: str,
    storage_for_extras: Storage | None,
    prefix: str,
) -> list[tuple[str, str]]:
    """Write the sanitized adapter into the local directory ``out_dir``.

    ``adapter_model.safetensors`` gets the input's tensors in the input's order, dtypes and
    ``__metadata__``, with lora_B of each module in ``new_b`` replaced (cast to B's dtype);
    every other tensor keeps its exact bytes. ``adapter_config.json`` is copied byte for byte,
    and the extra (non-weight) files are copied from ``storage_for_extras``. Skipped weight
    files are not copied: they would carry unsanitized weights.

    Args:
        adapter: The adapter as read by :func:`read_adapter`.
        new_b: Replacement B per module name (any float dtype, any device).
        out_dir: Local directory to write into (created if needed).
        storage_for_extras: Storage the adapter was read from, to copy its extra files;
            None to copy none.
        prefix: The adapter directory inside ``storage_for_extras``.

    Returns:
        ``(relative path, local path)`` pairs in publish order, ``adapter_config.json`` last
        (its presence marks an adapter as complete).

    Raises:
        AdapterError: ``new_b`` names an unknown module, has a wrong shape, or becomes
            non-finite in B's dtype; or an extra file cannot be copied.
    """

    def fail(reason: str) -> AdapterError:
        return AdapterError(f"adapter {adapter.adapter_id!r}: {reason}")

    replaced: dict[str, torch.Tensor] = {}
    for module, b in new_b.items():
        mod = adapter.modules.get(module)
        if mod is None:
            raise fail(f"no LoRA module {module!r} to replace B of")
        if tuple(b.shape) != tuple(mod.b.shape):
            raise fail(
                f"module {module!r}: new lora_B has shape {list(b.shape)}, expected "
                f"{list(mod.b.shape)}"
            )
        replaced[mod.b_key] = b.detach().to(device="cpu", dtype=mod.b.dtype).contiguous()
    bad = _first_non_finite(replaced)
    if bad is not None:
        mod = next(m for m in adapter.modules.values() if m.b_key == bad)
        raise fail(f"module {mod.module!r}: new lora_B has non-finite values in {mod.b.dtype}")

    os.makedirs(out_dir, exist_ok=True)
    files: list[tuple[str, str]] = []

    weights_local = os.path.join(out_dir, WEIGHTS_NAME)
    layout = [(name, info.dtype, info.shape) for name, info in adapter.tensor_infos.items()]
    with SafetensorsWriter(weights_local, layout, adapter.metadata) as writer:
        for name in writer.tensors:
            writer.write(name, replaced.get(name, adapter.tensors[name]))
    files.append((WEIGHTS_NAME, weights_local))

    if storage_for_extras is not None:
        prefix = prefix.strip("/")
        for rel, size in adapter.extra_files:
            try:
                rel_ok = normalize_relpath(rel)
            except SafeLoraError as e:
                raise fail(f"extra file {rel!r} has an unsafe path: {e}") from e
            if not rel_ok:
                continue
            local = os.path.join(out_dir, *rel_ok.split("/"))
            _copy_extra(storage_for_extras, posixpath.join(prefix, rel_ok), size, local, fail)
            files.append((rel_ok, local))

    config_local = os.path.join(out_dir, CONFIG_NAME)
    with open(config_local, "wb") as f:
        f.write(adapter.config_bytes)
    files.append((CONFIG_NAME, config_local))
    return files


def _copy_extra(storage: Storage, path: str, size: int, local: str, fail: Fail) -> None:
    os.makedirs(os.path.dirname(local), exist_ok=True)
    try:
        src = storage.local_path(path)
        if src is not None:
            shutil.copyfile(src, local)
        else:
            # Extras are small (README, tokenizer files); allow some growth since listing.
            data = storage.read(path, max_bytes=max(size, 1) * 2 + 1024**2)
            with open(local, "wb") as f:
                f.write(data)
    except (OSError, SafeLoraError) as e:
        raise fail(f"cannot copy extra file {storage.describe(path)}: {e}") from e


def output_digest(files: Sequence[tuple[str, str]]) -> str:
    """The :func:`adapter_digest` of a written adapter, from :func:`write_adapter`'s result.

    Args:
        files: ``(relative path, local path)`` pairs including the config and the weights.

    Returns:
        ``sha256:<hex>``, equal to :attr:`Adapter.digest` of the adapter read back.

    Raises:
        AdapterError: ``files`` lacks the config or the weights.
    """
    paths = dict(files)
    for need in (CONFIG_NAME, WEIGHTS_NAME):
        if need not in paths:
            raise AdapterError(f"written adapter files lack {need}: {sorted(paths)}")
    h = hashlib.sha256()
    h.update(CONFIG_NAME.encode() + b"\0")
    _hash_file(h, paths[CONFIG_NAME])
    h.update(b"\0" + WEIGHTS_NAME.encode() + b"\0")
    _hash_file(h, paths[WEIGHTS_NAME])
    return "sha256:" + h.hexdigest()


def _hash_file(h: Any, path: str) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(8 * 1024 * 1024):
            h.update(chunk)


# -- small helpers -------------------------------------------------------------------------


def _is_pos_int(v: Any) -> bool:
    return type(v) is int and v > 0  # type() excludes bool


def _is_number(v: Any) -> bool:
    return type(v) in (int, float) and v == v and abs(v) != float("inf")


