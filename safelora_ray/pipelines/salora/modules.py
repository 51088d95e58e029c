"""SaLoRA safety modules on a cluster: the calibration pass, data-parallel, then V_s per module.

The driver reads and tokenizes the calibration set, shares its samples out to the workers
(balanced by length) and asks every worker for one target layer at a time
(:func:`calibrate_layer`: each worker runs the aligned model over its share, whole or layer by
layer, see :mod:`safelora_ray.pipelines.salora.forward`, and returns that layer's Σ per input group,
float64). When all workers have returned a layer, the driver sums their Σ in worker order and
hands each target module of the layer to a worker (:func:`decompose_module`: V_s = the top-r_s
eigenvectors of ``W Σ Wᵀ``, on the worker's GPU when it has one). Driver memory stays at a
few layers' Σ whatever the model's depth. The result is written as a *safety-module set*: the
alignment-set format (``shards/`` + ``manifest.parquet`` + ``alignment.json`` last) with
``method.name = "salora"`` and stored form ``N`` (the basis V_s; a fold applies
``C_s = I − V_s V_sᵀ``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from safelora_ray._version import __version__
from safelora_ray.core.errors import (
    AlignmentSetError,
    CheckpointError,
    ClusterError,
    ConfigError,
    NotFoundError,
)
from safelora_ray.core.safety_basis import safety_basis
from safelora_ray.core.validate import check_at_least, check_positive, flag
from safelora_ray.execution import (
    INLINE_MAX_BUILD_BYTES,
    WORKER_LOST,
    WorkerContext,
    open_executor,
    resolve_workers,
    wind_down,
)
from safelora_ray.execution.progress import Progress
from safelora_ray.formats.alignment_set import (
    FORMAT,
    FORMAT_VERSION,
    SALORA_METHOD,
    ManifestRow,
    content_id,
    publish,
    read_metadata,
)
from safelora_ray.formats.checkpoint import Checkpoint, TensorRef, read_ref
from safelora_ray.formats.integrity import FileHasher
from safelora_ray.formats.safetensors import SafetensorsWriter
from safelora_ray.pipelines.salora.calibration import (
    CalibrationFile,
    TokenizedSamples,
    check_samples,
    load_tokenizer,
    pretokenized,
    read_calibration,
    tokenize,
)
from safelora_ray.pipelines.salora.forward import DTYPES, MODES, CalibrationJob
from safelora_ray.planning.plan import (
    DEFAULT_MAX_FILE_BYTES,
    DEFAULT_TARGETS,
    FLOAT_DTYPES,
    layer_index,
    match_target,
    parse_targets,
)
from safelora_ray.storage import Storage, open_storage
from safelora_ray.storage.guards import Output, check_outputs, probe_outputs
from safelora_ray.storage.uri import check_uri

logger = logging.getLogger(__name__)

#: SaLoRA's official code uses r_s = 32.
DEFAULT_SAFETY_RANK = 32
#: Padded positions per forward batch.
DEFAULT_BATCH_TOKENS = 4096
#: Target layers asked of the workers ahead of the one being summed (bounds driver memory).
LAYERS_AHEAD = 2
#: Worker slots: this run's calibration runner, and the checkpoint storage W is read from.
CALIBRATION_SLOT = "salora-calibration"
STORAGE_SLOT = "salora-storage"


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


@dataclass(frozen=True)
class PlannedModule:
    """A target module: its weight in the checkpoint."""

    module: str
    kind: str
    layer: int
    weight: TensorRef


def plan_modules(ckpt: Checkpoint, targets: Sequence[str], safety_rank: int
                 ) -> list[PlannedModule]:
    """The target weights of ``ckpt`` (PEFT's suffix rule, as the build), in layer order.

    Raises:
        CheckpointError: no weight matches, a target matches nothing, a weight that is not a
            2-D float tensor or not inside a numbered layer, or r_s larger than a weight's
            smaller side (W Xᵀ has no more directions).
    """
    out = []
    for name in ckpt.weight_map:
        if not name.endswith(".weight"):
            continue
        module = name[: -len(".weight")]
        kind = match_target(module, targets)
        if kind is None:
            continue
        ref = ckpt.ref(name)
        if ref.dtype not in FLOAT_DTYPES or len(ref.shape) != 2:
            raise CheckpointError(f"{ref.describe()}: {ref.dtype} {list(ref.shape)} is not a "
                                  "2-D float weight")
        layer = layer_index(module)
        if layer is None:
            raise CheckpointError(f"target module {module!r} is not inside a numbered decoder "
                                  "layer: SaLoRA's safety modules sit on linears inside them")
        if safety_rank > min(ref.shape):
            raise ConfigError(f"safety rank {safety_rank} exceeds {min(ref.shape)}, the "
                              f"smaller side of {module!r} ({list(ref.shape)})")
        out.append(PlannedModule(module, kind, layer, ref))
    if not out:
        raise CheckpointError(f"no tensor of {ckpt.uri} matches the targets {','.join(targets)}"
                              " (names must end with '.<target>.weight')")
    absent = [t for t in targets if t not in {m.kind for m in out}]
    if absent:
        raise CheckpointError(f"target(s) {', '.join(absent)} match no tensor in {ckpt.uri}")
    return sorted(out, key=lambda m: (m.layer, m.module))


# ---------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------


def calibrate_layer(ctx: WorkerContext, job: CalibrationJob, share: int,
                    samples: TokenizedSamples, layer: int) -> dict[str, Any]:
    """Task: run this worker's share of the calibration set through decoder layer ``layer``;
    returns that layer's Σ per input group (see ``CalibrationRunner.run_to``).

    The runner (model skeleton, hidden states) stays in the worker between the calls of one
    run. A call for a layer the runner has passed (Ray running a call again after its worker
    was restarted gets a fresh runner anyway) starts a fresh runner.
    """
    from safelora_ray.pipelines.salora.forward import CalibrationRunner

    def make() -> CalibrationRunner:
        return CalibrationRunner(job, samples, ctx.device, hash_weights=share == 0)

    key = (job.job_id, share)
    runner = ctx.resident(CALIBRATION_SLOT, key, make)
    if runner.next_layer > layer:
        ctx.drop(CALIBRATION_SLOT, key)
        runner = ctx.resident(CALIBRATION_SLOT, key, make)
    return runner.run_to(layer)


def end_calibration(ctx: WorkerContext, job_id: str) -> None:
    """Task: drop this run's calibration runner (a session's worker moves on)."""
    held = ctx.peek(CALIBRATION_SLOT)
    if held is not None and held[0][0] == job_id:  # type: ignore[index]
        ctx.drop(CALIBRATION_SLOT)


def decompose_module(ctx: WorkerContext, module: str, weight: TensorRef, transposed: bool,
                     sigma: torch.Tensor, rank: int) -> dict[str, Any]:
    """Task: V_s of one module from the summed Σ of its input group and its weight W (read
    from the checkpoint), on the worker's device."""
    storage: Storage = ctx.resident(STORAGE_SLOT, weight.uri, lambda: open_storage(weight.uri))
    t0 = time.perf_counter()
    w, _ = read_ref(storage, weight)
    if transposed:  # Conv1D stores d_in x d_out
        w = w.T
    try:
        sb = safety_basis(w.to(ctx.device), sigma.to(ctx.device), rank)
    except ValueError as e:
        raise CheckpointError(f"module {module!r}: {e}") from None
    return {
        "module": module,
        "basis": sb.basis.to(device="cpu", dtype=torch.float32).contiguous(),
        "eigenvalues": sb.eigenvalues.cpu().tolist(),
        "trace": sb.trace,
        "energy": sb.energy,
        "degenerate": sb.degenerate,
        "shape": [int(w.shape[0]), int(w.shape[1])],
        "seconds": time.perf_counter() - t0,
    }


# ---------------------------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------------------------


def _read_config(ckpt: Checkpoint) -> tuple[str, dict[str, Any]]:
    try:
        raw = ckpt.storage.read("config.json", max_bytes=16 * 1024**2)
    except NotFoundError as e:
        raise CheckpointError(f"{ckpt.uri}: no config.json beside the weights (the forward "
                              "pass needs the architecture)") from e
    try:
        cfg = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt.storage.describe('config.json')}: not JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{ckpt.storage.describe('config.json')}: not a JSON object")
    return raw.decode("utf-8"), cfg


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


def _source_info(ckpt: Checkpoint) -> dict[str, Any]:
    files = set(ckpt.weight_map.values()) | {"config.json"}
    info: dict[str, Any] = {"uri": ckpt.uri, "layout": ckpt.layout,
                            "files": ckpt.versions(files)}
    commit = getattr(ckpt.storage, "commit", None)
    if commit:
        info["revision"] = commit
    return info


def _same_inputs(existing: dict[str, Any], proposed: dict[str, Any]) -> bool:
    if any(existing.get(k) != proposed.get(k) for k in ("targets", "method")):
        return False
    a, b = existing.get("model", {}), proposed.get("model", {})
    return a.get("files") == b.get("files") and a.get("revision") == b.get("revision")


def _row_digest(calibration_sha: str, digests: dict[int, str], layer: int) -> str:
    """What a module's V_s depends on: the calibration bytes and every weight the forward read
    up to its layer (the prelude's, then layers 0..layer)."""
    h = hashlib.sha256(f"salora|{calibration_sha}".encode())
    for i in range(-1, layer + 1):
        h.update(f"|{digests[i]}".encode())
    return f"sha256-chain:{h.hexdigest()}"


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
    config_text, cfg = _read_config(ckpt)
    targets = tuple(config.targets)
    plan = plan_modules(ckpt, targets, config.safety_rank)
    cal = read_calibration(config.calibration)
    samples = _samples(cal, ckpt, cfg)
    if samples.tokens < config.safety_rank:
        raise ConfigError(
            f"{cal.uri}: {samples.tokens} counted tokens, fewer than the safety rank "
            f"{config.safety_rank}: W Xᵀ has at most {samples.tokens} directions")
    out = open_storage(config.out)
    method = {
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
    proposed = {"targets": list(targets), "method": method, "model": _source_info(ckpt)}
    existing = read_metadata(out)
    if existing is not None:
        if _same_inputs(existing, proposed):
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
    from safelora_ray.pipelines.salora.forward import require_transformers

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
    job = CalibrationJob(uuid.uuid4().hex, ckpt.uri, config_text, targets, config.dtype,
                         config.mode, config.batch_tokens, config.safety_rank)
    layers = sorted({m.layer for m in plan})
    by_layer: dict[int, list[PlannedModule]] = {}
    for m in plan:
        by_layer.setdefault(m.layer, []).append(m)
    logger.info("safety modules of %s: %d modules (%s) in %d layers, r_s = %d, %d samples "
                "(%d counted tokens) on %d %s worker(s)", ckpt.uri, len(plan),
                ",".join(targets), len(layers), config.safety_rank, len(samples),
                samples.tokens, len(shares), ex.kind)

    shipped = [ex.put(s) for s in shares]
    pending: dict[Any, tuple[str, Any]] = {}
    partial: dict[int, dict[int, dict[str, Any]]] = {}
    results: dict[str, dict[str, Any]] = {}
    digests: dict[int, str] = {}
    worker_stats: dict[int, dict[str, Any]] = {}
    eigen_s = 0.0
    next_layer = 0

    def submit_layer(k: int) -> None:
        for s in range(len(shares)):
            h = ex.submit(s, calibrate_layer, job, s, shipped[s], layers[k], group="stream")
            pending[h] = ("layer", (s, layers[k]))

    def finish_layer(layer: int) -> None:
        got = [partial[layer][s] for s in range(len(shares))]
        del partial[layer]
        modules = got[0]["modules"]
        for s, g in enumerate(got[1:], 1):
            if g["modules"] != modules:
                raise RuntimeError(f"workers 0 and {s} disagree on the modules of layer {layer}")
        planned = {m.module for m in by_layer[layer]}
        if set(modules) != planned:
            raise CheckpointError(
                f"layer {layer}: the checkpoint's target weights "
                f"({', '.join(sorted(planned - set(modules))) or '-'} not in the model) and the "
                f"model's target modules ({', '.join(sorted(set(modules) - planned)) or '-'} "
                "not in the checkpoint) differ")
        digests.update(got[0]["digests"])
        # Summed in worker order: the same Σ for the same shares, whatever finished first.
        sigma: dict[str, Any] = {}
        for group in got[0]["sigmas"]:
            total = got[0]["sigmas"][group].clone()
            for g in got[1:]:
                total += g["sigmas"][group]
            sigma[group] = ex.put(total)
        for j, m in enumerate(by_layer[layer]):
            info = modules[m.module]
            h = ex.submit((layer + j) % ex.size, decompose_module, m.module, m.weight,
                          info["transposed"], sigma[info["group"]], config.safety_rank,
                          group="batch")
            pending[h] = ("module", m)

    bar = Progress("safety modules", "module", total=len(plan), enabled=config.progress)
    ok = False
    t_cal = time.perf_counter()
    try:
        for k in range(min(LAYERS_AHEAD, len(layers))):
            submit_layer(k)
        next_layer = min(LAYERS_AHEAD, len(layers))
        while pending:
            h = ex.wait(list(pending), config.task_timeout_s, "calibration layer")
            if h is None:  # a worker came up (or was dropped: its calls fail below)
                continue
            kind, what = pending.pop(h)
            try:
                result = ex.result(h, config.task_timeout_s)
            except WORKER_LOST as e:
                # Each worker pushes its share of the calibration set through the layers in
                # turn, its hidden states held between calls: they died with it.
                raise ClusterError(
                    f"a calibration worker died ({type(e).__name__}) with its share of the "
                    "hidden states; run the command again (the forward pass is not "
                    "resumable)") from e
            if kind == "layer":
                share, layer = what
                worker_stats[share] = result
                partial.setdefault(layer, {})[share] = result
                if len(partial[layer]) == len(shares):
                    finish_layer(layer)
                    if next_layer < len(layers):
                        submit_layer(next_layer)
                        next_layer += 1
            else:
                results[what.module] = result
                eigen_s += result["seconds"]
                if result["degenerate"]:
                    logger.warning(
                        "module %s: %d of the %d safety directions carry no energy on the "
                        "calibration set (an arbitrary basis of a null space)", what.module,
                        result["degenerate"], config.safety_rank)
                bar.update(1)
        ok = True
    except KeyboardInterrupt:
        wind_down(ex, job.job_id, list(pending))
        raise
    finally:
        bar.close()
        if ok and not ex.owns_workers:
            ex.notify(end_calibration, job.job_id)  # workers kept by a session
        ex.close(ok)
    calibration_s = time.perf_counter() - t_cal

    rows, shards = _write_set(out, plan, results, digests, cal, samples, config)
    files = sorted(shards)
    core = {"method": method, "targets": list(targets)}
    cid = content_id(core, rows)
    duration = time.perf_counter() - t_start
    s0 = worker_stats.get(0, {})
    forward_s = max((w["stats"]["forward_s"] + w["stats"]["prelude_s"]
                     for w in worker_stats.values()), default=0.0)
    stats = {
        "calibration_s": round(calibration_s, 3),
        "forward_s": round(forward_s, 3),
        "load_s": round(max((w["stats"]["load_s"] for w in worker_stats.values()),
                            default=0.0), 3),
        "eigen_s": round(eigen_s, 3),
        "tokens_per_s": round(samples.positions / forward_s, 1) if forward_s else 0.0,
        "bytes_read": sum(w["stats"]["bytes_read"] for w in worker_stats.values()),
    }
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "content_id": cid,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tool_version": __version__,
        **proposed,
        "calibration": {"uri": cal.uri, "sha256": cal.sha256, "form": cal.form,
                        "samples": len(samples), "tokens": samples.tokens,
                        "positions": samples.positions},
        "weights_digests": {str(k): v for k, v in sorted(digests.items())},
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


def _write_set(out: Storage, plan: Sequence[PlannedModule], results: dict[str, dict[str, Any]],
               digests: dict[int, str], cal: CalibrationFile, samples: TokenizedSamples,
               config: SaloraConfig) -> tuple[list[ManifestRow], dict[str, dict[str, Any]]]:
    """Write the shards (layer order, files of at most ``max_file_bytes``); the rows and each
    shard's digest and size."""
    files: list[list[PlannedModule]] = [[]]
    size = 0
    for m in plan:
        n = 4 * results[m.module]["shape"][0] * config.safety_rank
        if files[-1] and size + n > config.max_file_bytes:
            files.append([])
            size = 0
        files[-1].append(m)
        size += n
    rows: list[ManifestRow] = []
    shards: dict[str, dict[str, Any]] = {}
    for j, mods in enumerate(files):
        path = f"shards/part-00000-{j:04d}.safetensors"
        layout = [(m.module, "F32", tuple(results[m.module]["basis"].shape)) for m in mods]
        hasher = FileHasher()  # the digests of what is written, taken as it is written
        with out.writing_file(path) as tmp:
            with SafetensorsWriter(tmp, layout, {"format": FORMAT}, hasher) as writer:
                for m in mods:
                    writer.write(m.module, results[m.module]["basis"])
            shards[path] = {"sha256": hasher.file_digest(), "bytes": os.path.getsize(tmp)}
        for m in mods:
            r = results[m.module]
            rows.append(ManifestRow(
                module=m.module, tensor=m.weight.name, layer=m.layer, kind=m.kind,
                shape=tuple(r["shape"]), form="N", stored_shape=tuple(r["basis"].shape),
                shard=path, norm=math.sqrt(r["trace"]),
                source_digest=_row_digest(cal.sha256, digests, m.layer),
                base_dtype=None, aligned_dtype=m.weight.dtype,
                safety_rank=config.safety_rank, tokens=samples.tokens,
                energy=r["energy"], calibration_digest=f"sha256:{cal.sha256}",
                digest=hasher.tensors[m.module],
            ))
    return rows, shards


__all__ = ["DEFAULT_SAFETY_RANK", "PlannedModule", "SaloraConfig", "SaloraResult",
           "calibrate_layer", "decompose_module", "end_calibration", "plan_modules",
           "salora_modules"]
