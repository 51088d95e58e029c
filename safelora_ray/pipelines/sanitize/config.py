"""What a sanitize run is given (:class:`SanitizeConfig`) and what it returns
(:class:`SanitizeResult`)."""

from __future__ import annotations

import datetime as _dt
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from safelora_ray.core.errors import ConfigError
from safelora_ray.core.merge import DEFAULT_WEIGHTS, MergeRule, parse_weights
from safelora_ray.core.selection import Selection
from safelora_ray.core.validate import check_at_least, check_positive, flag
from safelora_ray.formats.alignment_set import AlignmentSet
from safelora_ray.planning.catalog import is_manifest
from safelora_ray.storage.guards import Output, check_outputs
from safelora_ray.storage.uri import check_uri

logger = logging.getLogger(__name__)

#: ``--method``: Safe LoRA's alignment sets, SaLoRA's safety modules (SPEC §4), or SafeMERGE's
#: merge with a safety adapter (SPEC §5, on a Safe LoRA set).
METHODS = ("safelora", "salora", "safemerge")

REPORTS_PREFIX = "_reports"


#: Batches in flight per worker unless ``max_in_flight`` says: local storage, and a catalog
#: or output on an object store.
IN_FLIGHT, IN_FLIGHT_REMOTE = 2, 3


@dataclass
class SanitizeConfig:
    """Parameters of one fleet sanitization run.

    Attributes:
        alignment: URI of a complete alignment set.
        adapters: Catalog URI: a directory tree (local or ``s3://``) or a ``.parquet`` /
            ``.jsonl`` manifest with a ``uri`` column.
        out: Output root; adapter ``<id>`` goes to ``<out>/<id>/``, reports to
            ``<out>/_reports/<run_id>/``.
        threshold: Project every module whose rounded cosine is ≤ this (SPEC §2).
        num_proj_layers: Or: project the k modules with the smallest cosines (ties included).
        strict_k: With ``num_proj_layers``: exactly k modules, ties broken by module name.
        force: Redo adapters the ledger says are already done.
        workers: I/O workers (read, check, write adapters); 0 = in this process; None = one
            per CPU left beside the holders of the set (in this process for a catalog of at
            most :func:`~safelora_ray.execution.resolve.inline_max_adapters` adapters, 768 on
            2 CPUs and 256 from 6 on, when no Ray cluster is configured).
        use_gpu: Force GPU/CPU workers; None = GPUs when the cluster has them.
        workers_per_gpu: Holders of the alignment set per GPU, each with its own copy (on a
            CPU-only node the first I/O worker shares it with the others, once: its files
            mapped).
        batch_size: Adapters per task (their B matrices are batched per module).
        max_in_flight: Batches queued per worker (backpressure); None: 2, or 3 where the
            catalog or the output is on an object store (:meth:`in_flight`).
        run_id: Report folder name; default ``YYYYmmddTHHMMSSZ-<random>``.
        progress: Show a progress bar.
        task_timeout_s: Longest one batch may take.
        max_adapter_bytes: Largest adapter weights file read into memory.
        ray_address: Cluster address; None = ``RAY_ADDRESS`` or a new local Ray.
        allow_empty: A catalog with no adapters is an error (a mistyped catalog would
            otherwise make a run that silently does nothing) unless this is set.
        method: ``safelora`` (an alignment set from ``build``: B ← C B) or ``salora`` (a
            safety-module set from ``salora-modules``: B ← (I − V_s V_sᵀ) B, SPEC §4); must
            match the set. With ``salora`` and neither ``threshold`` nor
            ``num_proj_layers``, every module is folded.
        tenant_depth: Path components of an adapter id that name its tenant (reports).
        wait_s: When another run holds ``out``'s lease: wait at most this long for it
            (``math.inf``: as long as it takes); None: refuse at once (LeaseHeldError).
        safety_adapter: ``safemerge`` only (and required there): the safety adapter's URI.
        weights: ``safemerge`` only: (w_f, w_s) or ``"w_f,w_s"`` (default 0.8,0.2).
        combination: ``safemerge`` only: ``linear`` (default) or ``cat``.
    """

    alignment: str
    adapters: str
    out: str
    threshold: float | None = None
    num_proj_layers: int | None = None
    strict_k: bool = False
    force: bool = False
    workers: int | None = None
    use_gpu: bool | None = None
    workers_per_gpu: int = 1
    batch_size: int = 8
    max_in_flight: int | None = None
    run_id: str | None = None
    progress: bool = True
    task_timeout_s: float = 1800.0
    max_adapter_bytes: int = 4 * 1024**3
    ray_address: str | None = None
    allow_empty: bool = False
    method: str = "safelora"
    tenant_depth: int = 1
    wait_s: float | None = None
    safety_adapter: str | None = None
    weights: tuple[float, float] | str | None = None
    combination: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got "
                              f"{self.method!r}")
        self._check_merge()
        Selection(self.threshold, self.num_proj_layers, self.strict_k, self.method)  # checks
        for name in ("batch_size", "max_in_flight", "workers_per_gpu", "tenant_depth"):
            if getattr(self, name) is not None:
                check_at_least(getattr(self, name), name, 1)
        if self.workers is not None:
            check_at_least(self.workers, "workers", 0, " (0 = in this process)")
        check_positive(self.task_timeout_s, "timeout")
        if self.run_id is None:
            now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            self.run_id = f"{now}-{uuid.uuid4().hex[:6]}"
        elif not self.run_id.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ConfigError(f"--run-id {self.run_id!r} may only use letters, digits, . _ -")
        for name in ("alignment", "adapters", "out", "safety_adapter"):
            if getattr(self, name) is not None:
                check_uri(getattr(self, name), flag(name))
        # Inputs are never written, and outputs never become inputs of the next run (a
        # manifest's own entries are checked one by one as they are listed).
        check_outputs(self.outputs, [
            ("--adapters", self.adapters, "the run would write over the manifest"
             if is_manifest(self.adapters) else "sanitized adapters would overwrite the "
             "originals or become catalog entries of the next run"),
            ("--alignment", self.alignment, "the run would write into the alignment set"),
            *([("--safety-adapter", self.safety_adapter, "the run would write into the safety "
                "adapter")] if self.safety_adapter else [])])

    def in_flight(self, remote: bool) -> int:
        """Batches in flight per worker: ``max_in_flight``, else 2, or 3 when the catalog or
        the output is ``remote``: its requests wait on round trips, and a third batch keeps
        the I/O threads busy meanwhile (docs/benchmarks.md §15.3)."""
        if self.max_in_flight is not None:
            return self.max_in_flight
        return IN_FLIGHT_REMOTE if remote else IN_FLIGHT

    def _check_merge(self) -> None:
        """SafeMERGE's flags: a safety adapter required with it, none of them without it."""
        if self.method != "safemerge":
            given = [f for f, v in (("--safety-adapter", self.safety_adapter),
                                    ("--weights", self.weights),
                                    ("--combination", self.combination)) if v is not None]
            if given:
                raise ConfigError(f"{given[0]} is only used with --method safemerge (this run's "
                                  f"method is {self.method})")
            return
        if not self.safety_adapter:
            raise ConfigError("--method safemerge needs --safety-adapter URI (the LoRA adapter "
                              "the drifting modules are merged with)")
        _ = self.merge_rule  # checks --weights and --combination

    @property
    def merge_rule(self) -> MergeRule:
        """SafeMERGE's weights and combination (defaults: 0.8,0.2 and linear)."""
        return MergeRule(DEFAULT_WEIGHTS if self.weights is None else parse_weights(self.weights),
                         self.combination or "linear")

    @property
    def outputs(self) -> list[Output]:
        """What the run writes (see :func:`~safelora_ray.storage.guards.check_outputs`)."""
        return [Output("--out", self.out)]

    @property
    def selection(self) -> Selection:
        """The selection, as the workers apply it and (:meth:`Selection.record`) the ledger
        and reports record it."""
        return Selection(self.threshold, self.num_proj_layers, self.strict_k, self.method)


@dataclass
class SanitizeResult:
    """Counts and locations of one run."""

    run_id: str
    out: str
    report_uri: str
    total: int = 0
    ok: int = 0
    skipped: int = 0
    error: int = 0
    modules: int = 0
    projected: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    duration_s: float = 0.0
    alignment_id: str = ""
    errors: list[tuple[str, str]] = field(default_factory=list)
    method: str = "safelora"

    @property
    def exit_ok(self) -> bool:
        return self.error == 0

    def count(self, row: dict[str, Any]) -> None:
        """Add one adapter's report row to the counts (the first 1,000 errors are kept)."""
        status = row["status"]
        self.total += 1
        setattr(self, status, getattr(self, status) + 1)
        self.modules += row["modules"]
        self.projected += row["projected"] if status == "ok" else 0
        self.bytes_in += row["bytes_in"]
        self.bytes_out += row["bytes_out"]
        if status == "error" and len(self.errors) < 1000:
            self.errors.append((row["adapter_id"], row["error"]))


def check_method(aset: AlignmentSet, method: str) -> None:
    """``--method`` must name the method the set was made for (SafeMERGE uses Safe LoRA's).

    Raises:
        ConfigError: a Safe LoRA set with ``salora``, or SaLoRA safety modules without it.
    """
    if aset.method_family != ("safelora" if method == "safemerge" else method):
        made_by = ("safelora-ray salora-modules" if aset.method_family == "salora"
                   else "safelora-ray build")
        raise ConfigError(
            f"{aset.uri} holds {aset.method_name or 'unknown'} matrices (made by {made_by}), "
            f"but --method is {method}: use --method {aset.method_family}")


__all__ = ["METHODS", "REPORTS_PREFIX", "SanitizeConfig", "SanitizeResult", "check_method"]
