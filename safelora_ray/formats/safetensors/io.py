"""Streaming, strictly validating safetensors reader and writer.

The reader never loads a whole file: :func:`read_header` fetches the header with one ranged
read (two when the header is larger than :data:`SPECULATIVE_READ_BYTES`) and
:func:`read_tensor` fetches exactly one tensor's bytes. Headers are validated at least as
strictly as the reference implementation (the ``safetensors`` Rust crate): anything it
rejects is rejected here, with a message naming the file and the tensor. A few things it
tolerates are rejected here too (duplicate JSON keys, unknown fields, non-object tensor
entries, sizes beyond ``2**63 - 1``).

The writer (:class:`SafetensorsWriter`) computes the header up front from a layout, so tensors
can be produced and written one at a time without holding them all in memory; its output is
byte-compatible with what the library writes (compact JSON, space-padded so that the data
section starts 8-byte aligned).

File layout::

    [8 bytes: N, little-endian u64][N bytes: JSON header][data section]

and each header entry's ``data_offsets`` are relative to the start of the data section.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import operator
import os
import sys
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, BinaryIO

import torch

from safelora_ray.core.errors import CheckpointError, SafeLoraError, SafetensorsFormatError
from safelora_ray.formats.integrity import FileHasher
from safelora_ray.storage.base import Storage

logger = logging.getLogger(__name__)

#: The library's cap on the JSON header length (``MAX_HEADER_SIZE`` in the Rust crate).
MAX_HEADER_BYTES = 100_000_000

#: Bytes fetched by the first read of :func:`read_header`; most headers fit (a 7B model's
#: shard header is ~30 KiB), so one round trip to object storage usually suffices.
SPECULATIVE_READ_BYTES = 64 * 1024

#: Largest element count, bit count or offset accepted: sizes must fit torch's int64.
MAX_SIZE = 2**63 - 1

_N_LEN = 8  # the u64 header length prefix
_METADATA_KEY = "__metadata__"
_FIELDS = ("dtype", "shape", "data_offsets")

#: The library's ``Dtype`` variants in declaration order. The order matters: its serializer
#: lays tensors out by descending variant, then by name (see :func:`library_layout`).
_DTYPE_ORDER = (
    "BOOL",
    "F4",
    "F6_E2M3",
    "F6_E3M2",
    "U8",
    "I8",
    "F8_E5M2",
    "F8_E4M3",
    "F8_E8M0",
    "F8_E4M3FNUZ",
    "F8_E5M2FNUZ",
    "I16",
    "U16",
    "F16",
    "BF16",
    "I32",
    "U32",
    "F32",
    "C64",
    "F64",
    "I64",
    "U64",
)

# (torch attribute name or None, bits per element). Looked up with getattr because newer
# types (uint16-64: torch 2.3, float8_e8m0fnu / float4_e2m1fn_x2: later) may be missing.
_DTYPE_SPEC: dict[str, tuple[str | None, int]] = {
    "BOOL": ("bool", 8),
    "F4": ("float4_e2m1fn_x2", 4),  # torch packs two values per element (see _torch_shape)
    "F6_E2M3": (None, 6),
    "F6_E3M2": (None, 6),
    "U8": ("uint8", 8),
    "I8": ("int8", 8),
    "F8_E5M2": ("float8_e5m2", 8),
    "F8_E4M3": ("float8_e4m3fn", 8),
    "F8_E8M0": ("float8_e8m0fnu", 8),
    "F8_E4M3FNUZ": ("float8_e4m3fnuz", 8),
    "F8_E5M2FNUZ": ("float8_e5m2fnuz", 8),
    "I16": ("int16", 16),
    "U16": ("uint16", 16),
    "F16": ("float16", 16),
    "BF16": ("bfloat16", 16),
    "I32": ("int32", 32),
    "U32": ("uint32", 32),
    "F32": ("float32", 32),
    "C64": ("complex64", 64),
    "F64": ("float64", 64),
    "I64": ("int64", 64),
    "U64": ("uint64", 64),
}

#: safetensors dtype string -> (torch dtype, or None where this torch has none; bits/element).
DTYPES: dict[str, tuple[torch.dtype | None, int]] = {
    name: (getattr(torch, attr, None) if attr else None, bits)
    for name, (attr, bits) in _DTYPE_SPEC.items()
}

#: torch dtype -> safetensors dtype string (inverse of :data:`DTYPES`).
TORCH_TO_DTYPE: dict[torch.dtype, str] = {
    tdt: name for name, (tdt, _bits) in DTYPES.items() if tdt is not None
}


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


# -- reading ---------------------------------------------------------------------------------


def read_header(
    storage: Storage,
    path: str,
    *,
    max_header_bytes: int = MAX_HEADER_BYTES,
    file_size: int | None = None,
) -> SafetensorsHeader:
    """Read and validate the header of the safetensors file at ``path``.

    Args:
        storage: Where the file lives.
        path: The file's path relative to ``storage``.
        max_header_bytes: Largest accepted JSON header length (the library's cap by default).
        file_size: The file's size when already known (saves a ``size`` request).

    Returns:
        The validated header.

    Raises:
        SafetensorsFormatError: The file is not a valid safetensors file.
    """
    uri = storage.describe(path)
    if file_size is None:
        file_size = storage.size(path)
    if file_size < _N_LEN:
        raise SafetensorsFormatError(
            f"{uri}: file is {file_size} bytes, too short to hold the 8-byte header length"
        )
    first = storage.read_range(path, 0, min(file_size, SPECULATIVE_READ_BYTES))
    _check_read(uri, 0, min(file_size, SPECULATIVE_READ_BYTES), first)
    n = int.from_bytes(first[:_N_LEN], "little")
    # Bounds are checked before anything is allocated, so a hostile length costs nothing.
    if n == 0:
        raise SafetensorsFormatError(f"{uri}: header length is 0 (the header must be JSON)")
    if n > max_header_bytes:
        raise SafetensorsFormatError(
            f"{uri}: header length {n} exceeds the limit of {max_header_bytes} bytes"
        )
    if _N_LEN + n > file_size:
        raise SafetensorsFormatError(
            f"{uri}: header length {n} runs past the end of the file ({file_size} bytes)"
        )
    if _N_LEN + n <= len(first):
        raw = bytes(first[_N_LEN : _N_LEN + n])
    else:
        rest_len = _N_LEN + n - len(first)
        rest = storage.read_range(path, len(first), rest_len)
        _check_read(uri, len(first), rest_len, rest)
        raw = bytes(first[_N_LEN:]) + bytes(rest)
    return parse_header(raw, file_size=file_size, path=path, uri=uri)


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
        path=path,
        uri=uri,
        file_size=file_size,
        header_len=n,
        data_start=data_start,
        tensors=tensors,
        metadata=metadata,
    )


def read_tensor_bytes(storage: Storage, header: SafetensorsHeader, name: str) -> bytearray:
    """The raw (little-endian) bytes of tensor ``name``, read with one ranged read.

    Args:
        storage: The storage ``header`` was read from.
        header: The file's header.
        name: The tensor's name.

    Returns:
        A new buffer of exactly the tensor's size.
    """
    info = header.tensor(name)
    buf = bytearray(info.nbytes)
    if info.nbytes:
        storage.read_into(header.path, info.start, memoryview(buf))
    return buf


def read_tensor(
    storage: Storage,
    header: SafetensorsHeader,
    name: str,
    *,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Read tensor ``name`` (and nothing else) from the file described by ``header``.

    Args:
        storage: The storage ``header`` was read from.
        header: The file's header.
        name: The tensor's name.
        device: Device to place the result on.

    Returns:
        The tensor, owning its memory (a fresh buffer, not a view of a shared one).

    Raises:
        SafetensorsFormatError: Torch has no dtype for the tensor's dtype.
    """
    require_little_endian()
    info = header.tensor(name)
    tdtype = torch_dtype_of(header.uri, info)
    shape = torch_shape_of(header.uri, info)
    buf = read_tensor_bytes(storage, header, name)
    if not buf:
        tensor = torch.empty(shape, dtype=tdtype)  # frombuffer rejects empty buffers
    else:
        tensor = torch.frombuffer(buf, dtype=tdtype).reshape(shape)
    if torch.device(device).type != "cpu":
        tensor = tensor.to(device)
    return tensor


def require_little_endian() -> None:
    """Raise unless the host is little-endian (safetensors data is little-endian).

    Raises:
        SafeLoraError: The host is big-endian.
    """
    if sys.byteorder != "little":
        raise SafeLoraError(
            f"safelora_ray reads and writes safetensors data as raw little-endian bytes and "
            f"does not support this {sys.byteorder}-endian host"
        )


# -- writing ---------------------------------------------------------------------------------


Layout = list[tuple[str, str, tuple[int, ...]]]


class SafetensorsWriter:
    """Write a safetensors file one tensor at a time, with the header computed up front.

    Tensors must be written in layout order. The file is written to a temporary name in
    the same directory and renamed into place by :meth:`close`, so ``local_path`` never holds
    a partial file; on error (or :meth:`abort`) the temporary file is removed.

    Example::

        with SafetensorsWriter(path, [("a", "F32", (2, 2))], {"format": "pt"}) as w:
            w.write("a", torch.zeros(2, 2))

    Attributes:
        local_path: Final path of the file.
        tensors: The planned tensor entries, in layout order.
        file_size: Size of the finished file.
    """

    def __init__(
        self,
        local_path: str | os.PathLike[str],
        layout: Iterable[tuple[str, str, Iterable[int]]],
        metadata: Mapping[str, str] | None = None,
        hasher: FileHasher | None = None,
    ) -> None:
        """Plan the file and write its header.

        Args:
            local_path: Where the finished file goes.
            layout: ``(name, dtype string, shape)`` per tensor, in the order of writing.
            metadata: The ``__metadata__`` string map, if any.
            hasher: Digests every byte written (the file's SHA-256, each tensor's digest).

        Raises:
            SafetensorsFormatError: The layout or metadata is invalid.
        """
        require_little_endian()
        self.local_path = os.fspath(local_path)
        header_bytes, self.tensors = _plan(self.local_path, layout, metadata)
        self.file_size = _N_LEN + len(header_bytes) + sum(t.nbytes for t in self.tensors.values())
        self._order = list(self.tensors)
        self._next = 0
        self._closed = False
        directory = os.path.dirname(os.path.abspath(self.local_path))
        base = os.path.basename(self.local_path)
        # ".tmp-" is the prefix LocalStorage hides from listings, should this be inside one.
        self._tmp_path = os.path.join(directory, f".tmp-{uuid.uuid4().hex[:12]}-{base}")
        self._file: BinaryIO | None = open(self._tmp_path, "wb")  # noqa: SIM115
        self.hasher = hasher
        try:
            for part in (len(header_bytes).to_bytes(_N_LEN, "little"), header_bytes):
                self._file.write(part)
                if hasher is not None:
                    hasher.update(part)
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append tensor ``name``, which must be the next one in the layout.

        Args:
            name: The tensor's name.
            tensor: The tensor, of the planned dtype and shape (any device; copied to CPU).

        Raises:
            SafetensorsFormatError: Out of order, wrong dtype or shape, or writer closed.
        """
        if self._file is None:
            raise SafetensorsFormatError(f"{self.local_path}: writer is closed")
        if self._next >= len(self._order):
            raise SafetensorsFormatError(
                f"{self.local_path}: tensor {name!r} written after all "
                f"{len(self._order)} planned tensors"
            )
        expected = self._order[self._next]
        if name != expected:
            raise SafetensorsFormatError(
                f"{self.local_path}: expected tensor {expected!r} next (layout order), got {name!r}"
            )
        info = self.tensors[name]
        _check_matches(self.local_path, info, tensor)
        try:
            _write_tensor(self._file, tensor, info.nbytes, self.hasher, name)
        except BaseException:
            self.abort()
            raise
        self._next += 1

    def close(self) -> None:
        """Finish the file and move it into place.

        Raises:
            SafetensorsFormatError: Not every planned tensor was written (the partial file
                is removed).
        """
        if self._closed:
            return
        if self._next != len(self._order):
            missing = self._order[self._next :]
            self.abort()
            shown = ", ".join(repr(m) for m in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise SafetensorsFormatError(
                f"{self.local_path}: closed after {self._next} of {len(self._order)} "
                f"tensors; never written: {shown}{more}"
            )
        assert self._file is not None
        try:
            self._file.close()
            size = os.path.getsize(self._tmp_path)
            if size != self.file_size:  # would mean a bug in _write_tensor
                raise SafetensorsFormatError(
                    f"{self.local_path}: wrote {size} bytes, planned {self.file_size}"
                )
            os.replace(self._tmp_path, self.local_path)
        except BaseException:
            self.abort()
            raise
        self._file = None
        self._closed = True
        logger.debug("wrote %s (%d tensors, %d bytes)", self.local_path, len(self._order), size)

    def abort(self) -> None:
        """Stop writing and remove the partial file (idempotent)."""
        self._closed = True
        if self._file is not None:
            try:
                self._file.close()
            finally:
                self._file = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp_path)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def library_layout(tensors: Mapping[str, torch.Tensor]) -> Layout:
    """The layout the safetensors library would choose for ``tensors``.

    The library orders tensors by descending dtype (its enum order, which roughly means
    widest first, keeping data aligned) and then by name.

    Args:
        tensors: Tensors by name.

    Returns:
        ``(name, dtype string, shape)`` triples in the library's order.
    """
    layout = [(name, *_dtype_and_shape(name, t)) for name, t in tensors.items()]
    rank = {d: i for i, d in enumerate(_DTYPE_ORDER)}
    layout.sort(key=lambda e: (-rank[e[1]], e[0]))
    return layout


def save_tensors(
    local_path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` to ``local_path`` in the library's layout.

    Unlike ``safetensors.torch.save_file`` this accepts tensors sharing storage and tensors
    on any device.

    Args:
        local_path: Destination file.
        tensors: Tensors by name.
        metadata: The ``__metadata__`` string map, if any.
    """
    with SafetensorsWriter(local_path, library_layout(tensors), metadata) as writer:
        for name in writer.tensors:
            writer.write(name, tensors[name])


def serialize(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> bytes:
    """The bytes of a safetensors file holding ``tensors``.

    The result equals ``safetensors.torch.save(tensors, metadata)`` byte for byte, except
    possibly for the order of ``__metadata__`` keys, which the library takes from a hash map
    (here: insertion order).

    Args:
        tensors: Tensors by name.
        metadata: The ``__metadata__`` string map, if any.

    Returns:
        The file's bytes.
    """
    require_little_endian()
    header_bytes, infos = _plan("<bytes>", library_layout(tensors), metadata)
    parts = [len(header_bytes).to_bytes(_N_LEN, "little"), header_bytes]
    for name, info in infos.items():
        _check_matches("<bytes>", info, tensors[name])
        parts.append(bytes(_tensor_view(tensors[name], info.nbytes)[0]))
    return b"".join(parts)


# -- internals -------------------------------------------------------------------------------


class _DuplicateKeyError(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # object_pairs_hook sees every object, nested ones too; dict() would keep the last value.
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKeyError(k)
        out[k] = v
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


def _check_read(uri: str, start: int, length: int, data: bytes) -> None:
    if len(data) != length:
        raise SafetensorsFormatError(
            f"{uri}: short read at offset {start}: got {len(data)} of {length} bytes"
        )


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


def _dtype_and_shape(name: str, tensor: torch.Tensor) -> tuple[str, tuple[int, ...]]:
    try:
        dtype = TORCH_TO_DTYPE[tensor.dtype]
    except KeyError:
        raise SafetensorsFormatError(
            f"tensor {name!r}: torch dtype {tensor.dtype} has no safetensors equivalent"
        ) from None
    shape = tuple(tensor.shape)
    if dtype == "F4":  # the file counts 4-bit values; torch counts packed pairs
        shape = (*shape[:-1], shape[-1] * 2) if shape else (2,)
    return dtype, shape


def _check_matches(where: str, info: TensorInfo, tensor: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise SafetensorsFormatError(
            f"{where}: tensor {info.name!r} must be a torch.Tensor, got {type(tensor).__name__}"
        )
    dtype, shape = _dtype_and_shape(info.name, tensor)
    if dtype != info.dtype or shape != info.shape:
        raise SafetensorsFormatError(
            f"{where}: tensor {info.name!r} is {dtype} {list(shape)} but the layout says "
            f"{info.dtype} {list(info.shape)}"
        )


def _plan(
    where: str,
    layout: Iterable[tuple[str, str, Iterable[int]]],
    metadata: Mapping[str, str] | None,
) -> tuple[bytes, dict[str, TensorInfo]]:
    """The padded header bytes and the tensor entries for ``layout`` (offsets in order)."""
    header: dict[str, Any] = {}
    if metadata is not None:
        meta = dict(metadata)
        for k, v in meta.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise SafetensorsFormatError(
                    f"{where}: metadata must map strings to strings, got {k!r}: {v!r}"
                )
        header[_METADATA_KEY] = meta
    planned: list[tuple[str, str, tuple[int, ...], int, int]] = []
    offset = 0
    for entry in layout:
        name, dtype, shape_in = entry
        try:  # accept any integer type (numpy ints, torch.Size) but store plain ints
            shape = tuple(operator.index(d) for d in shape_in)
        except TypeError:
            raise SafetensorsFormatError(
                f"{where}: tensor {name!r}: invalid shape {shape_in!r}"
            ) from None
        if not isinstance(name, str) or name == _METADATA_KEY or name in header:
            raise SafetensorsFormatError(f"{where}: invalid or duplicate tensor name {name!r}")
        if dtype not in DTYPES:
            raise SafetensorsFormatError(f"{where}: tensor {name!r}: unknown dtype {dtype!r}")
        if not all(_is_size(d) for d in shape):
            raise SafetensorsFormatError(f"{where}: tensor {name!r}: invalid shape {shape!r}")
        nbytes = _nbytes(f"{where}: tensor {name!r}", dtype, shape)
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        planned.append((name, dtype, shape, offset, offset + nbytes))
        offset += nbytes
    # serde_json's compact output: no spaces, non-ASCII as raw UTF-8, the same escapes.
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":"))
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:
        raise SafetensorsFormatError(
            f"{where}: a tensor name or metadata string contains a lone surrogate"
        ) from None
    raw += b" " * (-len(raw) % _N_LEN)  # as the library: data starts 8-byte aligned
    data_start = _N_LEN + len(raw)
    infos = {
        name: TensorInfo(name, dtype, shape, data_start + b, data_start + e)
        for name, dtype, shape, b, e in planned
    }
    return raw, infos


def _tensor_view(tensor: torch.Tensor, nbytes: int) -> tuple[memoryview, torch.Tensor]:
    """A zero-copy byte view of ``tensor``'s data on CPU, with the tensor keeping it alive."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.resolve_conj().resolve_neg().contiguous()
    if t.numel() * t.element_size() != nbytes:
        raise SafetensorsFormatError(
            f"tensor holds {t.numel() * t.element_size()} bytes, expected {nbytes}"
        )
    if nbytes == 0:
        return memoryview(b""), t
    # ctypes over data_ptr avoids both a numpy dependency and a copy of large tensors.
    buf = (ctypes.c_ubyte * nbytes).from_address(t.data_ptr())
    return memoryview(buf).cast("B"), t


def _write_tensor(f: BinaryIO, tensor: torch.Tensor, nbytes: int,
                  hasher: FileHasher | None = None, name: str | None = None) -> None:
    view, keep_alive = _tensor_view(tensor, nbytes)
    if hasher is not None:  # the bytes written, hashed while at hand (no second read)
        hasher.update(view, tensor=name)
    written = f.write(view)
    if written is not None and written != nbytes:
        raise OSError(f"short write: {written} of {nbytes} bytes")
    del view, keep_alive
