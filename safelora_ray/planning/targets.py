"""Target modules: which weights of a checkpoint they are, and those weights paired across two
checkpoints (names, shapes, orientation), for the build, project-model and SaLoRA alike.

A target is a module-name suffix (``q_proj``) matched as PEFT does; its weight is the tensor
``<module>.weight``. Nothing here reads tensor data: only the index, headers and
``config.json``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from safelora_ray.core.errors import CheckpointError, ConfigError
from safelora_ray.formats.checkpoint import Checkpoint, TensorRef

logger = logging.getLogger(__name__)

DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "v_proj")
#: Stored dtypes a target weight may have.
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
WEIGHT_SUFFIX = ".weight"

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


def layer_index(module: str) -> int | None:
    """The first integer path component (``model.layers.7.self_attn.q_proj`` → 7)."""
    m = _LAYER_RE.search(module)
    return int(m.group(1)) if m else None


def module_of(tensor: str) -> str:
    """The module a weight belongs to (``….q_proj.weight`` → ``….q_proj``)."""
    return tensor[: -len(WEIGHT_SUFFIX)] if tensor.endswith(WEIGHT_SUFFIX) else tensor


def target_weights(ckpt: Checkpoint, targets: Sequence[str]) -> dict[str, str]:
    """The target weights of ``ckpt``: tensor name → the target its module matches, in the
    checkpoint's order (nothing is checked: see :func:`require_targets`)."""
    out: dict[str, str] = {}
    for name in ckpt.weight_map:
        if name.endswith(WEIGHT_SUFFIX):
            kind = match_target(module_of(name), targets)
            if kind is not None:
                out[name] = kind
    return out


def require_targets(found: Mapping[str, str], targets: Sequence[str], uri: str) -> None:
    """Every target matches some weight of the checkpoint at ``uri`` (``found``: from
    :func:`target_weights`).

    Raises:
        CheckpointError: no weight matches, or a target matches none.
    """
    if not found:
        raise CheckpointError(
            f"no tensor of {uri} matches the targets {','.join(targets)} "
            "(names must end with '.<target>.weight')")
    kinds = set(found.values())
    absent = [t for t in targets if t not in kinds]
    if absent:
        raise CheckpointError(f"target(s) {', '.join(absent)} match no tensor in {uri}; "
                              f"matched: {', '.join(sorted(kinds))}")


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


def weight_layouts(ckpts: Sequence[Checkpoint], modules: Iterable[str]) -> dict[str, Layout]:
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
class Side:
    """One checkpoint of a pair and the word error messages name it by: "shape … in
    <role> <uri>" (``base``, ``the fine-tune``); :func:`check_same_targets` also says "the
    <role> model"."""

    ckpt: Checkpoint
    role: str


@dataclass(frozen=True)
class WeightPair:
    """A target weight in both checkpoints of a pair, checked.

    Attributes:
        module: The module (the tensor name without ``.weight``).
        first: Its weight in the first checkpoint.
        second: Its weight in the second.
        layout: How both store it (``conv1d``: transposed).
    """

    module: str
    first: TensorRef
    second: TensorRef
    layout: Layout

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight as nn.Linear's d_out x d_in, whatever the stored orientation."""
        return self.first.shape[::-1] if self.layout == "conv1d" else self.first.shape


def check_same_targets(first: Side, second: Side, found_first: Mapping[str, str],
                       found_second: Mapping[str, str]) -> None:
    """Both checkpoints have the same target weights (``found_*``: :func:`target_weights`).

    Raises:
        CheckpointError: naming the weights missing on each side.
    """
    missing_second = sorted(set(found_first) - set(found_second))
    missing_first = sorted(set(found_second) - set(found_first))
    if missing_second or missing_first:
        parts = []
        if missing_second:
            parts.append(f"missing from the {second.role} model {second.ckpt.uri}: "
                         + ", ".join(missing_second[:5]))
        if missing_first:
            parts.append(f"missing from the {first.role} model {first.ckpt.uri}: "
                         + ", ".join(missing_first[:5]))
        raise CheckpointError(f"target tensors differ between {first.role} and "
                              f"{second.role}: " + "; ".join(parts))


def pair_weights(first: Side, second: Side, names: Iterable[str], *,
                 same_dtype: bool = False) -> dict[str, WeightPair]:
    """Pair the weights ``names`` (present in both) of two checkpoints: each a 2-D float
    tensor, of the same shape (and dtype, with ``same_dtype``) on both sides, its
    orientation told by the checkpoints' ``config.json`` (:func:`weight_layouts`).

    Returns:
        Tensor name → :class:`WeightPair`, in the order of ``names``.

    Raises:
        CheckpointError: naming the tensor and both checkpoints.
    """
    names = list(names)
    a, b = first.ckpt, second.ckpt
    layouts = weight_layouts([a, b], [module_of(n) for n in names])
    out: dict[str, WeightPair] = {}
    for name in names:
        x, y = a.ref(name), b.ref(name)
        check_target_weight(x)
        check_target_weight(y)
        if x.shape != y.shape:
            raise CheckpointError(
                f"tensor {name!r}: shape {list(x.shape)} in {first.role} {a.uri} but "
                f"{list(y.shape)} in {second.role} {b.uri}")
        if same_dtype and x.dtype != y.dtype:
            raise CheckpointError(
                f"tensor {name!r}: dtype {x.dtype} in {first.role} {a.uri} but {y.dtype} in "
                f"{second.role} {b.uri}")
        module = module_of(name)
        out[name] = WeightPair(module, x, y, layouts[module])
    return out


__all__ = [
    "CONV1D_MODULES",
    "DEFAULT_TARGETS",
    "FLOAT_DTYPES",
    "Layout",
    "Side",
    "WeightPair",
    "check_same_targets",
    "check_target_weight",
    "conv1d_names",
    "layer_index",
    "match_target",
    "module_of",
    "pair_weights",
    "parse_targets",
    "require_targets",
    "target_weights",
    "weight_layouts",
]
