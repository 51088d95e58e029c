"""SaLoRA's safety modules (arXiv 2501.01765; SPEC §4), safelora-ray's second method.

- :mod:`~safelora_ray.pipelines.salora.modules`: the cluster job (``safelora-ray salora-modules``):
  the aligned model's forward over a safety calibration set, data-parallel, whole or layer
  by layer; Σ per target input; V_s per module; a safety-module set. Its parts:
  :mod:`~safelora_ray.pipelines.salora.config` (parameters, outcome),
  :mod:`~safelora_ray.pipelines.salora.plan` (the target weights),
  :mod:`~safelora_ray.pipelines.salora.tasks` (what the workers run),
  :mod:`~safelora_ray.pipelines.salora.write` (the set's shards and rows).
- :mod:`~safelora_ray.pipelines.salora.calibration`: the calibration JSONL, its tokenization.
- :mod:`~safelora_ray.pipelines.salora.forward`: the forward pass with transformers' modelling code
  (with :mod:`~safelora_ray.pipelines.salora.model` and
  :mod:`~safelora_ray.pipelines.salora.capture`, the only modules that need the ``salora``
  extra).
- :mod:`~safelora_ray.pipelines.salora.export`: C_s per module for training (``salora-export``).
- :mod:`~safelora_ray.pipelines.salora.training`: C_s applied in a PEFT training loop.

Folding B ← (I − V_s V_sᵀ) B into existing adapters is ``safelora-ray sanitize --method
salora``: the post-hoc, weights-only use of SaLoRA's module, not SaLoRA's training.
"""

from safelora_ray.pipelines.salora.config import SaloraConfig, SaloraResult
from safelora_ray.pipelines.salora.modules import salora_modules

__all__ = ["SaloraConfig", "SaloraResult", "salora_modules"]
