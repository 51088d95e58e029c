"""Reading safetensors files from a storage: the header with one or two ranged reads, one
tensor with exactly one, or a whole file held in one buffer with its tensors viewed in place.

The reader never loads a whole file unless asked: :func:`read_header` fetches the header with
one ranged read (two when the header is larger than :data:`SPECULATIVE_READ_BYTES`) and
:func:`read_tensor` fetches exactly one tensor's bytes.
"""

from __future__ import annotations

import logging

import torch

from safelora_ray.core.errors import SafetensorsFormatError
from safelora_ray.formats.safetensors.dtypes import require_little_endian
from safelora_ray.formats.safetensors.header import (
    _N_LEN,
    MAX_HEADER_BYTES,
    SafetensorsHeader,
    TensorInfo,
    parse_header,
    torch_dtype_of,
    torch_shape_of,
)
from safelora_ray.storage.base import Storage

logger = logging.getLogger(__name__)

#: Bytes fetched by the first read of :func:`read_header`; most headers fit (a 7B model's
#: shard header is ~30 KiB), so one round trip to object storage usually suffices.
SPECULATIVE_READ_BYTES = 64 * 1024


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
    _check_file_size(uri, file_size)
    first = storage.read_range(path, 0, min(file_size, SPECULATIVE_READ_BYTES))
    _check_read(uri, 0, min(file_size, SPECULATIVE_READ_BYTES), first)
    n = _header_length(uri, first, file_size, max_header_bytes)
    if _N_LEN + n <= len(first):
        raw = bytes(first[_N_LEN : _N_LEN + n])
    else:
        rest_len = _N_LEN + n - len(first)
        rest = storage.read_range(path, len(first), rest_len)
        _check_read(uri, len(first), rest_len, rest)
        raw = bytes(first[_N_LEN:]) + bytes(rest)
    return parse_header(raw, file_size=file_size, path=path, uri=uri)


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


def parse_buffer_header(buf: bytearray | memoryview, path: str, uri: str) -> SafetensorsHeader:
    """Validate the header of the safetensors file held whole in ``buf``.

    Args:
        buf: The file's bytes.
        path: The file's path in its storage (stored in the result).
        uri: Name of the file used in messages.

    Raises:
        SafetensorsFormatError: The file is not a valid safetensors file.
    """
    size = len(buf)
    _check_file_size(uri, size)
    n = _header_length(uri, buf, size, MAX_HEADER_BYTES)
    return parse_header(bytes(buf[_N_LEN : _N_LEN + n]), file_size=size, path=path, uri=uri)


def buffer_tensor(buf: bytearray | memoryview, uri: str, info: TensorInfo) -> torch.Tensor:
    """Tensor ``info`` of the file held whole in ``buf``, as a view into ``buf`` (no copy)."""
    dtype = torch_dtype_of(uri, info)
    shape = torch_shape_of(uri, info)
    if info.nbytes == 0:
        return torch.empty(shape, dtype=dtype)  # frombuffer rejects empty ranges
    t = torch.frombuffer(buf, dtype=dtype, count=info.nbytes // dtype.itemsize,
                         offset=info.start)
    return t.reshape(shape)


def _check_file_size(uri: str, file_size: int) -> None:
    if file_size < _N_LEN:
        raise SafetensorsFormatError(
            f"{uri}: file is {file_size} bytes, too short to hold the 8-byte header length"
        )


def _header_length(uri: str, first: bytes | bytearray, file_size: int,
                   max_header_bytes: int) -> int:
    """The header length ``N`` from the file's first bytes, bounds-checked."""
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
    return n


def _check_read(uri: str, start: int, length: int, data: bytes) -> None:
    if len(data) != length:
        raise SafetensorsFormatError(
            f"{uri}: short read at offset {start}: got {len(data)} of {length} bytes"
        )
