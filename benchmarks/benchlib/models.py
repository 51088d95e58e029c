"""The benchmarks' models: Llama-shaped presets, deterministic weights (each tensor from its own
seeded generator, so any subset can be written alone and in any order), and the pair and
adapter catalogs they sanitize, written with :mod:`safelora_ray.formats.synthetic`.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from safelora_ray.formats.synthetic import (
    Arch,
    GiB,
    is_target,
    numel,
    write_adapter,
    write_streamed_checkpoint,
)

#: Llama-2-7B (no GQA), Llama-2-70B (GQA, 8 kv heads) and a ~100M-class pair for the fleet.
LLAMA2_7B = Arch(layers=32, hidden=4096, heads=32, kv_heads=32, intermediate=11008, vocab=32000)
LLAMA2_70B = Arch(layers=80, hidden=8192, heads=64, kv_heads=8, intermediate=28672, vocab=32000)
FLEET_100M = Arch(layers=12, hidden=768, heads=12, kv_heads=12, intermediate=2048, vocab=32000)
TINY = Arch(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=96, vocab=128)


def gen(seed: int, *keys: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr((seed, *keys)).encode()))


#: rank of the aligned − base update, its scale, and the noise on top of it.
UPDATE_RANK = 8
UPDATE_SCALE = 2e-3
NOISE_SCALE = 2e-4


def base_weight(name: str, shape: Sequence[int], seed: int) -> torch.Tensor:
    """The base model's tensor ``name`` (bf16, N(0, 0.02²))."""
    return (torch.randn(*shape, generator=gen(seed, name, "w")) * 0.02).to(torch.bfloat16)


def update_basis(name: str, shape: Sequence[int], seed: int) -> torch.Tensor:
    """U (d_out x UPDATE_RANK): the column space of the aligned − base update of ``name``."""
    return torch.randn(shape[0], UPDATE_RANK, generator=gen(seed, name, "U"))


def aligned_weight(name: str, shape: Sequence[int], seed: int) -> torch.Tensor:
    """The aligned model's tensor: base + a rank-8 update + noise, stored in bf16."""
    w = base_weight(name, shape, seed).to(torch.float32)
    if len(shape) == 2:
        u = update_basis(name, shape, seed)
        wt = torch.randn(UPDATE_RANK, shape[1], generator=gen(seed, name, "W"))
        w.addmm_(u, wt, alpha=UPDATE_SCALE / UPDATE_RANK**0.5)
        w.add_(torch.randn(*shape, generator=gen(seed, name, "n")), alpha=NOISE_SCALE)
    return w.to(torch.bfloat16)


def write_pair(root: str | Path, arch: Arch, *, targets: Sequence[str] = ("q_proj", "v_proj"),
               seed: int = 0, fill: str = "dense", max_shard_bytes: int = 10 * GiB,
               entries: Sequence[tuple[str, tuple[int, ...]]] | None = None,
               ) -> dict[str, Any]:
    """Write ``base/`` and ``aligned/`` under ``root``: targets real and different, every
    other tensor identical filler (``dense``) or sparse holes (``holes``).

    Returns:
        ``{"base", "aligned", "target_bytes", "apparent_bytes", "allocated_bytes", ...}``
        (bytes per model).
    """
    root = Path(root)
    entries = list(entries if entries is not None else arch.shapes())

    def make(which: str) -> Callable[[str, tuple[int, ...]], torch.Tensor | None]:
        def tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
            if not is_target(name, targets):
                return None
            return (aligned_weight if which == "aligned" else base_weight)(name, shape, seed)
        return tensor

    info = {}
    for which in ("base", "aligned"):
        info[which] = write_streamed_checkpoint(root / which, entries, make(which), fill=fill,
                                                max_shard_bytes=max_shard_bytes)
    target_bytes = sum(numel(s) * 2 for n, s in entries if is_target(n, targets))
    return {"base": str(root / "base"), "aligned": str(root / "aligned"),
            "target_bytes_per_model": target_bytes,
            "target_modules": sum(1 for n, _ in entries if is_target(n, targets)),
            "apparent_bytes_per_model": info["base"]["apparent_bytes"],
            "allocated_bytes_per_model": info["base"]["allocated_bytes"],
            "files_per_model": info["base"]["files"], "fill": fill,
            "params": sum(numel(s) for _, s in entries)}


def write_adapters(root: str | Path, arch: Arch, n: int, *, rank: int = 8, seed: int = 0,
                   targets: Sequence[str] = ("q_proj", "v_proj"),
                   lean_every: int = 3) -> list[Path]:
    """Write ``n`` PEFT LoRA adapters (``adapter_config.json`` + ``adapter_model.safetensors``,
    bf16, rank ``rank`` on every layer's target modules) as ``root/tenant-T/adapter-NNNNN``.

    One module in ``lean_every`` has B leaning on the alignment update's column space (high
    cosine: kept); the others are random (low cosine: projected at τ = 0.35), so the selection
    is a real mix.
    """

    root = Path(root)
    shapes = dict(arch.shapes())
    modules = [f"model.layers.{i}.self_attn.{t}" for i in range(arch.layers) for t in targets]
    bases = {m: update_basis(m + ".weight", shapes[m + ".weight"], seed) for m in modules}

    def one(k: int) -> Path:
        g = gen(seed, "adapter", k)
        lora = {}
        for j, m in enumerate(modules):
            d_out, d_in = shapes[m + ".weight"]
            a = torch.randn(rank, d_in, generator=g) * 0.01
            b = torch.randn(d_out, rank, generator=g) * 0.01
            if (j + k) % lean_every == 0:
                b = b + bases[m] @ torch.randn(UPDATE_RANK, rank, generator=g) * 0.05
            lora[m] = (a.to(torch.bfloat16), b.to(torch.bfloat16))
        p = root / f"tenant-{k % 8}" / f"adapter-{k:05d}"
        write_adapter(p, lora, rank)
        return p

    # Each adapter has its own generator, so threads give the same bytes (torch's kernels
    # and the file writes release the GIL: 2,048 7B-shaped adapters take ~1 min, not ~4).
    threads = max(1, min(8, (os.cpu_count() or 1) // 2, n))
    with cf.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, range(n)))


def link_catalog(pool: Sequence[Path], pool_root: Path, dest: Path) -> Path:
    """A directory-tree catalog of the given adapters made of hard links (no extra disk)."""
    for p in pool:
        rel = p.relative_to(pool_root)
        (dest / rel).mkdir(parents=True, exist_ok=True)
        for f in p.iterdir():
            os.link(f, dest / rel / f.name)
    return dest


def target_refs(base_uri: str, aligned_uri: str, targets: Sequence[str]) -> list[Any]:
    """The TensorRefs a build reads (base and aligned of every target module), in plan order."""
    from safelora_ray.formats.checkpoint import Checkpoint
    from safelora_ray.planning.plan import plan_build

    plan = plan_build(Checkpoint.open(base_uri), Checkpoint.open(aligned_uri), list(targets))
    return [r for m in plan.modules for r in (m.base, m.aligned)]
