"""Writers of small checkpoints and adapters in the real on-disk formats, for the tests.

They are :mod:`safelora_ray.formats.synthetic`'s (the demo and the benchmarks write theirs with
it too), re-exported under the names the tests import; here only what is the tests' own: a
checkpoint of sparse holes, and how much of a file is on disk.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from safelora_ray.formats.synthetic import (
    Arch,
    aligned_from,
    llama_tensors,
    write_checkpoint,
    write_streamed_checkpoint,
)


def write_sparse_checkpoint(path: str | Path, targets: dict[str, torch.Tensor],
                            hole_tensors: dict[str, tuple[int, ...]], dtype: str = "BF16") -> Path:
    """A single-file checkpoint whose non-target tensors are sparse holes (zeros never written).

    The file's apparent size is the full size; only the header and the targets occupy disk.
    ``targets`` must already have the dtype ``dtype`` names.
    """
    entries = [*hole_tensors.items(), *((n, tuple(t.shape)) for n, t in targets.items())]
    write_streamed_checkpoint(path, entries, lambda name, shape: targets.get(name),
                              fill="holes", max_shard_bytes=2**62, dtype=dtype)
    return Path(path)


def allocated_bytes(path: str | Path) -> int:
    """Bytes a file actually occupies on disk (st_blocks), to check holes stayed holes."""
    return os.stat(path).st_blocks * 512


__all__ = ["Arch", "aligned_from", "allocated_bytes", "llama_tensors", "write_checkpoint",
           "write_sparse_checkpoint"]
