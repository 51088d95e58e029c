"""What a build is asked to do (:class:`BuildConfig`, validated on construction) and what it
did (:class:`BuildResult`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from safelora_ray.core.errors import ConfigError
from safelora_ray.core.validate import check_at_least, check_positive, flag
from safelora_ray.planning.plan import (
    DEFAULT_MAX_FILE_BYTES,
    DEFAULT_TARGETS,
    Projection,
    parse_targets,
)
from safelora_ray.storage.guards import Output, check_outputs
from safelora_ray.storage.uri import check_uri

logger = logging.getLogger(__name__)


@dataclass
class BuildConfig:
    """Parameters of one alignment-set build.

    Attributes:
        base: URI of the base (unaligned) checkpoint.
        aligned: URI of the aligned checkpoint.
        out: URI where the alignment set is written.
        targets: Module-name suffixes (``q_proj,v_proj``).
        workers: Worker actors; 0 = in this process; None = one per GPU, or one per CPU
            without GPUs (in this process for a small pair when no Ray cluster is
            configured: see :mod:`safelora_ray.execution.resolve`).
        use_gpu: Force GPU (True) or CPU (False); None = GPUs when the cluster has them.
        max_file_bytes: Cap on one output safetensors file.
        prefetch: Modules read ahead per worker (bounds worker memory).
        task_timeout_s: Longest a single output file may take before the build fails.
        progress: Show a progress bar.
        ray_address: Cluster address; None = ``RAY_ADDRESS`` or a new local Ray.
        projection: ``fast`` (the paper's C = V Vᵀ/‖V‖_F) or ``exact`` (the truncated
            projection U_k U_kᵀ, SPEC §1), with ``rank`` or ``energy``.
        rank: ``exact``: keep k = rank directions per module.
        energy: ``exact``: keep the smallest k with Σ_{i≤k}σᵢ²/Σσᵢ² ≥ energy.
    """

    base: str
    aligned: str
    out: str
    targets: Sequence[str] | str = DEFAULT_TARGETS
    workers: int | None = None
    use_gpu: bool | None = None
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    prefetch: int = 2
    task_timeout_s: float = 3600.0
    progress: bool = True
    ray_address: str | None = None
    projection: str = "fast"
    rank: int | None = None
    energy: float | None = None

    def __post_init__(self) -> None:
        self.targets = parse_targets(self.targets)
        self.projection_spec  # noqa: B018 - validates projection/rank/energy
        if self.workers is not None:
            check_at_least(self.workers, "workers", 0, " (0 = in this process)")
        if isinstance(self.max_file_bytes, bool) or not isinstance(self.max_file_bytes, int) \
                or self.max_file_bytes < 1:
            raise ConfigError(f"--max-file-gb must be positive, got {self.max_file_bytes!r} bytes")
        check_at_least(self.prefetch, "prefetch", 1)
        check_positive(self.task_timeout_s, "timeout")
        for name in ("base", "aligned", "out"):
            check_uri(getattr(self, name), flag(name))
        # Never write into a source checkout (nor around one: its files would be listed as
        # part of the set's folder).
        check_outputs(self.outputs, [
            (flag(name), getattr(self, name),
             "the alignment set would be written into a source checkout")
            for name in ("base", "aligned")])

    @property
    def outputs(self) -> list[Output]:
        """What the build writes (see :func:`~safelora_ray.storage.guards.check_outputs`)."""
        return [Output("--out", self.out)]

    @property
    def projection_spec(self) -> Projection:
        """The stored form as a :class:`~safelora_ray.planning.plan.Projection` (validated)."""
        return Projection(self.projection, self.rank, self.energy)  # type: ignore[arg-type]


@dataclass
class BuildResult:
    """What a build did."""

    uri: str
    content_id: str
    num_modules: int
    source_bytes: int
    bytes_read: int
    stored_bytes: int
    duration_s: float
    reused: bool = False
    workers: int = 0  # worker actors used; 0 = this process (or nothing built: reused)
    device: str = "cpu"
    stats: dict[str, float] = field(default_factory=dict)


__all__ = ["BuildConfig", "BuildResult"]
