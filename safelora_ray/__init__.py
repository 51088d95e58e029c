"""safelora-ray: Safe LoRA (NeurIPS 2024) as a distributed batch processor on Ray.

Python API (the same verbs as the CLI)::

    from safelora_ray import BuildConfig, build, inspect
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
"""

from safelora_ray._version import __version__
from safelora_ray.build import BuildConfig, BuildResult, build, inspect
from safelora_ray.errors import (
    AdapterError,
    AlignmentSetError,
    CheckpointError,
    ConfigError,
    SafeLoraError,
    SafetensorsFormatError,
    StorageError,
)
from safelora_ray.finetune import FinetuneConfig, FinetuneResult, project_model
from safelora_ray.formats.alignment_set import AlignmentSet
from safelora_ray.sanitize import SanitizeConfig, SanitizeResult, sanitize
from safelora_ray.workers import worker_session

__all__ = [
    "AdapterError",
    "AlignmentSet",
    "AlignmentSetError",
    "BuildConfig",
    "BuildResult",
    "CheckpointError",
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
