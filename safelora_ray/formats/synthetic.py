"""Synthetic Llama-shaped models and LoRA adapters, written in the real on-disk formats.

Checkpoints follow the Hugging Face layout: ``model.safetensors`` (one file) or
``model-0000i-of-0000n.safetensors`` shards with ``model.safetensors.index.json``
(``{"metadata": {"total_size": ...}, "weight_map": {...}}``) and a ``config.json``, as
``save_pretrained`` writes them; adapters are PEFT LoRA directories (``adapter_config.json`` +
``adapter_model.safetensors``). Every value is seeded, so the same call writes the same bytes.

The demo (``safelora-ray demo``), the tests and the benchmarks write their inputs with these:
:func:`write_checkpoint` for tensors held in memory, :func:`write_streamed_checkpoint` for
models too large for that (one tensor at a time; the tensors a run does not read may be sparse
holes), :func:`write_adapter` for adapters.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

GiB = 1024**3
MiB = 1024**2
#: The ``base_model_name_or_path`` of the adapters :func:`write_adapter` writes.
BASE_MODEL_ID = "safelora-demo/llama-mini"
#: Bytes per element of the dtypes :func:`write_streamed_checkpoint` writes.
_ELEMENT_BYTES = {"BF16": 2, "F16": 2, "F32": 4}
_TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


@dataclass(frozen=True)
class Arch:
    """A Llama-like architecture (GQA when ``kv_heads < heads``), tensor names as in HF's
    ``LlamaForCausalLM``. The defaults are the tests' tiny model."""

    layers: int = 2
    hidden: int = 32
    heads: int = 4
    kv_heads: int = 4
    intermediate: int = 48
    vocab: int = 64

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def layer_shapes(self, layer: int) -> list[tuple[str, tuple[int, ...]]]:
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        p = f"model.layers.{layer}."
        return [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]

    def shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every tensor of ``LlamaForCausalLM``, in the order ``save_pretrained`` shards them."""
        out: list[tuple[str, tuple[int, ...]]] = [
            ("model.embed_tokens.weight", (self.vocab, self.hidden))]
        for layer in range(self.layers):
            out.extend(self.layer_shapes(layer))
        out.append(("model.norm.weight", (self.hidden,)))
        out.append(("lm_head.weight", (self.vocab, self.hidden)))
        return out

    @property
    def params(self) -> int:
        return sum(numel(s) for _, s in self.shapes())


def numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def is_target(name: str, targets: Sequence[str]) -> bool:
    """Whether tensor ``name`` is the weight of one of the ``targets`` (``q_proj``...)."""
    return name.endswith(".weight") and name[: -len(".weight")].rsplit(".", 1)[-1] in targets


# -- weights -----------------------------------------------------------------------------------


def random_weights(entries: Sequence[tuple[str, tuple[int, ...]]], g: torch.Generator, *,
                   scale: float, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """N(0, scale²) for every matrix, ones for every vector (the norms), drawn from ``g`` in
    the order of ``entries``."""
    out: dict[str, torch.Tensor] = {}
    for name, shape in entries:
        out[name] = ((torch.randn(*shape, generator=g) * scale).to(dtype) if len(shape) > 1
                     else torch.ones(*shape, dtype=dtype))
    return out


def llama_tensors(arch: Arch, seed: int = 0, dtype: torch.dtype = torch.float32
                  ) -> dict[str, torch.Tensor]:
    """Random weights named like ``LlamaForCausalLM``'s state dict (N(0, 0.05²))."""
    return random_weights(arch.shapes(), torch.Generator().manual_seed(seed), scale=0.05,
                          dtype=dtype)


def aligned_from(base: Mapping[str, torch.Tensor], seed: int = 1, scale: float = 0.02,
                 rank: int = 4) -> dict[str, torch.Tensor]:
    """An 'aligned' model: base plus a low-rank-plus-noise update on every 2-D weight."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in base.items():
        if w.dim() == 2:
            d_out, d_in = w.shape
            k = min(rank, d_out, d_in)
            upd = torch.randn(d_out, k, generator=g) @ torch.randn(k, d_in, generator=g)
            upd = upd * scale / k + torch.randn(d_out, d_in, generator=g) * scale * 0.1
            out[name] = (w.to(torch.float32) + upd).to(w.dtype)
        else:
            out[name] = w.clone()
    return out


# -- checkpoints ---------------------------------------------------------------------------------


def _save(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    # The safetensors library writes the files, as ``save_pretrained`` does: what reads them
    # (this package) is what the tests and benchmarks exercise, so it must not write them too.
    from safetensors.torch import save_file

    save_file({n: t.contiguous() for n, t in tensors.items()}, str(path), dict(metadata))


def write_checkpoint(path: str | Path, tensors: Mapping[str, torch.Tensor], *,
                     shards: int = 1, metadata: Mapping[str, str] | None = None,
                     single_file: bool | None = None) -> Path:
    """Write ``tensors`` as an HF checkpoint: ``shards`` files + index, or one
    ``model.safetensors`` (``single_file``; default: when ``shards`` is 1).

    Tensors are spread over the shards in name order, as ``save_pretrained`` does by size.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    md = {"format": "pt", **(metadata or {})}
    names = sorted(tensors)
    if single_file if single_file is not None else shards == 1:
        _save(path / "model.safetensors", {n: tensors[n] for n in names}, md)
    else:
        per = -(-len(names) // shards)
        weight_map: dict[str, str] = {}
        total = 0
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            chunk = {n: tensors[n] for n in names[s * per:(s + 1) * per]}
            _save(path / fname, chunk, md)
            weight_map.update(dict.fromkeys(chunk, fname))
            total += sum(t.numel() * t.element_size() for t in chunk.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return path


def write_model(path: str | Path, tensors: Mapping[str, torch.Tensor], shards: int = 2) -> Path:
    """A sharded HF checkpoint (``shards`` files + index, even for one shard): the demo's."""
    return write_checkpoint(path, tensors, shards=shards, single_file=False)


_FILLER: bytes | None = None


def filler_bytes() -> bytes:
    """16 MiB of valid bf16 values (N(0, 0.02²)) to tile over tensors whose content does not
    matter."""
    global _FILLER
    if _FILLER is None:
        t = (torch.randn(8 * MiB, generator=torch.Generator().manual_seed(7)) * 0.02)
        _FILLER = t.to(torch.bfloat16).view(torch.uint8).numpy().tobytes()
    return _FILLER


def write_streamed_checkpoint(
    path: str | Path,
    entries: Sequence[tuple[str, tuple[int, ...]]],
    tensor: Callable[[str, tuple[int, ...]], torch.Tensor | None],
    *,
    fill: str = "dense",
    max_shard_bytes: int = 10 * GiB,
    dtype: str = "BF16",
) -> dict[str, int]:
    """Write an HF-layout checkpoint of one dtype, one tensor in memory at a time.

    Args:
        path: Checkpoint directory.
        entries: ``(name, shape)`` in ``save_pretrained`` order; shards are cut in this order
            at ``max_shard_bytes`` (one ``model.safetensors`` when everything fits).
        tensor: The tensor for a name, or None for "content does not matter".
        fill: What None tensors become: ``dense`` (bf16 filler values written to disk) or
            ``holes`` (sparse-file holes: apparent size only, read back as zeros).
        max_shard_bytes: Shard size cap.
        dtype: The safetensors dtype of every tensor (``BF16``, ``F16``, ``F32``).

    Returns:
        ``{"apparent_bytes", "allocated_bytes", "files"}``.
    """
    if fill not in ("dense", "holes"):
        raise ValueError(f"fill must be dense or holes, got {fill!r}")
    if dtype not in _ELEMENT_BYTES or (fill == "dense" and dtype != "BF16"):
        raise ValueError(f"dtype {dtype!r} with fill {fill!r}: dense filler is BF16; "
                         f"holes take {sorted(_ELEMENT_BYTES)}")
    elt = _ELEMENT_BYTES[dtype]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in entries:
        n = numel(shape) * elt
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    weight_map: dict[str, str] = {}
    total = 0
    files: list[Path] = []
    for s, chunk in enumerate(shards):
        fname = ("model.safetensors" if len(shards) == 1
                 else f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors")
        total += _write_streamed_file(path / fname, chunk, tensor, fill, dtype)
        files.append(path / fname)
        weight_map.update(dict.fromkeys((n for n, _ in chunk), fname))
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return {"apparent_bytes": sum(f.stat().st_size for f in files),
            "allocated_bytes": sum(f.stat().st_blocks * 512 for f in files),
            "files": len(files)}


def _write_streamed_file(fname: Path, chunk: Sequence[tuple[str, tuple[int, ...]]],
                         tensor: Callable[[str, tuple[int, ...]], torch.Tensor | None],
                         fill: str, dtype: str) -> int:
    """One safetensors file of ``chunk``; returns its data bytes. The header is the library's
    for one dtype (tensors by name); a tensor left out is a hole, or filler when dense."""
    elt = _ELEMENT_BYTES[dtype]
    ordered = sorted(chunk)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape in ordered:
        n = numel(shape) * elt
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    data_start = 8 + len(hb)
    with open(fname, "wb") as f:
        f.write(len(hb).to_bytes(8, "little"))
        f.write(hb)
        for name, shape in ordered:
            start = data_start + header[name]["data_offsets"][0]
            t = tensor(name, shape)
            if t is not None:
                if t.dtype != _TORCH_DTYPES[dtype] or tuple(t.shape) != tuple(shape):
                    raise ValueError(f"{name}: expected {dtype} {shape}, got {t.dtype} "
                                     f"{tuple(t.shape)}")
                f.seek(start)
                f.write(memoryview(t.contiguous().view(torch.uint8).numpy()))
            elif fill == "dense":
                f.seek(start)
                block = filler_bytes()
                left = numel(shape) * elt
                while left:
                    k = min(left, len(block))
                    f.write(memoryview(block)[:k])
                    left -= k
        f.truncate(data_start + off)
    return off


# -- adapters ------------------------------------------------------------------------------------


def write_adapter(path: str | Path, modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                  r: int, use_dora: bool = False) -> None:
    """A PEFT LoRA adapter directory as ``save_pretrained`` writes it (q_proj/v_proj targets,
    base model :data:`BASE_MODEL_ID`); ``modules`` maps a module name to its (A, B)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": BASE_MODEL_ID,
        "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.05, "bias": "none",
        "target_modules": ["q_proj", "v_proj"], "use_dora": use_dora, "use_rslora": False,
        "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None,
        "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
        "init_lora_weights": True, "revision": None,
    }
    tensors: dict[str, torch.Tensor] = {}
    for module, (a, b) in modules.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
        if use_dora:
            tensors[f"base_model.model.{module}.lora_magnitude_vector"] = torch.ones(
                b.shape[0], dtype=b.dtype)
    _save(path / "adapter_model.safetensors", tensors, {"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))


__all__ = [
    "BASE_MODEL_ID",
    "Arch",
    "GiB",
    "MiB",
    "aligned_from",
    "filler_bytes",
    "is_target",
    "llama_tensors",
    "numel",
    "random_weights",
    "write_adapter",
    "write_checkpoint",
    "write_model",
    "write_streamed_checkpoint",
]
