"""Export SaLoRA's frozen safety modules ``C_s = I − V_s V_sᵀ`` for training.

One safetensors file, one d_out x d_out tensor per target module, keyed by the module's name
in a PEFT model (``base_model.model.<module>``, e.g.
``base_model.model.model.layers.0.self_attn.q_proj``), so a training loop finds each C_s by
``named_modules()``; :mod:`safelora_ray.salora.training` applies them. Written one module at
a time and published atomically (local or ``s3://``).
"""

from __future__ import annotations

import logging

import torch

from safelora_ray.errors import AlignmentSetError, ConfigError
from safelora_ray.formats.alignment_set import AlignmentSet
from safelora_ray.formats.safetensors_io import SafetensorsWriter
from safelora_ray.storage import open_storage

logger = logging.getLogger(__name__)

#: How PEFT prefixes a wrapped model's module names.
PEFT_PREFIX = "base_model.model."
EXPORT_DTYPES = {"float32": ("F32", torch.float32), "bfloat16": ("BF16", torch.bfloat16),
                 "float16": ("F16", torch.float16)}


def export_cs(alignment: str, out: str, *, dtype: str = "float32",
              prefix: str = PEFT_PREFIX) -> int:
    """Write C_s of every module of a safety-module set to the safetensors file ``out``.

    Args:
        alignment: A SaLoRA safety-module set (``salora-modules`` output).
        out: The ``.safetensors`` file to write (path or ``s3://``).
        dtype: ``float32`` (default), ``bfloat16`` or ``float16`` (the training dtype).
        prefix: Prepended to each module name (PEFT's ``base_model.model.``).

    Returns:
        The number of modules written.

    Raises:
        AlignmentSetError: not a SaLoRA set.
        ConfigError: bad ``out`` or ``dtype``.
    """
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    if not out.endswith(".safetensors"):
        raise ConfigError(f"{out}: the export is one .safetensors file")
    aset = AlignmentSet.open(alignment)
    if aset.method_family != "salora":
        raise AlignmentSetError(f"{aset.uri} is a {aset.method_name} alignment set, not SaLoRA "
                                "safety modules: nothing to export")
    st_dtype, torch_dtype = EXPORT_DTYPES[dtype]
    rows = sorted(aset.rows.values(), key=lambda r: (r.layer if r.layer is not None else -1,
                                                    r.module))
    layout = [(prefix + r.module, st_dtype, (r.shape[0], r.shape[0])) for r in rows]
    metadata = {"format": "pt", "safelora_ray": "salora-cs", "content_id": aset.content_id,
                "safety_rank": str(aset.metadata.get("method", {}).get("safety_rank"))}
    parent, name = out.rsplit("/", 1) if "/" in out else (".", out)
    storage = open_storage(parent)
    with storage.writing_file(name) as tmp, SafetensorsWriter(tmp, layout, metadata) as writer:
        for r in rows:
            cs = aset.load(r.module).dense()  # I − V_s V_sᵀ, float32
            writer.write(prefix + r.module, cs.to(torch_dtype))
    logger.info("wrote C_s of %d modules to %s", len(rows), storage.describe(name))
    return len(rows)


__all__ = ["PEFT_PREFIX", "export_cs"]
