"""Parsing and strict validation of a safetensors header.

Headers are validated at least as strictly as the reference implementation (the
``safetensors`` Rust crate): anything it rejects is rejected here, with a message naming the
file and the tensor. A few things it tolerates are rejected here too (duplicate JSON keys,
unknown fields, non-object tensor entries, sizes beyond ``2**63 - 1``).

File layout::

    [8 bytes: N, little-endian u64][N bytes: JSON header][data section]

and each header entry's ``data_offsets`` are relative to the start of the data section.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from dataclasses import dataclass
from typing import Any

import torch

from safelora_ray.core.errors import CheckpointError, SafetensorsFormatError
from safelora_ray.formats.safetensors.dtypes import _DTYPE_ORDER, DTYPES

logger = logging.getLogger(__name__)

#: The library's cap on the JSON header length (``MAX_HEADER_SIZE`` in the Rust crate).
MAX_HEADER_BYTES = 100_000_000

#: Largest element count, bit count or offset accepted: sizes must fit torch's int64.
MAX_SIZE = 2**63 - 1

_N_LEN = 8  # the u64 header length prefix
_METADATA_KEY = "__metadata__"
_FIELDS = ("dtype", "shape", "data_offsets")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a safetensors header.

    Attributes:
        name: Tensor name.
        dtype: safetensors dtype string (a key of :data:`DTYPES`).
        shape: Shape, in elements of ``dtype`` (for ``F4``: 4-bit values).
        start: Absolute byte offset of the first byte in the file.
        end: Absolute byte offset one past the last byte.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return self.end - self.start

    @property
    def numel(self) -> int:
        """Number of elements (1 for a scalar)."""
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated safetensors header.

    Attributes:
        path: Path of the file relative to its storage root.
        uri: The file's described URI (for messages).
        file_size: File size in bytes.
        header_len: Length ``N`` of the JSON header in bytes (including padding).
        data_start: Absolute offset of the data section (``8 + N``).
        tensors: Tensors by name, in data offset order.
        metadata: The ``__metadata__`` map, or None when absent.
    """

    path: str
    uri: str
    file_size: int
    header_len: int
    data_start: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None

    def tensor(self, name: str) -> TensorInfo:
        """The entry of tensor ``name``.

        Raises:
            CheckpointError: The file has no such tensor.
        """
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(
                f"{self.uri}: no tensor named {name!r} (the file has {len(self.tensors)})"
            ) from None


def parse_header(
    raw: bytes, *, file_size: int, path: str = "", uri: str = "<bytes>"
) -> SafetensorsHeader:
    """Validate the JSON header bytes ``raw`` of a file of ``file_size`` bytes.

    Args:
        raw: The ``N`` header bytes (after the 8-byte length).
        file_size: Size of the whole file, to check the data section is exactly covered.
        path: Path of the file in its storage (stored in the result).
        uri: Name of the file used in messages.

    Returns:
        The validated header.

    Raises:
        SafetensorsFormatError: The header is invalid.
    """
    raw = bytes(raw)
    try:
        seen = _validated(raw, file_size)
    except SafetensorsFormatError:
        _parse_header(raw, file_size, uri)  # the same check again, naming this file
        raise
    # Fresh maps: a caller may change what it was given without touching the cached one.
    return dataclasses.replace(seen, path=path, uri=uri, tensors=dict(seen.tensors),
                               metadata=None if seen.metadata is None else dict(seen.metadata))


@functools.lru_cache(maxsize=16)
def _validated(raw: bytes, file_size: int) -> SafetensorsHeader:
    """:func:`_parse_header`, kept for the headers seen lately (an invalid one raises and is
    not kept): a fleet's adapters share a few layouts, and parsing and checking 128 entries
    costs ~1 ms of Python per adapter."""
    return _parse_header(raw, file_size)


def _parse_header(raw: bytes, file_size: int, uri: str = "<bytes>") -> SafetensorsHeader:
    n = len(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SafetensorsFormatError(
            f"{uri}: header is not valid UTF-8 (bad byte at header offset {e.start})"
        ) from None
    try:
        obj = json.loads(text, object_pairs_hook=_reject_duplicates)
    except _DuplicateKeyError as e:
        raise SafetensorsFormatError(f"{uri}: header has duplicate JSON key {e.key!r}") from None
    except (ValueError, RecursionError) as e:
        # ValueError covers JSONDecodeError and Python's int-digit limit.
        raise SafetensorsFormatError(f"{uri}: header is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise SafetensorsFormatError(f"{uri}: header is a JSON {json_type(obj)}, not an object")

    metadata: dict[str, str] | None = None
    entries: list[tuple[str, str, tuple[int, ...], int, int]] = []
    for key, value in obj.items():
        _check_text(uri, key, "tensor name")
        if key == _METADATA_KEY:
            metadata = _parse_metadata(uri, value)
        else:
            entries.append(_parse_entry(uri, key, value))

    # The library sorts by (offsets, name) before checking contiguity, which lets empty
    # tensors share an offset with the tensor after them; do the same.
    entries.sort(key=lambda e: (e[3], e[4], e[0]))
    data_len = file_size - _N_LEN - n
    data_start = _N_LEN + n
    expected = 0
    prev: tuple[str, str, tuple[int, ...], int, int] | None = None
    tensors: dict[str, TensorInfo] = {}
    for name, dtype, shape, begin, end in entries:
        if begin != expected:
            where = f"{uri}: tensor {name!r}: data_offsets [{begin}, {end}]"
            if prev is None:
                raise SafetensorsFormatError(
                    f"{where} do not start at 0 (the data section must begin with a tensor)"
                )
            relation = "a gap after" if begin > expected else "an overlap with"
            raise SafetensorsFormatError(
                f"{where} leave {relation} tensor {prev[0]!r} [{prev[3]}, {prev[4]}]"
            )
        expected = end
        prev = (name, dtype, shape, begin, end)
        tensors[name] = TensorInfo(name, dtype, shape, data_start + begin, data_start + end)
    if expected != data_len:
        if expected < data_len:
            raise SafetensorsFormatError(
                f"{uri}: {data_len - expected} bytes of trailing data after the last tensor "
                f"(tensors cover {expected} of the {data_len} data bytes)"
            )
        last = f" (tensor {prev[0]!r} ends at {expected})" if prev else ""
        raise SafetensorsFormatError(
            f"{uri}: file is truncated: tensors need {expected} data bytes but only "
            f"{data_len} follow the header{last}"
        )
    return SafetensorsHeader(
        path="",
        uri=uri,
        file_size=file_size,
        header_len=n,
        data_start=data_start,
        tensors=tensors,
        metadata=metadata,
    )


class _DuplicateKeyError(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # object_pairs_hook sees every object, nested ones too; dict() would keep the last value.
    out = dict(pairs)
    if len(out) != len(pairs):  # the rare case: find the key, for the message
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _DuplicateKeyError(k)
            seen.add(k)
    return out


def json_type(v: Any) -> str:
    """The JSON type name of a parsed value (for error messages)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int | float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    return "object"


def _check_text(uri: str, s: str, what: str) -> None:
    # Python's json accepts lone surrogate escapes ("\ud800"); serde_json (and UTF-8) do not.
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise SafetensorsFormatError(
            f"{uri}: {what} {s!r} contains a lone UTF-16 surrogate escape"
        ) from None


def _is_size(v: Any) -> bool:
    return type(v) is int and 0 <= v <= MAX_SIZE  # type() excludes bool


def _parse_metadata(uri: str, value: Any) -> dict[str, str] | None:
    if value is None:  # the library reads "__metadata__": null as absent; so do we
        return None
    if not isinstance(value, dict):
        raise SafetensorsFormatError(
            f"{uri}: __metadata__ must be an object of strings, not a JSON {json_type(value)}"
        )
    for k, v in value.items():
        _check_text(uri, k, "__metadata__ key")
        if not isinstance(v, str):
            raise SafetensorsFormatError(
                f"{uri}: __metadata__[{k!r}] must be a string, not a JSON {json_type(v)}"
            )
        _check_text(uri, v, f"__metadata__[{k!r}]")
    return dict(value)


def _parse_entry(uri: str, name: str, value: Any) -> tuple[str, str, tuple[int, ...], int, int]:
    where = f"{uri}: tensor {name!r}"
    if not isinstance(value, dict):
        raise SafetensorsFormatError(
            f"{where}: entry must be an object with dtype, shape and data_offsets, "
            f"not a JSON {json_type(value)}"
        )
    missing = [f for f in _FIELDS if f not in value]
    if missing:
        raise SafetensorsFormatError(f"{where}: missing field(s) {', '.join(missing)}")
    extra = [k for k in value if k not in _FIELDS]
    if extra:
        raise SafetensorsFormatError(
            f"{where}: unexpected field(s) {', '.join(repr(k) for k in extra)}"
        )
    dtype = value["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise SafetensorsFormatError(
            f"{where}: unknown dtype {dtype!r} (known: {', '.join(_DTYPE_ORDER)})"
        )
    shape = value["shape"]
    if not isinstance(shape, list) or not all(_is_size(d) for d in shape):
        raise SafetensorsFormatError(
            f"{where}: shape must be a list of non-negative integers, got {json.dumps(shape)[:200]}"
        )
    offsets = value["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_size, offsets))):
        raise SafetensorsFormatError(
            f"{where}: data_offsets must be two non-negative integers [begin, end], got "
            f"{json.dumps(offsets)[:200]}"
        )
    begin, end = offsets
    if begin > end:
        raise SafetensorsFormatError(f"{where}: data_offsets [{begin}, {end}] end before begin")
    shape_t = tuple(shape)
    nbytes = _nbytes(where, dtype, shape_t)
    if end - begin != nbytes:
        raise SafetensorsFormatError(
            f"{where}: data_offsets [{begin}, {end}] hold {end - begin} bytes but shape "
            f"{list(shape_t)} of {dtype} needs {nbytes}"
        )
    return name, dtype, shape_t, begin, end


def _nbytes(where: str, dtype: str, shape: tuple[int, ...]) -> int:
    # Check as we multiply so a hostile shape cannot build huge integers; once a zero
    # dimension appears the product stays 0, as in the library's checked_mul fold.
    numel = 1
    for d in shape:
        numel *= d
        if numel > MAX_SIZE:
            raise SafetensorsFormatError(
                f"{where}: shape {list(shape)[:16]} overflows (more than 2**63 - 1 elements)"
            )
    bits = numel * DTYPES[dtype][1]
    if bits > MAX_SIZE:
        raise SafetensorsFormatError(
            f"{where}: shape {list(shape)[:16]} of {dtype} overflows (more than 2**63 - 1 bits)"
        )
    if bits % 8:
        raise SafetensorsFormatError(
            f"{where}: shape {list(shape)} of {dtype} is {bits} bits, not a whole number of bytes"
        )
    return bits // 8


def torch_dtype_of(uri: str, info: TensorInfo) -> torch.dtype:
    tdtype = DTYPES[info.dtype][0]
    if tdtype is None:
        raise SafetensorsFormatError(
            f"{uri}: tensor {info.name!r} has dtype {info.dtype}, which torch "
            f"{torch.__version__} cannot represent"
        )
    return tdtype


def torch_shape_of(uri: str, info: TensorInfo) -> tuple[int, ...]:
    if info.dtype != "F4":
        return info.shape
    # torch's float4_e2m1fn_x2 packs two F4 values per element along the last dimension.
    if not info.shape or info.shape[-1] % 2:
        raise SafetensorsFormatError(
            f"{uri}: tensor {info.name!r}: F4 shape {list(info.shape)} cannot be loaded into "
            f"torch.float4_e2m1fn_x2 (the last dimension must be even)"
        )
    return (*info.shape[:-1], info.shape[-1] // 2)
