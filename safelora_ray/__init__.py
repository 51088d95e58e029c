"""safelora-ray: Safe LoRA (NeurIPS 2024) as a distributed batch processor on Ray.

Python API (the same verbs as the CLI)::

    from safelora_ray import BuildConfig, SanitizeConfig, build, inspect, sanitize
    result = build(BuildConfig(base="hf://meta-llama/Llama-2-7b-hf",
                               aligned="hf://meta-llama/Llama-2-7b-chat-hf",
                               out="s3://bucket/alignment/llama2-7b-qv"))
    print(inspect(result.uri).summary())
    run = sanitize(SanitizeConfig(alignment=result.uri, adapters="s3://bucket/tenants/",
                                  out="s3://bucket/sanitized/", threshold=0.35))
    model = project_model(FinetuneConfig(alignment=result.uri,
                                         aligned="hf://meta-llama/Llama-2-7b-chat-hf",
                                         finetuned="s3://bucket/finetunes/acme-support",
                                         out="s3://bucket/projected/acme-support",
                                         threshold=0.35))

The names are imported on first use (PEP 562): ``import safelora_ray`` and the command line's
``--help`` do not load torch or Ray.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from safelora_ray._version import __version__
from safelora_ray.core.errors import (
    AdapterError,
    AlignmentSetError,
    CheckpointError,
    ClusterError,
    ConfigError,
    SafeLoraError,
    SafetensorsFormatError,
    StorageError,
)

#: Public name → the module that defines it (imported when the name is first used).
_LAZY = {
    "AlignmentSet": "safelora_ray.formats.alignment_set",
    "BuildConfig": "safelora_ray.pipelines.build.config",
    "FinetuneConfig": "safelora_ray.pipelines.project_model.driver",
    "FinetuneResult": "safelora_ray.pipelines.project_model.driver",
    "project_model": "safelora_ray.pipelines.project_model.driver",
    "BuildResult": "safelora_ray.pipelines.build.config",
    "build": "safelora_ray.pipelines.build.driver",
    "inspect": "safelora_ray.pipelines.build.driver",
    "SanitizeConfig": "safelora_ray.pipelines.sanitize.driver",
    "SanitizeResult": "safelora_ray.pipelines.sanitize.driver",
    "sanitize": "safelora_ray.pipelines.sanitize.driver",
    "worker_session": "safelora_ray.execution.session",
}

if TYPE_CHECKING:
    from safelora_ray.execution import worker_session
    from safelora_ray.formats.alignment_set import AlignmentSet
    from safelora_ray.pipelines.build.config import BuildConfig, BuildResult
    from safelora_ray.pipelines.build.driver import build, inspect
    from safelora_ray.pipelines.project_model.driver import (
        FinetuneConfig,
        FinetuneResult,
        project_model,
    )
    from safelora_ray.pipelines.sanitize.driver import SanitizeConfig, SanitizeResult, sanitize


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'safelora_ray' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AdapterError",
    "AlignmentSet",
    "AlignmentSetError",
    "BuildConfig",
    "BuildResult",
    "CheckpointError",
    "ClusterError",
    "ConfigError",
    "FinetuneConfig",
    "FinetuneResult",
    "SafeLoraError",
    "SafetensorsFormatError",
    "SanitizeConfig",
    "SanitizeResult",
    "StorageError",
    "__version__",
    "build",
    "inspect",
    "project_model",
    "sanitize",
    "worker_session",
]
