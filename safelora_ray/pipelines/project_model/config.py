"""project-model's parameters and outcome (:class:`FinetuneConfig`, :class:`FinetuneResult`),
the output's format names, and :class:`ProjectJob`: what every worker of one run shares."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from safelora_ray.core.errors import ConfigError
from safelora_ray.core.selection import Selection
from safelora_ray.core.validate import (
    check_at_least,
    check_positive,
    flag,
)
from safelora_ray.planning.model_plan import STATE_DIR
from safelora_ray.storage.guards import Output, check_outputs
from safelora_ray.storage.uri import check_uri, split_uri

logger = logging.getLogger(__name__)

FORMAT = "safelora-ray/projected-model"
FORMAT_VERSION = 1
#: The run's record, in our folder of the output checkpoint (``STATE_DIR``).
PROVENANCE_FILE = f"{STATE_DIR}/projection.json"
#: A file that keeps failing because its worker dies is given up after this many tries.
MAX_LOST = 3
DEFAULT_CHUNK_BYTES = 64 * 1024**2


@dataclass
class FinetuneConfig:
    """Parameters of one ``project-model`` run.

    Attributes:
        alignment: URI of a complete alignment set (built from the aligned model's pair).
        aligned: URI of the aligned checkpoint the fine-tune started from.
        finetuned: URI of the fully fine-tuned checkpoint.
        out: Where the projected checkpoint is written (local path or ``s3://``).
        threshold: Project every target module whose rounded cosine is ≤ this.
        num_proj_layers: Or: τ := the k-th smallest rounded cosine over all target modules.
        strict_k: With ``num_proj_layers``: exactly k modules, ties broken by module name.
        reports: Where the reports go; default ``<out>/_safelora``.
        workers: Worker actors; 0 = in this process; None = one per GPU, else one per CPU
            (in this process for a small model when no Ray cluster is configured).
        use_gpu: Force GPU (True) or CPU (False); None = GPUs when the cluster has them.
        chunk_bytes: Size of the ranged reads that copy non-target tensors.
        prefetch: Items (chunks or modules) a worker reads ahead.
        task_timeout_s: Longest one output file may take.
        progress: Show a progress bar.
        ray_address: Cluster address; None = ``RAY_ADDRESS`` or a new local Ray.
        wait_s: When another run holds ``out``'s lease: wait at most this long for it
            (``math.inf``: as long as it takes); None: refuse at once (LeaseHeldError).
    """

    alignment: str
    aligned: str
    finetuned: str
    out: str
    threshold: float | None = None
    num_proj_layers: int | None = None
    strict_k: bool = False
    reports: str | None = None
    workers: int | None = None
    use_gpu: bool | None = None
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    prefetch: int = 2
    task_timeout_s: float = 3600.0
    progress: bool = True
    ray_address: str | None = None
    wait_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("alignment", "aligned", "finetuned", "out"):
            check_uri(getattr(self, name), flag(name))
        if self.reports is not None:
            check_uri(self.reports, "--reports")
        Selection(self.threshold, self.num_proj_layers, self.strict_k)  # checks
        if self.workers is not None:
            check_at_least(self.workers, "workers", 0, " (0 = in this process)")
        if self.chunk_bytes < 4096:
            raise ConfigError("chunk_bytes must be at least 4096")
        check_at_least(self.prefetch, "prefetch", 1)
        check_positive(self.task_timeout_s, "timeout")
        if split_uri(self.out)[0] == "hf":
            raise ConfigError(f"--out {self.out}: the Hub is read-only here; write to a path "
                              "or s3://")
        # Inputs are never written: the projected checkpoint and its reports go apart from
        # all three.
        check_outputs(self.outputs, [
            (flag(name), getattr(self, name), "the outputs would be written into an input")
            for name in ("alignment", "aligned", "finetuned")])

    @property
    def outputs(self) -> list[Output]:
        """What the run writes (see :func:`~safelora_ray.storage.guards.check_outputs`)."""
        return [Output("--out", self.out),
                *([Output("--reports", self.reports)] if self.reports is not None else [])]

    @property
    def selection(self) -> dict[str, Any]:
        """The selection parameters, as recorded in the provenance and reports."""
        return Selection(self.threshold, self.num_proj_layers, self.strict_k).record()


@dataclass
class FinetuneResult:
    """What a ``project-model`` run did.

    Attributes:
        uri: The output checkpoint.
        reports_uri: Where ``layers.parquet``, ``summary.json`` and ``report.html`` are.
        modules: Target modules scored.
        selected: Modules projected.
        tau: The threshold applied (``threshold``, or the k-th smallest rounded cosine).
        bytes_read: Bytes fetched from the three inputs (driver and workers).
        must_read_bytes: What any run must read: every byte of the fine-tune's weights files,
            the aligned target tensors and the set's matrices of the target modules.
        bytes_written: Bytes of the output weights files.
        reused: The output was already complete, from the same inputs.
    """

    uri: str
    reports_uri: str
    modules: int = 0
    selected: int = 0
    tau: float | None = None
    bytes_read: int = 0
    must_read_bytes: int = 0
    bytes_written: int = 0
    duration_s: float = 0.0
    reused: bool = False
    workers: int = 0
    device: str = "cpu"
    stats: dict[str, float] = field(default_factory=dict)
    selected_modules: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ProjectJob:
    """What a worker needs for every file of one run (hashable: workers cache on it)."""

    job_id: str
    alignment_uri: str
    alignment_id: str
    out_uri: str
    chunk_bytes: int
    prefetch: int
    #: The largest target weight of the run (sizes the pool of reused read buffers).
    max_target_bytes: int = 0


__all__ = ["DEFAULT_CHUNK_BYTES", "FORMAT", "FORMAT_VERSION", "MAX_LOST", "PROVENANCE_FILE",
           "STATE_DIR", "FinetuneConfig", "FinetuneResult", "ProjectJob"]
