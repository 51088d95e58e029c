"""Training with SaLoRA's safety modules: apply a frozen ``C_s`` to each LoRA update of a PEFT
model, so that ``ΔW x = C_s B A x`` (SaLoRA's forward; SPEC §4).

No import of PEFT is needed: a PEFT LoRA layer is recognized by its ``lora_B`` module dict.
A forward hook on ``lora_B[adapter]`` multiplies its output (…, d_out) by ``C_sᵀ`` (= C_s,
symmetric); PEFT then scales and adds it to the base layer's output. Gradients flow through
the hook; C_s itself is a constant.

Example (see docs/salora.md)::

    cs = load_safety_modules("cs.safetensors")
    model = get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    handles = attach_safety_modules(model, cs)
    ...  # the usual training loop
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


def load_safety_modules(path: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The C_s tensors of a ``salora-export`` file (module name → d_out x d_out)."""
    from safetensors.torch import load_file

    return load_file(path, device=str(device))


def attach_safety_modules(model: nn.Module, cs: Mapping[str, torch.Tensor], *,
                          adapter_name: str = "default", strict: bool = True) -> list[Any]:
    """Put C_s in front of every LoRA update of ``model`` that has one.

    Args:
        model: A PEFT model (module names ``base_model.model.…``, as the export's keys).
        cs: Module name → C_s (d_out x d_out).
        adapter_name: The LoRA adapter to constrain.
        strict: Raise when a LoRA module of ``model`` has no C_s or a C_s names no LoRA
            module (the export and the LoRA targets disagree).

    Returns:
        The hook handles (``handle.remove()`` detaches).

    Raises:
        ValueError: a C_s of the wrong shape; with ``strict``, a mismatch of names.
    """
    lora = {name: m for name, m in model.named_modules()
            if isinstance(getattr(m, "lora_B", None), nn.ModuleDict)
            and adapter_name in m.lora_B}
    if strict:
        unmatched = sorted(set(cs) - set(lora))
        uncovered = sorted(set(lora) - set(cs))
        if unmatched or uncovered:
            raise ValueError(
                "safety modules and LoRA modules differ: "
                + (f"no LoRA module for {unmatched[:3]}" if unmatched else "")
                + ("; " if unmatched and uncovered else "")
                + (f"no C_s for {uncovered[:3]}" if uncovered else ""))
    handles = []
    for name, m in lora.items():
        if name not in cs:
            continue
        lb = m.lora_B[adapter_name]
        c = cs[name].detach().to(device=lb.weight.device, dtype=lb.weight.dtype)
        d_out = lb.weight.shape[0]
        if tuple(c.shape) != (d_out, d_out):
            raise ValueError(f"{name}: C_s is {list(c.shape)}, the LoRA B has {d_out} outputs")

        def hook(_mod: nn.Module, _inp: Any, out: torch.Tensor, c: torch.Tensor = c) -> Any:
            return out @ c.T.to(out.dtype)

        handles.append(lb.register_forward_hook(hook))
    logger.info("safety modules on %d LoRA module(s)", len(handles))
    return handles


__all__ = ["attach_safety_modules", "load_safety_modules"]
