"""What project-model's output holds and what it writes besides the weights files: the run's
record (``_safelora/projection.json``), reuse or refusal of what ``--out`` already holds, the
non-weight files, the index, and the run's summary.

The output is a checkpoint only once its marker exists: the index for a sharded checkpoint
(written last), ``model.safetensors`` for a single file (written after the config and
tokenizer files). The record holds the inputs (alignment set content id, file versions of both
checkpoints, selection) before anything else is written, and the run's figures once complete.
A rerun finds a complete output from the same inputs and reuses it; a complete output from
other inputs, or a checkpoint not written by this command, is refused; an incomplete one (no
marker) is overwritten.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from collections.abc import Sequence
from typing import Any

from safelora_ray._version import __version__
from safelora_ray.core.errors import CheckpointError, ConfigError, NotFoundError
from safelora_ray.formats.alignment_set import AlignmentSet
from safelora_ray.formats.checkpoint import INDEX_FILE, Checkpoint
from safelora_ray.pipelines.project_model.config import (
    FORMAT,
    PROVENANCE_FILE,
    FinetuneConfig,
    FinetuneResult,
)
from safelora_ray.planning.model_plan import ModelPlan
from safelora_ray.planning.provenance import same_inputs
from safelora_ray.storage import Storage, open_storage

logger = logging.getLogger(__name__)


def _read_json(storage: Storage, path: str) -> dict[str, Any] | None:
    try:
        raw = storage.read(path, max_bytes=64 * 1024**2)
    except NotFoundError:
        return None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{storage.describe(path)}: not JSON: {e}") from e
    return data if isinstance(data, dict) else None


def check_out(out: Storage, marker: str, request: dict[str, Any],
              inputs: Sequence[Checkpoint]) -> dict[str, Any] | None:
    """What ``--out`` holds: the complete provenance to reuse, None to (over)write.

    Raises:
        ConfigError: ``--out`` is one of the inputs.
        CheckpointError: it holds a complete output of other inputs, or a checkpoint that
            this command did not write.
    """
    for ckpt in inputs:
        if out.uri.rstrip("/") == ckpt.uri.rstrip("/"):
            raise ConfigError(f"--out {out.uri} is an input checkpoint; inputs are never "
                              "modified: choose another --out")
    existing = _read_json(out, PROVENANCE_FILE)
    visible = out.exists(marker)
    if existing is None:
        ours = [o.path for o in out.list("") if o.path.endswith(".safetensors")
                or o.path in ("config.json", INDEX_FILE)]
        if ours:
            raise CheckpointError(
                f"{out.uri} already holds a checkpoint ({ours[0]}...) not written by "
                "project-model: choose another --out")
        return None
    if existing.get("format") != FORMAT:
        raise CheckpointError(f"{out.describe(PROVENANCE_FILE)}: not a {FORMAT} record")
    # The same set, selection and file versions of both checkpoints (not their URIs).
    same = same_inputs(existing, request, equal=("alignment.content_id", "selection"),
                       sources=("aligned", "finetuned"))
    if visible and not same:
        raise CheckpointError(
            f"{out.uri} already holds a projected checkpoint made from other inputs "
            f"(alignment set {existing.get('alignment', {}).get('content_id')}, selection "
            f"{existing.get('selection')}); outputs are immutable: choose another --out")
    if visible and existing.get("status") == "complete":
        return existing
    return None  # an interrupted run (never visible, or being redone with the same inputs)


def copy_extras(ft: Checkpoint, out: Storage, files: Sequence[tuple[str, int]]) -> int:
    """Copy the fine-tune's non-weight files (config, tokenizer...); returns the bytes."""
    total = 0
    for path, size in files:
        data = ft.storage.read(path, max_bytes=max(size, 1) * 2 + 1024**2)
        out.put_bytes(path, data)
        total += len(data)
    return total


def write_index(ft: Checkpoint, out: Storage, plan: ModelPlan) -> None:
    """The fine-tune's index, byte for byte when its ``total_size`` is right (the output
    files hold the same tensors), else with the total corrected."""
    raw = ft.storage.read(INDEX_FILE, max_bytes=64 * 1024**2)
    index = json.loads(raw.decode("utf-8"))
    total = sum(seg.end - seg.start for f in plan.files for seg in f.segments)
    meta = index.get("metadata") if isinstance(index.get("metadata"), dict) else {}
    if meta.get("total_size") != total:
        logger.warning("%s: metadata.total_size is %s, the tensors hold %d bytes: writing "
                       "the index with the right total", ft.storage.describe(INDEX_FILE),
                       meta.get("total_size"), total)
        index["metadata"] = {**meta, "total_size": total}
        raw = (json.dumps(index, indent=2, sort_keys=False) + "\n").encode()
    out.put_bytes(INDEX_FILE, raw)


def summary(config: FinetuneConfig, result: FinetuneResult, aset: AlignmentSet,
            ft: Checkpoint, plan: ModelPlan, match: str, run_id: str,
            extra_bytes: int) -> dict[str, Any]:
    """The run's figures, as ``summary.json`` and the complete record hold them."""
    return {
        "run_id": run_id,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tool_version": __version__,
        "alignment": {"uri": aset.uri, "content_id": aset.content_id,
                      "method": aset.metadata.get("method", {}), "targets": aset.targets},
        "aligned": {"uri": open_storage(config.aligned).uri, "matches_set": match},
        "finetuned": {"uri": ft.uri, "layout": ft.layout, "files": len(plan.files)},
        "out": result.uri,
        "selection": config.selection,
        "tau": result.tau,
        "counts": {"modules": result.modules, "selected": result.selected,
                   "files": len(plan.files), "extra_files": len(plan.extra_files)},
        "selected_modules": result.selected_modules,
        "skipped_files": plan.skipped_files,
        "bytes": {"read": result.bytes_read, "must_read": result.must_read_bytes,
                  "read_ratio": round(result.bytes_read / max(1, result.must_read_bytes), 5),
                  "weights_written": result.bytes_written, "extra_written": extra_bytes},
        "duration_s": round(result.duration_s, 3),
        "workers": result.workers,
        "device": result.device,
        "stats": {k: round(v, 3) for k, v in result.stats.items()},
    }


__all__ = ["check_out", "copy_extras", "summary", "write_index"]
