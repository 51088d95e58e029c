"""Build planning: which tensors to read, paired and checked, split into balanced shards.

Source URI → :class:`Checkpoint` (index + headers only) → :class:`BuildPlan`. Nothing here
reads tensor data.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from safelora_ray.core.alignment import Form, choose_form
from safelora_ray.core.errors import CheckpointError, ConfigError
from safelora_ray.formats.checkpoint import Checkpoint, TensorRef

logger = logging.getLogger(__name__)

DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "v_proj")
#: Stored dtypes a target weight may have.
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
#: Default cap on one output safetensors file of the alignment set.
DEFAULT_MAX_FILE_BYTES = 2 * 1024**3

_LAYER_RE = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")
_TARGET_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.]*$")

#: How a checkpoint stores a 2-D weight: ``linear`` is nn.Linear's d_out x d_in; ``conv1d`` is
#: GPT-2's ``Conv1D`` (transformers.pytorch_utils), stored transposed as d_in x d_out.
Layout = Literal["linear", "conv1d"]
_GPT2_CONV1D = frozenset({"c_attn", "q_attn", "c_proj", "c_fc"})
#: Hugging Face model types whose modules of these names are ``Conv1D`` (found in
#: transformers 5: the models importing ``pytorch_utils.Conv1D``; every other projection of
#: theirs, and every module of other models, is nn.Linear).
CONV1D_MODULES: dict[str, frozenset[str]] = {
    "gpt2": _GPT2_CONV1D,
    "openai-gpt": frozenset({"c_attn", "c_proj", "c_fc"}),
    "imagegpt": _GPT2_CONV1D,
    "decision_transformer": _GPT2_CONV1D,
    "clvp": frozenset({"c_fc", "c_proj"}),
}
#: ``architectures`` prefixes of those models, for a config without ``model_type``.
_CONV1D_ARCHITECTURES = {"GPT2": "gpt2", "OpenAIGPT": "openai-gpt", "ImageGPT": "imagegpt",
                         "DecisionTransformer": "decision_transformer", "Clvp": "clvp"}
_CONV1D_NAMES = frozenset().union(*CONV1D_MODULES.values())


def parse_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    """Normalize ``--targets q_proj,v_proj`` into a sorted tuple of module-name suffixes."""
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    out = sorted({t.strip() for t in items if t.strip()})
    if not out:
        raise ConfigError("no target modules given (e.g. --targets q_proj,v_proj)")
    for t in out:
        if not _TARGET_RE.match(t) or t.endswith("."):
            raise ConfigError(f"invalid target module name {t!r}")
    return tuple(out)


def match_target(module: str, targets: Sequence[str]) -> str | None:
    """The target that ``module`` matches (PEFT's suffix rule: equal, or ends with ``.t``)."""
    for t in targets:
        if module == t or module.endswith("." + t):
            return t
    return None


def conv1d_names(config: dict[str, Any] | None) -> frozenset[str] | None:
    """The module names stored as ``Conv1D`` (transposed) by the model of this
    ``config.json``; empty for an nn.Linear model; None when there is no config to tell (no
    file, or one with neither ``model_type`` nor ``architectures``)."""
    if config is None:
        return None
    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type in CONV1D_MODULES:
        return CONV1D_MODULES[model_type]
    if not model_type:
        for arch in config.get("architectures") or []:
            for prefix, mt in _CONV1D_ARCHITECTURES.items():
                if isinstance(arch, str) and arch.startswith(prefix):
                    return CONV1D_MODULES[mt]
        if not config.get("architectures"):
            return None
    return frozenset()


def weight_layouts(ckpts: Sequence[Checkpoint], modules: Sequence[str]) -> dict[str, Layout]:
    """How each module's weight is stored (``linear`` or ``conv1d``), from the checkpoints'
    ``config.json`` (SPEC §1, orientation), never guessed from names alone.

    Raises:
        CheckpointError: the checkpoints' configs disagree on the model type, or no config
            says whether a module named like a GPT-2 ``Conv1D`` (``c_attn``...) is one.
    """
    found = [(c, conv1d_names(c.model_config())) for c in ckpts]
    known = [(c, n) for c, n in found if n is not None]
    if len({n for _, n in known}) > 1:
        desc = "; ".join(f"{c.uri}: model_type {(c.model_config() or {}).get('model_type')!r}"
                         for c, _ in known)
        raise CheckpointError(f"the checkpoints are different kinds of model ({desc})")
    names = known[0][1] if known else None
    out: dict[str, Layout] = {}
    for module in modules:
        last = module.rsplit(".", 1)[-1]
        if names is None:
            if last in _CONV1D_NAMES:
                raise CheckpointError(
                    f"module {module!r}: no config.json in {', '.join(c.uri for c in ckpts)} "
                    "says whether it is a GPT-2-style Conv1D (stored transposed, d_in x d_out) "
                    "or an nn.Linear weight; add the model's config.json")
            out[module] = "linear"
        else:
            out[module] = "conv1d" if last in names else "linear"
    return out


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


def layer_index(module: str) -> int | None:
    """The first integer path component (``model.layers.7.self_attn.q_proj`` → 7)."""
    m = _LAYER_RE.search(module)
    return int(m.group(1)) if m else None


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


def check_target_weight(ref: TensorRef) -> None:
    """A target weight must be a non-empty 2-D float tensor.

    Raises:
        CheckpointError: naming the tensor and its file.
    """
    if ref.dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{ref.describe()}: dtype {ref.dtype} is not a float type")
    if len(ref.shape) != 2:
        raise CheckpointError(f"{ref.describe()}: shape {list(ref.shape)} is not 2-D")
    if 0 in ref.shape:
        raise CheckpointError(f"{ref.describe()}: empty shape {list(ref.shape)}")


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

    def selected(ckpt: Checkpoint) -> dict[str, str]:
        out = {}
        for name in ckpt.weight_map:
            if name.endswith(".weight"):
                kind = match_target(name[: -len(".weight")], targets)
                if kind is not None:
                    out[name] = kind
        return out

    sel_base, sel_aligned = selected(base), selected(aligned)
    missing_aligned = sorted(set(sel_base) - set(sel_aligned))
    missing_base = sorted(set(sel_aligned) - set(sel_base))
    if missing_aligned or missing_base:
        parts = []
        if missing_aligned:
            parts.append(f"missing from the aligned model {aligned.uri}: "
                         + ", ".join(missing_aligned[:5]))
        if missing_base:
            parts.append(f"missing from the base model {base.uri}: " + ", ".join(missing_base[:5]))
        raise CheckpointError("target tensors differ between base and aligned: " + "; ".join(parts))
    if not sel_base:
        raise CheckpointError(
            f"no tensor of {base.uri} matches the targets {','.join(targets)} "
            "(names must end with '.<target>.weight')"
        )
    found = set(sel_base.values())
    absent = [t for t in targets if t not in found]
    if absent:
        raise CheckpointError(
            f"target(s) {', '.join(absent)} match no tensor in {base.uri}; "
            f"matched: {', '.join(sorted(found))}"
        )

    layouts = weight_layouts([base, aligned], [n[: -len(".weight")] for n in sel_base])
    modules: list[ModulePlan] = []
    for name, kind in sel_base.items():
        b, a = base.ref(name), aligned.ref(name)
        check_target_weight(b)
        check_target_weight(a)
        if b.shape != a.shape:
            raise CheckpointError(
                f"tensor {name!r}: shape {list(b.shape)} in base {base.uri} but "
                f"{list(a.shape)} in aligned {aligned.uri}"
            )
        if b.dtype != a.dtype:
            raise CheckpointError(
                f"tensor {name!r}: dtype {b.dtype} in base {base.uri} but {a.dtype} in aligned "
                f"{aligned.uri}"
            )
        module = name[: -len(".weight")]
        layout = layouts[module]
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
