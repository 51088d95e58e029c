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
import difflib
import json
import logging
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from safelora_ray.core.errors import (
    AlignmentSetError,
    ConfigError,
    LeaseHeldError,
    NotFoundError,
    SafeLoraError,
)
from safelora_ray.core.interrupts import describe
from safelora_ray.core.redact import redact
from safelora_ray.core.selection import Selection
from safelora_ray.core.validate import as_yaml_keys
from safelora_ray.execution import worker_session
from safelora_ray.formats.alignment_set import AlignmentSet
from safelora_ray.pipelines.build.config import BuildConfig
from safelora_ray.pipelines.build.driver import build
from safelora_ray.pipelines.project_model.driver import FinetuneConfig, project_model
from safelora_ray.pipelines.sanitize.driver import SanitizeConfig, sanitize
from safelora_ray.planning.catalog import (
    CONFIG_FILE,
    AdapterRef,
    ModelRef,
    iter_catalog,
    iter_models,
    validate_id,
)
from safelora_ray.planning.plan import parse_targets
from safelora_ray.reports import nightly_page, text_summary
from safelora_ray.storage import open_storage
from safelora_ray.storage.guards import Output, check_outputs, probe_outputs
from safelora_ray.storage.lease import DEFAULT_TTL_S, Lease
from safelora_ray.storage.uri import check_uri, join_uri, refuse_overlap

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PARTIAL, EXIT_LOCKED = 0, 1, 2, 3, 4
NIGHTLY_PREFIX = "_nightly"
MAX_LISTED = 1000  # unmatched / failed adapters named in the run record


@dataclass(frozen=True)
class PairSpec:
    """A base/aligned model pair and the adapters' base model ids that map to it."""

    name: str
    base: str
    aligned: str
    targets: tuple[str, ...]
    base_model_ids: tuple[str, ...]


@dataclass(frozen=True)
class CatalogSpec:
    """A catalog of adapters (directory tree or manifest).

    Attributes:
        name: Its name; its adapters go to ``<output_root>/<name>/``.
        uri: The catalog's URI.
        allow_empty: An empty catalog is an error (a mistyped URI would otherwise make a
            nightly that silently does nothing) unless this is set.
    """

    name: str
    uri: str
    allow_empty: bool = False


@dataclass(frozen=True)
class ModelCatalogSpec:
    """A catalog of full fine-tunes of one pair's aligned model (every directory holding
    ``model.safetensors[.index.json]`` is a model, its id its path).

    Attributes:
        allow_empty: As for :class:`CatalogSpec`: an empty catalog is an error unless set.
    """

    name: str
    uri: str
    pair: str
    allow_empty: bool = False


@dataclass
class NightlyConfig:
    """The nightly configuration (see ``jobs/nightly.example.yaml``).

    Attributes:
        output_root: Sanitized adapters go to ``<output_root>/<catalog>/<id>/``.
        alignment_root: Alignment sets live at ``<alignment_root>/<pair>/``.
        catalogs: The catalogs.
        pairs: The model pairs.
        selection: ``{"threshold": T}`` or ``{"num_proj_layers": K, "strict_k": bool}``.
        lock_ttl_s: ``lock.ttl_s``: seconds without a renewal after which the lease counts
            as abandoned (renewed every ttl_s / 6; a holder that died on this host is taken
            over at once).
        sanitize: Extra SanitizeConfig fields (batch_size, max_in_flight, workers, use_gpu,
            workers_per_gpu, task_timeout_s, tenant_depth).
        build: Extra BuildConfig fields (workers, use_gpu, max_file_bytes).
        models: Catalogs of full fine-tunes to project (``project-model``).
        project: Extra FinetuneConfig fields (workers, use_gpu, task_timeout_s, chunk_bytes).
    """

    output_root: str
    alignment_root: str
    catalogs: list[CatalogSpec]
    pairs: list[PairSpec]
    selection: dict[str, Any]
    lock_ttl_s: float = DEFAULT_TTL_S
    sanitize: dict[str, Any] = field(default_factory=dict)
    build: dict[str, Any] = field(default_factory=dict)
    models: list[ModelCatalogSpec] = field(default_factory=list)
    project: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.output_root or not self.alignment_root:
            raise ConfigError("output_root and alignment_root are required")
        if not self.catalogs and not self.models:
            raise ConfigError("at least one catalog is required (catalogs: or models:)")
        if not self.pairs:
            raise ConfigError("at least one model pair is required")
        for kind, names in (("catalog", [c.name for c in self.catalogs]
                             + [m.name for m in self.models]),
                            ("pair", [p.name for p in self.pairs])):
            if len(set(names)) != len(names):
                raise ConfigError(f"{kind} names must be unique: {names}")
            for n in names:
                if "/" in n:
                    raise ConfigError(f"{kind} name {n!r} may not contain '/'")
                validate_id(n)
        owners: dict[str, str] = {}
        for p in self.pairs:
            for mid in p.base_model_ids:
                if mid in owners:
                    raise ConfigError(f"base model id {mid!r} maps to both {owners[mid]!r} and "
                                      f"{p.name!r}")
                owners[mid] = p.name
        allowed = {"threshold", "num_proj_layers", "strict_k"}
        extra = set(self.selection) - allowed
        if extra:
            raise ConfigError(f"unknown selection keys: {sorted(extra)}")
        allowed_s = {"batch_size", "max_in_flight", "workers", "use_gpu", "task_timeout_s",
                     "workers_per_gpu", "tenant_depth"}
        if set(self.sanitize) - allowed_s:
            raise ConfigError(f"unknown sanitize keys: {sorted(set(self.sanitize) - allowed_s)}")
        allowed_b = {"workers", "use_gpu", "max_file_bytes", "task_timeout_s"}
        if set(self.build) - allowed_b:
            raise ConfigError(f"unknown build keys: {sorted(set(self.build) - allowed_b)}")
        allowed_p = {"workers", "use_gpu", "task_timeout_s", "chunk_bytes"}
        if set(self.project) - allowed_p:
            raise ConfigError(f"unknown project keys: {sorted(set(self.project) - allowed_p)}")
        pair_names = {p.name for p in self.pairs}
        for m in self.models:
            if m.pair not in pair_names:
                raise ConfigError(f"models catalog {m.name!r}: pair {m.pair!r} is not one of "
                                  f"the configured pairs {sorted(pair_names)}")
        # Validate the selection now, not at the first sanitize, in the YAML's own terms.
        try:
            Selection(**self._selection_kwargs())
        except ConfigError as e:
            raise ConfigError(as_yaml_keys(str(e), "selection")) from None
        if self.lock_ttl_s <= 0:
            raise ConfigError("lock.ttl_s must be positive")
        if self.lock_ttl_s > 3600:  # a config written when ttl_s was the run's whole length
            logger.warning("lock.ttl_s is %g s: a run that dies on another host keeps the "
                           "lock that long (it is seconds without a renewal, renewed every "
                           "ttl_s/6; default %g s)", self.lock_ttl_s, DEFAULT_TTL_S)
        check_uri(self.output_root, "output_root")
        check_uri(self.alignment_root, "alignment_root")
        catalogs = [*(("catalogs", c) for c in self.catalogs),
                    *(("models", m) for m in self.models)]
        for section, c in catalogs:
            check_uri(c.uri, f"{section}[{c.name}].uri")
        for p in self.pairs:
            for side in ("base", "aligned"):
                check_uri(getattr(p, side), f"pairs[{p.name}].{side}")
        # Neither root equals, lies inside or contains anything a run reads.
        check_outputs(self.outputs, [
            *((f"{section}[{c.name}].uri", c.uri, "the outputs would overwrite the originals "
               "or become catalog entries of the next run") for section, c in catalogs),
            *((f"pairs[{p.name}].{side}", getattr(p, side), "the run would write into a "
               "source checkout") for p in self.pairs for side in ("base", "aligned"))])
        for _, c in catalogs:
            cat_out = join_uri(self.output_root, c.name)
            refuse_overlap(self.alignment_root, "alignment_root", cat_out,
                           f"the output of catalog {c.name!r}",
                           "alignment sets and sanitized adapters would mix")

    @property
    def outputs(self) -> list[Output]:
        """What a run writes (see :func:`~safelora_ray.storage.guards.check_outputs`)."""
        return [Output("output_root", self.output_root),
                Output("alignment_root", self.alignment_root)]

    def _selection_kwargs(self) -> dict[str, Any]:
        s = self.selection
        return {"threshold": s.get("threshold"), "num_proj_layers": s.get("num_proj_layers"),
                "strict_k": bool(s.get("strict_k", False))}

    @classmethod
    def from_dict(cls, raw: Any, where: str = "config") -> NightlyConfig:
        """Build from parsed YAML; errors name the offending key."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: the top level must be a mapping")
        known = {"output_root", "alignment_root", "catalogs", "pairs", "selection", "lock",
                 "sanitize", "build", "models", "project"}
        unknown = set(raw) - known
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
        try:
            # A mistyped key (``urii:``) is refused, not silently left out of the entry.
            catalogs = [CatalogSpec(str(c["name"]), str(c["uri"]),
                                    allow_empty=_flag_value(c, "allow_empty"))
                        for c in _entries(raw, "catalogs", where, _CATALOG_KEYS)]
            models = [ModelCatalogSpec(str(m["name"]), str(m["uri"]), str(m["pair"]),
                                       allow_empty=_flag_value(m, "allow_empty"))
                      for m in _entries(raw, "models", where, _MODELS_KEYS)]
            pairs = [
                PairSpec(
                    name=str(p["name"]), base=str(p["base"]), aligned=str(p["aligned"]),
                    targets=parse_targets(p.get("targets", ["q_proj", "v_proj"])),
                    base_model_ids=tuple(str(x) for x in p.get("base_model_ids", [])),
                )
                for p in _entries(raw, "pairs", where, _PAIR_KEYS)
            ]
            if raw.get("lock") is not None:
                _check_keys(raw["lock"], f"{where}: lock", {"ttl_s"})
            return cls(
                output_root=str(raw["output_root"]).rstrip("/"),
                alignment_root=str(raw["alignment_root"]).rstrip("/"),
                catalogs=catalogs, pairs=pairs, selection=dict(raw.get("selection") or {}),
                lock_ttl_s=float((raw.get("lock") or {}).get("ttl_s", DEFAULT_TTL_S)),
                sanitize=dict(raw.get("sanitize") or {}), build=dict(raw.get("build") or {}),
                models=models, project=dict(raw.get("project") or {}),
            )
        except (KeyError, TypeError) as e:
            raise ConfigError(f"{where}: missing or malformed entry: {e}") from e

    @classmethod
    def load(cls, uri: str) -> NightlyConfig:
        """Read a YAML config from a path or URI."""
        parent, _, name = uri.rstrip("/").rpartition("/")
        try:
            raw = open_storage(parent or ".").read(name, max_bytes=16 * 1024**2)
        except NotFoundError as e:  # a mistyped --config is a usage error (exit 2)
            raise ConfigError(f"--config {uri}: {e}") from None
        try:
            data = yaml.safe_load(raw.decode("utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{uri}: not valid YAML: {e}") from e
        return cls.from_dict(data, uri)


_CATALOG_KEYS = frozenset({"name", "uri", "allow_empty"})
_MODELS_KEYS = frozenset({"name", "uri", "pair", "allow_empty"})
_PAIR_KEYS = frozenset({"name", "base", "aligned", "targets", "base_model_ids"})


def _entries(raw: dict[str, Any], section: str, where: str,
             known: frozenset[str]) -> list[dict[str, Any]]:
    """The entries of a list section, each a mapping with only ``known`` keys.

    Raises:
        ConfigError: naming the section, the entry and the unknown key (and the near one).
    """
    entries = raw.get(section) or []
    if not isinstance(entries, list):
        raise ConfigError(f"{where}: {section} must be a list of entries")
    for i, entry in enumerate(entries):
        name = entry.get("name") if isinstance(entry, dict) else None
        _check_keys(entry, f"{where}: {section}[{name if name is not None else i}]", known)
    return entries


def _check_keys(entry: Any, what: str, known: Iterable[str]) -> None:
    if not isinstance(entry, dict):
        raise ConfigError(f"{what} must be a mapping, got {entry!r}")
    for key in sorted(set(entry) - set(known), key=str):
        near = difflib.get_close_matches(str(key), sorted(known), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(f"{what}: unknown key {key!r}{hint}; known keys: "
                          f"{', '.join(sorted(known))}")


def _flag_value(entry: dict[str, Any], key: str) -> bool:
    value = entry.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


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
    if not dry_run:
        probe_outputs(cfg.outputs)  # a read-only root is found now, not after the catalogs
        lease.acquire()
    record: dict[str, Any] = {
        "run_id": run_id, "status": "running",
        "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "counts": {"adapters": 0, "ok": 0, "skipped": 0, "error": 0, "unmatched": 0},
        "bytes_in": 0, "bytes_out": 0, "alignment_ids": {}, "groups": [], "unmatched": [],
        "errors": [], "catalog_errors": [],
        "models": {"total": 0, "ok": 0, "reused": 0, "error": 0, "items": []},
    }
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


def main(argv: Sequence[str] | None = None) -> int:
    """``jobs/nightly.py``'s entry point: ``safelora-ray nightly`` (same flags, exit codes 0 ok,
    1 failed, 2 usage, 3 partial, 4 locked)."""
    from safelora_ray.cli.main import main as cli_main

    return cli_main(["nightly", *(sys.argv[1:] if argv is None else argv)])
