"""The nightly workflow: every configured catalog, grouped by model pair, sanitized incrementally.

Steps of one run:
1. take the lease ``<output_root>/_nightly/lock.json`` (another live run → exit 4);
2. list every catalog and read each adapter's ``adapter_config.json`` to find its
   ``base_model_name_or_path``; map it to a configured model pair (adapters matching no pair are
   reported, never guessed);
3. for each pair with adapters: open ``<alignment_root>/<pair>``, building it when missing;
4. for each (catalog, pair): sanitize the adapters listed in a per-run manifest into
   ``<output_root>/<catalog>/`` (the ledger there skips unchanged adapters);
5. write the run record ``<output_root>/_nightly/runs/<run_id>.json`` and ``latest.json``,
   give the lease back, and exit with a status an operator can alert on.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as _dt
import io
import json
import logging
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from safelora_ray.build import BuildConfig, build
from safelora_ray.catalog import CONFIG_FILE, AdapterRef, iter_catalog, validate_id
from safelora_ray.errors import AlignmentSetError, ConfigError, SafeLoraError
from safelora_ray.formats.alignment_set import AlignmentSet
from safelora_ray.lease import Lease, LeaseHeldError
from safelora_ray.plan import parse_targets
from safelora_ray.redact import configure_logging, redact
from safelora_ray.reports import text_summary
from safelora_ray.sanitize import SanitizeConfig, sanitize
from safelora_ray.storage import open_storage
from safelora_ray.storage.base import join_uri
from safelora_ray.workers import worker_session

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
    """A catalog of adapters (directory tree or manifest)."""

    name: str
    uri: str


@dataclass
class NightlyConfig:
    """The nightly configuration (see ``jobs/nightly.example.yaml``).

    Attributes:
        output_root: Sanitized adapters go to ``<output_root>/<catalog>/<id>/``.
        alignment_root: Alignment sets live at ``<alignment_root>/<pair>/``.
        catalogs: The catalogs.
        pairs: The model pairs.
        selection: ``{"threshold": T}`` or ``{"num_proj_layers": K, "strict_k": bool}``.
        lock_ttl_s: Lease TTL.
        sanitize: Extra SanitizeConfig fields (batch_size, max_in_flight, workers, use_gpu,
            workers_per_gpu, task_timeout_s, tenant_depth).
        build: Extra BuildConfig fields (workers, use_gpu, max_file_bytes).
    """

    output_root: str
    alignment_root: str
    catalogs: list[CatalogSpec]
    pairs: list[PairSpec]
    selection: dict[str, Any]
    lock_ttl_s: float = 6 * 3600
    sanitize: dict[str, Any] = field(default_factory=dict)
    build: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.output_root or not self.alignment_root:
            raise ConfigError("output_root and alignment_root are required")
        if not self.catalogs:
            raise ConfigError("at least one catalog is required")
        if not self.pairs:
            raise ConfigError("at least one model pair is required")
        for kind, names in (("catalog", [c.name for c in self.catalogs]),
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
        # Validate the selection now, not at the first sanitize, in the YAML's own terms.
        if (self.selection.get("threshold") is None) == (
                self.selection.get("num_proj_layers") is None):
            raise ConfigError("selection: give exactly one of threshold or num_proj_layers")
        try:
            SanitizeConfig(alignment="-", adapters="-", out="-", **self._selection_kwargs())
        except ConfigError as e:
            raise ConfigError(f"selection: {e}") from None
        if self.lock_ttl_s <= 0:
            raise ConfigError("lock.ttl_s must be positive")

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
                 "sanitize", "build"}
        unknown = set(raw) - known
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
        try:
            catalogs = [CatalogSpec(str(c["name"]), str(c["uri"])) for c in raw["catalogs"]]
            pairs = [
                PairSpec(
                    name=str(p["name"]), base=str(p["base"]), aligned=str(p["aligned"]),
                    targets=parse_targets(p.get("targets", ["q_proj", "v_proj"])),
                    base_model_ids=tuple(str(x) for x in p.get("base_model_ids", [])),
                )
                for p in raw["pairs"]
            ]
            return cls(
                output_root=str(raw["output_root"]).rstrip("/"),
                alignment_root=str(raw["alignment_root"]).rstrip("/"),
                catalogs=catalogs, pairs=pairs, selection=dict(raw.get("selection") or {}),
                lock_ttl_s=float((raw.get("lock") or {}).get("ttl_s", 6 * 3600)),
                sanitize=dict(raw.get("sanitize") or {}), build=dict(raw.get("build") or {}),
            )
        except (KeyError, TypeError) as e:
            raise ConfigError(f"{where}: missing or malformed entry: {e}") from e

    @classmethod
    def load(cls, uri: str) -> NightlyConfig:
        """Read a YAML config from a path or URI."""
        parent, _, name = uri.rstrip("/").rpartition("/")
        raw = open_storage(parent or ".").read(name, max_bytes=16 * 1024**2)
        try:
            data = yaml.safe_load(raw.decode("utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{uri}: not valid YAML: {e}") from e
        return cls.from_dict(data, uri)


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
                progress: bool = True) -> dict[str, Any]:
    """One nightly run; returns the run record (also written to storage unless ``dry_run``).

    Raises:
        LeaseHeldError: another live run holds the lease.
    """
    t0 = time.perf_counter()
    run_id = run_id or (_dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
                        + "-" + uuid.uuid4().hex[:6])
    out = open_storage(cfg.output_root)
    lease = Lease(out, f"{NIGHTLY_PREFIX}/lock.json", owner=run_id, ttl_s=cfg.lock_ttl_s)
    if not dry_run:
        lease.acquire()
    record: dict[str, Any] = {
        "run_id": run_id, "status": "running",
        "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "counts": {"adapters": 0, "ok": 0, "skipped": 0, "error": 0, "unmatched": 0},
        "bytes_in": 0, "bytes_out": 0, "alignment_ids": {}, "groups": [], "unmatched": [],
        "errors": [],
    }
    try:
        by_model = {mid: p for p in cfg.pairs for mid in p.base_model_ids}
        groups: dict[tuple[str, str], list[dict[str, str]]] = {}
        with cf.ThreadPoolExecutor(max_workers=16) as pool:
            for cat in cfg.catalogs:
                refs = []
                for item in iter_catalog(cat.uri):
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
        logger.info("nightly %s: %d adapter(s) in %d group(s), %d unmatched", run_id,
                    record["counts"]["adapters"], len(groups), record["counts"]["unmatched"])
        if dry_run:
            record["groups"] = [{"catalog": c, "pair": p, "adapters": len(v)}
                                for (c, p), v in sorted(groups.items())]
            record["status"] = "dry-run"
            return record

        # One set of workers for every build and sanitize of the run: each worker process
        # imports torch once and keeps the alignment set it last used resident.
        with worker_session():
            pairs = {p.name: p for p in cfg.pairs}
            for pair_name in sorted({p for _, p in groups}):
                record["alignment_ids"][pair_name] = _ensure_alignment(cfg, pairs[pair_name],
                                                                       progress)
            cats = {c.name: c for c in cfg.catalogs}
            for (cat_name, pair_name), entries in sorted(groups.items()):
                manifest = f"{NIGHTLY_PREFIX}/runs/{run_id}/manifests/{cat_name}--{pair_name}.jsonl"
                out.put_bytes(manifest, "".join(json.dumps(e) + "\n" for e in entries).encode())
                res = sanitize(SanitizeConfig(
                    alignment=join_uri(cfg.alignment_root, pair_name),
                    adapters=out.describe(manifest),
                    out=join_uri(cfg.output_root, cat_name),
                    run_id=f"{run_id}-{pair_name}", progress=progress,
                    **cfg._selection_kwargs(), **cfg.sanitize,
                ))
                print(text_summary(res))
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
        c = record["counts"]
        record["status"] = "success" if c["error"] == 0 and c["unmatched"] == 0 else "partial"
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
            finally:
                lease.release()
    return record


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


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``jobs/nightly.py``."""
    p = argparse.ArgumentParser(prog="nightly.py",
                                description="Nightly sanitization of adapter catalogs.")
    p.add_argument("--config", required=True, help="nightly YAML (path or s3://)")
    p.add_argument("--run-id", default=None, help="run id (default: UTC timestamp + random)")
    p.add_argument("--dry-run", action="store_true",
                   help="list and group adapters, print the plan, write nothing")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; exit codes 0 ok, 1 failed, 2 usage, 3 partial, 4 locked."""
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        cfg = NightlyConfig.load(args.config)
        record = run_nightly(cfg, run_id=args.run_id, dry_run=args.dry_run,
                             progress=not args.no_progress)
    except ConfigError as e:
        print(f"nightly: error: {redact(str(e))}", file=sys.stderr)
        return EXIT_USAGE
    except LeaseHeldError as e:
        print(f"nightly: another run is in progress: {e}", file=sys.stderr)
        return EXIT_LOCKED
    except SafeLoraError as e:
        print(f"nightly: error: {redact(str(e))}", file=sys.stderr)
        return EXIT_FAILED
    c = record["counts"]
    buf = io.StringIO()
    buf.write(f"nightly {record['run_id']}: {record['status']} — {c['adapters']} adapter(s): "
              f"{c['ok']} ok, {c['skipped']} skipped, {c['error']} failed, "
              f"{c['unmatched']} matched no model pair; {record['duration_s']:.1f} s\n")
    for u in record["unmatched"][:10]:
        buf.write(f"  unmatched: {u['catalog']}/{u['adapter_id']} (base model "
                  f"{u['base_model']!r})\n")
    print(buf.getvalue(), end="")
    return EXIT_OK if record["status"] in ("success", "dry-run") else EXIT_PARTIAL
