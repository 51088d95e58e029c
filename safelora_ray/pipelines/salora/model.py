"""The aligned model for SaLoRA's forward pass: its skeleton built by ``transformers`` with
parameters on the ``meta`` device (``accelerate.init_empty_weights``; buffers such as the
rotary frequencies stay real), its target linears, and its weights read tensor by tensor from
the checkpoint with ranged reads (local, ``s3://``, ``hf://``: never ``from_pretrained``),
the prelude (embeddings, final norm...) or one decoder layer at a time.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from safelora_ray.core.errors import CheckpointError, ConfigError
from safelora_ray.formats.checkpoint import Checkpoint, TensorRef, read_ref
from safelora_ray.formats.integrity import tree_digest
from safelora_ray.planning.targets import FLOAT_DTYPES, match_target
from safelora_ray.storage import Storage

logger = logging.getLogger(__name__)

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


class LoadedModel:
    """The model of one checkpoint, its weights loaded on demand (plain Python).

    Args:
        uri: The checkpoint.
        config_dict: Its ``config.json``.
        targets: Module-name suffixes.
        dtype: The forward dtype (floating weights are cast to it).
        device: ``cpu`` or ``cuda``.
        hash_weights: Digest every tensor read (for the set's content id).
    """

    def __init__(self, uri: str, config_dict: dict[str, Any], targets: Sequence[str],
                 dtype: torch.dtype, device: str, hash_weights: bool = False) -> None:
        require_transformers()
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        self.uri = uri
        self.target_names = tuple(targets)
        self.dtype = dtype
        self.device = device
        self.hash_weights = hash_weights
        self.ckpt = Checkpoint.open(uri)
        self.storage: Storage = self.ckpt.storage
        config = model_config(config_dict, uri)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config)
        model.eval().requires_grad_(False)
        self.model = model
        self.base: nn.Module = model.base_model
        self.prefix = self._checkpoint_prefix()
        self.layers_name, self.layers = self._decoder_layers(config)
        self.targets = self._find_targets()
        self.pad_id = self._pad_id(config)
        #: Per part read (-1: the prelude, i: decoder layer i): its weights' digest.
        self.digests: dict[int, str] = {}
        self.stats = {"load_s": 0.0, "forward_s": 0.0, "prelude_s": 0.0, "bytes_read": 0}
        self._pool = cf.ThreadPoolExecutor(READ_THREADS, thread_name_prefix="salora-read")
        self._prefetch: tuple[int, cf.Future[Any]] | None = None

    # -- structure ---------------------------------------------------------------------------
    def _checkpoint_prefix(self) -> str:
        """How the checkpoint names the base model's tensors (``model.``, ``gpt_neox.``, or
        nothing for a checkpoint saved from the base model class)."""
        prefix = next((f"{n}." for n, m in self.model.named_children() if m is self.base), "")
        names = [n for n, _ in self.base.named_parameters()]
        if not names:
            raise ConfigError(f"{self.uri}: the model has no parameters")
        if any(prefix + n in self.ckpt.weight_map for n in names):
            return prefix
        if any(n in self.ckpt.weight_map for n in names):
            return ""
        raise CheckpointError(
            f"{self.uri}: no tensor of the model ({prefix}{names[0]}, ...) is in the "
            "checkpoint: does config.json belong to these weights?")

    def _decoder_layers(self, config: Any) -> tuple[str, nn.ModuleList]:
        n = int(config.num_hidden_layers)
        found = [(name, m) for name, m in self.base.named_modules()
                 if isinstance(m, nn.ModuleList) and len(m) == n and name]
        if not found:
            raise ConfigError(f"{self.uri}: cannot find the {n} decoder layers of "
                              f"{type(self.base).__name__}")
        name, layers = min(found, key=lambda t: t[0].count("."))
        return name, layers  # type: ignore[return-value]

    def _find_targets(self) -> dict[str, tuple[nn.Module, TargetModule]]:
        from transformers.pytorch_utils import Conv1D

        out: dict[str, tuple[nn.Module, TargetModule]] = {}
        lead = f"{self.layers_name}."
        for name, module in self.base.named_modules():
            full = self.prefix + name
            if not name or match_target(full, self.target_names) is None:
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
            raise ConfigError(f"{self.uri}: no linear module matches the targets "
                              f"{','.join(self.target_names)}")
        return out

    @staticmethod
    def _pad_id(config: Any) -> int:
        pad = getattr(config, "pad_token_id", None)
        if isinstance(pad, int) and 0 <= pad < int(getattr(config, "vocab_size", pad + 1)):
            return pad
        return 0  # padded positions are masked out of attention and of Σ

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
                raise CheckpointError(f"{self.uri}: tensor {ck!r}, which the forward "
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
            if local in required and ref.dtype not in FLOAT_DTYPES:
                raise CheckpointError(f"{ref.describe()}: dtype {ref.dtype} is not a float "
                                      "type (quantized checkpoints are not supported)")
            tensors[local] = t
            bufs.append((ref.name, ref.dtype, ref.shape, buf))
        if self.hash_weights:
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
                f"{self.uri}: tensor {self.prefix}{what}{n} has shape "
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

    def load_prelude(self) -> None:
        """Read and place the prelude's weights (embeddings, final norm...)."""
        t0 = time.perf_counter()
        wanted = [(n, f"{self.prefix}{n}", is_param) for n, is_param in self._prelude_names()
                  if is_param or f"{self.prefix}{n}" in self.ckpt.weight_map]
        got = self._read(wanted, "prelude")
        self._materialize(self.base, got, "")
        if got["digest"]:
            self.digests[-1] = got["digest"]
        self.stats["load_s"] += time.perf_counter() - t0

    def free_prelude(self) -> None:
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

    def load_layer(self, i: int) -> None:
        """Read (or take the prefetched) and place decoder layer ``i``'s weights."""
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

    def prefetch_layer(self, i: int) -> None:
        """Start reading layer ``i``'s weights (taken by the next ``load_layer(i)``)."""
        self._prefetch = (i, self._pool.submit(self._read_layer, i))

    @property
    def param_bytes(self) -> int:
        """The base model's weights in the forward dtype."""
        return sum(p.numel() for p in self.base.parameters()) * self.dtype.itemsize

    @property
    def last_layer(self) -> int:
        """The last decoder layer with a target."""
        return max(tm.layer for _, tm in self.targets.values())

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


__all__ = ["LoadedModel", "TargetModule", "model_config", "require_transformers"]
