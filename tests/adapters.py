"""Real PEFT LoRA adapters (and hand-broken ones) on a tiny Llama, built offline for the tests.

The base model is a ``LlamaForCausalLM`` built from a small config (hidden 32, 2 layers,
4 heads, 4 or 2 KV heads, intermediate 48, vocab 64) with a fixed seed, so the same seed
always gives the same weights; nothing is downloaded. Adapters are made by PEFT itself
(``get_peft_model`` + ``save_pretrained``) after filling lora_A and lora_B with seeded random
values (PEFT initializes B to zero, which would make every test trivial).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

ModuleWeights = dict[str, tuple[torch.Tensor, torch.Tensor]]


def tiny_config(gqa: bool = False) -> Any:
    """The tiny ``LlamaConfig`` (2 KV heads when ``gqa``, so k/v_proj are 16 x 32)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2 if gqa else 4,
        intermediate_size=48,
        vocab_size=64,
        tie_word_embeddings=False,
    )


def tiny_model(seed: int = 0, gqa: bool = False, dtype: torch.dtype = torch.float32) -> Any:
    """A freshly initialized tiny ``LlamaForCausalLM``; the same seed gives the same weights."""
    from transformers import LlamaForCausalLM

    # fork_rng keeps the seeding from leaking into other tests' global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_config(gqa))
    return model.to(dtype).eval()


def save_base_model(path: str | os.PathLike[str], seed: int = 0, gqa: bool = False) -> Path:
    """Save the tiny base model (safetensors) so tests can ``from_pretrained`` it.

    Returns:
        The directory.
    """
    path = Path(path)
    tiny_model(seed, gqa).save_pretrained(str(path))  # transformers 5: always safetensors
    return path


def load_base_model(path: str | os.PathLike[str]) -> Any:
    """Load a base model saved by :func:`save_base_model` (a fresh copy each call)."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(path)).eval()


def make_adapter(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    adapter_seed: int = 1,
    gqa: bool = False,
    target_modules: Sequence[str] | str = ("q_proj", "v_proj"),
    r: int = 4,
    lora_alpha: float = 8,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    layers_to_transform: list[int] | None = None,
    lora_bias: bool = False,
    modules_to_save: list[str] | None = None,
    use_dora: bool = False,
    dtype: torch.dtype = torch.float32,
    base_model_name_or_path: str | None = None,
) -> tuple[Path, ModuleWeights]:
    """Create a real PEFT LoRA adapter with random A and B and save it at ``path``.

    Args:
        path: Output directory.
        seed: Seed of the base model (as in :func:`tiny_model`).
        adapter_seed: Seed of the random LoRA weights.
        gqa: Use the GQA base model.
        target_modules: PEFT ``target_modules`` (a list, or ``"all-linear"``).
        r: Default rank.
        lora_alpha: Default alpha.
        rank_pattern: PEFT ``rank_pattern``.
        alpha_pattern: PEFT ``alpha_pattern``.
        layers_to_transform: PEFT ``layers_to_transform``.
        lora_bias: PEFT ``lora_bias`` (a bias on lora_B).
        modules_to_save: PEFT ``modules_to_save`` (e.g. ``["lm_head"]``).
        use_dora: PEFT ``use_dora``.
        dtype: dtype of the base model and of the saved adapter weights.
        base_model_name_or_path: Recorded in the config.

    Returns:
        The directory and ``{module name: (A, B)}`` as saved (clones, in ``dtype``).
    """
    from peft import LoraConfig

    model = tiny_model(seed, gqa, dtype)
    kwargs: dict[str, Any] = {}
    if rank_pattern is not None:
        kwargs["rank_pattern"] = rank_pattern
    if alpha_pattern is not None:
        kwargs["alpha_pattern"] = alpha_pattern
    if layers_to_transform is not None:
        kwargs["layers_to_transform"] = layers_to_transform
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
        lora_bias=lora_bias,
        modules_to_save=modules_to_save,
        use_dora=use_dora,
        base_model_name_or_path=base_model_name_or_path,
        **kwargs,
    )
    return save_random_adapter(model, config, path, adapter_seed)


def save_random_adapter(model: Any, config: Any, path: str | os.PathLike[str],
                        adapter_seed: int) -> tuple[Path, ModuleWeights]:
    """Wrap ``model`` with PEFT ``config``, fill lora_A/lora_B (and LoRA biases) with seeded
    random values, save the adapter at ``path``; returns it and ``{module: (A, B)}``."""
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    lora_bias = bool(getattr(config, "lora_bias", False))
    # autocast_adapter_dtype=False keeps a bf16/f16 adapter in that dtype (PEFT upcasts
    # half-precision adapters to float32 by default).
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=False)
    g = torch.Generator().manual_seed(adapter_seed)
    weights: ModuleWeights = {}
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
                continue
            a = module.lora_A["default"].weight
            b = module.lora_B["default"].weight
            a.copy_(torch.randn(a.shape, generator=g) * 0.1)
            b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            if lora_bias and module.lora_B["default"].bias is not None:
                bias = module.lora_B["default"].bias
                bias.copy_(torch.randn(bias.shape, generator=g) * 0.1)
            weights[name.removeprefix("base_model.model.")] = (
                a.detach().clone(),
                b.detach().clone(),
            )
    path = Path(path)
    peft_model.save_pretrained(str(path))
    return path, weights


def tiny_gpt2(seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
    """A tiny ``GPT2LMHeadModel`` (n_embd 32, 2 layers): its c_attn / c_proj / c_fc are
    ``Conv1D``, weights stored d_in x d_out (c_attn 32 x 96, attn.c_proj 32 x 32,
    mlp.c_proj 128 x 32)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32,
                        bos_token_id=0, eos_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return model.to(dtype).eval()


def make_gpt2_adapter(path: str | os.PathLike[str], *, seed: int = 0, adapter_seed: int = 1,
                      target_modules: Sequence[str] = ("c_attn", "c_proj"), r: int = 2,
                      bias: str = "none") -> tuple[Path, ModuleWeights]:
    """A real PEFT LoRA adapter on :func:`tiny_gpt2` (PEFT sets ``fan_in_fan_out`` itself)."""
    from peft import LoraConfig

    config = LoraConfig(r=r, lora_alpha=4, target_modules=list(target_modules), bias=bias)
    return save_random_adapter(tiny_gpt2(seed), config, path, adapter_seed)


def make_ia3_adapter(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """A real (non-LoRA) PEFT IA3 adapter."""
    from peft import IA3Config, get_peft_model

    config = IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
    )
    peft_model = get_peft_model(tiny_model(seed), config)
    path = Path(path)
    peft_model.save_pretrained(str(path))
    return path


def read_weights(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Tensors and ``__metadata__`` of ``path/adapter_model.safetensors`` (via the library)."""
    file = str(Path(path) / "adapter_model.safetensors")
    with safe_open(file, "pt") as f:
        metadata = f.metadata()
    return load_file(file), metadata


def rewrite_weights(
    path: str | os.PathLike[str],
    edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
) -> None:
    """Replace ``adapter_model.safetensors`` with ``edit(tensors)``, keeping the metadata."""
    tensors, metadata = read_weights(path)
    out = edit(dict(tensors))
    save_file(
        {k: v.contiguous() for k, v in out.items()},
        str(Path(path) / "adapter_model.safetensors"),
        metadata,
    )


def edit_config(path: str | os.PathLike[str], edit: Callable[[dict], dict | None]) -> None:
    """Rewrite ``adapter_config.json`` as ``edit(config)`` (in place if it returns None)."""
    file = Path(path) / "adapter_config.json"
    config = json.loads(file.read_text())
    new = edit(config)
    file.write_text(json.dumps(config if new is None else new, indent=2, sort_keys=True))


def tree_bytes(path: str | os.PathLike[str]) -> dict[str, bytes]:
    """Every file under ``path`` (relative path -> bytes), to check nothing was modified."""
    root = Path(path)
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def spread_b(path: str | os.PathLike[str], v: dict[str, torch.Tensor], seed: int,
             every: int = 2) -> None:
    """Move every ``every``-th B of the PEFT adapter at ``path`` into the column space of its
    module's V = W_aligned − W_base (``v``, by module name: a high cosine); the others stay
    random (low cosines), so selections are not trivial."""
    g = torch.Generator().manual_seed(seed)
    pfx, suffix = "base_model.model.", ".lora_B.weight"

    def edit(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        keys = sorted(k for k in t if k.endswith(suffix))
        for i, k in enumerate(keys):
            if (i + seed) % every:
                continue
            vm = v[k[len(pfx): -len(suffix)]]
            b = t[k]
            new = vm @ torch.randn(vm.shape[1], b.shape[1], generator=g, dtype=torch.float64)
            t[k] = (new * (b.double().norm() / new.norm())).to(b.dtype)
        return t

    rewrite_weights(path, edit)


def save_aligned_pair(root: str | os.PathLike[str], *, seed: int, gqa: bool = False,
                      max_shard_size: str | None = None) -> tuple[Path, Path]:
    """A model pair under ``root``: base = the tiny Llama, aligned = base + a rank-2 update +
    noise on every layer weight (HF safetensors, sharded with ``max_shard_size``)."""
    root = Path(root)
    model = tiny_model(0, gqa=gqa)
    base = root / "base"
    model.save_pretrained(str(base))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and ".layers." in name:
                d_out, d_in = p.shape
                low = torch.randn(d_out, 2, generator=g) @ torch.randn(2, d_in, generator=g)
                p.add_(low * 0.02 + torch.randn(d_out, d_in, generator=g) * 0.001)
    aligned = root / "aligned"
    model.save_pretrained(str(aligned), **({"max_shard_size": max_shard_size}
                                            if max_shard_size else {}))
    return base, aligned
