"""Writing safetensors files: a streaming writer whose header is planned up front, and the
whole-mapping helpers built on it.

:class:`SafetensorsWriter` computes the header from a layout, so tensors can be produced and
written one at a time without holding them all in memory; its output is byte-compatible with
what the library writes (compact JSON, space-padded so that the data section starts 8-byte
aligned).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import operator
import os
import uuid
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any, BinaryIO

import torch

from safelora_ray.core.errors import SafetensorsFormatError
from safelora_ray.formats.integrity import FileHasher
from safelora_ray.formats.safetensors.dtypes import (
    _DTYPE_ORDER,
    DTYPES,
    _dtype_and_shape,
    require_little_endian,
)
from safelora_ray.formats.safetensors.header import (
    _METADATA_KEY,
    _N_LEN,
    TensorInfo,
    _is_size,
    _nbytes,
)

logger = logging.getLogger(__name__)


Layout = list[tuple[str, str, tuple[int, ...]]]

#: Bytes of a run hashed then written at a time (:meth:`SafetensorsWriter.write_run`): small
#: enough to stay in the CPU's cache between the two.
_RUN_PIECE = 256 * 1024


class SafetensorsWriter:
    """Write a safetensors file one tensor at a time, with the header computed up front.

    Tensors must be written in layout order. The file is written to a temporary name in
    the same directory and renamed into place by :meth:`close`, so ``local_path`` never holds
    a partial file; on error (or :meth:`abort`) the temporary file is removed. With
    ``in_memory`` no file is made: :attr:`data` holds the finished bytes (for an upload).

    Example::

        with SafetensorsWriter(path, [("a", "F32", (2, 2))], {"format": "pt"}) as w:
            w.write("a", torch.zeros(2, 2))

    Attributes:
        local_path: Final path of the file.
        tensors: The planned tensor entries, in layout order.
        file_size: Size of the finished file.
        data: The finished file's bytes (one buffer of its planned size: no copy), once
            closed, when written ``in_memory``.
    """

    def __init__(
        self,
        local_path: str | os.PathLike[str],
        layout: Iterable[tuple[str, str, Iterable[int]]],
        metadata: Mapping[str, str] | None = None,
        hasher: FileHasher | None = None,
        *,
        in_memory: bool = False,
    ) -> None:
        """Plan the file and write its header.

        Args:
            local_path: Where the finished file goes.
            layout: ``(name, dtype string, shape)`` per tensor, in the order of writing.
            metadata: The ``__metadata__`` string map, if any.
            hasher: Digests every byte written (the file's SHA-256, each tensor's digest).
            in_memory: Write into memory (:attr:`data`); ``local_path`` only names it.

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
        self.data: bytearray | None = None
        self._tmp_path: str | None = None
        self._file: BinaryIO | _Filled | None
        if in_memory:
            self._file = _Filled(self.file_size)
        else:
            directory = os.path.dirname(os.path.abspath(self.local_path))
            base = os.path.basename(self.local_path)
            # ".tmp-": the prefix LocalStorage hides from listings, should this be inside one.
            self._tmp_path = os.path.join(directory, f".tmp-{uuid.uuid4().hex[:12]}-{base}")
            self._file = open(self._tmp_path, "wb")  # noqa: SIM115
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

    def write_run(self, count: int, data: memoryview) -> None:
        """Append the next ``count`` planned tensors from ``data``, their bytes back to back
        in layout order (a run of another file's data section: one write and one hash for
        them all instead of one per tensor, each of which would release the GIL).

        Raises:
            SafetensorsFormatError: Fewer than ``count`` tensors left, ``data`` not their
                size, or writer closed.
        """
        if self._file is None:
            raise SafetensorsFormatError(f"{self.local_path}: writer is closed")
        names = self._order[self._next:self._next + count]
        if count < 1 or len(names) != count:
            raise SafetensorsFormatError(
                f"{self.local_path}: a run of {count} tensors asked for, "
                f"{len(self._order) - self._next} left to write"
            )
        view = memoryview(data).cast("B")
        start = self.tensors[names[0]].start
        if view.nbytes != self.tensors[names[-1]].end - start:
            raise SafetensorsFormatError(
                f"{self.local_path}: a run of {count} tensors from {names[0]!r} holds "
                f"{self.tensors[names[-1]].end - start} bytes, got {view.nbytes}"
            )
        try:
            if self.hasher is not None and getattr(self.hasher, "per_tensor", True):
                for n in names:  # each tensor's digest is taken too
                    i = self.tensors[n]
                    _put(self._file, view[i.start - start:i.end - start], self.hasher, n)
            else:
                # Hashed and written a piece at a time: the second pass over each piece
                # finds it in the CPU's cache (8 MB twice from memory costs more).
                for off in range(0, view.nbytes, _RUN_PIECE):
                    _put(self._file, view[off:off + _RUN_PIECE], self.hasher)
        except BaseException:
            self.abort()
            raise
        self._next += count

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
            f = self._file
            f.close()
            size = f.pos if isinstance(f, _Filled) else os.path.getsize(str(self._tmp_path))
            if size != self.file_size:  # would mean a bug in _write_tensor
                raise SafetensorsFormatError(
                    f"{self.local_path}: wrote {size} bytes, planned {self.file_size}"
                )
            if isinstance(f, _Filled):
                self.data = f.buf
            else:
                os.replace(str(self._tmp_path), self.local_path)
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
        if self._tmp_path is not None:
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


class _Filled:
    """The in-memory "file": a buffer of the planned size, filled in order (a BytesIO would
    grow by reallocating, copying what it holds each time)."""

    def __init__(self, size: int) -> None:
        self.buf = bytearray(size)
        self.pos = 0

    def write(self, data: bytes | memoryview) -> int:
        n = memoryview(data).nbytes
        if self.pos + n > len(self.buf):  # would mean a bug in the plan
            raise OSError(f"write past the planned {len(self.buf)} bytes")
        self.buf[self.pos:self.pos + n] = data
        self.pos += n
        return n

    def close(self) -> None:
        pass


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


def file_prefix(layout: Iterable[tuple[str, str, Iterable[int]]],
                metadata: Mapping[str, str] | None = None) -> bytes:
    """The first bytes of the file :class:`SafetensorsWriter` writes for ``layout`` and
    ``metadata``: the header's length and the header, up to the first tensor's data."""
    header_bytes, _ = _plan("<layout>", layout, metadata)
    return len(header_bytes).to_bytes(_N_LEN, "little") + header_bytes


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
    layout = list(layout)
    key = _plan_key(layout, metadata)
    if key is None:
        return _make_plan(where, layout, metadata)
    try:
        header_bytes, infos = _planned(key)
    except SafetensorsFormatError:
        _make_plan(where, layout, metadata)  # the same check again, naming this file
        raise
    return header_bytes, dict(infos)


@functools.lru_cache(maxsize=16)
def _planned(key: Any) -> tuple[bytes, dict[str, TensorInfo]]:
    """:func:`_make_plan` of a :func:`_plan_key`, kept for the layouts seen lately (an invalid
    one raises and is not kept): a fleet's outputs share a few layouts, and planning 128
    entries costs ~1 ms of Python per adapter."""
    entries, meta = key
    return _make_plan("<layout>", entries, None if meta is None else dict(meta))


def _plan_key(layout: list[tuple[str, str, Iterable[int]]],
              metadata: Mapping[str, str] | None) -> Any:
    """A hashable key equal only for equal plain layouts (strings and ints); else None."""
    entries = []
    for name, dtype, shape_in in layout:
        shape = tuple(shape_in)
        if type(name) is not str or type(dtype) is not str or not all(
                type(d) is int for d in shape):
            return None
        entries.append((name, dtype, shape))
    key = (tuple(entries), None if metadata is None else tuple(metadata.items()))
    try:
        hash(key)
    except TypeError:  # an unhashable metadata value: refused by the plan itself
        return None
    return key


def _make_plan(
    where: str,
    layout: Iterable[tuple[str, str, Iterable[int]]],
    metadata: Mapping[str, str] | None,
) -> tuple[bytes, dict[str, TensorInfo]]:
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


def _write_tensor(f: BinaryIO | _Filled, tensor: torch.Tensor, nbytes: int,
                  hasher: FileHasher | None = None, name: str | None = None) -> None:
    view, keep_alive = _tensor_view(tensor, nbytes)
    _put(f, view, hasher, name)
    del view, keep_alive


def _put(f: BinaryIO | _Filled, view: memoryview, hasher: FileHasher | None,
         name: str | None = None) -> None:
    """Write ``view`` to ``f``, hashed while at hand (no second read) when there is a hasher
    (``name``: the tensor it holds, for a hasher taking each tensor's digest)."""
    if hasher is not None:
        hasher.update(view, tensor=name)
    written = f.write(view)
    if written is not None and written != view.nbytes:
        raise OSError(f"short write: {written} of {view.nbytes} bytes")
