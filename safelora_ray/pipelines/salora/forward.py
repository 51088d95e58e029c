"""SaLoRA's calibration forward pass: the aligned model over the calibration tokens, capturing
the input of every target linear on the counted tokens into ``Σ = Σₜ xₜ xₜᵀ`` (float64).

The model runs with ``transformers``' own modelling code (the ``safelora-ray[salora]`` extra;
nothing else in safelora-ray imports transformers), its skeleton on the ``meta`` device and
its weights read from the checkpoint as needed (:mod:`.model`), in one of two modes:

- ``whole``: every weight on the device, the model's forward per batch of samples;
- ``layers``: one decoder layer at a time. The model's own forward runs once per batch with
  each decoder layer replaced by a recorder, which notes the arguments the model passes to
  that layer (attention mask, rotary embeddings, position ids: whatever this architecture and
  this transformers version pass) and hands the hidden states on unchanged; the last one
  stops the forward. Then for each layer in turn: load its weights, push every batch's hidden
  states through it with the recorded arguments, capture, free it. Device memory: one layer
  plus the hidden states of the samples, so a 70B model runs on one GPU.

Σ is captured by forward hooks on the target linears (:mod:`.capture`), once per input group.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from safelora_ray.pipelines.salora.calibration import TokenizedSamples
from safelora_ray.pipelines.salora.capture import Capture, Recorder, StopForward, make_batches
from safelora_ray.pipelines.salora.model import (
    LoadedModel,
    TargetModule,
    model_config,
    require_transformers,
)

logger = logging.getLogger(__name__)

#: Forward dtypes (``--dtype``); Σ is float64 whatever the forward dtype.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
    "float64": torch.float64,
}
MODES = ("auto", "whole", "layers")
#: ``auto`` runs the whole model when its weights take at most this share of the device's
#: free memory (the rest is for activations and Σ), else layer by layer.
WHOLE_MODEL_MAX_SHARE = 0.5


def _free_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info()[0])
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # not Linux: assume room for the model
        return 1 << 62


@dataclass(frozen=True)
class CalibrationJob:
    """What every worker of one calibration run shares (hashable: workers key state on it).

    Attributes:
        job_id: Unique per run.
        model: The aligned checkpoint's URI.
        config_json: Its ``config.json`` (the driver's parsed copy, as JSON).
        targets: Module-name suffixes.
        dtype: Forward dtype name (:data:`DTYPES`).
        mode: ``auto``, ``whole`` or ``layers``.
        batch_tokens: Padded positions per forward batch.
        safety_rank: r_s.
    """

    job_id: str
    model: str
    config_json: str
    targets: tuple[str, ...]
    dtype: str
    mode: str
    batch_tokens: int
    safety_rank: int


class CalibrationRunner:
    """One worker's share of the calibration pass (plain Python; a task function drives it).

    Layers are produced in order by :meth:`run_to`; a runner never goes back (a retried call
    gets a fresh runner, which runs from the start again).

    Args:
        job: The run.
        samples: This worker's share.
        device: ``cpu`` or ``cuda``.
        hash_weights: Digest every tensor read (one worker does, for the set's content id).
    """

    def __init__(self, job: CalibrationJob, samples: TokenizedSamples, device: str,
                 hash_weights: bool = False) -> None:
        self.job = job
        self.device = device
        self.dtype = DTYPES[job.dtype]
        self.samples = samples
        self.loaded = LoadedModel(job.model, json.loads(job.config_json), job.targets,
                                  self.dtype, device, hash_weights)
        self.model = self.loaded.model
        self.base: nn.Module = self.loaded.base
        self.layers = self.loaded.layers
        self.targets = self.loaded.targets
        self.batches = make_batches(samples, job.batch_tokens, self.loaded.pad_id, device)
        self.mode = self._choose_mode(job.mode)
        self.capture = Capture(device)
        self.digests = self.loaded.digests
        self.next_layer = 0
        self.stats = self.loaded.stats
        self._whole_done = False
        self._sigma_by_layer: dict[int, dict[str, torch.Tensor]] = {}

    def _choose_mode(self, mode: str) -> str:
        if mode != "auto":
            return mode
        need = self.loaded.param_bytes
        free = _free_bytes(self.device)
        chosen = "whole" if need <= WHOLE_MODEL_MAX_SHARE * free else "layers"
        logger.info("calibration forward: %s (weights %.2f GB in %s, %.2f GB free on %s)",
                    chosen, need / 1e9, self.job.dtype, free / 1e9, self.device)
        return chosen

    def target_info(self, layer: int) -> dict[str, TargetModule]:
        return self.loaded.target_info(layer)

    # -- the passes ----------------------------------------------------------------------------
    def _forward_whole(self) -> None:
        self.loaded.load_prelude()
        for i in range(len(self.layers)):
            self.loaded.load_layer(i)
        t0 = time.perf_counter()
        self.capture.attach(self.targets.values())
        try:
            with torch.inference_mode():
                for b in self.batches:
                    self.capture.begin(b)
                    self.base(input_ids=b.input_ids, attention_mask=b.attention_mask,
                              use_cache=False)
        finally:
            self.capture.detach()
        self._sync()
        self.stats["forward_s"] += time.perf_counter() - t0
        for name, (_, tm) in self.targets.items():
            group = self.capture.group[name]
            if group == name:
                self._sigma_by_layer.setdefault(tm.layer, {})[group] = self.capture.sigma.pop(
                    group)
        self._whole_done = True

    def _record(self) -> None:
        """The recording forward of layers mode (see the module docstring)."""
        self.loaded.load_prelude()
        t0 = time.perf_counter()
        last = max(tm.layer for _, tm in self.targets.values())
        originals = list(self.layers)
        for b in self.batches:
            calls: dict[int, Any] = {}
            for i in range(last + 1):
                self.layers[i] = Recorder(originals[i], i, calls, last=i == last)
            try:
                with torch.inference_mode():
                    self.base(input_ids=b.input_ids, attention_mask=b.attention_mask,
                              use_cache=False)
            except StopForward:
                pass
            finally:
                for i in range(last + 1):
                    self.layers[i] = originals[i]
            if set(calls) != set(range(last + 1)):
                raise RuntimeError(f"the recording forward reached layers {sorted(calls)}, "
                                   f"not 0..{last}")
            b.hidden = calls[0][0]
            b.calls = {i: c[1:] for i, c in calls.items()}
        # The embeddings and the rest of the prelude are not needed any more.
        self.loaded.free_prelude()
        self._sync()
        self.stats["prelude_s"] += time.perf_counter() - t0

    def _run_layer(self, i: int) -> None:
        layer = self.layers[i]
        self.loaded.load_layer(i)
        if i + 1 <= self.loaded.last_layer:  # read the next layer while this one computes
            self.loaded.prefetch_layer(i + 1)
        t0 = time.perf_counter()
        self.capture.attach(v for v in self.targets.values() if v[1].layer == i)
        try:
            with torch.inference_mode():
                for b in self.batches:
                    args, kwargs, positional = b.calls.pop(i)
                    self.capture.begin(b)
                    if positional:
                        out = layer(b.hidden, *args, **kwargs)
                    else:
                        out = layer(**{**kwargs, "hidden_states": b.hidden})
                    b.hidden = out[0] if isinstance(out, tuple) else out
        finally:
            self.capture.detach()
        self._sync()
        self.stats["forward_s"] += time.perf_counter() - t0
        layer.to("meta")  # free the weights
        for name, (_, tm) in self.targets.items():
            if tm.layer == i and self.capture.group[name] == name:
                self._sigma_by_layer.setdefault(i, {})[name] = self.capture.sigma.pop(name)

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def run_to(self, layer: int) -> dict[str, Any]:
        """Run the pass through decoder layer ``layer``; return that layer's Σ per input group.

        Returns:
            ``{"layer", "sigmas": {group: Σ (float64, CPU)}, "modules": {name: {"group",
            "transposed", "d_out", "d_in"}}, "tokens", "positions", "digests", "mode",
            "device", "stats"}``.
        """
        if layer < self.next_layer:
            raise RuntimeError(f"layer {layer} was already produced (next: {self.next_layer})")
        if self.mode == "whole":
            if not self._whole_done:
                self._forward_whole()
        else:
            if self.next_layer == 0:
                self._record()
            for i in range(self.next_layer, layer + 1):
                self._run_layer(i)
        self.next_layer = layer + 1
        sig = self._sigma_by_layer.pop(layer, {})
        for k in [k for k in self._sigma_by_layer if k < layer]:
            del self._sigma_by_layer[k]  # layers nobody asked for (a retried call)
        modules = {n: {"group": self.capture.group[n], "transposed": tm.transposed,
                       "d_out": tm.d_out, "d_in": tm.d_in}
                   for n, tm in self.target_info(layer).items()}
        return {
            "layer": layer,
            "sigmas": {g: s.cpu() for g, s in sig.items()},
            "modules": modules,
            "tokens": self.samples.tokens,
            "positions": self.samples.positions,
            "digests": dict(self.digests),
            "mode": self.mode,
            "device": self.device,
            "stats": dict(self.stats),
        }

    def close(self) -> None:
        self.loaded.close()
        self.batches = []
        self._sigma_by_layer = {}


__all__ = ["DTYPES", "MODES", "CalibrationJob", "CalibrationRunner", "TargetModule",
           "make_batches", "model_config", "require_transformers"]  # (the last four: as before)
