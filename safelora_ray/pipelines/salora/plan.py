"""SaLoRA's plan: the target weights of the aligned checkpoint, each inside a numbered decoder
layer, in layer order (selected as the build selects: :mod:`safelora_ray.planning.targets`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from safelora_ray.core.errors import CheckpointError, ConfigError
from safelora_ray.formats.checkpoint import Checkpoint, TensorRef
from safelora_ray.planning.targets import (
    check_target_weight,
    layer_index,
    module_of,
    require_targets,
    target_weights,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannedModule:
    """A target module: its weight in the checkpoint."""

    module: str
    kind: str
    layer: int
    weight: TensorRef


def plan_modules(ckpt: Checkpoint, targets: Sequence[str], safety_rank: int
                 ) -> list[PlannedModule]:
    """The target weights of ``ckpt`` (PEFT's suffix rule, as the build), in layer order.

    Raises:
        CheckpointError: no weight matches, a target matches nothing, a weight that is not a
            2-D float tensor or not inside a numbered layer.
        ConfigError: r_s larger than a weight's smaller side (W Xᵀ has no more directions).
    """
    found = target_weights(ckpt, targets)
    out = []
    for name, kind in found.items():
        module = module_of(name)
        ref = ckpt.ref(name)
        check_target_weight(ref)
        layer = layer_index(module)
        if layer is None:
            raise CheckpointError(f"target module {module!r} is not inside a numbered decoder "
                                  "layer: SaLoRA's safety modules sit on linears inside them")
        if safety_rank > min(ref.shape):
            raise ConfigError(f"safety rank {safety_rank} exceeds {min(ref.shape)}, the "
                              f"smaller side of {module!r} ({list(ref.shape)})")
        out.append(PlannedModule(module, kind, layer, ref))
    require_targets(found, targets, ckpt.uri)
    return sorted(out, key=lambda m: (m.layer, m.module))


__all__ = ["PlannedModule", "plan_modules"]
