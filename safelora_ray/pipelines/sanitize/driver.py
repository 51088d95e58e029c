"""Fleet sanitization: an alignment set + a catalog of LoRA adapters → sanitized adapters.

The driver streams the catalog into batches and keeps a bounded number of batches in flight
on a pool of worker actors (:mod:`safelora_ray.execution.workers`; this process for a small
catalog), each holding the alignment set once (on its GPU when it has one).
A worker reads its batch's adapters, multiplies every adapter's B of one module by that
module's C in a single matrix product, scores and selects modules per adapter exactly as
SPEC §2 says, writes each adapter atomically, records it in the ledger and returns one row per
adapter and per module. The driver streams those rows into Parquet reports.
"""

from __future__ import annotations

import collections
import datetime as _dt
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from safelora_ray.core.errors import (
    AdapterError,
    ConfigError,
    NotFoundError,
    SafeLoraError,
)
from safelora_ray.core.redact import redact
from safelora_ray.core.scores import (
    ModuleScore,
    lora_gram,
    pdst,
    scores_from_sums,
    select_modules,
)
from safelora_ray.core.validate import (
    check_at_least,
    check_positive,
    check_selection,
    env_number,
    flag,
    selection_record,
)
from safelora_ray.execution import (
    INLINE_MAX_ADAPTERS,
    WORKER_LOST,
    WorkerContext,
    open_executor,
    resolve_workers,
    wind_down,
)
from safelora_ray.execution.placement import NodeInfo, WorkerSpec, plan_pipeline
from safelora_ray.execution.progress import Progress
from safelora_ray.formats.alignment_set import AlignmentSet
from safelora_ray.formats.peft import Adapter, output_digest, read_adapter, write_adapter
from safelora_ray.pipelines.sanitize.projection import (
    GroupKey,
    HolderLost,
    MatrixCache,
    ProjectionEngine,
    Projector,
    SetKey,
    check_store_room,
    dtype_name,
    remote_projector,
    shared_projector,
    warm_set,
)
from safelora_ray.planning.catalog import CONFIG_FILE, AdapterRef, is_manifest, iter_catalog
from safelora_ray.reports import ReportWriter, ledger_figures
from safelora_ray.storage import open_storage
from safelora_ray.storage.cache import StorageCache
from safelora_ray.storage.guards import Output, check_outputs, probe_outputs
from safelora_ray.storage.lease import hold_output
from safelora_ray.storage.local import STAGING_PREFIX, sweep_stale_writes
from safelora_ray.storage.uri import check_uri, join_uri, overlap

logger = logging.getLogger(__name__)

#: ``--method``: Safe LoRA's alignment sets, or SaLoRA's safety modules (SPEC §4).
METHODS = ("safelora", "salora")

LEDGER_PREFIX = "_ledger"
#: Seconds between two looks for nodes that joined the cluster during a run.
GROW_EVERY_S = env_number("SAFELORA_GROW_EVERY_S", 30)
REPORTS_PREFIX = "_reports"


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
            most ``INLINE_MAX_ADAPTERS`` adapters when no Ray cluster is configured: see
            :mod:`safelora_ray.execution.workers`).
        use_gpu: Force GPU/CPU workers; None = GPUs when the cluster has them.
        workers_per_gpu: Holders of the alignment set per GPU, each with its own copy (on a
            CPU-only node the first I/O worker puts it in the node's object store, once).
        batch_size: Adapters per task (their B matrices are batched per module).
        max_in_flight: Batches queued per worker (backpressure).
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
    max_in_flight: int = 2
    run_id: str | None = None
    progress: bool = True
    task_timeout_s: float = 1800.0
    max_adapter_bytes: int = 4 * 1024**3
    ray_address: str | None = None
    allow_empty: bool = False
    method: str = "safelora"
    tenant_depth: int = 1
    wait_s: float | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got "
                              f"{self.method!r}")
        # SaLoRA folds every module when no selection is given (τ = 1).
        check_selection(self.threshold, self.num_proj_layers, self.strict_k,
                        allow_none=self.method == "salora")
        for name in ("batch_size", "max_in_flight", "workers_per_gpu", "tenant_depth"):
            check_at_least(getattr(self, name), name, 1)
        if self.workers is not None:
            check_at_least(self.workers, "workers", 0, " (0 = in this process)")
        check_positive(self.task_timeout_s, "timeout")
        if self.run_id is None:
            now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            self.run_id = f"{now}-{uuid.uuid4().hex[:6]}"
        elif not self.run_id.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ConfigError(f"--run-id {self.run_id!r} may only use letters, digits, . _ -")
        for name in ("alignment", "adapters", "out"):
            check_uri(getattr(self, name), flag(name))
        # Inputs are never written, and outputs never become inputs of the next run (a
        # manifest's own entries are checked one by one as they are listed).
        check_outputs(self.outputs, [
            ("--adapters", self.adapters, "the run would write over the manifest"
             if is_manifest(self.adapters) else "sanitized adapters would overwrite the "
             "originals or become catalog entries of the next run"),
            ("--alignment", self.alignment, "the run would write into the alignment set")])

    @property
    def outputs(self) -> list[Output]:
        """What the run writes (see :func:`~safelora_ray.storage.guards.check_outputs`)."""
        return [Output("--out", self.out)]

    @property
    def selection(self) -> dict[str, Any]:
        """The selection parameters, as recorded in the ledger and reports."""
        sel = selection_record(self.threshold, self.num_proj_layers, self.strict_k)
        if self.method != "safelora":  # (Safe LoRA ledgers keep their key)
            sel["method"] = self.method
        return sel


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


# ---------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------


def _params_id(selection: dict[str, Any]) -> str:
    return json.dumps(selection, sort_keys=True)


def ledger_path(adapter_id: str) -> str:
    """Where the ledger record of ``adapter_id`` lives under ``--out``."""
    return f"{LEDGER_PREFIX}/{adapter_id}.json"


class FleetSanitizer:
    """Sanitizes batches of adapters against one alignment set (plain Python; a worker
    actor's task wraps it): reads and checks adapters, has their products computed by a
    *projector* (the set's holder; see :mod:`safelora_ray.pipelines.sanitize.projection`), selects
    modules, writes each adapter and its ledger record.

    Args:
        alignment_uri: The alignment set.
        out_uri: Output root.
        selection: :attr:`SanitizeConfig.selection`.
        device: ``cpu`` or ``cuda``, for a projector made here (see :meth:`process`).
        force: Ignore the ledger.
        max_adapter_bytes: Cap on one adapter's weights file.
        aset: The set's metadata, already opened; None opens it.
        run_id: The run, recorded in the ledger (an adapter found done by this same run was
            sanitized by a retried batch: it is reported ``ok``, not ``skipped``).
    """

    def __init__(self, alignment_uri: str, out_uri: str, selection: dict[str, Any],
                 device: str = "cpu", force: bool = False,
                 max_adapter_bytes: int = 4 * 1024**3, aset: AlignmentSet | None = None,
                 run_id: str | None = None):
        self.run_id = run_id
        self.aset = aset or AlignmentSet.open(alignment_uri)
        self.out = open_storage(out_uri)
        self.selection = selection
        self.device = device
        self.force = force
        self.max_adapter_bytes = max_adapter_bytes
        self._storages = StorageCache()
        self._own_engine: ProjectionEngine | None = None
        # process() may run in two threads at once (one batch reads while another computes):
        # the caches are filled under this lock.
        self._lock = threading.Lock()

    # -- helpers ---------------------------------------------------------------------------
    def _default_projector(self) -> Projector:
        with self._lock:
            if self._own_engine is None:
                self._own_engine = ProjectionEngine(MatrixCache(self.aset, self.device))
            return self._own_engine.run

    def _ledger_key(self, digest: str | None) -> dict[str, str | None]:
        return {"content_digest": digest, "alignment_id": self.aset.content_id,
                "params": _params_id(self.selection)}

    def _read_ledger(self, adapter_id: str) -> dict[str, Any] | None:
        try:
            rec = json.loads(self.out.read(ledger_path(adapter_id), max_bytes=1024**2))
        except NotFoundError:
            return None
        except (ValueError, SafeLoraError):
            logger.warning("unreadable ledger record for %s; redoing it", adapter_id)
            return None
        return rec if isinstance(rec, dict) else None

    def _fingerprint(self, ref: AdapterRef) -> str | None:
        """Cheap change detector from object versions (no weight download)."""
        st = self._storages.get(ref.uri)
        try:
            parts = [st.version(f"{ref.prefix}/{n}" if ref.prefix else n)
                     for n in ("adapter_config.json", "adapter_model.safetensors")]
        except SafeLoraError:
            return None
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    def _check_owner(self, ledger: dict[str, Any] | None, ref: AdapterRef) -> None:
        """Refuse to overwrite another adapter's output that has the same id (ids are relative
        to each catalog: two catalogs into one ``--out`` would overwrite each other)."""
        theirs, ours = (ledger or {}).get("source"), _source_uri(ref)
        if self.force or not theirs or theirs == ours:
            return
        raise AdapterError(
            f"adapter {ref.adapter_id!r}: {self.out.describe(ref.adapter_id)} already holds "
            f"the sanitized output of {theirs}, not of {ours}: two catalogs write into one "
            "--out (adapter ids are relative to each catalog); give each catalog its own "
            "--out, or pass --force to replace it")

    def _done(self, ledger: dict[str, Any] | None, key: dict[str, str | None],
              ref: AdapterRef) -> bool:
        if self.force or not ledger or ledger.get("key") != key:
            return False
        recorded = ledger.get("outputs")
        if not isinstance(recorded, dict):  # a record from before outputs were recorded
            return self.out.exists(f"{ref.adapter_id}/adapter_config.json")
        # Each output as written (size and version: S3 ETag, local mtime): one listing, no
        # download. One deleted, cut short or replaced since is written again.
        now = self._outputs(ref.adapter_id)
        changed = sorted(rel for rel, rec in recorded.items() if now.get(rel) != rec)
        if changed:
            logger.warning("adapter %s: its output %s changed since the run that wrote it "
                           "(deleted, cut short or replaced): sanitizing it again",
                           ref.adapter_id, self.out.describe(f"{ref.adapter_id}/{changed[0]}"))
        return not changed

    def _outputs(self, adapter_id: str, names: Sequence[str] | None = None
                 ) -> dict[str, dict[str, Any]]:
        """``{file: {"bytes", "version"}}`` of the adapter's output files (``names`` only)."""
        cut = len(adapter_id) + 1
        found = {o.path[cut:]: {"bytes": o.size, "version": o.version}
                 for o in self.out.list(adapter_id)}
        return found if names is None else {n: found[n] for n in names if n in found}

    # -- the work --------------------------------------------------------------------------
    def process(self, refs: Sequence[AdapterRef],
                cancelled: Callable[[], bool] | None = None,
                project: Projector | None = None) -> dict[str, Any]:
        """Sanitize one batch; never raises for a bad adapter (it becomes an error row).

        Args:
            refs: The adapters.
            cancelled: Polled before each adapter is read and before each is written: once
                it says so, the rest of the batch is left alone (status ``cancelled``), so an
                interrupted run stops after the adapter in progress, never inside one.
            project: Computes the batch's products (default: here, the set loaded on this
                sanitizer's device).

        Returns:
            ``{"adapters": [row, ...], "layers": [row, ...]}``.
        """
        stop = cancelled or (lambda: False)
        t_batch = time.perf_counter()
        rows: dict[str, dict[str, Any]] = {}
        loaded: dict[str, tuple[AdapterRef, Adapter, str | None, float]] = {}
        for ref in refs:
            if stop():
                rows[ref.adapter_id] = {**_base_row(ref), "status": "cancelled"}
                continue
            t0 = time.perf_counter()
            row = rows[ref.adapter_id] = _base_row(ref)
            try:
                ledger = self._read_ledger(ref.adapter_id)
                self._check_owner(ledger, ref)
                fp = self._fingerprint(ref)
                # Same object versions as last time: skip without downloading the weights.
                if ledger and fp and ledger.get("fingerprint") == fp and self._done(
                        ledger, self._ledger_key(ledger.get("key", {}).get("content_digest")), ref):
                    _skip(row, ledger, "unchanged since the last run (ledger)", self.run_id)
                    continue
                adapter = read_adapter(self._storages.get(ref.uri), ref.prefix, ref.adapter_id,
                                       max_bytes=self.max_adapter_bytes)
                row["source_digest"] = adapter.digest
                row["bytes_in"] = adapter.nbytes
                row["base_model"] = adapter.base_model
                key = self._ledger_key(adapter.digest)
                if self._done(ledger, key, ref):
                    assert ledger is not None
                    if fp and ledger.get("fingerprint") != fp:  # rewritten with the same bytes
                        ledger = {**ledger, "fingerprint": fp}
                        self.out.put_bytes(ledger_path(ref.adapter_id),
                                           json.dumps(ledger, indent=1).encode())
                    _skip(row, ledger, "already sanitized with this alignment set and selection",
                          self.run_id)
                    continue
                self._check(adapter)
                loaded[ref.adapter_id] = (ref, adapter, fp, time.perf_counter() - t0)
            except Exception as e:  # one bad adapter never stops the batch
                _fail(row, e)
        layers: list[dict[str, Any]] = []
        if loaded:
            t0 = time.perf_counter()
            projected, scores = self._project_all([a for _, a, _, _ in loaded.values()],
                                                  project or self._default_projector())
            share = (time.perf_counter() - t0) / len(loaded)  # batch compute, per adapter
            for adapter_id, (ref, adapter, fp, read_s) in loaded.items():
                row = rows[adapter_id]
                if stop():
                    row["status"] = "cancelled"
                    continue
                try:
                    layers.extend(self._finish(ref, adapter, fp, projected[adapter_id],
                                               scores[adapter_id], row))
                    row["read_s"] = round(read_s, 4)
                    row["compute_s"] = round(row["compute_s"] + share, 4)
                except Exception as e:
                    _fail(row, e)
        for row in rows.values():
            row["batch_s"] = round(time.perf_counter() - t_batch, 4)
        return {"adapters": list(rows.values()), "layers": layers}

    def _check(self, adapter: Adapter) -> None:
        missing = [m for m in adapter.modules if m not in self.aset.rows]
        if missing:
            raise AdapterError(
                f"adapter {adapter.adapter_id!r}: {len(missing)} module(s) have no entry in "
                f"alignment set {self.aset.content_id} (targets {','.join(self.aset.targets)}): "
                + ", ".join(sorted(missing)[:5])
            )
        if not adapter.modules:
            raise AdapterError(f"adapter {adapter.adapter_id!r}: no LoRA modules found")
        for m in adapter.modules:
            check_orientation(adapter, m, self.aset)

    def _project_all(self, adapters: Sequence[Adapter], project: Projector
                     ) -> tuple[dict[str, dict[str, torch.Tensor]],
                                dict[str, dict[str, ModuleScore]]]:
        """C B and the scores of every adapter and module of a batch: one product per module
        (and dtype and rank) for the whole batch (SPEC §2), computed by ``project``.

        Returns:
            ``(cb, scores)``, each ``{adapter_id: {module: ...}}``; C B in each B's dtype (the
            scores use the float32 product).
        """
        members: dict[GroupKey, list[tuple[str, Any]]] = {}
        for ad in adapters:
            for m, lm in ad.modules.items():
                key = (m, dtype_name(lm.b.dtype), int(lm.rank))
                members.setdefault(key, []).append((ad.adapter_id, lm))
        groups = {key: (torch.stack([lm.b for _, lm in items]),
                        lora_gram(torch.stack([lm.a for _, lm in items])))
                  for key, items in members.items()}
        out = project(groups)
        cast: dict[str, dict[str, torch.Tensor]] = {ad.adapter_id: {} for ad in adapters}
        scores: dict[str, dict[str, ModuleScore]] = {ad.adapter_id: {} for ad in adapters}
        for key, items in members.items():
            cb, sums = out[key]
            for (adapter_id, _), one, sc in zip(items, cb, scores_from_sums(sums),
                                                 strict=True):
                cast[adapter_id][key[0]] = one
                scores[adapter_id][key[0]] = sc
        return cast, scores

    def _finish(self, ref: AdapterRef, adapter: Adapter, fingerprint: str | None,
                cbs: dict[str, torch.Tensor], scores: dict[str, ModuleScore],
                row: dict[str, Any]) -> list[dict[str, Any]]:
        t0 = time.perf_counter()
        sel = self.selection
        chosen = set(scores) if sel.get("mode") == "all" else select_modules(
            {m: s.cos_rounded for m, s in scores.items()},
            threshold=sel.get("threshold"),
            num_proj_layers=sel.get("num_proj_layers"),
            strict=bool(sel.get("strict", False)),
        )
        new_b = {m: cbs[m] for m in chosen}
        kept = untouched_note(adapter)
        notes = [kept] if kept else []
        k = sel.get("num_proj_layers")
        if k is not None and k >= len(scores):
            notes.append(f"--num-proj-layers {k} ≥ its {len(scores)} module(s): every module "
                         "was projected (the number is per adapter)")
        compute_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        # Written next to the outputs when they are local: then moved into place, not copied.
        tmp = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.out.scratch_dir())
        try:
            files = write_adapter(adapter, new_b, tmp, self._storages.get(ref.uri), ref.prefix)
            out_digest = output_digest(files)
            bytes_out = sum(os.path.getsize(p) for _, p in files)
            self.out.put_tree(ref.adapter_id, files, move=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        outputs = self._outputs(ref.adapter_id, [rel for rel, _ in files])
        dists = [0.0 if m in chosen else s.dist for m, s in scores.items()]
        adapter_pdst = pdst(dists)
        ledger = {
            "adapter_id": ref.adapter_id,
            "source": _source_uri(ref),
            "key": self._ledger_key(adapter.digest),
            # The versions seen before reading (not re-fetched: two HEADs per adapter saved).
            "fingerprint": fingerprint,
            "output_digest": out_digest,
            # What a later run checks before skipping it (a cheap listing, not a re-hash).
            "outputs": outputs,
            "run_id": self.run_id,
            "modules": len(scores),
            "projected": sorted(chosen),
            # The figures a later run that skips this adapter reports for it.
            "pdst": adapter_pdst if math.isfinite(adapter_pdst) else None,
            "scores": {m: (s.cos_rounded if math.isfinite(s.cos_rounded) else None)
                       for m, s in scores.items()},
            "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        # The ledger record goes last: an adapter is "done" only once its output is in place.
        self.out.put_bytes(ledger_path(ref.adapter_id), json.dumps(ledger, indent=1).encode())
        row.update(
            status="ok", modules=len(scores), projected=len(chosen), pdst=adapter_pdst,
            output_digest=out_digest, bytes_out=bytes_out, compute_s=round(compute_s, 4),
            write_s=round(time.perf_counter() - t1, 4),
            untouched=len(adapter.untouched), note="; ".join(notes) or None,
        )
        layers = []
        for m, s in scores.items():
            info = self.aset.rows[m]
            layers.append({
                "adapter_id": ref.adapter_id, "module": m, "layer": info.layer,
                "kind": info.kind, "rank": int(adapter.modules[m].rank),
                "cos": s.cos, "cos_rounded": s.cos_rounded, "projected": m in chosen,
                "norm_delta": s.norm_delta, "norm_projected": s.norm_projected,
                "dist": 0.0 if m in chosen else s.dist,
            })
        return layers


def check_orientation(adapter: Adapter, module: str, aset: AlignmentSet) -> None:
    """Refuse a module whose A/B do not fit the set's weight, naming the real cause.

    The set stores every weight as nn.Linear's d_out x d_in (V of a GPT-2 ``Conv1D``, stored
    d_in x d_out, was transposed by the build); PEFT's A (r x d_in) and B (d_out x r) are in
    that orientation too, and its ``fan_in_fan_out`` says the base layer is a Conv1D.
    """
    row = aset.rows[module]
    lm = adapter.modules[module]
    who = f"adapter {adapter.adapter_id!r}: module {module!r}"
    fifo = bool(adapter.config.get("fan_in_fan_out", False))
    if fifo and row.layout != "conv1d":
        raise AdapterError(
            f"{who}: the adapter has fan_in_fan_out=true (its base layer is a GPT-2-style "
            f"Conv1D, weight stored d_in x d_out) but alignment set {aset.content_id} holds "
            "this module as an nn.Linear weight: the set was built from another model, or by "
            "a safelora-ray that did not record weight layouts (rebuild it)")
    if not fifo and row.layout == "conv1d":
        raise AdapterError(
            f"{who}: the alignment set's model stores this weight as a GPT-2-style Conv1D "
            "(d_in x d_out) but the adapter has fan_in_fan_out=false, which PEFT never saves "
            "for a Conv1D layer: an adapter for another model, or an edited config")
    d_out, d_in = row.shape
    b_out, a_in = int(lm.b.shape[0]), int(lm.a.shape[1])
    if (b_out, a_in) == (d_out, d_in):
        return
    shapes = (f"A {list(lm.a.shape)} and B {list(lm.b.shape)} (ΔW = B A is {b_out}x{a_in}), "
              f"but the alignment set's weight is {d_out}x{d_in} (d_out x d_in)")
    if (b_out, a_in) == (d_in, d_out):
        raise AdapterError(f"{who}: {shapes}: the adapter's factors are transposed against "
                           "the weight (A and B were swapped, or written for the transposed "
                           "layout)")
    raise AdapterError(f"{who}: {shapes}: an adapter for another base model (other "
                       "dimensions)")


@dataclass(frozen=True)
class SanitizeJob:
    """What a worker needs to sanitize batches of one run (hashable: workers cache on it)."""

    alignment_uri: str
    alignment_id: str  # the set's content id: a set rebuilt at the same URI is another set
    out_uri: str
    selection_json: str
    force: bool
    max_adapter_bytes: int
    run_id: str
    task_timeout_s: float = 1800.0

    @classmethod
    def of(cls, alignment_uri: str, alignment_id: str, out_uri: str, selection: dict[str, Any],
           force: bool, max_adapter_bytes: int, run_id: str,
           task_timeout_s: float = 1800.0) -> SanitizeJob:
        return cls(alignment_uri, alignment_id, out_uri, json.dumps(selection, sort_keys=True),
                   force, max_adapter_bytes, run_id, task_timeout_s)


#: The worker slot of the latest job's sanitizer, so the next batches of a run reuse it.
SANITIZER_SLOT = "sanitizer"


def sanitize_batch(ctx: WorkerContext, job: SanitizeJob, refs: Sequence[AdapterRef],
                   holder: Any = None, shared: bool = False) -> dict[str, Any]:
    """Task: sanitize one batch of adapters (see :meth:`FleetSanitizer.process`).

    Args:
        ctx: This worker.
        job: The run.
        refs: The batch.
        holder: The actor of this node keeping the set (None: this worker is the holder, or
            this is the driver's process).
        shared: The node is CPU-only: the set is in its object store (put there by the
            holder) and this worker computes its own products with it; else ``holder``
            computes them (on its GPU).
    """
    key = SetKey(job.alignment_uri, job.alignment_id)

    def sanitizer() -> FleetSanitizer:
        aset = AlignmentSet.open(job.alignment_uri, expect=job.alignment_id)
        return FleetSanitizer(job.alignment_uri, job.out_uri, json.loads(job.selection_json),
                              ctx.device, job.force, job.max_adapter_bytes, aset=aset,
                              run_id=job.run_id)

    san = ctx.resident(SANITIZER_SLOT, job, sanitizer)
    if shared:
        project: Projector | None = shared_projector(ctx, holder, key, san.aset,
                                                     job.task_timeout_s)
    elif holder is not None:
        project = remote_projector(holder, key, job.task_timeout_s)
    else:  # the driver's process: the sanitizer's own engine
        project = None
    return san.process(refs, cancelled=lambda: ctx.cancelled(job.run_id), project=project)


def untouched_note(adapter: Adapter) -> str | None:
    """The report note naming what is kept as it is: ``modules_to_save`` and the biases an
    adapter saves (``lora_bias``: ``…lora_B.bias``; ``bias="lora_only"``/``"all"``:
    ``…base_layer.bias`` and other biases). The rule covers neither (SPEC §2)."""
    parts = []
    if adapter.modules_to_save:
        parts.append("modules_to_save left as is: " + ",".join(adapter.modules_to_save))
    mts = [f".{m}." for m in adapter.modules_to_save]
    biases = [n for n in adapter.untouched
              if n.endswith(".bias") and not any(m in f".{n}" for m in mts)]
    if biases:
        shown = ",".join(b.removeprefix("base_model.model.") for b in biases[:20])
        more = f" and {len(biases) - 20} more" if len(biases) > 20 else ""
        parts.append(f"biases left as is: {shown}{more}")
    return "; ".join(parts) or None


def _source_uri(ref: AdapterRef) -> str:
    """The adapter's URI as reports and the ledger show it (signed-URL parts masked)."""
    return redact(f"{ref.uri.rstrip('/')}/{ref.prefix}".rstrip("/")) or ""


def _base_row(ref: AdapterRef) -> dict[str, Any]:
    return {
        "adapter_id": ref.adapter_id, "source_uri": _source_uri(ref), "status": "error",
        "error": None, "modules": 0, "projected": 0,
        "pdst": None, "source_digest": None, "output_digest": None, "base_model": None,
        "bytes_in": 0, "bytes_out": 0, "read_s": 0.0, "compute_s": 0.0, "write_s": 0.0,
        "batch_s": 0.0, "untouched": 0, "note": None,
    }


def _skip(row: dict[str, Any], ledger: dict[str, Any], why: str,
          run_id: str | None = None) -> None:
    row.update(status="skipped", note=why, output_digest=ledger.get("output_digest"),
               source_digest=ledger.get("key", {}).get("content_digest"),
               projected=len(ledger.get("projected", [])), prior=ledger_figures(ledger))
    if run_id is not None and ledger.get("run_id") == run_id:
        # Written by this very run: a batch whose reply was lost with its worker and that Ray
        # ran again. The adapter was sanitized once, now; its per-module rows were lost.
        row.update(status="ok", modules=ledger.get("modules", 0),
                   note="sanitized by an earlier attempt of this batch in this run (the "
                        "worker died before replying); per-module rows were lost with it")


def _fail(row: dict[str, Any], e: BaseException) -> None:
    row["status"] = "error"
    if isinstance(e, SafeLoraError):
        msg = str(e)
        name = f"adapter {row['adapter_id']!r}"
        row["error"] = redact(msg if msg.startswith(name) else f"{name}: {msg}")
    else:  # unexpected: keep the type and the last frame for the operator
        tb = traceback.extract_tb(e.__traceback__)
        where = f" at {tb[-1].filename}:{tb[-1].lineno}" if tb else ""
        row["error"] = redact(f"adapter {row['adapter_id']!r}: {type(e).__name__}: {e}{where}")
    # Printed once, by the driver's summary (and kept in the reports); not here as well.
    logger.debug("%s", row["error"])


# ---------------------------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------------------------


def _adapter_counter() -> Any:
    """A Ray metrics counter of processed adapters by status (exported with Ray's metrics)."""
    try:
        from ray.util.metrics import Counter

        return Counter("safelora_adapters_processed",
                       description="Adapters processed by safelora-ray sanitize, by status.",
                       tag_keys=("status",))
    except Exception as e:  # metrics are optional: never fail a run for them
        logger.debug("Ray metrics unavailable: %s", e)
        return None


def _count_in_background(catalog: str, bar: Progress) -> None:
    """List the catalog a second time in a thread, to give the progress report its total
    (the run itself streams the catalog, never holding it whole)."""

    def count() -> None:
        try:
            bar.set_total(sum(1 for _ in iter_catalog(catalog)))
        except Exception as e:  # only the progress report loses its total
            logger.debug("could not count the catalog %s: %s", catalog, e)

    threading.Thread(target=count, name="safelora-count", daemon=True).start()


def _apart_from(items: Iterator[AdapterRef | tuple[str, str]],
                out: str) -> Iterator[AdapterRef | tuple[str, str]]:
    """A manifest's entries, each refused when it lies inside ``out`` or contains it."""
    for item in items:
        if isinstance(item, AdapterRef):
            where = join_uri(item.uri, item.prefix)
            rel = overlap(where, out)
            if rel is not None:
                how = {"same": "is", "inside": "lies inside", "contains": "contains"}[rel]
                item = (item.adapter_id, f"adapter {item.adapter_id!r}: {where} {how} --out "
                                         f"{out}: its output would overwrite the input")
        yield item


def _batches(items: Iterator[AdapterRef | tuple[str, str]], size: int,
             on_invalid) -> Iterator[list[AdapterRef]]:
    batch: list[AdapterRef] = []
    for item in items:
        if isinstance(item, tuple):
            on_invalid(*item)
            continue
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def check_method(aset: AlignmentSet, method: str) -> None:
    """``--method`` must name the method the set was made for.

    Raises:
        ConfigError: a Safe LoRA set with ``salora``, or SaLoRA safety modules without it.
    """
    if aset.method_family != method:
        made_by = ("safelora-ray salora-modules" if aset.method_family == "salora"
                   else "safelora-ray build")
        raise ConfigError(
            f"{aset.uri} holds {aset.method_name or 'unknown'} matrices (made by {made_by}), "
            f"but --method is {method}: use --method {aset.method_family}")


def sanitize(config: SanitizeConfig) -> SanitizeResult:
    """Sanitize every adapter of a catalog (SPEC §2) on Ray.

    Returns:
        A :class:`SanitizeResult`; bad adapters are counted as errors (and reported), never
        raised.

    Raises:
        AlignmentSetError: the alignment set is missing or incomplete.
        StorageError / ConfigError: the catalog or the output cannot be used at all.
        LeaseHeldError: another run writes to ``out`` (and ``wait_s`` ran out).
    """
    assert config.run_id is not None
    probe_outputs(config.outputs)  # a read-only --out is found now, not after the fleet
    # One writer per --out: the sweep of leftovers and the ledger's skips assume it.
    lease = hold_output(open_storage(config.out), "sanitize", config.run_id, config.wait_s)
    try:
        return _sanitize(config)
    finally:
        lease.release()


def _sanitize(config: SanitizeConfig) -> SanitizeResult:
    t_start = time.perf_counter()
    aset = AlignmentSet.open(config.alignment)  # fail fast, before any worker starts
    check_method(aset, config.method)
    out = open_storage(config.out)
    assert config.run_id is not None
    report_prefix = f"{REPORTS_PREFIX}/{config.run_id}"
    if next(iter(out.list(report_prefix)), None) is not None:  # never write over a report
        raise ConfigError(f"--run-id {config.run_id}: {out.describe(report_prefix)} already "
                          "holds that run's report; choose another id, or leave --run-id out")
    sweep_stale_writes(out, descend=(LEDGER_PREFIX, REPORTS_PREFIX))
    # A look at the catalog's head says whether it is small enough for this process.
    items = iter_catalog(config.adapters)
    if is_manifest(config.adapters):  # a directory catalog was checked as a whole already
        items = _apart_from(items, config.out)
    head = list(itertools.islice(items, INLINE_MAX_ADAPTERS + 1))
    exhausted_head = len(head) <= INLINE_MAX_ADAPTERS
    if not head and not config.allow_empty:
        raise ConfigError(
            f"--adapters {config.adapters}: no adapters found (no {CONFIG_FILE} under it); "
            "pass --allow-empty if an empty catalog is expected")
    plan = resolve_workers(config.workers, config.use_gpu, config.ray_address,
                           small=len(head) <= INLINE_MAX_ADAPTERS, shape="pipeline",
                           workers_per_gpu=config.workers_per_gpu)
    ex = open_executor(plan, config.use_gpu)
    key = SetKey(aset.uri, aset.content_id)
    # CPU-only nodes share the set through their object store (see projection.py).
    share_set_in_store = not ex.in_process and not plan.uses_gpu
    try:
        # Every node with a worker must see the local paths the workers read and write.
        ex.check_shared([("--out", config.out, True), ("--alignment", config.alignment, False),
                         ("--adapters", config.adapters, False)])
        if share_set_in_store:  # the nodes as the plan read them (their stores' sizes too)
            used = {s.node_id for s in plan.specs}
            check_store_room(aset, [n for n in plan.nodes if n.node_id in used])
        if not ex.in_process:  # holders load the set while the I/O workers read
            ex.notify(warm_set, key, share_set_in_store, group="serve", role="holder")
    except BaseException:
        ex.close(False)
        raise
    result = SanitizeResult(config.run_id, out.uri, out.describe(report_prefix),
                            alignment_id=aset.content_id)
    # Recorded as an absolute URI: a report read later, elsewhere, says where its inputs were.
    catalog_uri = open_storage(config.adapters).uri
    report = ReportWriter(config.run_id, aset, config.selection, catalog_uri,
                          tenant_depth=config.tenant_depth)
    job = SanitizeJob.of(aset.uri, aset.content_id, out.uri, config.selection, config.force,
                         config.max_adapter_bytes, config.run_id, config.task_timeout_s)

    counter = _adapter_counter() if not ex.in_process else None

    def record(payload: dict[str, Any]) -> None:
        for row in payload["adapters"]:
            result.count(row)
            status = row["status"]
            if counter is not None:
                counter.inc(1, tags={"status": status})
            k = config.num_proj_layers
            if k is not None and status == "ok" and 0 < row["modules"] <= k:
                all_by_k[0] += 1
        report.add(payload["adapters"], payload["layers"])
        bar.update(len(payload["adapters"]))

    all_by_k = [0]  # adapters with at most --num-proj-layers modules: all projected

    def invalid(adapter_id: str, message: str) -> None:
        row = _base_row(AdapterRef(adapter_id, catalog_uri, ""))
        row["error"] = redact(message)
        record({"adapters": [row], "layers": []})

    def lost(batch: list[AdapterRef], suspect: bool, e: BaseException) -> None:
        # The batch's worker (or the holder of its node's set) died with it in flight. Its
        # adapters are retried one by one, each alone on a worker, so a poison adapter fails
        # alone and its batch-mates (or an adapter that merely shared a worker with it) do
        # not; those already written are found in the ledger (done by this run: ok).
        if not suspect:
            logger.warning("a worker died (%s) with a batch of %d adapter(s) in flight; "
                           "retrying each of them alone", type(e).__name__, len(batch))
            retry.extend([ref] for ref in batch)
            return
        row = _base_row(batch[0])
        row["error"] = (f"adapter {batch[0].adapter_id!r}: the worker died while sanitizing it "
                        f"({type(e).__name__}); the rest of the fleet went on")
        record({"adapters": [row], "layers": []})

    logger.info("sanitizing %s with alignment set %s (%s) on %d %s worker(s) → %s",
                config.adapters, aset.content_id, config.selection, ex.size, ex.kind, out.uri)
    bar = Progress("sanitize", "adapter", enabled=config.progress)
    if exhausted_head:
        bar.set_total(len(head))
    elif config.progress:
        _count_in_background(config.adapters, bar)
    pending: dict[Any, tuple[int, list[AdapterRef], bool]] = {}
    retry: collections.deque[list[AdapterRef]] = collections.deque()
    load: collections.Counter[int] = collections.Counter()
    alone: set[int] = set()  # workers running a suspect adapter, with nothing else
    batches = _batches(itertools.chain(head, items), config.batch_size, invalid)
    # Nodes an autoscaler adds while the run goes get workers too (unless --workers fixed
    # the count): checked every GROW_EVERY_S.
    elastic = not ex.in_process and config.workers is None
    next_grow = time.monotonic() + GROW_EVERY_S

    def plan_node(node: NodeInfo) -> list[WorkerSpec]:
        if plan.uses_gpu and node.gpus < 1:
            return []
        if share_set_in_store:
            try:
                check_store_room(aset, [node])
            except ConfigError as e:
                logger.warning("a node joined but is left unused: %s", e)
                return []
        return plan_pipeline([node], None, plan.uses_gpu, config.workers_per_gpu)

    ok = False
    try:
        exhausted = False
        while True:
            if elastic and time.monotonic() >= next_grow:
                ex.grow(plan_node)
                next_grow = time.monotonic() + GROW_EVERY_S
            # Fill every ready I/O worker up to max_in_flight batches: bounded memory on both
            # sides. Suspects (adapters of a batch whose worker died) go first, each to an
            # idle worker that gets nothing else until it answers.
            while True:
                workers = ex.usable("io")
                if retry:
                    idle = [i for i in workers if load[i] == 0]
                    if not idle:
                        break
                    i, batch, suspect = idle[0], retry.popleft(), True
                    alone.add(i)
                else:
                    free = [i for i in workers
                            if i not in alone and load[i] < config.max_in_flight]
                    if exhausted or not free:
                        break
                    batch = next(batches, None)
                    if batch is None:
                        exhausted = True
                        break
                    i, suspect = min(free, key=load.__getitem__), False
                pending[ex.submit(i, sanitize_batch, job, batch, ex.holder_of(i),
                                  share_set_in_store)] = (
                    i, batch, suspect)
                load[i] += 1
            if not pending and exhausted and not retry:
                break
            ref = ex.wait(list(pending), config.task_timeout_s, "adapter batch")
            if ref is None:  # a worker came up or was dropped: hand out work again
                continue
            i, batch, suspect = pending.pop(ref)
            load[i] -= 1
            if suspect:
                alone.discard(i)
            try:
                payload = ex.result(ref, config.task_timeout_s)
            except (*WORKER_LOST, HolderLost) as e:
                if isinstance(e, HolderLost):  # its holder; the I/O worker may have waited
                    ex.lost(ex.holder_index(i), gone=str(e) if e.waited else None)
                else:
                    ex.lost(i)
                lost(batch, suspect, e)
                continue
            record(payload)
        ok = True
    except KeyboardInterrupt:
        # Adapters already written are in the ledger: the next run resumes after them.
        report.abort()
        wind_down(ex, config.run_id, list(pending))
        raise
    except BaseException:
        report.abort()
        raise
    finally:
        bar.close()
        ex.close(ok)
        # A worker killed mid-write (and retried elsewhere) leaves its temp files behind; no
        # writer is left now, so they go.
        try:
            sweep_stale_writes(out, descend=(LEDGER_PREFIX, REPORTS_PREFIX))
        except Exception as e:  # never mask the run's own outcome
            logger.warning("could not remove stale temp files under %s: %s", out.uri, e)
    if all_by_k[0]:
        logger.warning("%d adapter(s) have at most --num-proj-layers %d modules: every module of "
                       "theirs was projected (the number counts per adapter)", all_by_k[0],
                       config.num_proj_layers)
    result.duration_s = time.perf_counter() - t_start
    report.finish(out, report_prefix, result)
    logger.info("run %s: %d ok, %d skipped, %d failed in %.1f s; reports at %s", result.run_id,
                result.ok, result.skipped, result.error, result.duration_s, result.report_uri)
    return result


__all__ = ["METHODS", "FleetSanitizer", "MatrixCache", "SanitizeConfig", "SanitizeJob",
           "SanitizeResult", "check_method", "ledger_path", "sanitize", "sanitize_batch"]
