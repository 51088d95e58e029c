"""Requests from I/O workers to the holder of the set go in bounded parts (so that what is in
flight through Ray's object store is bounded whatever the batch and adapter sizes), and the
parts' answers are the bits of the whole."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from safelora_ray import BuildConfig, SanitizeConfig, build, sanitize
from safelora_ray.demo import write_adapter, write_model
from safelora_ray.pipelines.projection import split_groups
from tests.factory import Arch, aligned_from, llama_tensors


def _group(n: int, d: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(n, d, r, dtype=torch.bfloat16), torch.zeros(n, r, r, dtype=torch.float64)


def test_split_groups_bounds_every_part() -> None:
    groups = {(f"m{i}", "bfloat16", 8): _group(4, 64 * (1 + i % 3), 8) for i in range(20)}
    sizes = {k: b.numel() * 2 + g.numel() * 8 for k, (b, g) in groups.items()}
    limit = 3 * max(sizes.values())
    parts = split_groups(groups, limit)
    assert len(parts) > 1
    assert [k for p in parts for k in p] == list(groups)  # every group once, in order
    for p in parts:
        assert sum(sizes[k] for k in p) <= limit
    # a group larger than the limit is a part of its own; no limit: one part
    assert [len(p) for p in split_groups(groups, 1)] == [1] * 20
    assert len(split_groups(groups, 10**12)) == 1
    assert split_groups({}, 100) == []


@pytest.fixture(scope="module")
def tiny_requests() -> Iterator[None]:
    """Every group in a request of its own: set before this module's Ray starts, so that its
    workers inherit it."""
    old = os.environ.get("SAFELORA_REQUEST_MAX_BYTES")
    os.environ["SAFELORA_REQUEST_MAX_BYTES"] = "1"
    yield
    if old is None:
        os.environ.pop("SAFELORA_REQUEST_MAX_BYTES", None)
    else:
        os.environ["SAFELORA_REQUEST_MAX_BYTES"] = old


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("adapter_model.safetensors"))}


def test_parts_give_the_bytes_of_the_whole(tiny_requests: None, ray_local: None,
                                           tmp_path: Path) -> None:
    arch = Arch(layers=2, hidden=64, heads=4, kv_heads=4, intermediate=96)
    base = llama_tensors(arch)
    write_model(tmp_path / "base", base)
    write_model(tmp_path / "aligned", aligned_from(base))
    aset = build(BuildConfig(base=str(tmp_path / "base"), aligned=str(tmp_path / "aligned"),
                             out=str(tmp_path / "set"), workers=0, progress=False)).uri
    g = torch.Generator().manual_seed(3)
    for k in range(8):
        lora = {f"model.layers.{i}.self_attn.{t}": (torch.randn(4, 64, generator=g),
                                                    torch.randn(64, 4, generator=g))
                for i in range(2) for t in ("q_proj", "v_proj")}
        write_adapter(tmp_path / "cat" / f"a{k}", lora, 4)
    runs = {}
    for name, workers in (("in-process", 0), ("ray", 2)):
        res = sanitize(SanitizeConfig(alignment=aset, adapters=str(tmp_path / "cat"),
                                      out=str(tmp_path / name), threshold=0.35, batch_size=2,
                                      workers=workers, use_gpu=False, progress=False))
        assert res.ok == 8 and res.error == 0, res.errors
        runs[name] = _digests(tmp_path / name)
    assert len(runs["ray"]) == 8 and runs["ray"] == runs["in-process"]
