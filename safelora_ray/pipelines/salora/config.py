"""The parameters and outcome of one safety-module computation (SPEC §4)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from safelora_ray.core.errors import ConfigError
from safelora_ray.core.validate import check_at_least, check_positive, flag
from safelora_ray.pipelines.salora.forward import DTYPES, MODES
from safelora_ray.planning.plan import DEFAULT_MAX_FILE_BYTES
from safelora_ray.planning.targets import DEFAULT_TARGETS, parse_targets
from safelora_ray.storage.guards import Output, check_outputs
from safelora_ray.storage.uri import check_uri

logger = logging.getLogger(__name__)

#: SaLoRA's official code uses r_s = 32.
DEFAULT_SAFETY_RANK = 32
#: Padded positions per forward batch.
DEFAULT_BATCH_TOKENS = 4096


@dataclass
class SaloraConfig:
    """Parameters of one safety-module computation (SPEC §4).

    Attributes:
        model: URI of the aligned checkpoint (with its ``config.json``; with its tokenizer
            files when the calibration set is text).
        calibration: URI of the calibration JSONL (see
            :mod:`safelora_ray.pipelines.salora.calibration`).
        out: URI where the safety-module set is written.
        targets: Module-name suffixes (``q_proj,v_proj``).
        safety_rank: r_s, directions kept per module (SaLoRA: 32).
        dtype: Forward dtype: ``float32`` (default), ``bfloat16``, ``float16`` or
            ``float64``; Σ is accumulated in float64 whatever it is.
        mode: ``whole`` (every weight on the device), ``layers`` (one decoder layer at a
            time) or ``auto`` (whole when the weights take at most half the device's free
            memory).
        batch_tokens: Padded positions per forward batch.
        workers: Data-parallel workers; 0 = in this process; None = one per GPU, or one per
            CPU without GPUs (in this process for a checkpoint of at most 2 GiB when no Ray
            cluster is configured).
        use_gpu: Force GPU (True) or CPU (False); None = GPUs when the cluster has them.
        max_file_bytes: Cap on one output safetensors file.
        task_timeout_s: Longest one layer (or one module's decomposition) may take.
        export_cs: Also write C_s per module as safetensors keyed by PEFT module name here
            (see :mod:`safelora_ray.pipelines.salora.export`).
        force: Replace an existing file at ``export_cs`` (an earlier export of the same set
            is replaced without it).
        progress: Show a progress bar.
        ray_address: Cluster address; None = ``RAY_ADDRESS`` or a new local Ray.
    """

    model: str
    calibration: str
    out: str
    targets: Sequence[str] | str = DEFAULT_TARGETS
    safety_rank: int = DEFAULT_SAFETY_RANK
    dtype: str = "float32"
    mode: str = "auto"
    batch_tokens: int = DEFAULT_BATCH_TOKENS
    workers: int | None = None
    use_gpu: bool | None = None
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    task_timeout_s: float = 3600.0
    export_cs: str | None = None
    progress: bool = True
    ray_address: str | None = None
    force: bool = False

    def __post_init__(self) -> None:
        self.targets = parse_targets(self.targets)
        for name in ("model", "calibration", "out"):
            check_uri(getattr(self, name), flag(name))
        if self.export_cs is not None:
            check_uri(self.export_cs, "--export-cs")
        check_at_least(self.safety_rank, "safety_rank", 1)
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.mode not in MODES:
            raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        check_at_least(self.batch_tokens, "batch_tokens", 1)
        if self.workers is not None:
            check_at_least(self.workers, "workers", 0, " (0 = in this process)")
        if isinstance(self.max_file_bytes, bool) or not isinstance(self.max_file_bytes, int) \
                or self.max_file_bytes < 1:
            raise ConfigError(f"--max-file-gb must be positive, got {self.max_file_bytes!r} bytes")
        check_positive(self.task_timeout_s, "timeout")
        # Inputs are never written; the export goes apart from the set too (a set's folder
        # holds the set alone).
        check_outputs(self.outputs, [
            ("--model", self.model, "the run would write into the model's checkout"),
            ("--calibration", self.calibration, "the run would write over the calibration "
             "set")])
        if self.export_cs is not None:
            check_outputs(self.outputs[1:], [
                ("--out", self.out, "the export would be written into the safety-module set")])

    @property
    def outputs(self) -> list[Output]:
        """What the run writes: the set, and the export (see
        :func:`~safelora_ray.storage.guards.check_outputs`)."""
        from safelora_ray.pipelines.salora.export import export_output

        return [Output("--out", self.out),
                *([export_output(self.export_cs, "--export-cs")] if self.export_cs else [])]


@dataclass
class SaloraResult:
    """What a safety-module computation did."""

    uri: str
    content_id: str
    num_modules: int
    samples: int
    tokens: int
    duration_s: float
    reused: bool = False
    workers: int = 0  # worker actors used; 0 = this process
    device: str = "cpu"
    mode: str = ""
    positions: int = 0  # forward positions (prompt + response) over all samples
    stats: dict[str, float] = field(default_factory=dict)
    export_cs: str | None = None


__all__ = ["DEFAULT_BATCH_TOKENS", "DEFAULT_SAFETY_RANK", "SaloraConfig", "SaloraResult"]
