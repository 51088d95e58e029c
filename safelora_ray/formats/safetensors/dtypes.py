"""The safetensors dtypes and their torch equivalents, and the host byte order they need.

The safetensors library's ``Dtype`` enum is mirrored here (names, bits per element, and the
declaration order its serializer lays tensors out by).
"""

from __future__ import annotations

import logging
import sys

import torch

from safelora_ray.core.errors import SafeLoraError, SafetensorsFormatError

logger = logging.getLogger(__name__)

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
