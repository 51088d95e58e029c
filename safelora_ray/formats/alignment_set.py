"""The alignment set: what a build persists and every sanitize run reads.

Layout under the set's URI::

    shards/part-SSSSS-FFFF.safetensors   float32 tensors keyed by module name
    manifest.parquet                     one row per module (see MANIFEST_SCHEMA)
    alignment.json                       metadata; written last: its presence marks the set
                                         complete

A set is immutable: a build refuses to write over a complete set made from other inputs.

Integrity: ``alignment.json`` carries the SHA-256 of the manifest and of every shard
(``integrity``), the manifest a digest of every stored tensor (column ``digest``), all taken
while the files were written. Opening a set checks the manifest; loading a module checks its
tensor's bytes as they are read; :meth:`AlignmentSet.verify` reads every shard whole. A set
written before digests existed still loads, with a warning (once per process and set).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import logging
import math
import threading
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from safelora_ray._version import __version__
from safelora_ray.core.alignment import AlignmentMatrix
from safelora_ray.core.buffers import new_buffer
from safelora_ray.core.errors import AlignmentSetError, NotFoundError, SafeLoraError
from safelora_ray.formats.integrity import (
    TENSOR_SCHEME,
    file_sha256,
    read_digested,
    stream_sha256,
    tensor_digest,
)
from safelora_ray.formats.safetensors import (
    SafetensorsHeader,
    read_header,
    require_little_endian,
    torch_dtype_of,
    torch_shape_of,
)
from safelora_ray.storage import Storage, open_storage

logger = logging.getLogger(__name__)

FORMAT = "safelora-ray/alignment-set"
FORMAT_VERSION = 1
METADATA_FILE = "alignment.json"
MANIFEST_FILE = "manifest.parquet"
MAX_METADATA_BYTES = 16 * 1024 * 1024
MAX_MANIFEST_BYTES = 256 * 1024 * 1024

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("module", pa.string(), nullable=False),
        pa.field("tensor", pa.string(), nullable=False),
        pa.field("layer", pa.int32()),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("shape", pa.list_(pa.int64()), nullable=False),
        pa.field("form", pa.string(), nullable=False),
        pa.field("stored_shape", pa.list_(pa.int64()), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("norm", pa.float64(), nullable=False),
        pa.field("source_digest", pa.string(), nullable=False),
        pa.field("base_dtype", pa.string()),  # null in a SaLoRA set (no base model)
        pa.field("aligned_dtype", pa.string(), nullable=False),
        # Added later; a manifest without them reads as linear, fast-form modules.
        pa.field("layout", pa.string(), nullable=False),
        pa.field("proj_rank", pa.int32()),
        pa.field("proj_energy", pa.float64()),
        # SaLoRA safety-module sets (SPEC §4); null in a Safe LoRA set, absent in older ones.
        pa.field("safety_rank", pa.int32()),
        pa.field("tokens", pa.int64()),
        pa.field("energy", pa.float64()),
        pa.field("calibration_digest", pa.string()),
        # The stored tensor's digest (formats.integrity.TENSOR_SCHEME); absent in older sets.
        pa.field("digest", pa.string()),
    ]
)
#: Columns a manifest may lack (written by an earlier version), with their value then.
OPTIONAL_COLUMNS: dict[str, Any] = {"layout": "linear", "proj_rank": None, "proj_energy": None,
                                    "safety_rank": None, "tokens": None, "energy": None,
                                    "calibration_digest": None, "digest": None}

#: ``method.name`` of a SaLoRA safety-module set; any other name is a Safe LoRA set.
SALORA_METHOD = "salora"


@dataclass(frozen=True)
class ManifestRow:
    """One module of the set (a row of ``manifest.parquet``).

    ``shape`` is the weight as nn.Linear's d_out x d_in; ``layout`` says how the checkpoints
    store it (``conv1d``: GPT-2's Conv1D, transposed). ``proj_rank`` / ``proj_energy``: the
    k of an exact projection (form ``U``) and the fraction of Σσᵢ² its k directions keep.
    """

    module: str
    tensor: str
    layer: int | None
    kind: str
    shape: tuple[int, ...]
    form: str
    stored_shape: tuple[int, ...]
    shard: str
    norm: float
    source_digest: str
    base_dtype: str | None
    aligned_dtype: str
    layout: str = "linear"
    proj_rank: int | None = None
    proj_energy: float | None = None
    safety_rank: int | None = None
    tokens: int | None = None
    energy: float | None = None
    calibration_digest: str | None = None
    digest: str | None = None


def manifest_table(rows: Iterable[ManifestRow]) -> pa.Table:
    """Rows → an Arrow table with :data:`MANIFEST_SCHEMA`, sorted by (layer, module)."""
    rows = sorted(rows, key=lambda r: (r.layer if r.layer is not None else -1, r.module))
    cols: dict[str, list[Any]] = {f.name: [] for f in MANIFEST_SCHEMA}
    for r in rows:
        for name in cols:
            v = getattr(r, name)
            cols[name].append(list(v) if isinstance(v, tuple) else v)
    return pa.table(cols, schema=MANIFEST_SCHEMA)


def parquet_bytes(table: pa.Table) -> bytes:
    """Serialize a table to Parquet bytes (zstd)."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def content_id(metadata_core: dict[str, Any], rows: Iterable[ManifestRow]) -> str:
    """A content id: a digest of the method, targets and every module's source digest and form.

    Two builds from the same source bytes with the same parameters get the same id, whatever
    the storage, sharding or hardware.
    """
    h = hashlib.sha256()
    h.update(json.dumps(metadata_core, sort_keys=True).encode())
    for r in sorted(rows, key=lambda r: r.module):
        # A transposed (Conv1D) module gives another matrix from the same bytes; linear ones
        # keep the line of sets built before layouts were recorded.
        layout = f"|{r.layout}" if r.layout != "linear" else ""
        h.update(f"\n{r.module}|{r.source_digest}|{r.form}|{list(r.stored_shape)}{layout}"
                 .encode())
    return "als-" + h.hexdigest()[:32]


@dataclass
class AlignmentSet:
    """A complete alignment set opened for reading; tensors are loaded lazily per module.

    Attributes:
        storage: Where the set lives.
        metadata: The parsed ``alignment.json``.
        rows: Module name → manifest row.
    """

    storage: Storage
    metadata: dict[str, Any]
    rows: dict[str, ManifestRow]
    _headers: dict[str, SafetensorsHeader] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def uri(self) -> str:
        return self.storage.uri

    @property
    def content_id(self) -> str:
        return str(self.metadata["content_id"])

    @property
    def targets(self) -> list[str]:
        return list(self.metadata.get("targets", []))

    @property
    def method_name(self) -> str:
        """``method.name`` of the metadata (``safelora-fast``, ``salora``)."""
        return str((self.metadata.get("method") or {}).get("name") or "")

    @property
    def method_family(self) -> str:
        """``salora`` for a SaLoRA safety-module set, else ``safelora``: what
        ``sanitize --method`` must say."""
        return "salora" if self.method_name == SALORA_METHOD else "safelora"

    @classmethod
    def open(cls, uri_or_storage: str | Storage, expect: str | None = None) -> AlignmentSet:
        """Open a complete set.

        Args:
            uri_or_storage: Where it is.
            expect: The content id a running job started with: a set rebuilt there since is
                an error (a job never mixes two sets).

        Raises:
            AlignmentSetError: no set there, an interrupted build (no ``alignment.json``), an
                unknown format version, a manifest that disagrees with the metadata, or not
                the ``expect``-ed set.
        """
        storage = (
            open_storage(uri_or_storage) if isinstance(uri_or_storage, str) else uri_or_storage
        )
        metadata = read_metadata(storage)
        if metadata is None:
            if storage.exists(MANIFEST_FILE) or any(True for _ in storage.list("shards/")):
                raise AlignmentSetError(
                    f"{storage.uri}: incomplete alignment set ({METADATA_FILE} is missing: the "
                    "build was interrupted); run the build again"
                )
            raise AlignmentSetError(f"{storage.uri}: no alignment set ({METADATA_FILE} not found)")
        try:
            raw = storage.read(MANIFEST_FILE, max_bytes=MAX_MANIFEST_BYTES)
            table = pq.ParquetFile(io.BytesIO(raw)).read()  # read_table imports pyarrow.dataset
        except NotFoundError as e:
            raise AlignmentSetError(f"{storage.uri}: {MANIFEST_FILE} is missing") from e
        except (pa.ArrowException, OSError) as e:
            raise AlignmentSetError(f"{storage.describe(MANIFEST_FILE)}: unreadable: {e}") from e
        _check_manifest(storage, metadata, raw)
        missing = [f.name for f in MANIFEST_SCHEMA
                   if f.name not in table.column_names and f.name not in OPTIONAL_COLUMNS]
        if missing:
            raise AlignmentSetError(
                f"{storage.describe(MANIFEST_FILE)}: columns missing: {', '.join(missing)}"
            )
        present = [f.name for f in MANIFEST_SCHEMA if f.name in table.column_names]
        rows: dict[str, ManifestRow] = {}
        for rec in table.select(present).to_pylist():
            for name, default in OPTIONAL_COLUMNS.items():
                rec.setdefault(name, default)
            rec["shape"] = tuple(rec["shape"])
            rec["stored_shape"] = tuple(rec["stored_shape"])
            rows[rec["module"]] = ManifestRow(**rec)
            if "integrity" in metadata and not rec["digest"]:
                raise AlignmentSetError(f"{storage.describe(MANIFEST_FILE)}: module "
                                        f"{rec['module']!r} has no digest")
        if len(rows) != metadata.get("num_modules"):
            raise AlignmentSetError(
                f"{storage.uri}: manifest has {len(rows)} modules, {METADATA_FILE} says "
                f"{metadata.get('num_modules')}"
            )
        aset = cls(storage, metadata, rows)
        if expect is not None and aset.content_id != expect:
            raise AlignmentSetError(
                f"{storage.uri} now holds alignment set {aset.content_id}, not {expect}: it "
                "changed while the run started")
        return aset

    def header(self, shard: str) -> SafetensorsHeader:
        with self._lock:
            h = self._headers.get(shard)
        if h is None:
            try:
                h = read_header(self.storage, shard)
            except NotFoundError as e:
                raise AlignmentSetError(f"{self.storage.describe(shard)} is missing") from e
            with self._lock:
                self._headers[shard] = h
        return h

    def load(self, module: str, device: str = "cpu",
             scratch: bytearray | None = None) -> AlignmentMatrix:
        """Load one module's :class:`AlignmentMatrix` (a ranged read of its tensor).

        Args:
            module: The module.
            device: Where the matrix goes.
            scratch: Read into this buffer (when it is large enough) instead of a new one:
                for a caller that copies each matrix elsewhere at once (into an object
                store), so that one buffer's pages serve every module (fresh pages cost a
                page fault each; on a VM that first-touches them from the host, most of a
                load's CPU). The matrix returned is a view of it.
        """
        shard, start, nbytes = self.stored_range(module)
        row = self.rows[module]
        if scratch is not None and len(scratch) >= nbytes:
            buf = memoryview(scratch)[:nbytes]
        else:
            # Not zero-filled (the read fills every byte, or raises): GIL released meanwhile.
            buf = memoryview(new_buffer(nbytes))
        # The bytes are checked against the manifest's digest while they are read.
        if row.digest is None:  # a set from before digests (warned about at open)
            if nbytes:
                self.storage.read_into(shard, start, buf)
        else:
            got = read_digested(self.storage, shard, start, buf) if nbytes else tensor_digest(b"")
            if got != row.digest:
                raise self._corrupt(row, got)
        m = self.from_bytes(module, buf, verify=False)
        return AlignmentMatrix(m.form, m.tensor.to(device), m.norm)

    def local_shards(self) -> dict[str, str] | None:
        """Each shard's file on this machine (a local set, or the Hub's cache), or None when
        any lies elsewhere (an object store): local shards can be mapped rather than read."""
        paths = {}
        for shard in sorted({r.shard for r in self.rows.values()}):
            try:
                path = self.storage.local_path(shard)
            except SafeLoraError:
                return None
            if path is None:
                return None
            paths[shard] = path
        return paths

    def stored_range(self, module: str) -> tuple[str, int, int]:
        """``(shard, offset, length)`` of the module's stored tensor, its header checked
        against the manifest (float32, the stored shape).

        Raises:
            AlignmentSetError: an unknown module, or a header that disagrees.
        """
        row = self.rows.get(module)
        if row is None:
            raise AlignmentSetError(f"{self.uri}: module {module!r} is not in the alignment set")
        header = self.header(row.shard)
        if module not in header.tensors:
            raise AlignmentSetError(f"{self.storage.describe(row.shard)}: no tensor {module!r}")
        info = header.tensor(module)
        dtype, shape = torch_dtype_of(header.uri, info), torch_shape_of(header.uri, info)
        if tuple(shape) != row.stored_shape or dtype != torch.float32:
            raise AlignmentSetError(
                f"{self.storage.describe(row.shard)}: tensor {module!r} is {dtype} "
                f"{list(shape)}, the manifest says float32 {list(row.stored_shape)}")
        return row.shard, info.start, info.nbytes

    def from_bytes(self, module: str, data: memoryview, verify: bool = True
                   ) -> AlignmentMatrix:
        """The module's matrix as a view of ``data``, its stored bytes (e.g. a slice of its
        shard mapped read-only: no copy), checked against the manifest's digest unless
        ``verify`` is false (this process, or the one that shared the bytes, checked them).

        Raises:
            AlignmentSetError: the bytes are not the module's (length or digest).
        """
        require_little_endian()
        row = self.rows[module]
        if len(data) != 4 * math.prod(row.stored_shape):
            raise AlignmentSetError(f"{self.storage.describe(row.shard)}: tensor {module!r} "
                                    f"has {len(data)} bytes, not float32 {list(row.stored_shape)}")
        if verify and row.digest is not None:
            got = tensor_digest(data)
            if got != row.digest:
                raise self._corrupt(row, got)
        if not len(data):
            t = torch.empty(row.stored_shape)  # frombuffer rejects empty buffers
        else:
            with warnings.catch_warnings():
                # "the given buffer is not writable": nothing writes to an alignment matrix
                warnings.simplefilter("ignore", UserWarning)
                t = torch.frombuffer(data, dtype=torch.float32).reshape(row.stored_shape)
        return AlignmentMatrix(row.form, t, row.norm)  # type: ignore[arg-type]

    def _corrupt(self, row: ManifestRow, got: str) -> AlignmentSetError:
        return AlignmentSetError(
            f"{self.storage.describe(row.shard)}: tensor {row.module!r} is corrupt: its bytes "
            f"do not match the digest written when alignment set {self.content_id} was built "
            f"({got}, expected {row.digest}); rebuild it")

    def verify(self) -> list[str]:
        """Read every shard whole and check its size and SHA-256 against ``alignment.json``
        (what ``inspect --verify`` does); returns the shards checked.

        Raises:
            AlignmentSetError: naming the first shard that is missing or differs, or a set
                written before digests existed (nothing to check it against).
        """
        integrity = self.metadata.get("integrity")
        if not isinstance(integrity, dict):
            raise AlignmentSetError(
                f"{self.uri}: written before alignment sets carried digests: it cannot be "
                "verified (build it again to get them)")
        shards: dict[str, Any] = integrity.get("shards") or {}
        undigested = sorted({r.shard for r in self.rows.values()} - set(shards))
        if undigested:
            raise AlignmentSetError(f"{self.storage.describe(undigested[0])}: no digest in "
                                    f"{METADATA_FILE}")
        for path, rec in sorted(shards.items()):
            where = self.storage.describe(path)
            try:
                size = self.storage.size(path)
            except NotFoundError as e:
                raise AlignmentSetError(f"{where} is missing") from e
            if size != rec.get("bytes"):
                raise AlignmentSetError(f"{where} is corrupt: {size} bytes, {METADATA_FILE} "
                                        f"says {rec.get('bytes')}")
            if stream_sha256(self.storage, path, size) != rec.get("sha256"):
                raise AlignmentSetError(
                    f"{where} is corrupt: its SHA-256 does not match the one written when "
                    f"alignment set {self.content_id} was built; rebuild it")
        return sorted(shards)

    def summary(self) -> str:
        """A readable multi-line summary (what ``safelora-ray inspect`` prints)."""
        md = self.metadata
        kinds: dict[str, int] = {}
        forms: dict[str, int] = {}
        for r in self.rows.values():
            kinds[r.kind] = kinds.get(r.kind, 0) + 1
            forms[r.form] = forms.get(r.form, 0) + 1
        layers = sorted({r.layer for r in self.rows.values() if r.layer is not None})
        norms = [r.norm for r in self.rows.values()]
        if self.method_family == "salora":
            return self._salora_summary(kinds, forms, layers)
        layouts: dict[str, int] = {}
        for r in self.rows.values():
            layouts[r.layout] = layouts.get(r.layout, 0) + 1
        ks = [r.proj_rank for r in self.rows.values() if r.proj_rank is not None]
        kept = [r.proj_energy for r in self.rows.values() if r.proj_energy is not None]
        method = md.get("method", {})
        exact = ""
        if ks:
            rule = (f"rank {method['rank']}" if method.get("rank") is not None
                    else f"energy ≥ {method.get('energy')}")
            exact = (f"exact k        {rule}: k {min(ks)}..{max(ks)} (total {sum(ks)})"
                     + (f", energy kept {min(kept):.4f}..{max(kept):.4f}" if kept else ""))
        lines = [
            f"alignment set  {self.uri}",
            f"content id     {self.content_id}",
            f"method         {md.get('method', {}).get('name')}",
            f"base           {_source_line(md.get('base', {}))}",
            f"aligned        {_source_line(md.get('aligned', {}))}",
            *self._module_lines(kinds, forms, layers),
            exact,
            "weight layouts " + ", ".join(f"{k} {v}" for k, v in sorted(layouts.items()))
            + ("  (conv1d: GPT-2 Conv1D, stored d_in x d_out; V taken as d_out x d_in)"
               if "conv1d" in layouts else ""),
            self._bytes_line(),
            f"source bytes   {_human(int(md.get('source_bytes', 0)))} read",
            f"‖V‖_F          min {min(norms):.4g}  max {max(norms):.4g}" if norms else "",
            f"built          {md.get('created_at')} by safelora-ray {md.get('tool_version')}"
            f" on {md.get('build', {}).get('device')} x{md.get('build', {}).get('workers')}",
        ]
        return "\n".join(line for line in lines if line)

    def _module_lines(self, kinds: dict[str, int], forms: dict[str, int],
                      layers: list[int]) -> list[str]:
        span = f"{layers[0]}..{layers[-1]}" if layers else "-..-"
        return [f"targets        {','.join(self.targets)}",
                f"modules        {len(self.rows)} ("
                + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) + f"), layers {span}",
                "stored forms   " + ", ".join(f"{k} {v}" for k, v in sorted(forms.items()))]

    def _bytes_line(self) -> str:
        md = self.metadata
        return (f"stored bytes   {_human(int(md.get('stored_bytes', 0)))} in "
                f"{len(md.get('shards', []))} shard file(s)")

    def _salora_summary(self, kinds: dict[str, int], forms: dict[str, int],
                        layers: list[int]) -> str:
        md = self.metadata
        method = md.get("method", {})
        cal = md.get("calibration", {})
        energies = [r.energy for r in self.rows.values() if r.energy is not None]
        lines = [
            f"safety modules {self.uri}",
            f"content id     {self.content_id}",
            f"method         salora: V_s = top-{method.get('safety_rank')} eigenvectors of "
            "W Σ Wᵀ; folds apply C_s = I − V_s V_sᵀ",
            f"model          {_source_line(md.get('model', {}))}",
            f"calibration    {cal.get('uri')} (sha256 {str(cal.get('sha256'))[:16]}…, "
            f"{cal.get('samples')} samples, {cal.get('tokens')} counted tokens)",
            *self._module_lines(kinds, forms, layers),
            self._bytes_line(),
            f"energy         min {min(energies):.4g}  max {max(energies):.4g} (share of "
            "‖W Xᵀ‖_F² in V_s)" if energies else "",
            f"built          {md.get('created_at')} by safelora-ray {md.get('tool_version')}"
            f" on {md.get('build', {}).get('device')} x{md.get('build', {}).get('workers')}"
            f" ({md.get('build', {}).get('mode')})",
        ]
        return "\n".join(line for line in lines if line)


def metadata_head(content_id: str) -> dict[str, Any]:
    """The first keys of every set's ``alignment.json``: format, version, id, when, by what."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "content_id": content_id,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tool_version": __version__,
    }


def publish(out: Storage, rows: Iterable[ManifestRow], metadata: dict[str, Any],
            shards: dict[str, dict[str, Any]]) -> None:
    """Finish a set: write the manifest, then ``alignment.json`` (last: its presence makes the
    set complete) with the digests of the manifest and of each shard (``{"sha256", "bytes"}``
    per shard path, as the shard's writer took them)."""
    raw = parquet_bytes(manifest_table(rows))
    out.put_bytes(MANIFEST_FILE, raw)
    metadata = {**metadata, "integrity": {
        "tensor_digest": TENSOR_SCHEME, "manifest": file_sha256(raw),
        "shards": {p: shards[p] for p in sorted(shards)}}}
    out.put_bytes(METADATA_FILE, json.dumps(metadata, indent=2, ensure_ascii=False).encode())


#: Words of the warning about a set written before digests (said once per process and set).
UNVERIFIED = "was written before sets carried digests"


class _Once(logging.Filter):
    """Lets the warning about a set without digests through once per process and set, be it
    logged here or relayed from a worker (each worker opens the set too)."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if UNVERIFIED not in message:
            return True
        with self._lock:
            first = message not in self._seen
            self._seen.add(message)
        return first


logger.addFilter(_Once())


def _check_manifest(storage: Storage, metadata: dict[str, Any], raw: bytes) -> None:
    """The manifest's bytes against the digest in ``alignment.json``; a set from before
    digests gets a warning, once per process."""
    integrity = metadata.get("integrity")
    if integrity is None:
        logger.warning("alignment set %s %s: its files are used unverified (build it again to "
                       "get them)", storage.uri, UNVERIFIED)
        return
    want = integrity.get("manifest") if isinstance(integrity, dict) else None
    if want != file_sha256(raw):
        raise AlignmentSetError(
            f"{storage.describe(MANIFEST_FILE)} is corrupt: its SHA-256 does not match the one "
            f"in {METADATA_FILE} (changed since the set was built); rebuild the set")


def read_metadata(storage: Storage) -> dict[str, Any] | None:
    """The parsed ``alignment.json``, or None when absent; validates the format."""
    try:
        raw = storage.read(METADATA_FILE, max_bytes=MAX_METADATA_BYTES)
    except NotFoundError:
        return None
    where = storage.describe(METADATA_FILE)
    try:
        md = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AlignmentSetError(f"{where}: not JSON: {e}") from e
    if not isinstance(md, dict) or md.get("format") != FORMAT:
        raise AlignmentSetError(f"{where}: not a {FORMAT} metadata file")
    if md.get("format_version") != FORMAT_VERSION:
        raise AlignmentSetError(
            f"{where}: format version {md.get('format_version')} is not supported "
            f"(this safelora-ray reads version {FORMAT_VERSION})"
        )
    for key in ("content_id", "num_modules", "targets"):
        if key not in md:
            raise AlignmentSetError(f"{where}: field {key!r} is missing")
    return md


def _source_line(src: dict[str, Any]) -> str:
    rev = src.get("revision")
    return f"{src.get('uri')}" + (f" @ {rev}" if rev else "") + f" ({src.get('layout')})"


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{n} B"


__all__ = [
    "FORMAT",
    "MANIFEST_FILE",
    "METADATA_FILE",
    "SALORA_METHOD",
    "AlignmentSet",
    "ManifestRow",
    "SafeLoraError",
    "content_id",
    "manifest_table",
    "parquet_bytes",
    "publish",
    "read_metadata",
]
