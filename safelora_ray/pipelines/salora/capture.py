"""What the calibration forward runs over and what it captures: the samples as right-padded
batches, the recorders that stand in for decoder layers during layers mode's recording
forward, and the hooks that accumulate ``Σ = Σₜ xₜ xₜᵀ`` (float64) of each target's input.

Inputs that several targets share (q/k/v_proj read the same normalized hidden states) are
detected by tensor identity in the forward and accumulated once, as one *input group*.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from safelora_ray.core.errors import CheckpointError
from safelora_ray.core.safety_basis import accumulate_second_moment
from safelora_ray.pipelines.salora.calibration import TokenizedSamples
from safelora_ray.pipelines.salora.model import TargetModule

logger = logging.getLogger(__name__)


class StopForward(Exception):
    """Raised by the last layer's recorder: the rest of the forward is not needed."""


class Recorder(nn.Module):
    """Stands in for decoder layer ``index`` during the recording forward: notes the arguments
    the model passes, hands the hidden states on; the last one stops the forward."""

    def __init__(self, layer: nn.Module, index: int, calls: dict[int, Any], last: bool):
        super().__init__()
        self.wrapped = layer
        self.index = index
        self.calls = calls
        self.last = last

    def __getattr__(self, name: str) -> Any:
        # The model may read layer attributes (e.g. ``attention_type`` for its mask).
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["wrapped"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        # (layer 0's input: the embeddings; the other arguments, as passed)
        self.calls[self.index] = (hidden if self.index == 0 else None, args[1:], kwargs,
                                  bool(args))
        if self.last:
            raise StopForward
        return hidden


@dataclass
class Batch:
    input_ids: torch.Tensor  # (b, L) int64, right-padded
    attention_mask: torch.Tensor  # (b, L) int64
    counted: torch.Tensor  # (b * L,) bool: positions whose inputs enter Σ
    positions: int  # real (unpadded) positions
    hidden: torch.Tensor | None = None  # layers mode: the current layer's input
    calls: dict[int, Any] = field(default_factory=dict)  # layers mode: recorded arguments


def make_batches(samples: TokenizedSamples, batch_tokens: int, pad_id: int,
                 device: str) -> list[Batch]:
    """Samples into right-padded batches of at most ``batch_tokens`` padded positions (a longer
    sample is a batch of its own), longest first so that padding stays small."""
    order = sorted(range(len(samples)), key=lambda i: (-samples.lengths[i], i))
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * samples.lengths[groups[-1][0]] <= batch_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    offsets = samples.offsets
    batches = []
    for g in groups:
        width = samples.lengths[g[0]]
        ids = torch.full((len(g), width), pad_id, dtype=torch.int64)
        mask = torch.zeros((len(g), width), dtype=torch.int64)
        counted = torch.zeros((len(g), width), dtype=torch.bool)
        for row, i in enumerate(g):
            n, start = samples.lengths[i], offsets[i]
            ids[row, :n] = samples.ids[start:start + n]
            mask[row, :n] = 1
            counted[row, :n] = samples.counted[start:start + n]
        batches.append(Batch(ids.to(device), mask.to(device), counted.reshape(-1).to(device),
                              int(mask.sum())))
    return batches


class Capture:
    """Forward pre-hooks on target linears that accumulate Σ of their counted inputs.

    Targets whose input is the very same tensor in a forward (q/k/v_proj) form one input
    group, named after the first of them to run; Σ is accumulated once per group.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.sigma: dict[str, torch.Tensor] = {}
        self.group: dict[str, str] = {}
        self._mask: torch.Tensor | None = None
        self._seen: list[tuple[torch.Tensor, str]] = []
        self._seen_layer: int | None = None
        self._handles: list[Any] = []

    def attach(self, targets: Iterable[tuple[nn.Module, TargetModule]]) -> None:
        for module, tm in targets:
            self._handles.append(module.register_forward_pre_hook(
                lambda mod, args, kwargs, tm=tm: self._hook(tm, args, kwargs),
                with_kwargs=True))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._seen = []

    def begin(self, batch: Batch) -> None:
        """The next forward is over ``batch``."""
        self._mask = batch.counted
        self._seen = []
        self._seen_layer = None

    def _hook(self, tm: TargetModule, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else kwargs.get("input", kwargs.get("x"))
        if not isinstance(x, torch.Tensor):
            raise CheckpointError(f"module {tm.name!r}: its input is not a tensor")
        if self._seen_layer != tm.layer:  # hold one layer's inputs at most
            self._seen, self._seen_layer = [], tm.layer
        group = next((g for t, g in self._seen if t is x), None)
        if group is None:
            group = tm.name
            self._seen.append((x, tm.name))
        known = self.group.setdefault(tm.name, group)
        if known != group:
            raise RuntimeError(f"module {tm.name!r} shared its input with {known!r} in one "
                               f"batch and with {group!r} in another")
        if group != tm.name:
            return  # the group's first module accumulated this input
        assert self._mask is not None
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] != self._mask.numel() or rows.shape[1] != tm.d_in:
            raise CheckpointError(
                f"module {tm.name!r}: input of shape {tuple(x.shape)}, expected "
                f"(batch, positions, {tm.d_in}) for {self._mask.numel()} positions")
        sigma = self.sigma.get(group)
        if sigma is None:
            sigma = self.sigma[group] = torch.zeros(tm.d_in, tm.d_in, dtype=torch.float64,
                                                    device=self.device)
        accumulate_second_moment(sigma, rows[self._mask])


__all__ = ["Batch", "Capture", "Recorder", "StopForward", "make_batches"]
