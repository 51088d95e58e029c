"""Fleet sanitization: an alignment set + a catalog of LoRA adapters → sanitized adapters.

The driver holds ``--out``'s lease, streams the catalog into batches and has the one
dispatcher (:mod:`safelora_ray.execution.dispatch`) keep a bounded number of batches in flight
on a pool of worker actors (this process for a small catalog), each holding the alignment set
once (on its GPU when it has one). A worker sanitizes its batch
(:mod:`safelora_ray.pipelines.sanitize.worker`) and returns one row per adapter and per
module; the driver streams those rows into Parquet reports.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from safelora_ray.core.errors import ConfigError
from safelora_ray.core.redact import redact
from safelora_ray.core.validate import env_number
from safelora_ray.execution import (
    WORKER_LOST,
    inline_max_adapters,
    open_executor,
    resolve_workers,
)
from safelora_ray.execution.dispatch import Dispatcher, Policy, Task
from safelora_ray.execution.placement import NodeInfo, WorkerSpec, plan_pipeline
from safelora_ray.execution.progress import Progress
from safelora_ray.formats.alignment_set import AlignmentSet
from safelora_ray.pipelines.sanitize.config import (
    REPORTS_PREFIX,
    SanitizeConfig,
    SanitizeResult,
    check_method,
)
from safelora_ray.pipelines.sanitize.ledger import LEDGER_PREFIX, all_recorded, recorded_ids
from safelora_ray.pipelines.sanitize.projection import HolderLost, SetKey
from safelora_ray.pipelines.sanitize.rows import base_row
from safelora_ray.pipelines.sanitize.safemerge import SafetySpec, check_safety_set, read_safety
from safelora_ray.pipelines.sanitize.shared_set import (
    check_gpu_products,
    check_store_room,
    map_set,
    warm_set,
)
from safelora_ray.pipelines.sanitize.worker import SanitizeJob, sanitize_batch
from safelora_ray.planning.catalog import CONFIG_FILE, AdapterRef, is_manifest, iter_catalog
from safelora_ray.reports import ReportWriter
from safelora_ray.storage import open_storage
from safelora_ray.storage.guards import probe_outputs
from safelora_ray.storage.lease import hold_output
from safelora_ray.storage.local import sweep_stale_writes
from safelora_ray.storage.uri import join_uri, overlap

logger = logging.getLogger(__name__)

#: Seconds between two looks for nodes that joined the cluster during a run.
GROW_EVERY_S = env_number("SAFELORA_GROW_EVERY_S", 30)


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
             on_invalid: Callable[[str, str], None]) -> Iterator[list[AdapterRef]]:
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


def _mark_lost(ex: Any, i: int, e: BaseException) -> bool:
    """Which worker died with a batch: its holder (the I/O worker may have waited for it
    already), or the I/O worker itself."""
    if isinstance(e, HolderLost):
        return ex.lost(ex.holder_index(i), gone=str(e) if e.waited else None)
    return ex.lost(i)


def _safety_spec(config: SanitizeConfig, aset: AlignmentSet) -> SafetySpec | None:
    """SafeMERGE's safety adapter, read and checked against the set before any worker
    starts (the workers read it again, once each, and refuse other bytes)."""
    if config.method != "safemerge":
        return None
    assert config.safety_adapter is not None
    uri = open_storage(config.safety_adapter).uri
    safety = read_safety(uri, config.max_adapter_bytes)
    check_safety_set(safety, uri, aset)
    logger.info("SafeMERGE: safety adapter %s (%s, %d modules), %s", uri, safety.digest,
                len(safety.modules), config.merge_rule.record())
    return SafetySpec(uri, safety.digest, config.merge_rule)


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
    merge = _safety_spec(config, aset)  # SafeMERGE: the safety adapter read once, here too
    gpu_products = check_gpu_products()  # a wrong setting is refused before Ray starts
    out = open_storage(config.out)
    assert config.run_id is not None
    selection = config.selection
    report_prefix = f"{REPORTS_PREFIX}/{config.run_id}"
    if next(iter(out.list(report_prefix)), None) is not None:  # never write over a report
        raise ConfigError(f"--run-id {config.run_id}: {out.describe(report_prefix)} already "
                          "holds that run's report; choose another id, or leave --run-id out")
    sweep_stale_writes(out, descend=(LEDGER_PREFIX, REPORTS_PREFIX))
    # A look at the catalog's head says whether it is small enough for this process.
    items = iter_catalog(config.adapters)
    if is_manifest(config.adapters):  # a directory catalog was checked as a whole already
        items = _apart_from(items, config.out)
    bar = inline_max_adapters()
    head = list(itertools.islice(items, bar + 1))
    exhausted_head = len(head) <= bar
    if not head and not config.allow_empty:
        raise ConfigError(
            f"--adapters {config.adapters}: no adapters found (no {CONFIG_FILE} under it); "
            "pass --allow-empty if an empty catalog is expected")
    plan = resolve_workers(config.workers, config.use_gpu, config.ray_address,
                           small=len(head) <= bar, shape="pipeline",
                           workers_per_gpu=config.workers_per_gpu)
    ex = open_executor(plan, config.use_gpu)
    key = SetKey(aset.uri, aset.content_id)
    # The I/O workers compute their own products with the one copy of the set their node
    # (CPU) or GPU keeps, unless told to send them to the GPU's holder (see shared_set.py).
    shared = not ex.in_process and (not plan.uses_gpu or gpu_products == "workers")
    try:
        # Every node with a worker must see the local paths the workers read and write.
        ex.check_shared([("--out", config.out, True), ("--alignment", config.alignment, False),
                         ("--adapters", config.adapters, False)])
        if shared and not plan.uses_gpu:  # the plan's nodes (their stores' sizes too)
            used = {s.node_id for s in plan.specs}
            check_store_room(aset, [n for n in plan.nodes if n.node_id in used])
        if not ex.in_process:  # holders load the set while the I/O workers read
            ex.notify(warm_set, key, shared, group="serve", role="holder")
    except BaseException:
        ex.close(False)
        raise
    result = SanitizeResult(config.run_id, out.uri, out.describe(report_prefix),
                            alignment_id=aset.content_id, method=config.method)
    # Recorded as an absolute URI: a report read later, elsewhere, says where its inputs were.
    catalog = open_storage(config.adapters)
    catalog_uri = catalog.uri
    report = ReportWriter(config.run_id, aset, selection if merge is None else
                          {**selection.record(), "merge": merge.record()}, catalog_uri,
                          tenant_depth=config.tenant_depth)
    job = SanitizeJob(aset.uri, aset.content_id, out.uri, selection, config.force,
                      config.max_adapter_bytes, config.run_id, config.task_timeout_s, merge)

    # Which adapters have a ledger record, from one listing (an object store's): a new
    # adapter's record is then not asked for, one 404 per adapter saved.
    known = None if config.force else recorded_ids(out)
    if ex.in_process and (config.force or not all_recorded(
            out, (r.adapter_id for r in head if isinstance(r, AdapterRef)), known)):
        # This process maps the set (copied to the node first) while its first batches read;
        # not on a rerun whose first adapters all have records (it may need no product).
        ex.submit(0, map_set, key, config.run_id, group="batch")
    counter = _adapter_counter() if not ex.in_process else None
    all_by_k = 0  # adapters with at most --num-proj-layers modules: all projected
    k = selection.num_proj_layers

    def record(payload: dict[str, Any]) -> None:
        nonlocal all_by_k
        for row in payload["adapters"]:
            result.count(row)
            status = row["status"]
            if counter is not None:
                counter.inc(1, tags={"status": status})
            if k is not None and status == "ok" and 0 < row["modules"] <= k:
                all_by_k += 1
        report.add(payload["adapters"], payload["layers"])
        bar.update(len(payload["adapters"]))

    def invalid(adapter_id: str, message: str) -> None:
        row = base_row(AdapterRef(adapter_id, catalog_uri, ""))
        row["error"] = redact(message)
        record({"adapters": [row], "layers": []})

    def batch_task(batch: list[AdapterRef], first: bool = True) -> Task:
        # The holder is the chosen worker's; a batch whose worker (or the holder of its
        # node's set) died is replaced by its adapters, each run alone on a worker, so a
        # poison adapter fails alone and its batch-mates do not; those already written are
        # found in the ledger (done by this run: ok). A part, or a batch run again, reads
        # every record: the listing taken at the start knows nothing of this run's.
        recorded = (frozenset(r.adapter_id for r in batch if r.adapter_id in known)
                    if first and known is not None else None)
        runs = itertools.count()

        def args(i: int) -> tuple[Any, ...]:
            again = next(runs) > 0
            return (job, batch, ex.holder_of(i), shared, None if again else recorded)

        return Task(sanitize_batch, args, item=batch, group="io",
                    parts=lambda: [batch_task([ref], False) for ref in batch])

    def died_alone(alone: Task, e: BaseException) -> None:
        ref = alone.item[0]
        row = base_row(ref)
        row["error"] = (f"adapter {ref.adapter_id!r}: the worker died while sanitizing it "
                        f"({type(e).__name__}); the rest of the fleet went on")
        record({"adapters": [row], "layers": []})

    def plan_node(node: NodeInfo) -> list[WorkerSpec]:
        if plan.uses_gpu and node.gpus < 1:
            return []
        if shared and not plan.uses_gpu:
            try:
                check_store_room(aset, [node])
            except ConfigError as e:
                logger.warning("a node joined but is left unused: %s", e)
                return []
        return plan_pipeline([node], None, plan.uses_gpu, config.workers_per_gpu)

    # Nodes an autoscaler adds while the run goes get workers too (unless --workers fixed
    # the count): looked for every GROW_EVERY_S.
    elastic = not ex.in_process and config.workers is None
    policy = Policy("adapter batch", config.task_timeout_s, config.run_id, role="io",
                    in_flight=config.in_flight(catalog.remote or out.remote), isolate=True,
                    grow_every_s=GROW_EVERY_S if elastic else None, plan_node=plan_node,
                    lost_errors=(*WORKER_LOST, HolderLost), mark_lost=_mark_lost)

    logger.info("sanitizing %s with alignment set %s (%s) on %d %s worker(s) → %s",
                config.adapters, aset.content_id, selection.record(), ex.size, ex.kind,
                out.uri)
    bar = Progress("sanitize", "adapter", enabled=config.progress)
    if exhausted_head:
        bar.set_total(len(head))
    elif config.progress:
        _count_in_background(config.adapters, bar)
    batches = _batches(itertools.chain(head, items), config.batch_size, invalid)
    ok = False
    try:
        # On Ctrl-C the dispatcher lets the batches in flight reach a safe point first;
        # adapters already written are in the ledger: the next run resumes after them.
        Dispatcher(ex, policy).run(map(batch_task, batches), lambda _, p: record(p),
                                  died_alone)
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
            sweep_stale_writes(out, descend=(LEDGER_PREFIX, REPORTS_PREFIX))
        except Exception as e:  # never mask the run's own outcome
            logger.warning("could not remove stale temp files under %s: %s", out.uri, e)
    if all_by_k:
        logger.warning("%d adapter(s) have at most --num-proj-layers %d modules: every module of "
                       "theirs was projected (the number counts per adapter)", all_by_k, k)
    result.duration_s = time.perf_counter() - t_start
    report.finish(out, report_prefix, result)
    logger.info("run %s: %d ok, %d skipped, %d failed in %.1f s; reports at %s", result.run_id,
                result.ok, result.skipped, result.error, result.duration_s, result.report_uri)
    return result


# SanitizeConfig and SanitizeResult are the public API's (safelora_ray.SanitizeConfig).
__all__ = ["GROW_EVERY_S", "SanitizeConfig", "SanitizeResult", "sanitize"]
