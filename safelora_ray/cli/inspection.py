"""What is at a location: an alignment set, an adapter, a checkpoint, a catalog, a sanitize
output root: ``safelora-ray inspect`` (a mistaken path gets told what it is, not just
"not an alignment set").

Only metadata is read: ``alignment.json`` and the manifest, an adapter's config and its
safetensors header, a checkpoint's index and headers. No tensor data, except with ``verify``:
then every shard of an alignment set is read whole and checked against its digest.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from typing import Any

from safelora_ray.core.errors import (
    AdapterError,
    AlignmentSetError,
    ConfigError,
    NotFoundError,
    SafeLoraError,
    StorageError,
)
from safelora_ray.storage import Storage, open_storage
from safelora_ray.storage.local import LocalStorage

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
#: Entries a directory listing looks at before calling it a catalog.
_SCAN_LIMIT = 10_000


def describe(uri: str, verify: bool = False) -> dict[str, Any]:
    """A description of what lies at ``uri``: ``{"kind": ..., ...}``; ``verify``: an
    alignment set's shards are read whole and checked (``verified``: the shards checked).

    Kinds: ``alignment-set``, ``adapter``, ``checkpoint``, ``catalog``, ``sanitize-output``,
    ``unknown``.

    Raises:
        StorageError / ConfigError: the location cannot be read or is not a valid URI.
        AlignmentSetError: ``verify``: a shard differs from its digest, or the set has none;
            or ``verify`` of something that is not an alignment set.
    """
    from safelora_ray.planning.catalog import is_manifest

    if is_manifest(uri):
        return _describe_manifest(uri)
    storage = open_storage(uri)
    if isinstance(storage, LocalStorage) and os.path.isdir(storage.root):
        try:  # an unreadable folder is said so, not described as empty
            os.scandir(storage.root).close()
        except OSError as e:
            raise StorageError(f"cannot read {storage.uri}: {e.strerror or e}") from None
    if (storage.exists("alignment.json") or storage.exists("manifest.parquet")
            or any(True for _ in storage.list("shards/"))):
        from safelora_ray.formats.alignment_set import AlignmentSet

        # An interrupted build raises here, saying so.
        aset = AlignmentSet.open(storage)
        verified = {"verified": aset.verify()} if verify else {}
        return {"kind": "alignment-set", "uri": storage.uri, "content_id": aset.content_id,
                "targets": aset.targets, "modules": len(aset.rows),
                "method": aset.metadata.get("method", {}).get("name"),
                "summary": aset.summary(), "rows": aset.rows, **verified}
    if verify:
        raise AlignmentSetError(f"{storage.uri}: --verify checks an alignment set, and there "
                                "is none here")
    if storage.exists(ADAPTER_CONFIG):
        return describe_adapter(storage)
    if storage.exists("model.safetensors.index.json") or storage.exists("model.safetensors"):
        return _describe_checkpoint(storage)
    return _describe_tree(storage)


def describe_adapter(storage: Storage, prefix: str = "") -> dict[str, Any]:
    """An adapter directory: PEFT type, base model, modules, ranks, dtypes, and whether the
    Safe LoRA rule covers it (the reason when not)."""
    from safelora_ray.formats.peft import check_config
    from safelora_ray.formats.safetensors import read_header

    def rel(name: str) -> str:
        return f"{prefix}/{name}" if prefix else name

    out: dict[str, Any] = {"kind": "adapter", "uri": storage.describe(prefix)}
    try:
        config = json.loads(storage.read(rel(ADAPTER_CONFIG), max_bytes=1024**2))
    except ValueError as e:
        out["covered"] = False
        out["reason"] = f"{ADAPTER_CONFIG} is not valid JSON: {e}"
        return out
    if not isinstance(config, dict):
        config = {}
    out.update(peft_type=config.get("peft_type"),
               base_model=config.get("base_model_name_or_path"),
               r=config.get("r"), lora_alpha=config.get("lora_alpha"),
               target_modules=config.get("target_modules"),
               use_dora=bool(config.get("use_dora")),
               fan_in_fan_out=bool(config.get("fan_in_fan_out")),
               modules_to_save=config.get("modules_to_save"))
    try:
        check_config(config)
        out["covered"], out["reason"] = True, None
    except AdapterError as e:
        out["covered"], out["reason"] = False, str(e)
    try:
        header = read_header(storage, rel(ADAPTER_WEIGHTS))
    except NotFoundError:
        out["weights"] = None
        if out["covered"]:
            out["covered"] = False
            out["reason"] = f"no {ADAPTER_WEIGHTS} (pickle-only adapters are never loaded)"
        return out
    except SafeLoraError as e:
        out["weights"] = None
        out["covered"], out["reason"] = False, str(e)
        return out
    modules: dict[str, dict[str, Any]] = {}
    dtypes: Counter[str] = Counter()
    other: list[str] = []
    for name, info in header.tensors.items():
        dtypes[info.dtype] += 1
        for part in ("lora_A", "lora_B"):
            tail = f".{part}.weight"
            if name.endswith(tail):
                module = name[: -len(tail)].removeprefix(_PREFIX)
                m = modules.setdefault(module, {})
                m[part] = list(info.shape)
                break
        else:
            other.append(name)
    # The reader refuses these; saying "can be sanitized" of them would be wrong.
    unpaired = sorted(m for m, parts in modules.items() if len(parts) < 2)
    if out["covered"] and (unpaired or not modules):
        out["covered"] = False
        out["reason"] = (f"module {unpaired[0]!r} lacks its lora_A or lora_B weight"
                         if unpaired else f"{ADAPTER_WEIGHTS} has no LoRA modules (no "
                                          "lora_A/lora_B weight pairs)")
    ranks = Counter(m["lora_A"][0] for m in modules.values() if "lora_A" in m)
    out.update(weights=storage.describe(rel(ADAPTER_WEIGHTS)), modules=len(modules),
               ranks=dict(sorted(ranks.items())), dtypes=dict(sorted(dtypes.items())),
               other_tensors=other, module_shapes=modules,
               bytes=sum(i.nbytes for i in header.tensors.values()))
    return out


def _describe_checkpoint(storage: Storage) -> dict[str, Any]:
    from safelora_ray.formats.checkpoint import Checkpoint

    ckpt = Checkpoint.open(storage)
    dtypes: Counter[str] = Counter()
    nbytes = 0
    for path in sorted(set(ckpt.weight_map.values())):
        for info in ckpt.header(path).tensors.values():
            dtypes[info.dtype] += 1
            nbytes += info.nbytes
    config: dict[str, Any] = {}
    if storage.exists("config.json"):
        try:
            raw = json.loads(storage.read("config.json", max_bytes=16 * 1024**2))
            config = raw if isinstance(raw, dict) else {}
        except ValueError:
            config = {}
    return {"kind": "checkpoint", "uri": storage.uri, "layout": ckpt.layout,
            "tensors": len(ckpt.weight_map), "files": len(set(ckpt.weight_map.values())),
            "dtypes": dict(sorted(dtypes.items())), "bytes": nbytes,
            "model_type": config.get("model_type"),
            "architectures": config.get("architectures")}


def _describe_manifest(uri: str) -> dict[str, Any]:
    """A ``.jsonl`` / ``.parquet`` catalog manifest: its entries, read as ``sanitize`` reads
    them (ids, collisions, URIs checked; the adapters themselves are not opened)."""
    from safelora_ray.planning.catalog import iter_catalog

    adapters, invalid = 0, []
    for item in iter_catalog(uri):
        if isinstance(item, tuple):
            invalid.append({"entry": item[0], "error": item[1]})
        else:
            adapters += 1
    return {"kind": "catalog", "uri": uri, "format": "manifest", "adapters": str(adapters),
            **({"invalid": invalid} if invalid else {})}


def _describe_tree(storage: Storage) -> dict[str, Any]:
    from safelora_ray.storage.local import LocalStorage

    if isinstance(storage, LocalStorage) and not os.path.exists(storage.root):
        raise ConfigError(f"{storage.uri} does not exist")
    adapters, ledger, seen = 0, False, 0
    # Folders this process may not list are named, not left out of the count unsaid.
    unreadable: list[dict[str, str]] = []
    listing = (storage.list("", on_unreadable=lambda rel, is_dir, message: unreadable.append(
                   {"entry": rel, "error": message}))
               if isinstance(storage, LocalStorage) else storage.list(""))
    try:
        for obj in listing:
            seen += 1
            if obj.path.startswith("_ledger/"):
                ledger = True
            elif obj.path.rsplit("/", 1)[-1] == ADAPTER_CONFIG:
                adapters += 1
            if seen >= _SCAN_LIMIT:
                break
    except NotFoundError:
        seen = 0
    more = "+" if seen >= _SCAN_LIMIT else ""
    extra = {"unreadable": unreadable} if unreadable else {}
    if ledger:
        return {"kind": "sanitize-output", "uri": storage.uri, "adapters": f"{adapters}{more}",
                **extra}
    if adapters:
        return {"kind": "catalog", "uri": storage.uri, "adapters": f"{adapters}{more}", **extra}
    return {"kind": "unknown", "uri": storage.uri, "objects": f"{seen}{more}", **extra}


def render(d: dict[str, Any], modules: bool = False) -> str:
    """The readable text of :func:`describe`'s answer."""
    kind, uri = d["kind"], d["uri"]
    if kind == "alignment-set":
        text = d["summary"]
        if "verified" in d:
            text += (f"\nverified       {len(d['verified'])} shard file(s) read whole: each "
                     "matches its SHA-256")
        if modules:
            from safelora_ray.formats.alignment_set import SALORA_METHOD

            # A SaLoRA set's norm is ‖W Xᵀ‖_F (the calibration's), a Safe LoRA set's ‖V‖_F.
            norm = "‖W Xᵀ‖_F" if d.get("method") == SALORA_METHOD else "‖V‖_F"
            lines = [text, "", f"{'module':60s} {'layer':>5s} {'form':>4s} "
                               f"{'stored shape':>14s} {norm:>10s}"]
            for r in d["rows"].values():
                shape = "x".join(map(str, r.stored_shape))
                layer = "-" if r.layer is None else str(r.layer)
                lines.append(f"{r.module:60s} {layer:>5s} {r.form:>4s} {shape:>14s} "
                             f"{r.norm:10.4g}")
            text = "\n".join(lines)
        return text
    if kind == "adapter":
        lines = [f"PEFT adapter   {uri}",
                 f"peft type      {d.get('peft_type')}"
                 + ("  (DoRA)" if d.get("use_dora") else ""),
                 f"base model     {d.get('base_model')}"]
        if d.get("weights"):
            ranks = ", ".join(f"r={k} x{v}" for k, v in d["ranks"].items())
            lines += [f"modules        {d['modules']} ({ranks})",
                      "dtypes         " + ", ".join(f"{k} x{v}" for k, v in d["dtypes"].items()),
                      f"weights        {d['bytes']:,} bytes"]
            if d.get("other_tensors"):
                lines.append(f"other tensors  {len(d['other_tensors'])} (left as they are)")
        if d.get("fan_in_fan_out"):
            lines.append("layout         fan_in_fan_out (Conv1D)")
        verdict = ("can be sanitized (plain LoRA)" if d.get("covered")
                   else f"would be refused: {d.get('reason')}")
        lines.append(f"safe lora      {verdict}")
        if modules and d.get("module_shapes"):
            lines.append("")
            lines.append(f"{'module':60s} {'A':>12s} {'B':>12s}")
            for m, s in sorted(d["module_shapes"].items()):
                a = "x".join(map(str, s.get("lora_A", []))) or "-"
                b = "x".join(map(str, s.get("lora_B", []))) or "-"
                lines.append(f"{m:60s} {a:>12s} {b:>12s}")
        return "\n".join(lines)
    if kind == "checkpoint":
        arch = ",".join(d.get("architectures") or []) or d.get("model_type") or "unknown"
        return "\n".join([
            f"checkpoint     {uri} — not an alignment set",
            f"model          {arch}",
            f"layout         {d['layout']}: {d['tensors']} tensors in {d['files']} file(s)",
            "dtypes         " + ", ".join(f"{k} x{v}" for k, v in d["dtypes"].items()),
            f"bytes          {d['bytes']:,}",
            "build an alignment set from it (as --base or --aligned) with "
            "`safelora-ray build`",
        ])
    denied = "".join(f"\n{key:14s} {u['entry']}: {u['error']}"
                     for key in ("unreadable", "invalid") for u in d.get(key, ()))
    if kind == "catalog":
        what = "catalog manifest" if d.get("format") == "manifest" else "catalog       "
        return (f"{what} {uri} — not an alignment set\nadapters       {d['adapters']}"
                f"{denied}\nsanitize it with `safelora-ray sanitize --adapters ...`")
    if kind == "sanitize-output":
        return (f"sanitize output {uri} — not an alignment set\nadapters        "
                f"{d['adapters']}{denied}\nits reports are under _reports/")
    return (f"{uri}: not an alignment set, adapter, checkpoint or catalog "
            f"({d['objects']} object(s) there){denied}")


def as_json(d: dict[str, Any]) -> dict[str, Any]:
    """:func:`describe`'s answer as plain JSON data."""
    out = {k: v for k, v in d.items() if k not in ("summary", "rows", "module_shapes")}
    if d["kind"] == "alignment-set":
        out["module_list"] = [
            {"module": r.module, "layer": r.layer, "kind": r.kind, "form": r.form,
             "shape": list(r.shape), "stored_shape": list(r.stored_shape), "norm": r.norm}
            for r in d["rows"].values()]
    if d["kind"] == "adapter":
        out["module_shapes"] = d.get("module_shapes")
    return out


__all__ = ["as_json", "describe", "describe_adapter", "render"]
