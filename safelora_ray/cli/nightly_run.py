"""The nightly workflow: every configured catalog, grouped by model pair, sanitized incrementally.

Steps of one run:
1. take the lease ``<output_root>/_nightly/lock.json`` (another live run → exit 4);
2. list every catalog and read each adapter's ``adapter_config.json`` to find its
   ``base_model_name_or_path``; map it to a configured model pair (adapters matching no pair are
   reported, never guessed);
3. for each pair with adapters: open ``<alignment_root>/<pair>``, building it when missing;
4. for each (catalog, pair): sanitize the adapters listed in a per-run manifest into
   ``<output_root>/<catalog>/`` (the ledger there skips unchanged adapters);
5. for each catalog of full fine-tunes (``models:``): project every model found in it with its
   pair's alignment set (``project-model``) into ``<output_root>/<catalog>/<model id>/``; an
   output complete from the same inputs is reused, a model that fails is reported and the
   others go on;
6. write the run record ``<output_root>/_nightly/runs/<run_id>.json`` and ``latest.json``, its
   page ``runs/<run_id>.html`` (unlisted catalogs and unmatched adapters included) and
   ``_nightly/index.html``, give the lease back, and exit with a status an operator can alert
   on.
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime as _dt
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from safelora_ray.cli.nightly_config import ModelCatalogSpec, NightlyConfig, PairSpec
from safelora_ray.core.errors import (
    AlignmentSetError,
    ConfigError,
    LeaseHeldError,
    SafeLoraError,
)
from safelora_ray.core.interrupts import describe
from safelora_ray.core.redact import redact
from safelora_ray.execution import worker_session
from safelora_ray.formats.alignment_set import AlignmentSet
from safelora_ray.pipelines.build.driver import BuildConfig, build
from safelora_ray.pipelines.project_model.driver import FinetuneConfig, project_model
from safelora_ray.pipelines.sanitize.driver import SanitizeConfig, sanitize
from safelora_ray.planning.catalog import (
    CONFIG_FILE,
    AdapterRef,
    ModelRef,
    iter_catalog,
    iter_models,
)
from safelora_ray.reports import nightly_page, text_summary
from safelora_ray.storage import open_storage
from safelora_ray.storage.guards import probe_outputs
from safelora_ray.storage.lease import Lease
from safelora_ray.storage.uri import join_uri

logger = logging.getLogger(__name__)

NIGHTLY_PREFIX = "_nightly"
MAX_LISTED = 1000  # unmatched / failed adapters named in the run record


def _base_model_of(ref: AdapterRef) -> tuple[AdapterRef, str | None, str | None]:
    """Read one adapter's config; returns (ref, base model id, error)."""
    try:
        st = open_storage(ref.uri)
        path = f"{ref.prefix}/{CONFIG_FILE}" if ref.prefix else CONFIG_FILE
        cfg = json.loads(st.read(path, max_bytes=1024**2))
        base = cfg.get("base_model_name_or_path") if isinstance(cfg, dict) else None
        return ref, (str(base).rstrip("/") if base else None), None
    except (SafeLoraError, ValueError) as e:
        return ref, None, f"adapter {ref.adapter_id!r}: cannot read {CONFIG_FILE}: {e}"


def run_nightly(cfg: NightlyConfig, run_id: str | None = None, dry_run: bool = False,
                progress: bool = True,
                say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """One nightly run; returns the run record (also written to storage unless ``dry_run``).

    Raises:
        LeaseHeldError: another live run holds the lease.
    """
    t0 = time.perf_counter()
    run_id = run_id or (_dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
                        + "-" + uuid.uuid4().hex[:6])
    out = open_storage(cfg.output_root)
    if not dry_run and out.exists(f"{NIGHTLY_PREFIX}/runs/{run_id}.json"):
        raise ConfigError(f"--run-id {run_id}: {out.describe(f'{NIGHTLY_PREFIX}/runs')} "
                          "already holds that run's record; choose another id, or leave "
                          "--run-id out")
    lease = Lease(out, f"{NIGHTLY_PREFIX}/lock.json", owner=run_id, ttl_s=cfg.lock_ttl_s,
                  command="nightly")
    record: dict[str, Any] = {
        "run_id": run_id, "status": "running",
        "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "counts": {"adapters": 0, "ok": 0, "skipped": 0, "error": 0, "unmatched": 0},
        "bytes_in": 0, "bytes_out": 0, "alignment_ids": {}, "groups": [], "unmatched": [],
        "errors": [], "catalog_errors": [],
        "models": {"total": 0, "ok": 0, "reused": 0, "error": 0, "items": []},
    }
    if not dry_run:
        probe_outputs(cfg.outputs)  # a read-only root is found now, not after the catalogs
        # Taken right before the try whose finally gives it back: no Ctrl-C lands between.
        lease.acquire()
    try:
        by_model = {mid: p for p in cfg.pairs for mid in p.base_model_ids}
        groups: dict[tuple[str, str], list[dict[str, str]]] = {}
        with cf.ThreadPoolExecutor(max_workers=16) as pool:
            for cat in cfg.catalogs:
                refs = []
                items = _listed(record, "catalog", cat.name, cat.uri, cat.allow_empty,
                                iter_catalog, f"no adapters found (no {CONFIG_FILE} under it)")
                if items is None:
                    continue
                for item in items:
                    if isinstance(item, tuple):
                        _note(record, "errors", {"catalog": cat.name, "adapter_id": item[0],
                                                 "error": item[1]})
                        record["counts"]["error"] += 1
                        continue
                    refs.append(item)
                for ref, base_model, err in pool.map(_base_model_of, refs):
                    record["counts"]["adapters"] += 1
                    if err is not None:
                        record["counts"]["error"] += 1
                        _note(record, "errors", {"catalog": cat.name,
                                                 "adapter_id": ref.adapter_id, "error": err})
                        continue
                    pair = by_model.get(base_model or "")
                    if pair is None:
                        record["counts"]["unmatched"] += 1
                        _note(record, "unmatched", {"catalog": cat.name,
                                                    "adapter_id": ref.adapter_id,
                                                    "base_model": base_model})
                        continue
                    uri = join_uri(ref.uri, ref.prefix)
                    groups.setdefault((cat.name, pair.name), []).append(
                        {"id": ref.adapter_id, "uri": uri})
        models = _list_models(cfg, record)
        logger.info("nightly %s: %d adapter(s) in %d group(s), %d unmatched; %d full "
                    "fine-tune(s)", run_id, record["counts"]["adapters"], len(groups),
                    record["counts"]["unmatched"], len(models))
        if dry_run:
            record["groups"] = [{"catalog": c, "pair": p, "adapters": len(v)}
                                for (c, p), v in sorted(groups.items())]
            record["models"]["items"] = [{"catalog": m.name, "pair": m.pair,
                                          "model_id": ref.model_id, "uri": ref.uri}
                                         for m, ref in models]
            # A catalog that cannot be listed fails a dry run too (what it is there to find).
            record["status"] = "failed" if record["catalog_errors"] else "dry-run"
            if record["catalog_errors"]:
                record["failure"] = "; ".join(e["error"] for e in record["catalog_errors"])
            return record

        # One set of workers for every build and sanitize of the run: each worker process
        # imports torch once and keeps the alignment set it last used resident.
        with worker_session():
            pairs = {p.name: p for p in cfg.pairs}
            for pair_name in sorted({p for _, p in groups} | {m.pair for m, _ in models}):
                record["alignment_ids"][pair_name] = _ensure_alignment(cfg, pairs[pair_name],
                                                                       progress)
            cats = {c.name: c for c in cfg.catalogs}
            for (cat_name, pair_name), entries in sorted(groups.items()):
                manifest = f"{NIGHTLY_PREFIX}/runs/{run_id}/manifests/{cat_name}--{pair_name}.jsonl"
                out.put_bytes(manifest, "".join(json.dumps(e) + "\n" for e in entries).encode())
                try:
                    res = sanitize(SanitizeConfig(
                        alignment=join_uri(cfg.alignment_root, pair_name),
                        adapters=out.describe(manifest),
                        out=join_uri(cfg.output_root, cat_name),
                        run_id=f"{run_id}-{pair_name}", progress=progress,
                        **cfg._selection_kwargs(), **cfg.sanitize,
                        **pairs[pair_name].method_kwargs(),
                    ))
                except LeaseHeldError as e:  # a manual run writes there: the others go on
                    msg = redact(f"catalog {cat_name!r}: another run is in progress: {e}")
                    logger.error("%s", msg)
                    record["catalog_errors"].append({"catalog": cat_name, "error": msg})
                    continue
                (say or print)(text_summary(res))
                for k in ("ok", "skipped", "error"):
                    record["counts"][k] += getattr(res, k)
                record["bytes_in"] += res.bytes_in
                record["bytes_out"] += res.bytes_out
                for adapter_id, err in res.errors:
                    _note(record, "errors", {"catalog": cat_name, "adapter_id": adapter_id,
                                             "error": err})
                record["groups"].append({
                    "catalog": cat_name, "catalog_uri": cats[cat_name].uri, "pair": pair_name,
                    "adapters": res.total, "ok": res.ok, "skipped": res.skipped,
                    "error": res.error, "report": res.report_uri,
                    "report_html": f"{res.report_uri}/report.html",
                })
            for spec, ref in models:
                _project_one(cfg, pairs[spec.pair], spec, ref, record, progress)
        c = record["counts"]
        if record["catalog_errors"]:
            record["status"] = "failed"
            record["failure"] = "; ".join(e["error"] for e in record["catalog_errors"])
        elif c["error"] == 0 and c["unmatched"] == 0 and record["models"]["error"] == 0:
            record["status"] = "success"
        else:
            record["status"] = "partial"
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM, SIGHUP: the pipelines wound down
        record["status"] = "interrupted"
        record["failure"] = describe(e)
        raise
    except Exception as e:
        record["status"] = "failed"
        record["failure"] = str(e) if isinstance(e, SafeLoraError) else f"{type(e).__name__}: {e}"
        raise
    finally:
        record["finished_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        record["duration_s"] = round(time.perf_counter() - t0, 3)
        if not dry_run:
            body = json.dumps(record, indent=2, ensure_ascii=False).encode()
            try:
                out.put_bytes(f"{NIGHTLY_PREFIX}/runs/{run_id}.json", body)
                out.put_bytes(f"{NIGHTLY_PREFIX}/latest.json", body)
                # For people: the run's page (what never reached a catalog report too).
                nightly_page.publish(out, NIGHTLY_PREFIX, record)
            finally:
                lease.release()
    return record


def _listed(record: dict[str, Any], what: str, name: str, uri: str, allow_empty: bool,
            lister: Callable[[str], Iterable[Any]], nothing: str) -> list[Any] | None:
    """A catalog's listing, or None once it is recorded as an error: missing, unreadable, or
    empty unless ``allow_empty`` (a mistyped URI must not make a nightly that silently does
    nothing). The other catalogs still run; the run fails (exit 1) for this one."""
    try:
        items = list(lister(uri))
        if not items and not allow_empty:
            raise ConfigError(f"{nothing}; set allow_empty: true for it if that is expected")
    except SafeLoraError as e:
        msg = redact(f"{what} {name!r} ({uri}): {e}")
        logger.error("%s", msg)
        record["catalog_errors"].append({"catalog": name, "error": msg})
        return None
    return items


def _list_models(cfg: NightlyConfig, record: dict[str, Any]
                 ) -> list[tuple[ModelCatalogSpec, ModelRef]]:
    """Every full fine-tune of the ``models:`` catalogs (bad ids are reported as errors)."""
    found = []
    for spec in cfg.models:
        items = _listed(record, "model catalog", spec.name, spec.uri, spec.allow_empty,
                        iter_models, "no models found (no model.safetensors or "
                        "model.safetensors.index.json under it)")
        if items is None:
            continue
        for item in items:
            record["models"]["total"] += 1
            if isinstance(item, tuple):
                record["models"]["error"] += 1
                _note(record, "errors", {"catalog": spec.name, "model_id": item[0],
                                         "error": item[1]})
                continue
            found.append((spec, item))
    return found


def _project_one(cfg: NightlyConfig, pair: PairSpec, spec: ModelCatalogSpec, ref: ModelRef,
                 record: dict[str, Any], progress: bool) -> None:
    """Project one fine-tune into ``<output_root>/<catalog>/<model id>/``; a failure is
    recorded, never raised (the other models go on)."""
    out = join_uri(join_uri(cfg.output_root, spec.name), ref.model_id)
    item: dict[str, Any] = {"catalog": spec.name, "pair": pair.name, "model_id": ref.model_id,
                            "uri": ref.uri, "out": out}
    try:
        res = project_model(FinetuneConfig(
            alignment=join_uri(cfg.alignment_root, pair.name), aligned=pair.aligned,
            finetuned=ref.uri, out=out, progress=progress, **cfg._selection_kwargs(),
            **cfg.project))
        status = "reused" if res.reused else "ok"
        item.update(status=status, modules=res.modules, selected=res.selected, tau=res.tau,
                    reports=res.reports_uri)
        record["models"][status] += 1
        if not res.reused:
            record["bytes_in"] += res.bytes_read
            record["bytes_out"] += res.bytes_written
    except SafeLoraError as e:
        msg = redact(str(e))
        logger.warning("model %s/%s: %s", spec.name, ref.model_id, msg)
        item.update(status="error", error=msg)
        record["models"]["error"] += 1
        _note(record, "errors", {"catalog": spec.name, "model_id": ref.model_id, "error": msg})
    if len(record["models"]["items"]) < MAX_LISTED:
        record["models"]["items"].append(item)


def _note(record: dict[str, Any], key: str, item: dict[str, Any]) -> None:
    if len(record[key]) < MAX_LISTED:
        record[key].append(item)


def _ensure_alignment(cfg: NightlyConfig, pair: PairSpec, progress: bool) -> str:
    """The content id of the pair's alignment set, building it when there is none."""
    uri = join_uri(cfg.alignment_root, pair.name)
    try:
        return AlignmentSet.open(uri).content_id
    except AlignmentSetError as e:
        logger.info("alignment set for %s not usable (%s): building it", pair.name, e)
    res = build(BuildConfig(base=pair.base, aligned=pair.aligned, out=uri, targets=pair.targets,
                            progress=progress, **cfg.build))
    return res.content_id


def summary_text(record: dict[str, Any]) -> str:
    """The human summary of a run record."""
    c = record["counts"]
    lines = [f"nightly {record['run_id']}: {record['status']} — {c['adapters']} adapter(s): "
             f"{c['ok']} ok, {c['skipped']} skipped, {c['error']} failed, "
             f"{c['unmatched']} matched no model pair; {record['duration_s']:.1f} s"]
    mc = record.get("models", {})
    if mc.get("total"):
        lines.append(f"  full fine-tunes: {mc['total']}: {mc['ok']} projected, {mc['reused']} "
                     f"reused, {mc['error']} failed")
    for e in record.get("catalog_errors", []):
        lines.append(f"  catalog failed: {e['error']}")
    for u in record["unmatched"][:10]:
        lines.append(f"  unmatched: {u['catalog']}/{u['adapter_id']} (base model "
                     f"{u['base_model']!r})")
    if len(record["unmatched"]) > 10:
        lines.append(f"  ... and {c['unmatched'] - 10} more unmatched (see the run record)")
    return "\n".join(lines)


__all__ = ["MAX_LISTED", "NIGHTLY_PREFIX", "run_nightly", "summary_text"]
