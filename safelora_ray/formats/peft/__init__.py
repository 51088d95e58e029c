"""peft: the public names of this package.

``config`` (adapter_config.json checks, rank/alpha patterns), ``pairing`` (lora_A with lora_B),
``read`` (read_adapter), ``write`` (write_adapter) and ``digest`` (the content digest) hold the
code; import from here.
"""

from safelora_ray.formats.peft.config import (
    check_config,
    get_pattern_key,
    module_scaling,
    resolve_rank_alpha,
    unit_scaling_config,
)
from safelora_ray.formats.peft.digest import (
    DIGEST_SCHEME,
    OutputDigest,
    adapter_digest,
    digest_scheme,
    output_digest,
)
from safelora_ray.formats.peft.read import Adapter, is_weight_file, read_adapter
from safelora_ray.formats.peft.write import write_adapter

__all__ = [
    "DIGEST_SCHEME",
    "Adapter",
    "OutputDigest",
    "adapter_digest",
    "check_config",
    "digest_scheme",
    "get_pattern_key",
    "is_weight_file",
    "module_scaling",
    "output_digest",
    "read_adapter",
    "resolve_rank_alpha",
    "unit_scaling_config",
    "write_adapter",
]
