"""SaLoRA's task functions, run on the workers: one share of the calibration pass through one
decoder layer (:func:`calibrate_layer`), and one module's V_s (:func:`decompose_module`)."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from safelora_ray.core.errors import CheckpointError
from safelora_ray.core.safety_basis import safety_basis
from safelora_ray.execution import WorkerContext
from safelora_ray.formats.checkpoint import TensorRef, read_ref
from safelora_ray.pipelines.salora.calibration import TokenizedSamples
from safelora_ray.pipelines.salora.forward import CalibrationJob, CalibrationRunner
from safelora_ray.storage import Storage, open_storage

logger = logging.getLogger(__name__)

#: Worker slots: this run's calibration runner, and the checkpoint storage W is read from.
CALIBRATION_SLOT = "salora-calibration"
STORAGE_SLOT = "salora-storage"


def calibrate_layer(ctx: WorkerContext, job: CalibrationJob, share: int,
                    samples: TokenizedSamples, layer: int) -> dict[str, Any]:
    """Task: run this worker's share of the calibration set through decoder layer ``layer``;
    returns that layer's Σ per input group (see ``CalibrationRunner.run_to``).

    The runner (model skeleton, hidden states) stays in the worker between the calls of one
    run. A call for a layer the runner has passed (Ray running a call again after its worker
    was restarted gets a fresh runner anyway) starts a fresh runner.
    """
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


__all__ = ["CALIBRATION_SLOT", "STORAGE_SLOT", "calibrate_layer", "decompose_module",
           "end_calibration"]
