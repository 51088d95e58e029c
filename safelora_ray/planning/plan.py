"""Build planning: the target weights of the base and aligned checkpoints, paired and checked
(:mod:`safelora_ray.planning.targets`), their stored forms, split into balanced shards.

Source URI → :class:`Checkpoint` (index + headers only) → :class:`BuildPlan`. Nothing here
reads tensor data.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from safelora_ray.core.alignment import Form, choose_form
from safelora_ray.core.errors import ConfigError
from safelora_ray.formats.checkpoint import Checkpoint, TensorRef
from safelora_ray.planning.targets import (
    DEFAULT_TARGETS,
    Layout,
    Side,
    check_same_targets,
    conv1d_names,
    layer_index,
    pair_weights,
    parse_targets,
    require_targets,
    target_weights,
)

logger = logging.getLogger(__name__)

#: Default cap on one output safetensors file of the alignment set.
DEFAULT_MAX_FILE_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class Projection:
    """How each module's alignment matrix is stored.

    Attributes:
        kind: ``fast``: the paper's C = V Vᵀ/‖V‖_F (stored as C or V); ``exact``: the
            truncated projection Ĉ_k = U_k U_kᵀ (stored as U_k, SPEC §1).
        rank: ``exact`` with a fixed k.
        energy: ``exact`` with the smallest k keeping this fraction of Σσᵢ².
    """

    kind: Literal["fast", "exact"] = "fast"
    rank: int | None = None
    energy: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("fast", "exact"):
            raise ConfigError(f"projection must be fast or exact, got {self.kind!r}")
        if self.kind == "fast":
            if self.rank is not None or self.energy is not None:
                raise ConfigError("--rank / --energy need --projection exact")
            return
        if (self.rank is None) == (self.energy is None):
            raise ConfigError("--projection exact needs exactly one of --rank K or --energy E")
        if self.rank is not None and (type(self.rank) is not int or self.rank < 1):
            raise ConfigError(f"rank must be a positive integer, got {self.rank!r}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise ConfigError(f"energy must be in (0, 1], got {self.energy}")

    def method(self) -> dict[str, Any]:
        """The ``method`` record of ``alignment.json`` (part of the content id)."""
        if self.kind == "fast":
            return {"name": "safelora-fast", "compute_dtype": "float32",
                    "stored_dtype": "float32",
                    "forms": {"C": "C = V Vᵀ/‖V‖_F", "V": "V; C B = V (Vᵀ B)/‖V‖_F"}}
        k = {"rank": self.rank} if self.rank is not None else {"energy": self.energy}
        return {"name": "safelora-exact", "compute_dtype": "float64 (eigh of V Vᵀ, or SVD)",
                "stored_dtype": "float32", "forms": {"U": "Ĉ_k = U_k U_kᵀ; Ĉ_k B = U_k (U_kᵀ B)"},
                **k}


@dataclass(frozen=True)
class ModulePlan:
    """One target module: both source tensors and what will be stored.

    Attributes:
        module: Module name (the tensor name without ``.weight``).
        kind: The target it matched (``q_proj``).
        layer: Layer index, if the name has one.
        base: The base weight.
        aligned: The aligned weight.
        form: Stored form (``C``, ``V`` or ``U``).
        stored_shape: Shape of the stored float32 tensor (form ``U``: the largest it can be,
            (d_out, min(d_out, d_in)) with ``energy``; its k is known once computed).
        layout: How the checkpoints store the weight (``conv1d``: transposed).
        rank: Form ``U``: the fixed k.
        energy: Form ``U``: the energy fraction that sets k.
    """

    module: str
    kind: str
    layer: int | None
    base: TensorRef
    aligned: TensorRef
    form: Form
    stored_shape: tuple[int, ...]
    layout: Layout = "linear"
    rank: int | None = None
    energy: float | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight as nn.Linear's d_out x d_in, whatever the stored orientation."""
        return self.base.shape[::-1] if self.layout == "conv1d" else self.base.shape

    @property
    def input_bytes(self) -> int:
        return self.base.nbytes + self.aligned.nbytes

    @property
    def output_bytes(self) -> int:
        n = 4
        for d in self.stored_shape:
            n *= d
        return n


@dataclass(frozen=True)
class FilePlan:
    """One output safetensors file of the alignment set: its path and modules in order."""

    path: str
    modules: tuple[ModulePlan, ...]

    @property
    def input_bytes(self) -> int:
        return sum(m.input_bytes for m in self.modules)


@dataclass
class BuildPlan:
    """Everything a build needs to know before reading any tensor data.

    Attributes:
        base: The base checkpoint.
        aligned: The aligned checkpoint.
        targets: Target module suffixes.
        modules: The target modules in layer order.
        shards: One list of output files per worker.
    """

    base: Checkpoint
    aligned: Checkpoint
    targets: tuple[str, ...]
    modules: list[ModulePlan]
    shards: list[list[FilePlan]] = field(default_factory=list)

    @property
    def input_bytes(self) -> int:
        return sum(m.input_bytes for m in self.modules)

    @property
    def output_bytes(self) -> int:
        return sum(m.output_bytes for m in self.modules)


def plan_build(
    base: Checkpoint,
    aligned: Checkpoint,
    targets: Sequence[str] = DEFAULT_TARGETS,
    *,
    num_shards: int = 1,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    projection: Projection | None = None,
) -> BuildPlan:
    """Select, pair and check the target tensors, then shard them.

    Args:
        base: Base (unaligned) checkpoint.
        aligned: Aligned checkpoint.
        targets: Module-name suffixes to build (``q_proj``, ``v_proj``...).
        num_shards: How many workers will share the work.
        max_file_bytes: Cap on one output file's bytes (a module larger than this gets a file
            of its own).
        projection: The stored form (default: the fast form).

    Raises:
        CheckpointError: a target tensor is missing on one side, or shapes/dtypes differ, or a
            target weight is not a 2-D float tensor, or its orientation cannot be told; the
            message names the tensor.
        ConfigError: ``projection.rank`` exceeds a module's min(d_out, d_in).
    """
    targets = parse_targets(targets)
    projection = projection or Projection()
    if num_shards < 1:
        raise ConfigError(f"num_shards must be ≥ 1, got {num_shards}")

    sides = Side(base, "base"), Side(aligned, "aligned")
    found = target_weights(base, targets)
    check_same_targets(*sides, found, target_weights(aligned, targets))
    require_targets(found, targets, base.uri)
    pairs = pair_weights(*sides, found, same_dtype=True)
    modules: list[ModulePlan] = []
    for name, kind in found.items():
        pair = pairs[name]
        module, layout, b, a = pair.module, pair.layout, pair.first, pair.second
        d_out, d_in = b.shape[::-1] if layout == "conv1d" else b.shape
        if projection.kind == "exact":
            k = projection.rank if projection.rank is not None else min(d_out, d_in)
            if k > min(d_out, d_in):
                raise ConfigError(
                    f"rank {k} exceeds min(d_out, d_in) = {min(d_out, d_in)} of module "
                    f"{module!r} ({d_out} x {d_in})")
            form: Form = "U"
            stored: tuple[int, ...] = (d_out, k)
        else:
            form = choose_form(d_out, d_in)
            stored = (d_out, d_out) if form == "C" else (d_out, d_in)
        modules.append(ModulePlan(module, kind, layer_index(module), b, a, form, stored, layout,
                                  projection.rank, projection.energy))

    modules.sort(key=lambda m: (m.layer if m.layer is not None else -1, m.module))
    plan = BuildPlan(base, aligned, targets, modules)
    plan.shards = shard_modules(modules, num_shards, max_file_bytes)
    return plan


def shard_modules(
    modules: Sequence[ModulePlan], num_shards: int, max_file_bytes: int
) -> list[list[FilePlan]]:
    """Split modules (in layer order) into ≤ ``num_shards`` contiguous runs of balanced input
    bytes, each run cut into output files of at most ``max_file_bytes``.

    Contiguous runs keep a shard's layers together (its reads then hit few checkpoint files).
    """
    total = sum(m.input_bytes for m in modules)
    n = max(1, min(num_shards, len(modules)))
    runs: list[list[ModulePlan]] = [[] for _ in range(n)]
    acc = 0
    for m in modules:
        # Place each module by the midpoint of its byte range: balanced within one module.
        idx = min(n - 1, int((acc + m.input_bytes / 2) * n / total)) if total else 0
        runs[idx].append(m)
        acc += m.input_bytes
    shards: list[list[FilePlan]] = []
    for i, run in enumerate(r for r in runs if r):
        files: list[FilePlan] = []
        cur: list[ModulePlan] = []
        cur_bytes = 0
        for m in run:
            if cur and cur_bytes + m.output_bytes > max_file_bytes:
                files.append(FilePlan("", tuple(cur)))
                cur, cur_bytes = [], 0
            cur.append(m)
            cur_bytes += m.output_bytes
        if cur:
            files.append(FilePlan("", tuple(cur)))
        shards.append([FilePlan(f"shards/part-{i:05d}-{j:04d}.safetensors", f.modules)
                       for j, f in enumerate(files)])
    return shards


__all__ = [
    "DEFAULT_MAX_FILE_BYTES",
    "DEFAULT_TARGETS",  # (from planning.targets, as before)
    "BuildPlan",
    "FilePlan",
    "ModulePlan",
    "Projection",
    "conv1d_names",  # (from planning.targets, as before)
    "parse_targets",  # (from planning.targets, as before)
    "plan_build",
    "shard_modules",
]
