"""project-model's plan: the alignment set's modules paired with the aligned checkpoint and a
full fine-tune of it, and the fine-tune's files as the output files they become.

Nothing here reads tensor data: only the set's manifest, the checkpoints' indexes, headers and
``config.json``, and a listing of the fine-tune's folder.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from safelora_ray.core.errors import CheckpointError
from safelora_ray.formats.alignment_set import AlignmentSet, ManifestRow
from safelora_ray.formats.checkpoint import INDEX_FILE, Checkpoint, TensorRef
from safelora_ray.formats.peft import is_weight_file
from safelora_ray.planning.targets import Side, pair_weights, target_weights

logger = logging.getLogger(__name__)

#: project-model's folder inside its output checkpoint (Hugging Face loaders ignore
#: subfolders); never copied from a fine-tune that has one.
STATE_DIR = "_safelora"
#: Largest non-weight file copied (tokenizers are tens of MB).
MAX_EXTRA_BYTES = 1024**3


@dataclass(frozen=True)
class TargetPlan:
    """One target module: where its tensors are and how its weight is stored."""

    module: str
    kind: str
    layer: int | None
    ft: TensorRef
    aligned: TensorRef
    layout: str
    form: str
    matrix_bytes: int
    proj_rank: int | None

    @property
    def shape(self) -> tuple[int, ...]:
        """nn.Linear's d_out x d_in."""
        return self.ft.shape[::-1] if self.layout == "conv1d" else self.ft.shape


@dataclass(frozen=True)
class Segment:
    """A tensor of an output file, in data order: ``[start, end)`` absolute in the file."""

    name: str
    start: int
    end: int
    target: TargetPlan | None = None


@dataclass(frozen=True)
class OutputFile:
    """One weights file of the fine-tune, rewritten under the same name."""

    path: str
    size: int
    data_start: int
    segments: tuple[Segment, ...]

    @property
    def targets(self) -> list[TargetPlan]:
        return [s.target for s in self.segments if s.target is not None]


@dataclass
class ModelPlan:
    """Everything a run needs to know before reading any tensor data."""

    files: list[OutputFile]
    targets: list[TargetPlan]
    extra_files: list[tuple[str, int]]  # non-weight files copied: (path, size)
    skipped_files: list[str]  # weight files not in the checkpoint: never copied

    @property
    def weights_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def must_read_bytes(self) -> int:
        """Every byte of the fine-tune's weights and copied files, the aligned weights and
        the set's matrices of the target modules: what any run must read."""
        return (self.weights_bytes + sum(n for _, n in self.extra_files)
                + sum(t.aligned.nbytes + t.matrix_bytes for t in self.targets))


def plan_model(aset: AlignmentSet, aligned: Checkpoint, ft: Checkpoint) -> ModelPlan:
    """Pair the set's modules with both checkpoints' tensors and check them.

    Raises:
        CheckpointError: a module of the set is missing from a checkpoint, the fine-tune has a
            target tensor the set lacks, shapes or orientations disagree, or a target weight is
            not a 2-D float tensor; the message names the tensor.
    """
    targets_of_set = aset.targets
    rows: dict[str, ManifestRow] = {r.tensor: r for r in aset.rows.values()}
    extra = sorted(n for n in target_weights(ft, targets_of_set) if n not in rows)
    if extra:
        raise CheckpointError(
            f"{ft.uri} has target tensor(s) that alignment set {aset.content_id} (targets "
            f"{','.join(targets_of_set)}) lacks: {', '.join(extra[:5])}: the set was built "
            "for another model")
    for ckpt, what in ((ft, "fine-tuned"), (aligned, "aligned")):
        missing = sorted(n for n in rows if n not in ckpt.weight_map)
        if missing:
            raise CheckpointError(
                f"the {what} checkpoint {ckpt.uri} lacks tensor(s) of alignment set "
                f"{aset.content_id}: {', '.join(missing[:5])}")
    pairs = pair_weights(Side(ft, "the fine-tune"), Side(aligned, "the aligned model"), rows)
    by_name: dict[str, TargetPlan] = {}
    for name, row in rows.items():
        pair = pairs[name]
        if pair.layout != row.layout:
            raise CheckpointError(
                f"module {row.module!r}: alignment set {aset.content_id} holds it as a "
                f"{row.layout} weight but {ft.uri}'s config.json makes it "
                f"{pair.layout}: the set was built from another model, or by a "
                "safelora-ray that did not record weight layouts (rebuild it)")
        if tuple(pair.shape) != tuple(row.shape):
            raise CheckpointError(
                f"tensor {name!r}: {list(pair.shape)} (d_out x d_in) in {ft.uri} but "
                f"{list(row.shape)} in alignment set {aset.content_id}")
        by_name[name] = TargetPlan(
            module=row.module, kind=row.kind, layer=row.layer, ft=pair.first,
            aligned=pair.second, layout=row.layout, form=row.form,
            matrix_bytes=4 * math.prod(row.stored_shape), proj_rank=row.proj_rank)
    files = []
    for path in ft.files:
        header = ft.header(path)
        names_here = [n for n, p in ft.weight_map.items() if p == path]
        if sorted(names_here) != sorted(header.tensors):
            odd = sorted(set(header.tensors) ^ set(names_here))[:5]
            raise CheckpointError(
                f"{ft.storage.describe(path)}: its tensors and the index disagree "
                f"({', '.join(odd)}): the index must map every tensor of every file")
        segments = tuple(Segment(info.name, info.start, info.end, by_name.get(info.name))
                         for info in header.tensors.values())
        files.append(OutputFile(path, header.file_size, header.data_start, segments))
    extra_files, skipped = other_files(ft)
    targets = sorted(by_name.values(),
                     key=lambda t: (t.layer if t.layer is not None else -1, t.module))
    return ModelPlan(files, targets, extra_files, skipped)


def other_files(ft: Checkpoint) -> tuple[list[tuple[str, int]], list[str]]:
    """Non-weight files to copy (config, tokenizer, generation files...) and weight files
    that are not part of the checkpoint (never copied: they would carry unprojected
    weights)."""
    weights = set(ft.files) | {INDEX_FILE}
    extra: list[tuple[str, int]] = []
    skipped: list[str] = []
    for obj in ft.storage.list(""):
        if obj.path in weights or obj.path.split("/", 1)[0] == STATE_DIR:
            continue
        if is_weight_file(obj.path):
            skipped.append(obj.path)
        elif obj.size > MAX_EXTRA_BYTES:
            logger.warning("not copying %s: %d bytes, more than a non-weight file should be",
                           ft.storage.describe(obj.path), obj.size)
            skipped.append(obj.path)
        else:
            extra.append((obj.path, obj.size))
    return extra, skipped


__all__ = ["MAX_EXTRA_BYTES", "STATE_DIR", "ModelPlan", "OutputFile", "Segment", "TargetPlan",
           "other_files", "plan_model"]
