"""The safety-module set's files: the shards of V_s in layer order and their manifest rows
(the alignment-set format, form ``N``; ``alignment.json`` is published by the driver)."""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

from safelora_ray.formats.alignment_set import FORMAT, ManifestRow
from safelora_ray.formats.integrity import FileHasher
from safelora_ray.formats.safetensors import SafetensorsWriter
from safelora_ray.pipelines.salora.calibration import CalibrationFile, TokenizedSamples
from safelora_ray.pipelines.salora.config import SaloraConfig
from safelora_ray.pipelines.salora.plan import PlannedModule
from safelora_ray.storage import Storage

logger = logging.getLogger(__name__)


def row_digest(calibration_sha: str, digests: dict[int, str], layer: int) -> str:
    """What a module's V_s depends on: the calibration bytes and every weight the forward read
    up to its layer (the prelude's, then layers 0..layer)."""
    h = hashlib.sha256(f"salora|{calibration_sha}".encode())
    for i in range(-1, layer + 1):
        h.update(f"|{digests[i]}".encode())
    return f"sha256-chain:{h.hexdigest()}"



def write_set(out: Storage, plan: Sequence[PlannedModule], results: dict[str, dict[str, Any]],
               digests: dict[int, str], cal: CalibrationFile, samples: TokenizedSamples,
               config: SaloraConfig) -> tuple[list[ManifestRow], dict[str, dict[str, Any]]]:
    """Write the shards (layer order, files of at most ``max_file_bytes``); the rows and each
    shard's digest and size."""
    files: list[list[PlannedModule]] = [[]]
    size = 0
    for m in plan:
        n = 4 * results[m.module]["shape"][0] * config.safety_rank
        if files[-1] and size + n > config.max_file_bytes:
            files.append([])
            size = 0
        files[-1].append(m)
        size += n
    rows: list[ManifestRow] = []
    shards: dict[str, dict[str, Any]] = {}
    for j, mods in enumerate(files):
        path = f"shards/part-00000-{j:04d}.safetensors"
        layout = [(m.module, "F32", tuple(results[m.module]["basis"].shape)) for m in mods]
        hasher = FileHasher()  # the digests of what is written, taken as it is written
        with out.writing_file(path) as tmp:
            with SafetensorsWriter(tmp, layout, {"format": FORMAT}, hasher) as writer:
                for m in mods:
                    writer.write(m.module, results[m.module]["basis"])
            shards[path] = {"sha256": hasher.file_digest(), "bytes": os.path.getsize(tmp)}
        for m in mods:
            r = results[m.module]
            rows.append(ManifestRow(
                module=m.module, tensor=m.weight.name, layer=m.layer, kind=m.kind,
                shape=tuple(r["shape"]), form="N", stored_shape=tuple(r["basis"].shape),
                shard=path, norm=math.sqrt(r["trace"]),
                source_digest=row_digest(cal.sha256, digests, m.layer),
                base_dtype=None, aligned_dtype=m.weight.dtype,
                safety_rank=config.safety_rank, tokens=samples.tokens,
                energy=r["energy"], calibration_digest=f"sha256:{cal.sha256}",
                digest=hasher.tensors[m.module],
            ))
    return rows, shards


__all__ = ["row_digest", "write_set"]
