"""SaLoRA safety modules on a cluster: the calibration pass, data-parallel, then V_s per module.

The driver reads and tokenizes the calibration set, shares its samples out to the workers
(balanced by length) and asks every worker for one target layer at a time
(:func:`~.tasks.calibrate_layer`: each worker runs the aligned model over its share, whole or
layer by layer, see :mod:`safelora_ray.pipelines.salora.forward`, and returns that layer's Σ
per input group, float64). When all workers have returned a layer, the driver sums their Σ in
worker order and hands each target module of the layer to a worker
(:func:`~.tasks.decompose_module`: V_s = the top-r_s eigenvectors of ``W Σ Wᵀ``, on the
worker's GPU when it has one). Driver memory stays at a few layers' Σ whatever the model's
depth. The tasks run on the :class:`~safelora_ray.execution.dispatch.Dispatcher`, each pinned
to the worker holding its share. The result is written as a *safety-module set*: the
alignment-set format (``shards/`` + ``manifest.parquet`` + ``alignment.json`` last) with
``method.name = "salora"`` and stored form ``N`` (the basis V_s; a fold applies
``C_s = I − V_s V_sᵀ``).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from safelora_ray.core.errors import (
    AlignmentSetError,
    CheckpointError,
    ClusterError,
    ConfigError,
)
from safelora_ray.execution import (
    INLINE_MAX_BUILD_BYTES,
    open_executor,
    resolve_workers,
)
from safelora_ray.execution.dispatch import Dispatcher, Policy, Task
from safelora_ray.execution.progress import Progress
from safelora_ray.formats.alignment_set import (
    SALORA_METHOD,
    content_id,
    metadata_head,
    publish,
    read_metadata,
)
from safelora_ray.formats.checkpoint import Checkpoint
from safelora_ray.pipelines.salora.calibration import (
    CalibrationFile,
    TokenizedSamples,
    check_samples,
    load_tokenizer,
    pretokenized,
    read_calibration,
    tokenize,
)
from safelora_ray.pipelines.salora.config import (
    DEFAULT_SAFETY_RANK,
    SaloraConfig,
    SaloraResult,
)
from safelora_ray.pipelines.salora.forward import CalibrationJob, require_transformers
from safelora_ray.pipelines.salora.plan import PlannedModule, plan_modules
from safelora_ray.pipelines.salora.tasks import (
    calibrate_layer,
    decompose_module,
    end_calibration,
)
from safelora_ray.pipelines.salora.write import write_set
from safelora_ray.planning.provenance import same_inputs
from safelora_ray.storage import open_storage
from safelora_ray.storage.guards import probe_outputs

logger = logging.getLogger(__name__)

#: Target layers asked of the workers ahead of the one being summed (bounds driver memory).
LAYERS_AHEAD = 2


def _samples(cal: CalibrationFile, ckpt: Checkpoint, cfg: dict[str, Any]) -> TokenizedSamples:
    if cal.form == "tokens":
        samples = pretokenized(cal)
    else:
        samples = tokenize(cal, load_tokenizer(ckpt.storage), ckpt.uri)
    vocab = cfg.get("vocab_size")
    positions = cfg.get("max_position_embeddings") or cfg.get("n_positions")
    check_samples(samples, cal.uri, vocab_size=vocab if isinstance(vocab, int) else None,
                  max_positions=positions if isinstance(positions, int) else None)
    return samples


def _method(config: SaloraConfig, cal: CalibrationFile) -> dict[str, Any]:
    """The ``method`` record of the set (part of its content id)."""
    return {
        "name": SALORA_METHOD,
        "safety_rank": config.safety_rank,
        "compute_dtype": config.dtype,
        "accumulate_dtype": "float64",
        "stored_dtype": "float32",
        "decomposition": "V_s = top-r_s eigenvectors of W Σ Wᵀ (torch.linalg.eigh, float64); "
                         "the largest entry of each vector is positive",
        "forms": {"N": "V_s (d_out x r_s); a fold applies C_s = I − V_s V_sᵀ"},
        "calibration_sha256": cal.sha256,
    }


class _Calibration:
    """The calibration pass's bookkeeping on the driver: each layer's Σ from every share,
    summed once all are in, then its modules' decompositions (the dispatcher's callbacks).

    Args:
        ex: The executor (its workers hold the shares: share ``s`` on worker ``s``).
        job: The run.
        plan: The target modules.
        shipped: Each share of the calibration set (object references).
        config: The run's parameters.
        bar: Counts the decomposed modules.
    """

    def __init__(self, ex: Any, job: CalibrationJob, plan: list[PlannedModule],
                 shipped: list[Any], config: SaloraConfig, bar: Progress) -> None:
        self.ex = ex
        self.job = job
        self.shipped = shipped
        self.config = config
        self.bar = bar
        self.layers = sorted({m.layer for m in plan})
        self.by_layer: dict[int, list[PlannedModule]] = {}
        for m in plan:
            self.by_layer.setdefault(m.layer, []).append(m)
        self.partial: dict[int, dict[int, dict[str, Any]]] = {}
        self.results: dict[str, dict[str, Any]] = {}
        self.digests: dict[int, str] = {}
        self.worker_stats: dict[int, dict[str, Any]] = {}
        self.eigen_s = 0.0
        self.next_layer = min(LAYERS_AHEAD, len(self.layers))

    def first_tasks(self) -> list[Task]:
        return [t for k in range(self.next_layer) for t in self.layer_tasks(k)]

    def layer_tasks(self, k: int) -> list[Task]:
        """Every share through target layer ``layers[k]``, each on its own worker."""
        layer = self.layers[k]
        return [Task(calibrate_layer, (self.job, s, shipped, layer), item=("layer", (s, layer)),
                     pin=s, group="stream") for s, shipped in enumerate(self.shipped)]

    def done(self, task: Task, result: dict[str, Any]) -> list[Task]:
        kind, what = task.item
        if kind == "module":
            self.results[what.module] = result
            self.eigen_s += result["seconds"]
            if result["degenerate"]:
                logger.warning(
                    "module %s: %d of the %d safety directions carry no energy on the "
                    "calibration set (an arbitrary basis of a null space)", what.module,
                    result["degenerate"], self.config.safety_rank)
            self.bar.update(1)
            return []
        share, layer = what
        self.worker_stats[share] = result
        self.partial.setdefault(layer, {})[share] = result
        if len(self.partial[layer]) < len(self.shipped):
            return []
        follow = self._finish_layer(layer)
        if self.next_layer < len(self.layers):
            follow += self.layer_tasks(self.next_layer)
            self.next_layer += 1
        return follow

    @staticmethod
    def failed(task: Task, e: BaseException) -> None:
        # Each worker pushes its share of the calibration set through the layers in turn,
        # its hidden states held between calls: they died with it.
        raise ClusterError(
            f"a calibration worker died ({type(e).__name__}) with its share of the "
            "hidden states; run the command again (the forward pass is not "
            "resumable)") from e

    def _finish_layer(self, layer: int) -> list[Task]:
        """Σ of the layer summed over the shares; a decomposition task per module."""
        got = [self.partial[layer][s] for s in range(len(self.shipped))]
        del self.partial[layer]
        modules = got[0]["modules"]
        for s, g in enumerate(got[1:], 1):
            if g["modules"] != modules:
                raise RuntimeError(f"workers 0 and {s} disagree on the modules of layer {layer}")
        planned = {m.module for m in self.by_layer[layer]}
        if set(modules) != planned:
            raise CheckpointError(
                f"layer {layer}: the checkpoint's target weights "
                f"({', '.join(sorted(planned - set(modules))) or '-'} not in the model) and the "
                f"model's target modules ({', '.join(sorted(set(modules) - planned)) or '-'} "
                "not in the checkpoint) differ")
        self.digests.update(got[0]["digests"])
        # Summed in worker order: the same Σ for the same shares, whatever finished first.
        sigma: dict[str, Any] = {}
        for group in got[0]["sigmas"]:
            total = got[0]["sigmas"][group].clone()
            for g in got[1:]:
                total += g["sigmas"][group]
            sigma[group] = self.ex.put(total)
        tasks = []
        for j, m in enumerate(self.by_layer[layer]):
            info = modules[m.module]
            tasks.append(Task(decompose_module,
                              (m.module, m.weight, info["transposed"], sigma[info["group"]],
                               self.config.safety_rank),
                              item=("module", m), pin=(layer + j) % self.ex.size,
                              group="batch"))
        return tasks


def salora_modules(config: SaloraConfig) -> SaloraResult:
    """Compute and persist the SaLoRA safety modules of an aligned model (SPEC §4).

    Returns:
        A :class:`SaloraResult`. If ``config.out`` already holds a set computed from the same
        inputs (model files and versions, calibration digest, targets, r_s, dtype), it is
        reused as it is.

    Raises:
        ConfigError: bad parameters or calibration file (names the file and line).
        CheckpointError: bad model (names the tensor).
        AlignmentSetError: ``config.out`` holds a set computed from other inputs.
    """
    t_start = time.perf_counter()
    ckpt = Checkpoint.open(config.model)
    cfg = ckpt.model_config()
    if cfg is None:
        raise CheckpointError(f"{ckpt.uri}: no config.json beside the weights (the forward "
                              "pass needs the architecture)")
    targets = tuple(config.targets)
    plan = plan_modules(ckpt, targets, config.safety_rank)
    cal = read_calibration(config.calibration)
    samples = _samples(cal, ckpt, cfg)
    if samples.tokens < config.safety_rank:
        raise ConfigError(
            f"{cal.uri}: {samples.tokens} counted tokens, fewer than the safety rank "
            f"{config.safety_rank}: W Xᵀ has at most {samples.tokens} directions")
    out = open_storage(config.out)
    method = _method(config, cal)
    # Every weights file and config.json: the forward pass reads the whole model.
    proposed = {"targets": list(targets), "method": method,
                "model": ckpt.source_info(config=True)}
    existing = read_metadata(out)
    if existing is not None:
        if same_inputs(existing, proposed, equal=("targets", "method"), sources=("model",)):
            logger.info("%s already holds these safety modules (%s); reusing them", out.uri,
                        existing["content_id"])
            reused = SaloraResult(out.uri, existing["content_id"], existing["num_modules"],
                                  len(samples), samples.tokens, time.perf_counter() - t_start,
                                  reused=True)
            return _export(reused, config)
        raise AlignmentSetError(
            f"{out.uri} already holds set {existing['content_id']} computed from other inputs; "
            "sets are immutable: choose another --out")
    # An unwritable --out or --export-cs, or a file in the export's way, is found now.
    probe_outputs(config.outputs, force=config.force)

    # Checks the driver can make before any worker starts.
    require_transformers()
    model_bytes = sum(ckpt.ref(n).nbytes for n in ckpt.weight_map)
    wplan = resolve_workers(config.workers, config.use_gpu, config.ray_address,
                            small=model_bytes <= INLINE_MAX_BUILD_BYTES, shape="device")
    ex = open_executor(wplan.take(min(max(wplan.num_workers, 1), len(samples))), config.use_gpu)
    try:
        ex.check_shared([("--model", config.model, False),
                         ("--calibration", config.calibration, False),
                         ("--out", config.out, True)])
    except BaseException:
        ex.close(False)
        raise
    shares = samples.split(ex.size)
    job = CalibrationJob(uuid.uuid4().hex, ckpt.uri, json.dumps(cfg), targets, config.dtype,
                         config.mode, config.batch_tokens, config.safety_rank)
    logger.info("safety modules of %s: %d modules (%s) in %d layers, r_s = %d, %d samples "
                "(%d counted tokens) on %d %s worker(s)", ckpt.uri, len(plan),
                ",".join(targets), len({m.layer for m in plan}), config.safety_rank,
                len(samples), samples.tokens, len(shares), ex.kind)
    shipped = [ex.put(s) for s in shares]
    bar = Progress("safety modules", "module", total=len(plan), enabled=config.progress)
    run = _Calibration(ex, job, plan, shipped, config, bar)
    # Every task pinned to its share's worker; a lost worker loses its hidden states.
    policy = Policy("calibration layer", config.task_timeout_s, job.job_id, in_flight=None,
                    attempts=1, mark_last_loss=False)
    ok = False
    t_cal = time.perf_counter()
    try:
        Dispatcher(ex, policy).run(run.first_tasks(), run.done, run.failed)
        ok = True
    finally:
        bar.close()
        if ok and not ex.owns_workers:
            ex.notify(end_calibration, job.job_id)  # workers kept by a session
        ex.close(ok)
    calibration_s = time.perf_counter() - t_cal

    rows, shards = write_set(out, plan, run.results, run.digests, cal, samples, config)
    files = sorted(shards)
    core = {"method": method, "targets": list(targets)}
    cid = content_id(core, rows)
    duration = time.perf_counter() - t_start
    worker_stats = run.worker_stats
    s0 = worker_stats.get(0, {})
    forward_s = max((w["stats"]["forward_s"] + w["stats"]["prelude_s"]
                     for w in worker_stats.values()), default=0.0)
    stats = {
        "calibration_s": round(calibration_s, 3),
        "forward_s": round(forward_s, 3),
        "load_s": round(max((w["stats"]["load_s"] for w in worker_stats.values()),
                            default=0.0), 3),
        "eigen_s": round(run.eigen_s, 3),
        "tokens_per_s": round(samples.positions / forward_s, 1) if forward_s else 0.0,
        "bytes_read": sum(w["stats"]["bytes_read"] for w in worker_stats.values()),
    }
    metadata = {
        **metadata_head(cid),
        **proposed,
        "calibration": {"uri": cal.uri, "sha256": cal.sha256, "form": cal.form,
                        "samples": len(samples), "tokens": samples.tokens,
                        "positions": samples.positions},
        "weights_digests": {str(k): v for k, v in sorted(run.digests.items())},
        "dtypes": {"model": sorted({m.weight.dtype for m in plan}), "stored": "F32"},
        "num_modules": len(rows),
        "shards": files,
        "source_bytes": model_bytes,
        "bytes_read": stats["bytes_read"],
        "stored_bytes": sum(4 * r.stored_shape[0] * r.stored_shape[1] for r in rows),
        "build": {"workers": 0 if ex.in_process else len(shares),
                  "device": s0.get("device", "cpu"), "mode": s0.get("mode"),
                  "duration_s": round(duration, 3), **stats},
    }
    publish(out, rows, metadata, shards)  # alignment.json last: the set is complete
    logger.info("safety-module set %s written to %s in %.1f s (%.0f tokens/s forward)", cid,
                out.uri, duration, stats["tokens_per_s"])
    result = SaloraResult(out.uri, cid, len(rows), len(samples), samples.tokens, duration,
                          workers=0 if ex.in_process else len(shares),
                          device=s0.get("device", "cpu"), mode=s0.get("mode", ""),
                          positions=samples.positions, stats=stats)
    return _export(result, config)


def _export(result: SaloraResult, config: SaloraConfig) -> SaloraResult:
    """Write ``--export-cs`` of the set ``result`` names (an export of this set already
    there is kept as it is)."""
    if not config.export_cs:
        return result
    from safelora_ray.pipelines.salora.export import export_cs, exported_from

    if not result.reused or exported_from(config.export_cs) != result.content_id:
        export_cs(result.uri, config.export_cs, force=config.force, out_flag="--export-cs")
    result.export_cs = config.export_cs
    return result


__all__ = ["DEFAULT_SAFETY_RANK", "PlannedModule", "SaloraConfig", "SaloraResult",
           "calibrate_layer", "decompose_module", "end_calibration", "plan_modules",
           "salora_modules"]
