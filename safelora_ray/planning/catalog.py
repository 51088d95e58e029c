"""Adapter catalogs: where tenant adapters are and what their ids are.

A catalog is either a directory tree (local or ``s3://``) in which every directory holding
``adapter_config.json`` is an adapter whose id is its path relative to the catalog root, or a
manifest file (``.parquet`` / ``.jsonl``) with a ``uri`` column (and optionally ``id``).
Catalogs are listed lazily: the driver never holds the whole catalog in memory.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import posixpath
import re
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field

from safelora_ray.core.errors import ConfigError, NotFoundError, StorageError
from safelora_ray.storage import Storage, open_storage
from safelora_ray.storage.base import ObjectInfo
from safelora_ray.storage.local import LocalStorage
from safelora_ray.storage.uri import check_uri, split_uri

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
MANIFEST_SUFFIXES = (".parquet", ".jsonl")
MAX_MANIFEST_BYTES = 1024**3
#: Output names the tool itself uses at the top of ``--out``; no adapter id may start so.
RESERVED_PREFIX = "_"
_ID_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=@-]*$")


@dataclass(frozen=True)
class AdapterRef:
    """One adapter of a catalog.

    Attributes:
        adapter_id: Stable id; also its output path under ``--out``.
        uri: Storage root URI holding the adapter.
        prefix: The adapter directory inside that storage (``""`` for the root itself).
        listing: ``list(prefix)`` as the catalog's own listing saw it, on an object store
            (a worker then needs no LIST of its own: a request per adapter saved); its
            versions pin what is read (``If-Match``). Not part of the ref's identity.
    """

    adapter_id: str
    uri: str
    prefix: str
    listing: tuple[ObjectInfo, ...] | None = field(default=None, compare=False, repr=False)


def validate_id(adapter_id: str) -> str:
    """Check an adapter id is a safe relative path; returns it.

    Ids become output paths, so they may not be absolute, contain ``..`` or empty segments,
    start with the reserved ``_``, or use characters outside ``[A-Za-z0-9._+=@-]``.

    Raises:
        ConfigError: naming the id and what is wrong.
    """
    if not adapter_id or adapter_id.startswith("/") or "\\" in adapter_id:
        raise ConfigError(f"adapter id {adapter_id!r} is empty or absolute")
    if adapter_id.startswith(RESERVED_PREFIX):
        raise ConfigError(f"adapter id {adapter_id!r} starts with '_', reserved for reports")
    for seg in adapter_id.split("/"):
        if seg in ("", ".", ".."):
            raise ConfigError(f"adapter id {adapter_id!r} has an empty, '.' or '..' segment")
        if not _ID_SEGMENT.match(seg):
            raise ConfigError(f"adapter id {adapter_id!r} has unsupported characters in {seg!r}")
    return adapter_id


def is_manifest(uri: str) -> bool:
    """Whether a catalog URI names a manifest file rather than a directory tree."""
    return uri.rstrip("/").endswith(MANIFEST_SUFFIXES)


def iter_catalog(uri: str) -> Iterator[AdapterRef | tuple[str, str]]:
    """Yield the catalog's adapters in a stable order.

    Yields:
        :class:`AdapterRef` for each adapter, or ``(id_or_path, error message)`` for an entry
        that cannot be an adapter (a bad id): the fleet run reports those and goes on.

    An empty catalog yields nothing; whether that is an error is the caller's call.

    Raises:
        ConfigError: the catalog does not exist (a local directory or a manifest file).
        StorageError: the catalog cannot be read.
    """
    if is_manifest(uri):
        yield from _iter_manifest(uri.rstrip("/"))
        return
    storage = open_storage(uri)
    _check_local_root(storage, "catalog", f"a directory of adapters nor a "
                      f"{' or '.join(MANIFEST_SUFFIXES)} manifest")
    # Symlinks out of a local catalog are never read; an adapter directory or config that is
    # one becomes an error row instead of silently vanishing from the run. So does a folder
    # this process may not list (a tenant's adapters are not a tenant with no adapters).
    refused: list[tuple[str, bool, str, bool]] = []
    if isinstance(storage, LocalStorage):
        listing = storage.list("", on_refused=lambda *r: refused.append((*r, False)),
                               on_unreadable=lambda *r: refused.append((*r, True)))
    else:
        listing = storage.list("")
    # An object store's listing is gathered whole anyway (S3Storage.list sorts its pages);
    # each adapter's folder is then a contiguous run of it, handed on with the ref.
    folders = _Folders(list(listing)) if storage.remote else None
    for obj in itertools.chain(folders.objects if folders else listing, [None]):
        while refused:
            item = _refused_entry(storage, *refused.pop(0))
            if item is not None:
                yield item
        if obj is None or posixpath.basename(obj.path) != CONFIG_FILE:
            continue
        prefix = posixpath.dirname(obj.path)
        adapter_id = prefix or _root_name(storage.uri)
        try:
            validate_id(adapter_id)
        except ConfigError as e:
            yield (adapter_id, str(e))
            continue
        yield AdapterRef(adapter_id, storage.uri, prefix,
                         folders.under(prefix) if folders and prefix else None)


class _Folders:
    """A sorted listing, and the objects under any folder of it (a bisection each)."""

    def __init__(self, objects: list[ObjectInfo]) -> None:
        self.objects = objects
        self._paths = [o.path for o in objects]

    def under(self, prefix: str) -> tuple[ObjectInfo, ...]:
        # Every path starting "p/" sorts in ["p/", "p0"): "0" is the code point after "/".
        lo = bisect_left(self._paths, prefix + "/")
        return tuple(self.objects[lo:bisect_left(self._paths, prefix + "0", lo)])


#: The files that make a directory a Hugging Face safetensors checkpoint.
MODEL_MARKERS = ("model.safetensors.index.json", "model.safetensors")


@dataclass(frozen=True)
class ModelRef:
    """One full checkpoint of a model catalog.

    Attributes:
        model_id: Stable id; also its output path under the catalog's output folder.
        uri: The checkpoint directory's URI.
    """

    model_id: str
    uri: str


def _check_local_root(storage: Storage, what: str, expected: str) -> None:
    """A mistyped local path must not look like an empty catalog (a run that does nothing).

    Raises:
        ConfigError: the path does not exist, or is a file.
    """
    if isinstance(storage, LocalStorage):
        if not os.path.exists(storage.root):
            raise ConfigError(f"{what} {storage.uri} does not exist")
        if not os.path.isdir(storage.root):
            raise ConfigError(f"{what} {storage.uri} is a file, not {expected}")


def iter_models(uri: str) -> Iterator[ModelRef | tuple[str, str]]:
    """Yield the checkpoints of a directory tree (local or ``s3://``) in a stable order: every
    directory holding ``model.safetensors.index.json`` or ``model.safetensors`` is one; its id
    is its path relative to the root. Folders starting with ``_`` (reports, our own state) are
    not searched.

    Yields:
        :class:`ModelRef`, or ``(id, error message)`` for a directory whose id is unusable or
        (local) that this process may not list.

    Raises:
        ConfigError: a local catalog that does not exist.
    """
    storage = open_storage(uri)
    _check_local_root(storage, "model catalog", "a directory of checkpoints")
    seen: set[str] = set()
    denied: list[tuple[str, bool, str]] = []
    listing = (storage.list("", on_unreadable=lambda *r: denied.append(r))
               if isinstance(storage, LocalStorage) else storage.list(""))
    for obj in itertools.chain(listing, [None]):
        while denied:  # a folder not ours to list: an error, not a catalog without it
            rel, is_dir, message = denied.pop(0)
            where = rel if is_dir else posixpath.dirname(rel)
            if ((is_dir or posixpath.basename(rel) in MODEL_MARKERS)
                    and not _reserved(where) and where not in seen):
                seen.add(where)
                yield (where or _root_name(storage.uri), f"catalog entry {rel!r}: {message}")
        if obj is None:
            break
        prefix, name = posixpath.split(obj.path)
        if name not in MODEL_MARKERS or prefix in seen or _reserved(prefix):
            continue
        seen.add(prefix)
        model_id = prefix or _root_name(storage.uri)
        try:
            validate_id(model_id)
        except ConfigError as e:
            yield (model_id, str(e).replace("adapter id", "model id"))
            continue
        yield ModelRef(model_id, storage.describe(prefix) if prefix else storage.uri)
    if not seen:
        logger.warning("no model.safetensors[.index.json] found under %s: the model catalog "
                       "is empty", storage.uri)


def _reserved(prefix: str) -> bool:
    return any(seg.startswith(RESERVED_PREFIX) for seg in prefix.split("/") if seg)


def _refused_entry(storage: LocalStorage, rel: str, is_dir: bool, message: str,
                   unreadable: bool) -> tuple[str, str] | None:
    """The error entry for a symlink out of a local catalog, when it stands for an adapter:
    an ``adapter_config.json`` link, or a directory link whose target holds one (only its
    existence is checked; nothing outside the catalog is read). For an entry this process may
    not read (``unreadable``): a directory, whatever it holds, or an ``adapter_config.json``."""
    if unreadable and is_dir:
        logger.warning("catalog %s: %s", storage.uri, message)
        return (rel, f"catalog entry {rel!r}: {message}; the adapters under it (if any) were "
                     "not sanitized")
    if unreadable:
        if posixpath.basename(rel) != CONFIG_FILE:
            return None  # another file of an adapter: reading that adapter reports it
        adapter_id = posixpath.dirname(rel) or _root_name(storage.uri)
        return (adapter_id, f"adapter {adapter_id!r}: {message}")
    if is_dir:
        if not os.path.isfile(os.path.join(storage.describe(rel), CONFIG_FILE)):
            logger.warning("catalog %s: ignoring %s", storage.uri, message)
            return None
        adapter_id = rel
    elif posixpath.basename(rel) == CONFIG_FILE:
        adapter_id = posixpath.dirname(rel) or _root_name(storage.uri)
    else:
        return None  # another file of an adapter: reading that adapter reports it
    return (adapter_id, f"adapter {adapter_id!r}: {message}; symlinks out of the catalog are "
                        "never followed")


def _root_name(uri: str) -> str:
    _, rest = split_uri(uri)
    return posixpath.basename(rest.rstrip("/")) or "adapter"


def _iter_manifest(uri: str) -> Iterator[AdapterRef | tuple[str, str]]:
    parent, name = uri.rsplit("/", 1) if "/" in uri else (".", uri)
    storage = open_storage(parent)
    try:
        raw = storage.read(name, max_bytes=MAX_MANIFEST_BYTES)
    except NotFoundError:
        raise ConfigError(f"catalog manifest {uri} does not exist") from None
    records: list[dict[str, object]]
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            table = pq.ParquetFile(io.BytesIO(raw)).read()  # read_table imports pyarrow.dataset
        except Exception as e:
            raise ConfigError(f"{uri}: not a Parquet file: {e}") from e
        if "uri" not in table.column_names:
            raise ConfigError(f"{uri}: the manifest needs a 'uri' column")
        cols = [c for c in ("id", "uri") if c in table.column_names]
        records = table.select(cols).to_pylist()
    else:
        records = []
        for i, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{uri}: line {i} is not JSON: {e}") from e
            if not isinstance(rec, dict) or not isinstance(rec.get("uri"), str):
                raise ConfigError(f"{uri}: line {i} needs a string 'uri'")
            records.append(rec)
    derived = _derived_ids([str(r["uri"]).rstrip("/") for r in records if not r.get("id")])
    _refuse_collisions(uri, records, derived)
    seen: set[str] = set()
    for rec in records:
        adapter_uri = str(rec["uri"]).rstrip("/")
        adapter_id = str(rec.get("id") or derived[adapter_uri])
        try:
            validate_id(adapter_id)
            check_uri(adapter_uri, f"adapter {adapter_id!r}: its uri")
            if adapter_id in seen:
                raise ConfigError(f"adapter id {adapter_id!r} appears twice in {uri}")
        except ConfigError as e:
            yield (adapter_id, str(e))
            continue
        seen.add(adapter_id)
        yield AdapterRef(adapter_id, adapter_uri, "")


def _derived_ids(uris: list[str]) -> dict[str, str]:
    """Ids for manifest entries without one: each URI's path below the deepest folder that
    holds all of them on its storage (the local filesystem, or one bucket), so tenant
    prefixes stay: ``/d/acme/chat-0`` and ``/d/globex/chat-0`` are ``acme/chat-0`` and
    ``globex/chat-0``, not ``chat-0`` twice. A lone URI keeps its last path component."""
    groups: dict[tuple[str, str], list[list[str]]] = {}
    for u in uris:
        scheme, rest = split_uri(u)
        parts = rest.split("/")
        groups.setdefault((scheme, "" if scheme == "file" else parts[0]), []).append(parts)
    ids: dict[str, str] = {}
    for (scheme, _), paths in groups.items():
        common = 0  # components shared by every path, leaving each at least one of its own
        limit = min(len(p) for p in paths) - 1
        while common < limit and len({p[common] for p in paths}) == 1:
            common += 1
        for parts in paths:
            rest = "/".join(parts)
            u = rest if scheme == "file" else f"{scheme}://{rest}"
            ids[u] = "/".join(parts[common:]) or _root_name(u)
    return ids


def _refuse_collisions(uri: str, records: list[dict[str, object]],
                       derived: dict[str, str]) -> None:
    """Refuse, before any work, a manifest in which an id derived from a URI is also another
    entry's id: two adapters would be written to one output (an id written twice by hand is
    that entry's error instead, reported with the run).

    Raises:
        ConfigError: naming the id and both URIs.
    """
    owner: dict[str, tuple[int, str, bool]] = {}  # id → its first entry, URI, derived?
    for i, rec in enumerate(records):
        adapter_uri = str(rec["uri"]).rstrip("/")
        was_derived = not rec.get("id")
        adapter_id = derived[adapter_uri] if was_derived else str(rec["id"])
        first = owner.setdefault(adapter_id, (i, adapter_uri, was_derived))
        if first[0] != i and (was_derived or first[2]):
            raise ConfigError(
                f"{uri}: {first[1]} and {adapter_uri} would both be adapter {adapter_id!r} "
                "(an entry without 'id' gets its path below the entries' common folder); "
                "give them distinct 'id' values")


__all__ = ["AdapterRef", "ModelRef", "StorageError", "iter_catalog", "iter_models",
           "validate_id"]
