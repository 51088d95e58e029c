"""Writers of small checkpoints and adapters in the real on-disk formats, for the tests.

Checkpoints follow the Hugging Face layout: ``model.safetensors`` (single file) or
``model-0000i-of-0000n.safetensors`` shards with ``model.safetensors.index.json``
(``{"metadata": {"total_size": ...}, "weight_map": {...}}``), written with the safetensors
library as ``save_pretrained`` does.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file


@dataclass(frozen=True)
class Arch:
    """A small Llama-like architecture (GQA when kv_heads < heads)."""

    layers: int = 2
    hidden: int = 32
    heads: int = 4
    kv_heads: int = 4
    intermediate: int = 48
    vocab: int = 64

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads


def llama_tensors(arch: Arch, seed: int = 0, dtype: torch.dtype = torch.float32
                  ) -> dict[str, torch.Tensor]:
    """Random weights named like ``LlamaForCausalLM``'s state dict."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.05).to(dtype)

    h, kv, i = arch.hidden, arch.kv_dim, arch.intermediate
    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": r(arch.vocab, h)}
    for layer in range(arch.layers):
        p = f"model.layers.{layer}."
        t[p + "self_attn.q_proj.weight"] = r(h, h)
        t[p + "self_attn.k_proj.weight"] = r(kv, h)
        t[p + "self_attn.v_proj.weight"] = r(kv, h)
        t[p + "self_attn.o_proj.weight"] = r(h, h)
        t[p + "mlp.gate_proj.weight"] = r(i, h)
        t[p + "mlp.up_proj.weight"] = r(i, h)
        t[p + "mlp.down_proj.weight"] = r(h, i)
        t[p + "input_layernorm.weight"] = torch.ones(h, dtype=dtype)
        t[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=dtype)
    t["model.norm.weight"] = torch.ones(h, dtype=dtype)
    t["lm_head.weight"] = r(arch.vocab, h)
    return t


def aligned_from(base: dict[str, torch.Tensor], seed: int = 1, scale: float = 0.02,
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


def write_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], *,
                     shards: int = 1, metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` as an HF checkpoint: single file (shards=1) or ``shards`` files + index.

    Tensors are spread over the shards in name order, as ``save_pretrained`` does by size.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    md = {"format": "pt", **(metadata or {})}
    names = sorted(tensors)
    if shards == 1:
        save_file({n: tensors[n].contiguous() for n in names}, str(path / "model.safetensors"), md)
    else:
        per = -(-len(names) // shards)
        weight_map: dict[str, str] = {}
        total = 0
        for s in range(shards):
            chunk = names[s * per:(s + 1) * per]
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: tensors[n].contiguous() for n in chunk}, str(path / fname), md)
            for n in chunk:
                weight_map[n] = fname
                total += tensors[n].numel() * tensors[n].element_size()
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return path


def write_sparse_checkpoint(path: str | Path, targets: dict[str, torch.Tensor],
                            hole_tensors: dict[str, tuple[int, ...]], dtype: str = "BF16") -> Path:
    """A single-file checkpoint whose non-target tensors are sparse holes (zeros never written).

    The file's apparent size is the full size; only the header and the targets occupy disk.
    ``targets`` must already have the dtype ``dtype`` names.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    elt = {"BF16": 2, "F16": 2, "F32": 4}[dtype]
    entries: list[tuple[str, tuple[int, ...], torch.Tensor | None]] = []
    for name, shape in hole_tensors.items():
        entries.append((name, shape, None))
    for name, t in targets.items():
        entries.append((name, tuple(t.shape), t))
    entries.sort(key=lambda e: e[0])
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape, _ in entries:
        n = elt
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    fname = path / "model.safetensors"
    with open(fname, "wb") as f:
        f.write(len(hb).to_bytes(8, "little"))
        f.write(hb)
        data_start = 8 + len(hb)
        for name, _, t in entries:
            if t is not None:
                f.seek(data_start + header[name]["data_offsets"][0])  # type: ignore[index]
                f.write(t.contiguous().view(torch.uint8).numpy().tobytes())
        f.truncate(data_start + off)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return path


def allocated_bytes(path: str | Path) -> int:
    """Bytes a file actually occupies on disk (st_blocks), to check holes stayed holes."""
    return os.stat(path).st_blocks * 512
