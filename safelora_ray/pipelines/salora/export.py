"""Export SaLoRA's frozen safety modules ``C_s = I − V_s V_sᵀ`` for training.

One safetensors file, one d_out x d_out tensor per target module, keyed by the module's name
in a PEFT model (``base_model.model.<module>``, e.g.
``base_model.model.model.layers.0.self_attn.q_proj``), so a training loop finds each C_s by
``named_modules()``; :mod:`safelora_ray.pipelines.salora.training` applies them.
Written one module at a time and published atomically (local or ``s3://``).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from safelora_ray.core.errors import AlignmentSetError, ConfigError, SafeLoraError
from safelora_ray.formats.alignment_set import AlignmentSet
from safelora_ray.formats.safetensors import SafetensorsWriter, read_header
from safelora_ray.storage import open_storage
from safelora_ray.storage.guards import Output, check_outputs, probe_outputs

logger = logging.getLogger(__name__)

#: How PEFT prefixes a wrapped model's module names.
PEFT_PREFIX = "base_model.model."
EXPORT_DTYPES = {"float32": ("F32", torch.float32), "bfloat16": ("BF16", torch.bfloat16),
                 "float16": ("F16", torch.float16)}


def export_output(out: str, out_flag: str = "--out") -> Output:
    """The export file as an output (see :func:`~safelora_ray.storage.guards.check_outputs`).

    Raises:
        ConfigError: ``out`` does not name a ``.safetensors`` file.
    """
    if not out.endswith(".safetensors"):
        raise ConfigError(f"{out_flag} {out}: the export is one .safetensors file")
    return Output(out_flag, out, file=True)


def exported_from(out: str) -> str | None:
    """The content id of the set whose C_s the file ``out`` holds (None: not an export)."""
    parent, name = out.rsplit("/", 1) if "/" in out else (".", out)
    try:
        header = read_header(open_storage(parent), name)
    except SafeLoraError:
        return None
    meta = header.metadata or {}
    return meta.get("content_id") if meta.get("safelora_ray") == "salora-cs" else None


def export_cs(alignment: str, out: str, *, dtype: str = "float32",
              prefix: str = PEFT_PREFIX, force: bool = False, out_flag: str = "--out") -> int:
    """Write C_s of every module of a safety-module set to the safetensors file ``out``.

    Args:
        alignment: A SaLoRA safety-module set (``salora-modules`` output).
        out: The ``.safetensors`` file to write (path or ``s3://``), apart from the set; an
            existing file there is replaced only with ``force``, or when it is an earlier
            export of this same set.
        dtype: ``float32`` (default), ``bfloat16`` or ``float16`` (the training dtype).
        prefix: Prepended to each module name (PEFT's ``base_model.model.``).
        force: Replace an existing file at ``out``.
        out_flag: How messages name ``out``.

    Returns:
        The number of modules written.

    Raises:
        AlignmentSetError: not a SaLoRA set.
        ConfigError: bad ``out`` or ``dtype``, ``out`` inside the set or an existing file.
        StorageError: ``out`` is not writable (found before anything is computed).
    """
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    target = export_output(out, out_flag)
    check_outputs([target], [("--alignment", alignment,
                              "the export would be written into the set")])
    aset = AlignmentSet.open(alignment)
    if aset.method_family != "salora":
        raise AlignmentSetError(f"{aset.uri} is a {aset.method_name} alignment set, not SaLoRA "
                                "safety modules: nothing to export")
    probe_outputs([replace(target, replaceable=lambda u: exported_from(u) == aset.content_id)],
                  force=force)
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


__all__ = ["PEFT_PREFIX", "export_cs", "export_output", "exported_from"]
