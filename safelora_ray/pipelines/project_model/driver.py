"""Full fine-tunes (SPEC §3): project a fully fine-tuned checkpoint of the aligned model.

``project-model`` reads an alignment set, the aligned checkpoint and a full fine-tune of it,
and writes a complete Hugging Face checkpoint in the fine-tune's own layout: per target
module ΔW = W_ft − W_aligned (float32), cos(ΔW, CΔW) rounded to 5 decimals, and where
selected W_out = W_aligned + C ΔW cast to the tensor's dtype; every other tensor, the
safetensors headers (metadata included) and the non-weight files are the fine-tune's, byte
for byte.

The driver is a composition: lease ``--out`` → plan (:mod:`safelora_ray.planning.model_plan`)
→ check what ``--out`` holds (:mod:`.output`) → dispatch the files to workers
(:mod:`.worker`, on :class:`~safelora_ray.execution.dispatch.Dispatcher`) → index and reports.

Work unit: one output file = one weights file of the fine-tune (same name, same tensors in the
same order, same header bytes), so the index stays valid. Files go to workers (Ray actors, or
this process for a small model), one at a time per worker, largest first.

Selection. Threshold mode needs nothing global: one pass, each module decided where it is
computed. Number mode sets τ := the k-th smallest rounded cosine over *all* the model's target
modules, so it runs two phases: (1) workers compute every module's cosine and norms and return
only those numbers (no ΔW or CΔW is kept anywhere: a 70B model's q/v residuals would be
~24 GB); the driver selects; (2) the writing pass, the selection known, projects only the
selected modules (their aligned weight and matrix are read again) and copies the others like
non-targets. Number mode thus reads the fine-tune's target tensors twice, and the aligned
weights and matrices of the selected modules twice: the price of bounded memory.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from safelora_ray.core.errors import CheckpointError, ConfigError
from safelora_ray.core.scores import select_modules
from safelora_ray.execution import (
    INLINE_MAX_BUILD_BYTES,
    open_executor,
    resolve_workers,
)
from safelora_ray.execution.dispatch import Dispatcher, Policy, Task
from safelora_ray.execution.progress import Progress
from safelora_ray.formats.alignment_set import AlignmentSet
from safelora_ray.formats.checkpoint import INDEX_FILE, SINGLE_FILE, Checkpoint
from safelora_ray.pipelines.project_model.config import (
    FORMAT,
    FORMAT_VERSION,
    MAX_LOST,
    PROVENANCE_FILE,
    STATE_DIR,
    FinetuneConfig,
    FinetuneResult,
    ProjectJob,
)
from safelora_ray.pipelines.project_model.output import (
    check_out,
    copy_extras,
    summary,
    write_index,
)
from safelora_ray.pipelines.project_model.worker import end_run, score_file, write_file
from safelora_ray.planning.model_plan import OutputFile, plan_model
from safelora_ray.planning.provenance import aligned_matches_set
from safelora_ray.reports.model import write_reports
from safelora_ray.storage import open_storage
from safelora_ray.storage.guards import probe_outputs
from safelora_ray.storage.lease import hold_output
from safelora_ray.storage.local import sweep_stale_writes  # killed writers' temps

logger = logging.getLogger(__name__)


def _run_files(ex: Any, fn: Callable[..., Any], job: Any, token: str,
               files: Sequence[OutputFile], args: Callable[[OutputFile], tuple[Any, ...]],
               timeout_s: float, what: str,
               on_result: Callable[[OutputFile, dict[str, Any]], None]) -> None:
    """Run ``fn(ctx, job, file, *args(file))`` for every file, one at a time per worker,
    largest files first; a file whose worker died is run again (on that worker once Ray has
    restarted it, else on another: a lost node's worker is dropped), ``MAX_LOST`` times at
    most. ``job`` may be an object reference (put once for all files); ``token`` is the run's
    job id, which an interrupt cancels: files in flight finish (at most the grace period) or
    their workers are stopped; temp files go with the driver's sweep, and without the index
    nothing is visible."""
    by_path = {f.path: f for f in files}
    tasks = [Task(fn, (job, f, *args(f)), item=f.path, group="stream")
             for f in sorted(files, key=lambda f: -f.size)]
    policy = Policy(what, timeout_s, token, in_flight=1, attempts=MAX_LOST,
                    mark_last_loss=False)

    def failed(task: Task, e: BaseException) -> None:
        raise CheckpointError(f"{task.item}: its worker died {MAX_LOST} times "
                              f"({type(e).__name__}); giving up") from e

    Dispatcher(ex, policy).run(tasks, lambda t, r: on_result(by_path[t.item], r), failed)


def project_model(config: FinetuneConfig) -> FinetuneResult:
    """Project a full fine-tune of the aligned model (SPEC §3) on Ray.

    Returns:
        A :class:`FinetuneResult`. If ``config.out`` already holds a complete output made
        from the same inputs (same set, file versions and selection), it is reused.

    Raises:
        CheckpointError: bad or mismatched inputs (names the tensor or file), or ``--out``
            holds something that may not be overwritten.
        AlignmentSetError: the alignment set is missing or incomplete.
        ConfigError: the set holds SaLoRA safety modules.
        LeaseHeldError: another run writes to ``out`` (and ``wait_s`` ran out).
    """
    run_id = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + \
        uuid.uuid4().hex[:6]
    # Before any work; even a reuse of a complete output takes the lease, so it is writable.
    probe_outputs(config.outputs)
    # One writer per --out: what it holds is checked, swept and written by this run alone.
    lease = hold_output(open_storage(config.out), "project-model", run_id, config.wait_s)
    try:
        return _project_model(config, run_id)
    finally:
        lease.release()


def _project_model(config: FinetuneConfig, run_id: str) -> FinetuneResult:
    t_start = time.perf_counter()
    aset = AlignmentSet.open(config.alignment)
    if aset.method_family != "safelora":  # as sanitize's --method check: never silently
        raise ConfigError(
            f"{aset.uri} holds {aset.method_name} safety modules (made by safelora-ray "
            "salora-modules); project-model needs a Safe LoRA alignment set (safelora-ray "
            "build): fold adapters with `sanitize --method salora` instead")
    aligned = Checkpoint.open(config.aligned)
    ft = Checkpoint.open(config.finetuned)
    out = open_storage(config.out)
    reports = open_storage(config.reports or out.describe(STATE_DIR))
    plan = plan_model(aset, aligned, ft)
    match = aligned_matches_set(aset, aligned, {t.aligned.path for t in plan.targets})
    marker = INDEX_FILE if ft.layout == "sharded" else SINGLE_FILE
    request = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "alignment": {"uri": aset.uri, "content_id": aset.content_id,
                      "method": aset.metadata.get("method", {}).get("name")},
        "aligned": aligned.source_info({t.aligned.path for t in plan.targets}),
        "finetuned": {**ft.source_info(), "extra_files": {
            p: ft.storage.version(p) for p, _ in plan.extra_files}},
        "selection": config.selection,
    }
    existing = check_out(out, marker, request, [aligned, ft])
    result = FinetuneResult(out.uri, reports.uri, must_read_bytes=plan.must_read_bytes)
    if existing is not None:
        s = existing.get("summary", {})
        logger.info("%s already holds this projection (alignment set %s); reusing it",
                    out.uri, aset.content_id)
        result.reused = True
        result.modules = s.get("counts", {}).get("modules", 0)
        result.selected = s.get("counts", {}).get("selected", 0)
        result.tau = s.get("tau")
        result.selected_modules = list(s.get("selected_modules", []))
        result.duration_s = time.perf_counter() - t_start
        return result

    sweep_stale_writes(out)
    out.put_bytes(PROVENANCE_FILE, json.dumps(
        {**request, "status": "writing", "run_id": run_id}, indent=2).encode())
    wplan = resolve_workers(config.workers, config.use_gpu, config.ray_address,
                            small=plan.must_read_bytes <= INLINE_MAX_BUILD_BYTES, shape="device")
    ex = open_executor(wplan.take(max(1, len(plan.files))), config.use_gpu)
    try:
        ex.check_shared([("--out", config.out, True), ("--alignment", config.alignment, False),
                         ("--aligned", config.aligned, False),
                         ("--finetuned", config.finetuned, False)])
    except BaseException:
        ex.close(False)
        raise
    job = ProjectJob(uuid.uuid4().hex, aset.uri, aset.content_id, out.uri, config.chunk_bytes,
                     config.prefetch, max((max(t.ft.nbytes, t.aligned.nbytes)
                                           for t in plan.targets), default=0))
    logger.info("projecting %d target modules of %s (%d file(s), %.2f GB) with alignment set "
                "%s (%s) on %d %s worker(s) → %s", len(plan.targets), ft.uri, len(plan.files),
                plan.weights_bytes / 1e9, aset.content_id, config.selection, ex.size, ex.kind,
                out.uri)
    # Non-weight files first: without its weights marker the output is not a checkpoint.
    extra_bytes = copy_extras(ft, out, plan.extra_files)
    stats = {"score_s": 0.0, "compute_s": 0.0, "write_s": 0.0}
    fetched = [0]
    rows: dict[str, dict[str, Any]] = {}
    device = "cpu"
    ok = False
    try:
        selected: frozenset[str] | None = None
        tau = config.threshold
        if config.num_proj_layers is not None:
            t0 = time.perf_counter()
            scored = [f for f in plan.files if f.targets]
            bar = Progress("score", "module", total=len(plan.targets),
                           enabled=config.progress)

            def scored_one(f: OutputFile, r: dict[str, Any]) -> None:
                fetched[0] += r["bytes_fetched"]
                stats["compute_s"] += r["compute_s"]
                for row in r["rows"]:
                    rows[row["module"]] = row
                bar.update(len(r["rows"]))

            try:
                _run_files(ex, score_file, ex.put(job), job.job_id, scored, lambda f: (),
                           config.task_timeout_s, "scored file", scored_one)
            finally:
                bar.close()
            chosen = select_modules({m: r["cos_rounded"] for m, r in rows.items()},
                                    num_proj_layers=config.num_proj_layers,
                                    strict=config.strict_k)
            selected = frozenset(chosen)
            finite = sorted(r["cos_rounded"] for r in rows.values()
                            if not math.isnan(r["cos_rounded"]))
            tau = finite[min(config.num_proj_layers, len(finite)) - 1] if finite else None
            stats["score_s"] = time.perf_counter() - t0
        bar = Progress("project-model", "B", total=plan.weights_bytes, unit_scale=True,
                       enabled=config.progress)

        def written(f: OutputFile, r: dict[str, Any]) -> None:
            nonlocal device
            fetched[0] += r["bytes_fetched"]
            device = r["device"]
            for k in ("compute_s", "write_s"):
                stats[k] += r[k]
            for row in r["rows"]:
                rows[row["module"]] = row  # number mode: the selected ones, rescored
            bar.update(f.size)

        try:
            _run_files(ex, write_file, ex.put(job), job.job_id, plan.files,
                       lambda f: (ft.uri, config.threshold, selected), config.task_timeout_s,
                       "output file", written)
        finally:
            bar.close()
        ok = True
    finally:
        if ok and not ex.owns_workers:
            ex.notify(end_run, job)
        ex.close(ok)
        # A worker killed mid-file leaves its temp file beside the target; no writer is left.
        try:
            sweep_stale_writes(out)
        except Exception as e:  # never mask the run's own outcome
            logger.warning("could not remove stale temp files under %s: %s", out.uri, e)
    if selected is not None:
        for m, row in rows.items():
            row["selected"] = m in selected
    if config.threshold is not None and len(rows) != len(plan.targets):
        raise CheckpointError(f"scored {len(rows)} of {len(plan.targets)} target modules")

    result.modules = len(rows)
    result.selected_modules = sorted(m for m, r in rows.items() if r["selected"])
    result.selected = len(result.selected_modules)
    result.tau = tau
    # Everything fetched from the inputs: the driver's index/header/config reads + workers'.
    result.bytes_read = (fetched[0] + aset.storage.bytes_read + aligned.storage.bytes_read
                         + ft.storage.bytes_read)
    result.bytes_written = plan.weights_bytes
    result.workers = 0 if ex.in_process else ex.size
    result.device = device
    result.stats = stats
    result.duration_s = time.perf_counter() - t_start
    record = summary(config, result, aset, ft, plan, match, run_id, extra_bytes)
    ordered = sorted(rows.values(), key=lambda r: (r["layer"] if r["layer"] is not None else -1,
                                                   r["module"]))
    write_reports(reports, ordered, record)
    out.put_bytes(PROVENANCE_FILE, json.dumps(
        {**request, "status": "complete", "run_id": run_id, "summary": record},
        indent=2, ensure_ascii=False).encode())
    if ft.layout == "sharded":
        write_index(ft, out, plan)  # last: its presence makes the output a checkpoint
    logger.info("projected %d of %d modules (τ = %s) into %s in %.1f s; reports at %s",
                result.selected, result.modules, tau, out.uri, result.duration_s, reports.uri)
    return result


__all__ = ["FinetuneConfig", "FinetuneResult", "project_model"]
