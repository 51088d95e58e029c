"""The worker side of a sanitize run: one batch of adapters → sanitized adapters and rows.

A worker reads its batch's adapters, has every adapter's B of one module multiplied by that
module's C in a single matrix product (by the set's holder, see
:mod:`safelora_ray.pipelines.sanitize.projection`), scores and selects modules per adapter
exactly as SPEC §2 says, writes each adapter atomically, records it in the ledger and returns
one row per adapter and per module.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from safelora_ray.core.errors import AdapterError, ChangedError, SafeLoraError
from safelora_ray.core.scores import ModuleScore, pdst, scores_from_sums
from safelora_ray.core.selection import Selection
from safelora_ray.core.validate import env_number
from safelora_ray.execution import WorkerContext
from safelora_ray.execution.buffers import BufferPool, Loans
from safelora_ray.formats.alignment_set import AlignmentSet
from safelora_ray.formats.peft import (
    DIGEST_SCHEME,
    Adapter,
    OutputDigest,
    digest_scheme,
    read_adapter,
    write_adapter,
)
from safelora_ray.pipelines.sanitize.ledger import Ledger, source_uri
from safelora_ray.pipelines.sanitize.projection import (
    GroupKey,
    MatrixCache,
    ProjectionEngine,
    Projector,
    SetKey,
    dtype_name,
    remote_projector,
)
from safelora_ray.pipelines.sanitize.rows import base_row, mark_failed, mark_skipped
from safelora_ray.pipelines.sanitize.safemerge import (
    SafetySpec,
    check_pair,
    merged_factors,
    read_safety,
)
from safelora_ray.pipelines.sanitize.shared_set import local_projector, shared_projector
from safelora_ray.planning.catalog import AdapterRef
from safelora_ray.storage import open_storage
from safelora_ray.storage.base import ObjectInfo
from safelora_ray.storage.cache import StorageCache
from safelora_ray.storage.local import STAGING_PREFIX

logger = logging.getLogger(__name__)

#: Threads of a sanitizer reading and writing a batch's adapters side by side. Reading,
#: hashing, checking and writing release the GIL: the per-adapter CPU spreads over them
#: instead of one thread carrying all of it (which would cap what a GPU can be fed), and
#: one adapter's fsync waits while the others go on.
IO_THREADS = env_number("SAFELORA_IO_THREADS", 8, int)
#: ... for adapters of at least this many bytes on average (so far in the run): a small
#: adapter's time is Python holding the GIL, where threads only add switching (measured: a
#: 100M-parameter pair's 0.3 MB adapters went 60 % slower on 8 threads).
IO_THREADS_MIN_BYTES = env_number("SAFELORA_IO_THREADS_MIN_BYTES", 2 * 1024**2, int)
#: Bytes of read buffers a sanitizer keeps for its next batches: three batches in flight of
#: 16 7B adapters, each read into a 9 MiB buffer (432 MiB; 256 kept only 28 of two batches'
#: 32). A read into reused memory skips a page fault per 4 KiB, which cost more than the
#: read itself (docs/benchmarks.md, section 14).
READ_POOL_BYTES = env_number("SAFELORA_READ_POOL_MB", 512, int) * 1024**2
#: Adapters smaller than this are read into fresh memory (malloc reuses small blocks itself).
POOLED_MIN_BYTES = 1024**2


class Loaded(NamedTuple):
    """An adapter read and checked, waiting for its batch's products."""

    ref: AdapterRef
    adapter: Adapter
    fingerprint: str | None
    read_s: float


class FleetSanitizer:
    """Sanitizes batches of adapters against one alignment set (plain Python; a worker
    actor's task wraps it): reads and checks adapters, has their products computed by a
    *projector* (the set's holder; see :mod:`safelora_ray.pipelines.sanitize.projection`),
    selects modules, writes each adapter and its ledger record.

    Args:
        alignment_uri: The alignment set.
        out_uri: Output root.
        selection: The run's selection (:attr:`SanitizeConfig.selection`).
        device: ``cpu`` or ``cuda``, for a projector made here (see :meth:`process`).
        force: Ignore the ledger.
        max_adapter_bytes: Cap on one adapter's weights file.
        aset: The set's metadata, already opened; None opens it.
        run_id: The run, recorded in the ledger (an adapter found done by this same run was
            sanitized by a retried batch: it is reported ``ok``, not ``skipped``).
        merge: SafeMERGE (SPEC §5): the selected modules are merged with this safety adapter
            (read here, once) instead of projected.
    """

    def __init__(self, alignment_uri: str, out_uri: str, selection: Selection,
                 device: str = "cpu", force: bool = False,
                 max_adapter_bytes: int = 4 * 1024**3, aset: AlignmentSet | None = None,
                 run_id: str | None = None, merge: SafetySpec | None = None):
        self.run_id = run_id
        self.merge = merge
        self.safety = (read_safety(merge.uri, max_adapter_bytes, expect=merge.digest)
                       if merge is not None else None)
        self.aset = aset or AlignmentSet.open(alignment_uri)
        self.out = open_storage(out_uri)
        self.selection = selection
        self.ledger = Ledger(self.out, self.aset.content_id, selection, force,
                             merge.ledger_key() if merge is not None else None)
        self.device = device
        self.max_adapter_bytes = max_adapter_bytes
        self._storages = StorageCache()
        self._own_engine: ProjectionEngine | None = None
        self._io_pool: ThreadPoolExecutor | None = None
        self._buffers = BufferPool(max_free=READ_POOL_BYTES)
        self._read_count = 0
        self._read_bytes = 0
        # process() may run in two threads at once (one batch reads while another computes):
        # the caches are filled under this lock.
        self._lock = threading.Lock()

    def default_projector(self) -> Projector:
        """The products computed with this sanitizer's own engine (the set loaded on its
        device, module by module as batches need them)."""
        with self._lock:
            if self._own_engine is None:
                self._own_engine = ProjectionEngine(MatrixCache(self.aset, self.device))
            return self._own_engine.run

    def _fingerprint(self, ref: AdapterRef) -> tuple[str | None, list[ObjectInfo] | None]:
        """Cheap change detector from object versions (no weight download).

        On an object store, one LIST of the adapter's folder gives both versions (instead of
        two HEADs) and is handed on to :func:`read_adapter` (instead of its own LIST); the
        catalog's own listing, when the ref carries it, saves that LIST too.

        Returns:
            ``(fingerprint or None, the folder's listing or None)``.
        """
        st = self._storages.get(ref.uri)
        names = ("adapter_config.json", "adapter_model.safetensors")
        paths = [f"{ref.prefix}/{n}" if ref.prefix else n for n in names]
        listing: list[ObjectInfo] | None = None
        try:
            if st.remote:
                listing = list(st.list(ref.prefix) if ref.listing is None else ref.listing)
                versions = {o.path: o.version for o in listing}
                if not all(p in versions for p in paths):
                    return None, listing
                parts = [versions[p] for p in paths]
            else:
                parts = [st.version(p) for p in paths]
        except SafeLoraError:
            return None, None
        return hashlib.sha256("|".join(parts).encode()).hexdigest(), listing

    # -- the work --------------------------------------------------------------------------
    def load(self, ref: AdapterRef, row: dict[str, Any],
             buffer: Callable[[int], bytearray] | None = None,
             recorded: frozenset[str] | None = None) -> tuple[Adapter | None, str | None]:
        """Reads and checks one adapter unless the ledger says it is done (then ``row`` is
        marked skipped and the adapter is None). ``buffer`` gives the memory its weights are
        read into (see :func:`~safelora_ray.formats.peft.read_adapter`); ``recorded``: the
        ids with a ledger record, when known (:func:`~.ledger.recorded_ids`).

        Returns:
            ``(adapter, fingerprint)``.

        Raises:
            Exception: the adapter cannot be sanitized (``row`` becomes its error).
        """
        ledger = self.ledger
        # --force: no record counts (nor is owned), so none is read.
        record = None if ledger.force else ledger.read(ref.adapter_id, recorded)
        ledger.check_owner(record, ref)
        fp, listing = self._fingerprint(ref)
        # Same object versions as last time: skip without downloading the weights.
        if record and fp and record.get("fingerprint") == fp and ledger.done(
                record, ledger.key(record.get("key", {}).get("content_digest")), ref):
            mark_skipped(row, record, "unchanged since the last run (ledger)", self.run_id)
            return None, fp
        # A record keyed in an older digest scheme is compared in its own (taken beside
        # ours), so an adapter rewritten with the same bytes is still not redone.
        theirs = (digest_scheme((record or {}).get("key", {}).get("content_digest"))
                  or DIGEST_SCHEME)
        try:
            adapter = read_adapter(self._storages.get(ref.uri), ref.prefix, ref.adapter_id,
                                   max_bytes=self.max_adapter_bytes, buffer=buffer,
                                   listing=listing, schemes=(DIGEST_SCHEME, theirs))
        except ChangedError as e:
            if ref.listing is None:  # our own LIST a moment ago: being rewritten right now
                raise AdapterError(f"adapter {ref.adapter_id!r}: {e}; try again once it is "
                                   "written") from e
            # Rewritten since the catalog was listed (hours, on a large fleet): list it again.
            logger.info("adapter %s changed since the catalog was listed; listing it again",
                        ref.adapter_id)
            return self.load(dataclasses.replace(ref, listing=None), row, buffer, recorded)
        row["source_digest"] = adapter.digest
        row["bytes_in"] = adapter.nbytes
        row["base_model"] = adapter.base_model
        if ledger.done(record, ledger.key(adapter.digests[theirs]), ref):
            assert record is not None
            if fp and record.get("fingerprint") != fp:  # rewritten with the same bytes
                record = {**record, "fingerprint": fp, "key": ledger.key(adapter.digest)}
                ledger.write(ref.adapter_id, record)
            mark_skipped(row, record, "already sanitized with this alignment set and selection",
                         self.run_id)
            return None, fp
        self._check(adapter)
        if self.merge is not None:
            assert self.safety is not None
            check_pair(adapter, self.safety, self.merge.rule.combination)
        return adapter, fp

    def process(self, refs: Sequence[AdapterRef],
                cancelled: Callable[[], bool] | None = None,
                project: Projector | None = None,
                recorded: frozenset[str] | None = None) -> dict[str, Any]:
        """Sanitize one batch; never raises for a bad adapter (it becomes an error row).

        Args:
            refs: The adapters.
            cancelled: Polled before each adapter is read and before each is written: once
                it says so, the rest of the batch is left alone (status ``cancelled``), so an
                interrupted run stops after the adapter in progress, never inside one.
            project: Computes the batch's products (default: here, the set loaded on this
                sanitizer's device).
            recorded: Which of ``refs`` have a ledger record (None: unknown, each is read).

        Returns:
            ``{"adapters": [row, ...], "layers": [row, ...]}``.
        """
        loans = Loans(self._buffers, min_bytes=POOLED_MIN_BYTES)
        try:
            return self._batch(refs, cancelled or (lambda: False), project, loans, recorded)
        finally:
            # After _batch returned: its names holding the adapters (and so views into
            # these buffers) are gone with its frame.
            loans.give_back()

    def _batch(self, refs: Sequence[AdapterRef], stop: Callable[[], bool],
               project: Projector | None, loans: Loans,
               recorded: frozenset[str] | None) -> dict[str, Any]:
        t_batch = time.perf_counter()

        def read_one(ref: AdapterRef) -> tuple[dict[str, Any], Loaded | None]:
            if stop():
                return {**base_row(ref), "status": "cancelled"}, None
            t0 = time.perf_counter()
            row = base_row(ref)
            try:
                adapter, fp = self.load(ref, row, loans, recorded)
                if adapter is None:
                    return row, None
                return row, Loaded(ref, adapter, fp, time.perf_counter() - t0)
            except Exception as e:  # one bad adapter never stops the batch
                mark_failed(row, e)
                return row, None

        rows: dict[str, dict[str, Any]] = {}
        loaded: dict[str, Loaded] = {}

        def keep(ref: AdapterRef, row: dict[str, Any], got: Loaded | None) -> None:
            rows[ref.adapter_id] = row
            if got is not None:
                loaded[ref.adapter_id] = got
                self._seen(got.adapter.nbytes)

        # The run's first adapter is read here: its size says whether threads pay.
        rest = list(refs)
        while rest and self._large_adapters() is None:
            keep(rest[0], *read_one(rest[0]))
            rest.pop(0)
        # Adapters read from an object store: threads overlap the requests' round trips.
        remote_in = IO_THREADS > 1 and any(self._storages.get(r.uri).remote for r in rest[:1])
        each = self._pool().map if remote_in or self._large_adapters() else map
        for ref, (row, got) in zip(rest, each(read_one, rest), strict=True):
            keep(ref, row, got)
        layers: list[dict[str, Any]] = []
        if loaded:
            t0 = time.perf_counter()
            projected, scores = self._project_all([x.adapter for x in loaded.values()],
                                                  project or self.default_projector())
            share = (time.perf_counter() - t0) / len(loaded)  # batch compute, per adapter

            def write_one(item: tuple[str, Loaded]) -> list[dict[str, Any]]:
                adapter_id, (ref, adapter, fp, read_s) = item  # a Loaded
                row = rows[adapter_id]
                if stop():
                    row["status"] = "cancelled"
                    return []
                try:
                    done = self._finish(ref, adapter, fp, projected[adapter_id],
                                        scores[adapter_id], row)
                    row["read_s"] = round(read_s, 4)
                    row["compute_s"] = round(row["compute_s"] + share, 4)
                    return done
                except Exception as e:
                    mark_failed(row, e)
                    return []

            for done in each(write_one, loaded.items()):
                layers.extend(done)
        for row in rows.values():
            row["batch_s"] = round(time.perf_counter() - t_batch, 4)
        return {"adapters": list(rows.values()), "layers": layers}

    def _seen(self, nbytes: int) -> None:
        with self._lock:
            self._read_count += 1
            self._read_bytes += nbytes

    def _large_adapters(self) -> bool | None:
        """Whether the I/O threads pay: always when the output is on an object store (each
        request waits a round trip, with the GIL released), else once this run's adapters
        average :data:`IO_THREADS_MIN_BYTES`; None before one was read."""
        with self._lock:
            n = self._read_count
            if n == 0:
                return None
            if IO_THREADS > 1 and self.out.remote:
                return True
            return IO_THREADS > 1 and self._read_bytes / n >= IO_THREADS_MIN_BYTES

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._io_pool is None:
                self._io_pool = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="safelora-io")
            return self._io_pool

    def close(self) -> None:
        """Stop the I/O threads (the worker dropped this sanitizer)."""
        with self._lock:
            pool, self._io_pool = self._io_pool, None
        if pool is not None:
            pool.shutdown(wait=False)

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
        (and dtypes and rank) for the whole batch (SPEC §2), computed by ``project``.

        Returns:
            ``(cb, scores)``, each ``{adapter_id: {module: ...}}``; C B in each B's dtype (the
            scores use the float32 product).
        """
        members: dict[GroupKey, list[tuple[str, Any]]] = {}
        for ad in adapters:
            for m, lm in ad.modules.items():
                key = (m, dtype_name(lm.b.dtype), dtype_name(lm.a.dtype), int(lm.rank))
                members.setdefault(key, []).append((ad.adapter_id, lm))
        groups = {key: (torch.stack([lm.b for _, lm in items]),
                        torch.stack([lm.a for _, lm in items]))
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
        chosen = self.selection.pick({m: s.cos_rounded for m, s in scores.items()})
        new_b = {m: cbs[m] for m in chosen}
        new_a: dict[str, torch.Tensor] | None = None
        config_bytes: bytes | None = None
        if self.merge is not None:  # SafeMERGE: every module rewritten (scaling 1)
            assert self.safety is not None
            new_a, new_b, config_bytes = merged_factors(adapter, self.safety, chosen,
                                                        self.merge.rule)
        kept = untouched_note(adapter)
        notes = [kept] if kept else []
        k = self.selection.num_proj_layers
        if k is not None and k >= len(scores):
            notes.append(f"--num-proj-layers {k} ≥ its {len(scores)} module(s): every module "
                         "was projected (the number is per adapter)")
        compute_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        # Written next to the outputs when they are local (then moved into place, not
        # copied); in memory for an object store (no local file written, read back, removed).
        tmp = (None if self.out.remote
               else tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.out.scratch_dir()))
        try:
            digest = OutputDigest()  # hashed as written: no read-back
            files = write_adapter(adapter, new_b, tmp, self._storages.get(ref.uri), ref.prefix,
                                  digest, new_a=new_a, config_bytes=config_bytes)
            out_digest = digest.value()
            sizes = {rel: len(p) if isinstance(p, (bytes, bytearray)) else os.path.getsize(p)
                     for rel, p in files}
            bytes_out = sum(sizes.values())
            # Not read back by this run: kept out of the page cache (LocalStorage.put_tree).
            written = self.out.put_tree(ref.adapter_id, files, move=True, cache=False)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        # Each output's size and version, as a later run's listing will show them: told by
        # the writes themselves on an object store (the PUTs' ETags), else listed.
        outputs = ({rel: {"bytes": n, "version": written[rel]} for rel, n in sizes.items()}
                   if written is not None else self.ledger.outputs(ref.adapter_id, list(sizes)))
        dists = [0.0 if m in chosen else s.dist for m, s in scores.items()]
        adapter_pdst = pdst(dists)
        # The record goes last: an adapter is "done" only once its output is in place.
        self.ledger.write(ref.adapter_id, {
            "adapter_id": ref.adapter_id,
            "source": source_uri(ref),
            "key": self.ledger.key(adapter.digest),
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
        })
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


# ---------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SanitizeJob:
    """What a worker needs to sanitize batches of one run (hashable: workers cache on it)."""

    alignment_uri: str
    alignment_id: str  # the set's content id: a set rebuilt at the same URI is another set
    out_uri: str
    selection: Selection
    force: bool
    max_adapter_bytes: int
    run_id: str
    task_timeout_s: float = 1800.0
    merge: SafetySpec | None = None  # SafeMERGE's safety adapter (SPEC §5)


#: The worker slot of the latest job's sanitizer, so the next batches of a run reuse it.
SANITIZER_SLOT = "sanitizer"


def sanitize_batch(ctx: WorkerContext, job: SanitizeJob, refs: Sequence[AdapterRef],
                   holder: Any = None, shared: bool = False,
                   recorded: frozenset[str] | None = None) -> dict[str, Any]:
    """Task: sanitize one batch of adapters (see :meth:`FleetSanitizer.process`).

    Args:
        ctx: This worker.
        job: The run.
        refs: The batch.
        holder: The actor of this node keeping the set (None: this worker is the holder, or
            this is the driver's process).
        shared: This worker computes its own products with the set its holder shares (a
            CPU node's object store, a GPU's memory through CUDA IPC: see
            :mod:`~safelora_ray.pipelines.sanitize.shared_set`); else ``holder`` computes
            them.
        recorded: Which of ``refs`` had a ledger record when the run started (None:
            unknown, each adapter's record is read).
    """
    key = SetKey(job.alignment_uri, job.alignment_id)

    def sanitizer() -> FleetSanitizer:
        aset = AlignmentSet.open(job.alignment_uri, expect=job.alignment_id)
        return FleetSanitizer(job.alignment_uri, job.out_uri, job.selection, ctx.device,
                              job.force, job.max_adapter_bytes, aset=aset, run_id=job.run_id,
                              merge=job.merge)

    san = ctx.resident(SANITIZER_SLOT, job, sanitizer)
    if shared:
        project: Projector | None = shared_projector(ctx, holder, key, san.aset,
                                                     job.task_timeout_s)
    elif holder is not None:
        project = remote_projector(holder, key, job.task_timeout_s)
    else:  # the driver's process: its set's files mapped, else the sanitizer's own engine
        project = local_projector(ctx, key, san.aset, san.default_projector,
                                  cancelled=lambda: ctx.cancelled(job.run_id))
    return san.process(refs, cancelled=lambda: ctx.cancelled(job.run_id), project=project,
                       recorded=recorded)


__all__ = ["FleetSanitizer", "SanitizeJob", "check_orientation", "sanitize_batch",
           "untouched_note"]
