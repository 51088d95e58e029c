"""safetensors: the public names of this package.

``dtypes`` (the dtype table), ``header`` (parsing and validation), ``read`` (ranged and
whole-buffer reads) and ``write`` (the streaming writer) hold the code; import from here.
"""

from safelora_ray.formats.safetensors.dtypes import (
    _DTYPE_ORDER,
    DTYPES,
    TORCH_TO_DTYPE,
    _dtype_and_shape,
    require_little_endian,
)
from safelora_ray.formats.safetensors.header import (
    MAX_HEADER_BYTES,
    SafetensorsHeader,
    TensorInfo,
    json_type,
    parse_header,
    torch_dtype_of,
    torch_shape_of,
)
from safelora_ray.formats.safetensors.read import (
    SPECULATIVE_READ_BYTES,
    buffer_tensor,
    parse_buffer_header,
    read_header,
    read_tensor,
    read_tensor_bytes,
)
from safelora_ray.formats.safetensors.write import (
    Layout,
    SafetensorsWriter,
    file_prefix,
    library_layout,
    save_tensors,
    serialize,
)

__all__ = [
    "DTYPES",
    "MAX_HEADER_BYTES",
    "SPECULATIVE_READ_BYTES",
    "TORCH_TO_DTYPE",
    "_DTYPE_ORDER",
    "Layout",
    "SafetensorsHeader",
    "SafetensorsWriter",
    "TensorInfo",
    "_dtype_and_shape",
    "buffer_tensor",
    "file_prefix",
    "json_type",
    "library_layout",
    "parse_buffer_header",
    "parse_header",
    "read_header",
    "read_tensor",
    "read_tensor_bytes",
    "require_little_endian",
    "save_tensors",
    "serialize",
    "torch_dtype_of",
    "torch_shape_of",
]
