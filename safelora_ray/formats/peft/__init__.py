"""peft: the public names of this package."""

from safelora_ray.formats.peft.adapter import (
    Adapter,
    adapter_digest,
    check_config,
    get_pattern_key,
    is_weight_file,
    output_digest,
    read_adapter,
    resolve_rank_alpha,
    write_adapter,
)

__all__ = [
    "Adapter",
    "adapter_digest",
    "check_config",
    "get_pattern_key",
    "is_weight_file",
    "output_digest",
    "read_adapter",
    "resolve_rank_alpha",
    "write_adapter",
]
