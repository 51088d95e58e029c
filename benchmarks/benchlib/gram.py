"""G = A Aᵀ as an I/O worker's reading threads formed it per adapter until issue 22's twelfth
session moved it to the products' engine: for the results scripts that timed it."""

from __future__ import annotations

from typing import Any

import torch

from safelora_ray.core.scores import lora_gram
from safelora_ray.formats.peft import Adapter


def per_adapter_grams(adapter: Adapter) -> list[torch.Tensor]:
    """One float64 product per shape and dtype of the adapter's A."""
    by_shape: dict[tuple[Any, ...], list[str]] = {}
    for m, lm in adapter.modules.items():
        by_shape.setdefault((lm.a.dtype, *lm.a.shape), []).append(m)
    return [lora_gram(torch.stack([adapter.modules[m].a for m in names]))
            for names in by_shape.values()]
