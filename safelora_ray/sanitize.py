"""Fleet sanitization: an alignment set + a catalog of LoRA adapters → sanitized adapters.

The driver streams the catalog into batches and keeps a bounded number of batches in flight
on a pool of worker actors (:mod:`safelora_ray.workers`; this process for a small catalog),
each holding the alignment set once (on its GPU when it has one).
A worker reads its batch's adapters, multiplies every adapter's B of one module by that
module's C in a single matrix product, scores and selects modules per adapter exactly as
SPEC §2 says, writes each adapter atomically, records it in the ledger and returns one row per
adapter and per module. The driver streams those rows into Parquet reports.
"""

from __future__ import annotations

import collections
import contextlib
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from safelora_ray.catalog import AdapterRef, iter_catalog
from safelora_ray.errors import AdapterError, ConfigError, NotFoundError, SafeLoraError
from safelora_ray.formats.alignment_set import AlignmentSet
from safelora_ray.formats.peft_adapter import Adapter, output_digest, read_adapter, write_adapter
from safelora_ray.math_core import (
    AlignmentMatrix,
    ModuleScore,
    module_scores,
    pdst,
    select_modules,
)
from safelora_ray.redact import redact
from safelora_ray.reports import ReportWriter, ledger_figures
from safelora_ray.storage import Storage, open_storage
from safelora_ray.storage.local import STAGING_PREFIX, TMP_PREFIX, TRASH_PREFIX, LocalStorage
from safelora_ray.workers import (
    INLINE_MAX_ADAPTERS,
    WORKER_LOST,
    SanitizeJob,
    open_executor,
    resolve_workers,
)

logger = logging.getLogger(__name__)

LEDGER_PREFIX = "_ledger"
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
        workers: Worker actors; 0 = in this process; None = one per GPU, else one per CPU
            (in this process for a catalog of at most ``INLINE_MAX_ADAPTERS`` adapters when
            no Ray cluster is configured: see :mod:`safelora_ray.workers`).
        use_gpu: Force GPU/CPU workers; None = GPUs when the cluster has them.
        workers_per_gpu: GPU workers per GPU (default: workers = ``workers_per_gpu`` x
            GPUs, each with that fraction of a GPU and its own copy of the alignment set).
        batch_size: Adapters per task (their B matrices are batched per module).
        max_in_flight: Batches queued per worker (backpressure).
        run_id: Report folder name; default ``YYYYmmddTHHMMSSZ-<random>``.
        progress: Show a progress bar.
        task_timeout_s: Longest one batch may take.
        max_adapter_bytes: Largest adapter weights file read into memory.
        ray_address: Cluster address; None = ``RAY_ADDRESS`` or a new local Ray.
        tenant_depth: Path components of an adapter id that name its tenant (reports).
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
    tenant_depth: int = 1

    def __post_init__(self) -> None:
        if (self.threshold is None) == (self.num_proj_layers is None):
            raise ConfigError("give exactly one of --threshold or --num-proj-layers")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise ConfigError(f"threshold must be a finite number, got {self.threshold}")
        if self.num_proj_layers is not None and self.num_proj_layers < 1:
            raise ConfigError(f"num_proj_layers must be ≥ 1, got {self.num_proj_layers}")
        if self.strict_k and self.num_proj_layers is None:
            raise ConfigError("strict_k needs num_proj_layers")
        for name in ("batch_size", "max_in_flight", "workers_per_gpu", "tenant_depth"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be ≥ 1")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"workers must be ≥ 0 (0 = in this process), got {self.workers}")
        if self.run_id is None:
            now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            self.run_id = f"{now}-{uuid.uuid4().hex[:6]}"
        elif not self.run_id.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ConfigError(f"run_id {self.run_id!r} may only use letters, digits, . _ -")

    @property
    def selection(self) -> dict[str, Any]:
        """The selection parameters, as recorded in the ledger and reports."""
        if self.threshold is not None:
            return {"mode": "threshold", "threshold": self.threshold}
        return {"mode": "number", "num_proj_layers": self.num_proj_layers,
                "strict": self.strict_k}


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


# ---------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------


def _params_id(selection: dict[str, Any]) -> str:
    return json.dumps(selection, sort_keys=True)


def ledger_path(adapter_id: str) -> str:
    """Where the ledger record of ``adapter_id`` lives under ``--out``."""
    return f"{LEDGER_PREFIX}/{adapter_id}.json"


class MatrixCache:
    """An alignment set's matrices on one device, each loaded on first use, once (several
    threads, and several runs against the same set in one worker, share it).

    Args:
        aset: The opened alignment set.
        device: ``cpu`` or ``cuda``.
    """

    def __init__(self, aset: AlignmentSet, device: str) -> None:
        self.aset = aset
        self.device = device
        self._matrices: dict[str, AlignmentMatrix] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(cls, alignment_uri: str, device: str) -> MatrixCache:
        return cls(AlignmentSet.open(alignment_uri), device)

    def get(self, module: str) -> AlignmentMatrix:
        m = self._matrices.get(module)
        if m is None:
            with self._lock:
                m = self._matrices.get(module)
                if m is None:
                    m = self._matrices[module] = self.aset.load(module, device=self.device)
        return m


class FleetSanitizer:
    """Sanitizes batches of adapters against one alignment set (plain Python; a Ray actor
    wraps it). The set's matrices are loaded once, on first use, and stay on ``device``.

    Args:
        alignment_uri: The alignment set.
        out_uri: Output root.
        selection: :attr:`SanitizeConfig.selection`.
        device: ``cpu`` or ``cuda``.
        force: Ignore the ledger.
        max_adapter_bytes: Cap on one adapter's weights file.
        matrices: The set's matrices already resident on ``device`` (shared between runs);
            None opens the set.
        run_id: The run, recorded in the ledger (an adapter found done by this same run was
            sanitized by a retried batch: it is reported ``ok``, not ``skipped``).
    """

    def __init__(self, alignment_uri: str, out_uri: str, selection: dict[str, Any],
                 device: str = "cpu", force: bool = False,
                 max_adapter_bytes: int = 4 * 1024**3, matrices: MatrixCache | None = None,
                 run_id: str | None = None):
        self.run_id = run_id
        self.matrices = matrices or MatrixCache.open(alignment_uri, device)
        self.aset = self.matrices.aset
        self.out = open_storage(out_uri)
        self.selection = selection
        self.device = device
        self.force = force
        self.max_adapter_bytes = max_adapter_bytes
        self._storages: dict[str, Storage] = {}
        # process() may run in two threads at once (one batch reads while another computes):
        # the storage cache is filled under this lock.
        self._lock = threading.Lock()

    # -- helpers ---------------------------------------------------------------------------
    def _storage(self, uri: str) -> Storage:
        st = self._storages.get(uri)
        if st is None:
            with self._lock:
                st = self._storages.get(uri)
                if st is None:
                    st = self._storages[uri] = open_storage(uri)
        return st

    def matrix(self, module: str) -> AlignmentMatrix:
        return self.matrices.get(module)

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
        st = self._storage(ref.uri)
        try:
            parts = [st.version(f"{ref.prefix}/{n}" if ref.prefix else n)
                     for n in ("adapter_config.json", "adapter_model.safetensors")]
        except SafeLoraError:
            return None
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    def _done(self, ledger: dict[str, Any] | None, key: dict[str, str | None],
              ref: AdapterRef) -> bool:
        if self.force or not ledger or ledger.get("key") != key:
            return False
        return self.out.exists(f"{ref.adapter_id}/adapter_config.json")

    # -- the work --------------------------------------------------------------------------
    def process(self, refs: Sequence[AdapterRef]) -> dict[str, Any]:
        """Sanitize one batch; never raises for a bad adapter (it becomes an error row).

        Returns:
            ``{"adapters": [row, ...], "layers": [row, ...]}``.
        """
        t_batch = time.perf_counter()
        rows: dict[str, dict[str, Any]] = {}
        loaded: dict[str, tuple[AdapterRef, Adapter, str | None, float]] = {}
        for ref in refs:
            t0 = time.perf_counter()
            row = rows[ref.adapter_id] = _base_row(ref)
            try:
                ledger = self._read_ledger(ref.adapter_id)
                fp = self._fingerprint(ref)
                # Same object versions as last time: skip without downloading the weights.
                if ledger and fp and ledger.get("fingerprint") == fp and self._done(
                        ledger, self._ledger_key(ledger.get("key", {}).get("content_digest")), ref):
                    _skip(row, ledger, "unchanged since the last run (ledger)", self.run_id)
                    continue
                adapter = read_adapter(self._storage(ref.uri), ref.prefix, ref.adapter_id,
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
            projected, scores = self._project_all([a for _, a, _, _ in loaded.values()])
            share = (time.perf_counter() - t0) / len(loaded)  # batch compute, per adapter
            for adapter_id, (ref, adapter, fp, read_s) in loaded.items():
                row = rows[adapter_id]
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
        for m, lm in adapter.modules.items():
            d_out, d_in = self.aset.rows[m].shape
            if next(iter(lm.b.shape)) != d_out or tuple(lm.a.shape)[1] != d_in:
                raise AdapterError(
                    f"adapter {adapter.adapter_id!r}: module {m!r} has A {list(lm.a.shape)} and "
                    f"B {list(lm.b.shape)}, but the alignment set's weight is {d_out}x{d_in} "
                    "(an adapter for another base model?)"
                )

    def _project_all(self, adapters: Sequence[Adapter]
                     ) -> tuple[dict[str, dict[str, torch.Tensor]],
                                dict[str, dict[str, ModuleScore]]]:
        """C B and the scores of every adapter and module of a batch: one matrix product per
        module for the batch, one batched scoring per shape (SPEC §2).

        Returns:
            ``(cb, scores)``, each ``{adapter_id: {module: ...}}``; C B in each B's dtype (the
            scores use the float32 product).
        """
        by_module: dict[str, list[tuple[str, torch.Tensor]]] = {}
        for ad in adapters:
            for m, lm in ad.modules.items():
                by_module.setdefault(m, []).append((ad.adapter_id, lm.b))
        out: dict[str, dict[str, torch.Tensor]] = {ad.adapter_id: {} for ad in adapters}
        cast: dict[str, dict[str, torch.Tensor]] = {ad.adapter_id: {} for ad in adapters}
        for m, items in by_module.items():
            # cat promotes mixed half dtypes to float32; one conversion per module
            bcat = torch.cat([b for _, b in items], dim=1).to(self.device, torch.float32)
            cb = self.matrix(m).apply(bcat).cpu()
            # C B in B's dtype, as written (elementwise, so converting the batch at once is
            # the same as converting each adapter's columns)
            dtypes = {b.dtype for _, b in items}
            cbc = cb.to(dtypes.pop()) if len(dtypes) == 1 else None
            col = 0
            for adapter_id, b in items:
                r = b.shape[1]
                out[adapter_id][m] = cb[:, col:col + r]
                cast[adapter_id][m] = (cbc[:, col:col + r] if cbc is not None
                                       else cb[:, col:col + r].to(b.dtype))
                col += r
        # Modules of equal shapes (every q_proj of the batch, ...) are scored together.
        groups: dict[tuple[Any, ...], list[tuple[str, str]]] = {}
        mods = {ad.adapter_id: ad.modules for ad in adapters}
        for ad in adapters:
            for m, lm in ad.modules.items():
                groups.setdefault((tuple(lm.a.shape), tuple(lm.b.shape)), []).append(
                    (ad.adapter_id, m))
        scores: dict[str, dict[str, ModuleScore]] = {ad.adapter_id: {} for ad in adapters}
        for keys in groups.values():
            # stack promotes mixed dtypes; module_scores converts to float64 once
            got = module_scores(torch.stack([mods[i][m].a for i, m in keys]),
                                torch.stack([mods[i][m].b for i, m in keys]),
                                torch.stack([out[i][m] for i, m in keys]))
            for (i, m), sc in zip(keys, got, strict=True):
                scores[i][m] = sc
        return cast, scores

    def _finish(self, ref: AdapterRef, adapter: Adapter, fingerprint: str | None,
                cbs: dict[str, torch.Tensor], scores: dict[str, ModuleScore],
                row: dict[str, Any]) -> list[dict[str, Any]]:
        t0 = time.perf_counter()
        sel = self.selection
        chosen = select_modules(
            {m: s.cos_rounded for m, s in scores.items()},
            threshold=sel.get("threshold"),
            num_proj_layers=sel.get("num_proj_layers"),
            strict=bool(sel.get("strict", False)),
        )
        new_b = {m: cbs[m] for m in chosen}
        compute_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        tmp = tempfile.mkdtemp(prefix="safelora-adapter-")
        try:
            files = write_adapter(adapter, new_b, tmp, self._storage(ref.uri), ref.prefix)
            out_digest = output_digest(files)
            bytes_out = sum(os.path.getsize(p) for _, p in files)
            self.out.put_tree(ref.adapter_id, files)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        dists = [0.0 if m in chosen else s.dist for m, s in scores.items()]
        adapter_pdst = pdst(dists)
        ledger = {
            "adapter_id": ref.adapter_id,
            "source": _source_uri(ref),
            "key": self._ledger_key(adapter.digest),
            # The versions seen before reading (not re-fetched: two HEADs per adapter saved).
            "fingerprint": fingerprint,
            "output_digest": out_digest,
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
            untouched=len(adapter.untouched),
            note=("modules_to_save left as is: " + ",".join(adapter.modules_to_save)
                  if adapter.modules_to_save else None),
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
    logger.warning("%s", row["error"])


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


def sweep_stale_writes(out: Storage) -> int:
    """Remove what killed writers left under a local ``--out``: ``.tmp-*`` files and
    ``.staging-*`` / ``.trash-*`` trees (never listed or read, but they take space).

    A run owns its ``--out`` while it runs (the nightly job holds a lease on it), so whatever
    is there when a run starts is stale. Other tools' top-level ``_*`` folders (``_nightly``)
    are left alone. Object stores need nothing: an interrupted upload is never visible.

    Returns:
        How many were removed.
    """
    if not isinstance(out, LocalStorage):
        return 0
    stale = (TMP_PREFIX, STAGING_PREFIX, TRASH_PREFIX)
    removed = 0
    for parent, dirs, files in os.walk(out.root):
        if parent == out.root:
            dirs[:] = [d for d in dirs if not d.startswith("_")
                       or d in (LEDGER_PREFIX, REPORTS_PREFIX)]
        for name in [d for d in dirs if d.startswith(stale)]:
            dirs.remove(name)
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            removed += 1
        for name in files:
            if name.startswith(stale):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(parent, name))
                removed += 1
    if removed:
        logger.info("removed %d leftover(s) of an interrupted run under %s", removed, out.uri)
    return removed


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


def sanitize(config: SanitizeConfig) -> SanitizeResult:
    """Sanitize every adapter of a catalog (SPEC §2) on Ray.

    Returns:
        A :class:`SanitizeResult`; bad adapters are counted as errors (and reported), never
        raised.

    Raises:
        AlignmentSetError: the alignment set is missing or incomplete.
        StorageError / ConfigError: the catalog or the output cannot be used at all.
    """
    t_start = time.perf_counter()
    aset = AlignmentSet.open(config.alignment)  # fail fast, before any worker starts
    out = open_storage(config.out)
    sweep_stale_writes(out)
    # A look at the catalog's head says whether it is small enough for this process.
    items = iter_catalog(config.adapters)
    head = list(itertools.islice(items, INLINE_MAX_ADAPTERS + 1))
    res = resolve_workers(config.workers, config.use_gpu, config.ray_address,
                          small=len(head) <= INLINE_MAX_ADAPTERS,
                          workers_per_gpu=config.workers_per_gpu)
    ex = open_executor(res, config.use_gpu)
    assert config.run_id is not None
    report_prefix = f"{REPORTS_PREFIX}/{config.run_id}"
    result = SanitizeResult(config.run_id, out.uri, out.describe(report_prefix),
                            alignment_id=aset.content_id)
    report = ReportWriter(config.run_id, aset, config.selection, config.adapters,
                          tenant_depth=config.tenant_depth)
    job = SanitizeJob.of(aset.uri, aset.content_id, out.uri, config.selection, config.force,
                         config.max_adapter_bytes, config.run_id)

    counter = _adapter_counter() if not ex.in_process else None

    def record(payload: dict[str, Any]) -> None:
        for row in payload["adapters"]:
            result.total += 1
            status = row["status"]
            if counter is not None:
                counter.inc(1, tags={"status": status})
            setattr(result, status, getattr(result, status) + 1)
            result.modules += row["modules"]
            result.projected += row["projected"] if status == "ok" else 0
            result.bytes_in += row["bytes_in"]
            result.bytes_out += row["bytes_out"]
            if status == "error" and len(result.errors) < 1000:
                result.errors.append((row["adapter_id"], row["error"]))
        report.add(payload["adapters"], payload["layers"])
        bar.update(len(payload["adapters"]))

    def invalid(adapter_id: str, message: str) -> None:
        row = _base_row(AdapterRef(adapter_id, config.adapters, ""))
        row["error"] = redact(message)
        record({"adapters": [row], "layers": []})

    def lost(batch: list[AdapterRef], suspect: bool, e: BaseException) -> None:
        # Ray already retried the batch on a restarted worker (max_task_retries); it still
        # kills its worker. Its adapters are retried one by one, each alone on a worker, so a
        # poison adapter fails alone and its batch-mates (or an adapter that merely shared a
        # worker with it) do not.
        if not suspect:
            retry.extend([ref] for ref in batch)
            return
        row = _base_row(batch[0])
        row["error"] = (f"adapter {batch[0].adapter_id!r}: the worker died while sanitizing it "
                        f"({type(e).__name__}); the rest of the fleet went on")
        logger.warning("%s", row["error"])
        record({"adapters": [row], "layers": []})

    logger.info("sanitizing %s with alignment set %s (%s) on %d %s worker(s) → %s",
                config.adapters, aset.content_id, config.selection, ex.size, ex.kind, out.uri)
    bar = tqdm(desc="sanitize", unit="adapter", disable=not config.progress)
    pending: dict[Any, tuple[int, list[AdapterRef], bool]] = {}
    retry: collections.deque[list[AdapterRef]] = collections.deque()
    load = [0] * ex.size
    alone: set[int] = set()  # workers running a suspect adapter, with nothing else
    batches = _batches(itertools.chain(head, items), config.batch_size, invalid)
    ok = False
    try:
        exhausted = False
        while True:
            # Fill every worker up to max_in_flight batches: bounded memory on both sides.
            # Suspects (adapters of a batch that killed its worker) go first, each to an idle
            # worker that gets nothing else until it answers.
            while True:
                if retry:
                    idle = [i for i in range(ex.size) if load[i] == 0]
                    if not idle:
                        break
                    i, batch, suspect = idle[0], retry.popleft(), True
                    alone.add(i)
                else:
                    free = [i for i in range(ex.size)
                            if i not in alone and load[i] < config.max_in_flight]
                    if exhausted or not free:
                        break
                    batch = next(batches, None)
                    if batch is None:
                        exhausted = True
                        break
                    i, suspect = min(free, key=load.__getitem__), False
                pending[ex.submit(i, "sanitize", job, batch)] = (i, batch, suspect)
                load[i] += 1
            if not pending:
                break
            ref = ex.wait(list(pending), config.task_timeout_s, "adapter batch")
            i, batch, suspect = pending.pop(ref)
            load[i] -= 1
            if suspect:
                alone.discard(i)
            try:
                payload = ex.result(ref, config.task_timeout_s)
            except WORKER_LOST as e:
                ex.replace(i)
                lost(batch, suspect, e)
                continue
            record(payload)
        ok = True
    except BaseException:
        report.abort()
        raise
    finally:
        bar.close()
        ex.close(ok)
        # A worker killed mid-write (and retried elsewhere) leaves its temp files behind; no
        # writer is left now, so they go.
        try:
            sweep_stale_writes(out)
        except Exception as e:  # never mask the run's own outcome
            logger.warning("could not remove stale temp files under %s: %s", out.uri, e)
    result.duration_s = time.perf_counter() - t_start
    report.finish(out, report_prefix, result)
    logger.info("run %s: %d ok, %d skipped, %d failed in %.1f s; reports at %s", result.run_id,
                result.ok, result.skipped, result.error, result.duration_s, result.report_uri)
    return result


__all__ = ["FleetSanitizer", "MatrixCache", "SanitizeConfig", "SanitizeResult", "ledger_path",
           "sanitize", "sweep_stale_writes"]
