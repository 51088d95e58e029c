"""SaLoRA's calibration forward pass: the aligned model over the calibration tokens, capturing
the input of every target linear on the counted tokens into ``Σ = Σₜ xₜ xₜᵀ`` (float64).

The model runs with ``transformers``' own modelling code (the ``safelora-ray[salora]`` extra;
nothing else in safelora-ray imports transformers). Its skeleton is built with parameters on
the ``meta`` device (``accelerate.init_empty_weights``; buffers such as the rotary
frequencies stay real), and weights are read tensor by tensor from the checkpoint with ranged
reads (local, ``s3://``, ``hf://``: never ``from_pretrained``), in one of two modes:

- ``whole``: every weight on the device, the model's forward per batch of samples;
- ``layers``: one decoder layer at a time. The model's own forward runs once per batch with
  each decoder layer replaced by a recorder, which notes the arguments the model passes to
  that layer (attention mask, rotary embeddings, position ids: whatever this architecture and
  this transformers version pass) and hands the hidden states on unchanged; the last one
  stops the forward. Then for each layer in turn: load its weights, push every batch's hidden
  states through it with the recorded arguments, capture, free it. Device memory: one layer
  plus the hidden states of the samples, so a 70B model runs on one GPU.

Inputs that several targets share (q/k/v_proj read the same normalized hidden states) are
detected by tensor identity in the forward and accumulated once, as one *input group*.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from safelora_ray.core.errors import CheckpointError, ConfigError
from safelora_ray.core.safety_basis import accumulate_second_moment
from safelora_ray.formats.checkpoint import Checkpoint, TensorRef, read_ref
from safelora_ray.pipelines.salora.calibration import TokenizedSamples
from safelora_ray.planning.plan import match_target
from safelora_ray.storage import Storage

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
#: Threads reading one layer's tensors (ranged reads; S3 latency hides behind parallelism).
READ_THREADS = 4


def require_transformers() -> Any:
    """Import transformers (and accelerate), or say how to install them."""
    try:
        import accelerate  # noqa: F401
        import transformers
    except ImportError as e:
        raise ConfigError(
            "SaLoRA's forward pass needs transformers and accelerate: "
            "pip install 'safelora-ray[salora]'") from e
    return transformers


def model_config(config_dict: dict[str, Any], where: str) -> Any:
    """The ``PretrainedConfig`` of a checkpoint's ``config.json`` (no remote code)."""
    require_transformers()
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if config_dict.get("auto_map"):
        raise ConfigError(f"{where}: the model needs remote code (config.json has 'auto_map'); "
                          "only architectures built into transformers are supported")
    model_type = config_dict.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise ConfigError(f"{where}: config.json model_type {model_type!r} is not an "
                          "architecture this transformers knows")
    return CONFIG_MAPPING[model_type].from_dict(dict(config_dict))


@dataclass(frozen=True)
class TargetModule:
    """A target linear of the model.

    Attributes:
        name: Checkpoint module name (the weight's tensor name without ``.weight``).
        layer: Decoder layer index.
        transposed: GPT-2-style ``Conv1D``: the weight is stored d_in x d_out.
        d_out: Output features.
        d_in: Input features.
    """

    name: str
    layer: int
    transposed: bool
    d_out: int
    d_in: int


class _Stop(Exception):
    """Raised by the last layer's recorder: the rest of the forward is not needed."""


class _Recorder(nn.Module):
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
            raise _Stop
        return hidden


@dataclass
class _Batch:
    input_ids: torch.Tensor  # (b, L) int64, right-padded
    attention_mask: torch.Tensor  # (b, L) int64
    counted: torch.Tensor  # (b * L,) bool: positions whose inputs enter Σ
    positions: int  # real (unpadded) positions
    hidden: torch.Tensor | None = None  # layers mode: the current layer's input
    calls: dict[int, Any] = field(default_factory=dict)  # layers mode: recorded arguments


def make_batches(samples: TokenizedSamples, batch_tokens: int, pad_id: int,
                 device: str) -> list[_Batch]:
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
        batches.append(_Batch(ids.to(device), mask.to(device), counted.reshape(-1).to(device),
                              int(mask.sum())))
    return batches


class _Capture:
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

    def begin(self, batch: _Batch) -> None:
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
        config_json: Its ``config.json`` (as read by the driver).
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
        require_transformers()
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        self.job = job
        self.device = device
        self.dtype = DTYPES[job.dtype]
        self.hash_weights = hash_weights
        self.samples = samples
        self.ckpt = Checkpoint.open(job.model)
        self.storage: Storage = self.ckpt.storage
        config = model_config(json.loads(job.config_json), job.model)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config)
        model.eval().requires_grad_(False)
        self.model = model
        self.base: nn.Module = model.base_model
        self.prefix = self._checkpoint_prefix()
        self.layers_name, self.layers = self._decoder_layers(config)
        self.targets = self._find_targets()
        self.pad_id = self._pad_id(config)
        self.batches = make_batches(samples, job.batch_tokens, self.pad_id, device)
        self.mode = self._choose_mode(job.mode)
        self.capture = _Capture(device)
        self.digests: dict[int, str] = {}
        self.next_layer = 0
        self.stats = {"load_s": 0.0, "forward_s": 0.0, "prelude_s": 0.0, "bytes_read": 0}
        self._pool = cf.ThreadPoolExecutor(READ_THREADS, thread_name_prefix="salora-read")
        self._prefetch: tuple[int, cf.Future[Any]] | None = None
        self._whole_done = False
        self._sigma_by_layer: dict[int, dict[str, torch.Tensor]] = {}

    # -- structure ---------------------------------------------------------------------------
    def _checkpoint_prefix(self) -> str:
        """How the checkpoint names the base model's tensors (``model.``, ``gpt_neox.``, or
        nothing for a checkpoint saved from the base model class)."""
        prefix = next((f"{n}." for n, m in self.model.named_children() if m is self.base), "")
        names = [n for n, _ in self.base.named_parameters()]
        if not names:
            raise ConfigError(f"{self.job.model}: the model has no parameters")
        if any(prefix + n in self.ckpt.weight_map for n in names):
            return prefix
        if any(n in self.ckpt.weight_map for n in names):
            return ""
        raise CheckpointError(
            f"{self.job.model}: no tensor of the model ({prefix}{names[0]}, ...) is in the "
            "checkpoint: does config.json belong to these weights?")

    def _decoder_layers(self, config: Any) -> tuple[str, nn.ModuleList]:
        n = int(config.num_hidden_layers)
        found = [(name, m) for name, m in self.base.named_modules()
                 if isinstance(m, nn.ModuleList) and len(m) == n and name]
        if not found:
            raise ConfigError(f"{self.job.model}: cannot find the {n} decoder layers of "
                              f"{type(self.base).__name__}")
        name, layers = min(found, key=lambda t: t[0].count("."))
        return name, layers  # type: ignore[return-value]

    def _find_targets(self) -> dict[str, tuple[nn.Module, TargetModule]]:
        from transformers.pytorch_utils import Conv1D

        out: dict[str, tuple[nn.Module, TargetModule]] = {}
        lead = f"{self.layers_name}."
        for name, module in self.base.named_modules():
            full = self.prefix + name
            if not name or match_target(full, self.job.targets) is None:
                continue
            if not isinstance(getattr(module, "weight", None), torch.Tensor):
                continue  # a container named like a target (PEFT would not wrap it either)
            if not name.startswith(lead):
                raise ConfigError(f"target module {full!r} is outside the decoder layers: "
                                  "SaLoRA's safety modules sit on linears inside them")
            layer = int(name[len(lead):].split(".", 1)[0])
            w = module.weight
            if isinstance(module, nn.Linear):
                tm = TargetModule(full, layer, False, int(w.shape[0]), int(w.shape[1]))
            elif isinstance(module, Conv1D):
                tm = TargetModule(full, layer, True, int(w.shape[1]), int(w.shape[0]))
            else:
                raise ConfigError(f"target module {full!r} is a {type(module).__name__}, not "
                                  "a linear layer")
            out[full] = (module, tm)
        if not out:
            raise ConfigError(f"{self.job.model}: no linear module matches the targets "
                              f"{','.join(self.job.targets)}")
        return out

    @staticmethod
    def _pad_id(config: Any) -> int:
        pad = getattr(config, "pad_token_id", None)
        if isinstance(pad, int) and 0 <= pad < int(getattr(config, "vocab_size", pad + 1)):
            return pad
        return 0  # padded positions are masked out of attention and of Σ

    def _choose_mode(self, mode: str) -> str:
        if mode != "auto":
            return mode
        need = sum(p.numel() for p in self.base.parameters()) * self.dtype.itemsize
        free = _free_bytes(self.device)
        chosen = "whole" if need <= WHOLE_MODEL_MAX_SHARE * free else "layers"
        logger.info("calibration forward: %s (weights %.2f GB in %s, %.2f GB free on %s)",
                    chosen, need / 1e9, self.job.dtype, free / 1e9, self.device)
        return chosen

    def target_info(self, layer: int) -> dict[str, TargetModule]:
        return {n: tm for n, (_, tm) in self.targets.items() if tm.layer == layer}

    # -- weights ------------------------------------------------------------------------------
    def _wanted(self, module: nn.Module, local_prefix: str) -> list[tuple[str, str, bool]]:
        """``(local name, checkpoint name, required)`` of the tensors ``module`` needs: its
        parameters, and persistent buffers the checkpoint has (else they keep their value)."""
        params = {n for n, _ in module.named_parameters()}
        out = []
        for n in module.state_dict(keep_vars=True):
            ck = f"{self.prefix}{local_prefix}{n}"
            if n in params:
                out.append((n, ck, True))
            elif ck in self.ckpt.weight_map:
                out.append((n, ck, False))
        return out

    def _read(self, wanted: Sequence[tuple[str, str, bool]], tag: str) -> dict[str, Any]:
        """Read tensors to CPU (parallel ranged reads); digest them when asked."""
        t0 = time.perf_counter()
        refs: list[tuple[str, TensorRef]] = []
        for local, ck, _ in wanted:
            if ck not in self.ckpt.weight_map:
                raise CheckpointError(f"{self.job.model}: tensor {ck!r}, which the forward "
                                      "pass needs, is not in the checkpoint")
            refs.append((local, self.ckpt.ref(ck)))
        futs = [(local, ref, self._pool.submit(read_ref, self.storage, ref))
                for local, ref in refs]
        tensors: dict[str, torch.Tensor] = {}
        digest = None
        bufs = []
        required = {local for local, _, req in wanted if req}
        for local, ref, fut in futs:
            t, buf = fut.result()
            if local in required and ref.dtype not in ("F16", "BF16", "F32", "F64"):
                raise CheckpointError(f"{ref.describe()}: dtype {ref.dtype} is not a float "
                                      "type (quantized checkpoints are not supported)")
            tensors[local] = t
            bufs.append((ref.name, ref.dtype, ref.shape, buf))
        if self.hash_weights:
            from safelora_ray.formats.integrity import tree_digest

            bufs.sort(key=lambda b: b[0])
            names = json.dumps([[n, d, list(s)] for n, d, s, _ in bufs]).encode()
            digest = tree_digest([tag.encode(), names, *[b[3] for b in bufs]])
        nbytes = sum(ref.nbytes for _, ref in refs)
        return {"tensors": tensors, "digest": digest, "bytes": nbytes,
                "read_s": time.perf_counter() - t0}

    def _materialize(self, module: nn.Module, got: dict[str, Any], what: str) -> None:
        state = {n: t.to(device=self.device,
                         dtype=self.dtype if t.is_floating_point() else t.dtype)
                 for n, t in got["tensors"].items()}
        bad = [(n, tuple(t.shape)) for n, t in module.state_dict(keep_vars=True).items()
               if n in state and tuple(state[n].shape) != tuple(t.shape)]
        if bad:
            n, shape = bad[0]
            raise CheckpointError(
                f"{self.job.model}: tensor {self.prefix}{what}{n} has shape "
                f"{list(state[n].shape)}, the model (config.json) expects {list(shape)}")
        module.load_state_dict(state, strict=False, assign=True)
        self.stats["bytes_read"] += got["bytes"]

    def _prelude_names(self) -> list[tuple[str, bool]]:
        """``(name, is parameter)`` of the base model's tensors outside the decoder layers
        (embeddings, position embeddings, final norm ...), wherever the layers are nested
        (``layers``, ``h``, ``decoder.layers``)."""
        params = {n for n, _ in self.base.named_parameters()}
        lead = f"{self.layers_name}."
        return [(n, n in params) for n in self.base.state_dict(keep_vars=True)
                if not n.startswith(lead)]

    def _load_prelude(self) -> None:
        t0 = time.perf_counter()
        wanted = [(n, f"{self.prefix}{n}", is_param) for n, is_param in self._prelude_names()
                  if is_param or f"{self.prefix}{n}" in self.ckpt.weight_map]
        got = self._read(wanted, "prelude")
        self._materialize(self.base, got, "")
        if got["digest"]:
            self.digests[-1] = got["digest"]
        self.stats["load_s"] += time.perf_counter() - t0

    def _free_prelude(self) -> None:
        """Back to ``meta`` with the prelude's weights: layers mode needs them once."""
        for name, is_param in self._prelude_names():
            owner, _, leaf = name.rpartition(".")
            mod = self.base.get_submodule(owner) if owner else self.base
            if is_param:
                mod._parameters[leaf] = nn.Parameter(mod._parameters[leaf].to("meta"),
                                                     requires_grad=False)
            elif mod._buffers.get(leaf) is not None:
                mod._buffers[leaf] = mod._buffers[leaf].to("meta")

    def _read_layer(self, i: int) -> dict[str, Any]:
        lp = f"{self.layers_name}.{i}."
        return self._read(self._wanted(self.layers[i], lp), f"layer {i}")

    def _load_layer(self, i: int) -> None:
        t0 = time.perf_counter()
        if self._prefetch is not None and self._prefetch[0] == i:
            got = self._prefetch[1].result()
        else:
            got = self._read_layer(i)
        self._prefetch = None
        self._materialize(self.layers[i], got, f"{self.layers_name}.{i}.")
        if got["digest"]:
            self.digests[i] = got["digest"]
        self.stats["load_s"] += time.perf_counter() - t0

    # -- the passes ----------------------------------------------------------------------------
    def _forward_whole(self) -> None:
        self._load_prelude()
        for i in range(len(self.layers)):
            self._load_layer(i)
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
        self._load_prelude()
        t0 = time.perf_counter()
        last = max(tm.layer for _, tm in self.targets.values())
        originals = list(self.layers)
        for b in self.batches:
            calls: dict[int, Any] = {}
            for i in range(last + 1):
                self.layers[i] = _Recorder(originals[i], i, calls, last=i == last)
            try:
                with torch.inference_mode():
                    self.base(input_ids=b.input_ids, attention_mask=b.attention_mask,
                              use_cache=False)
            except _Stop:
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
        self._free_prelude()
        self._sync()
        self.stats["prelude_s"] += time.perf_counter() - t0

    def _run_layer(self, i: int) -> None:
        layer = self.layers[i]
        self._load_layer(i)
        if i + 1 <= self._last_layer:  # read the next layer while this one computes
            self._prefetch = (i + 1, self._pool.submit(self._read_layer, i + 1))
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

    @property
    def _last_layer(self) -> int:
        return max(tm.layer for _, tm in self.targets.values())

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
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.batches = []
        self._sigma_by_layer = {}


__all__ = ["DTYPES", "MODES", "CalibrationJob", "CalibrationRunner", "TargetModule",
           "make_batches", "model_config", "require_transformers"]
