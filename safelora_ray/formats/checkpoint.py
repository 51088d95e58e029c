"""Hugging Face checkpoints in safetensors, opened lazily.

A checkpoint is a storage root holding either ``model.safetensors.index.json`` (sharded) or a
single ``model.safetensors``. Only the index and the headers of the shards that hold wanted
tensors are read; tensor bytes are read later, one tensor at a time, by whoever needs them.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from safelora_ray.core.errors import (
    CheckpointError,
    NotFoundError,
    SafetensorsFormatError,
    StorageError,
)
from safelora_ray.formats.safetensors import DTYPES, SafetensorsHeader, TensorInfo, read_header
from safelora_ray.storage import Storage, open_storage

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
#: The model's Hugging Face config (``model_type``, ``architectures``).
CONFIG_FILE = "config.json"
MAX_CONFIG_BYTES = 16 * 1024 * 1024
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin")
#: An index larger than this is not an index (a 70B index is ~100 KB).
MAX_INDEX_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class TensorRef(TensorInfo):
    """Where one tensor's bytes live, enough for any worker to read it: its header entry
    (name, dtype, shape, absolute byte range) in file ``path`` of the checkpoint at ``uri``."""

    uri: str
    path: str

    def describe(self) -> str:
        return f"tensor {self.name!r} in {self.uri.rstrip('/')}/{self.path}"


def read_ref(storage: Storage, ref: TensorRef, buffer: Any = None
             ) -> tuple[torch.Tensor, Any]:
    """Read one tensor's bytes with a single ranged read.

    Args:
        storage: Where the tensor's file is.
        ref: The tensor.
        buffer: A buffer of exactly ``ref.nbytes`` to read into (reused: its pages are
            already mapped): a ``bytearray`` or a uint8 numpy array, or a uint8 tensor (pinned
            host memory, from which a copy to a GPU runs asynchronously); None allocates a
            fresh one.

    Returns:
        The tensor (a view on the buffer, on CPU) and the raw bytes (for hashing).
    """
    torch_dtype = DTYPES[ref.dtype][0]
    if torch_dtype is None:
        raise CheckpointError(f"{ref.describe()}: dtype {ref.dtype} has no torch equivalent")
    if isinstance(buffer, torch.Tensor):
        if buffer.dtype != torch.uint8 or buffer.numel() != ref.nbytes:
            raise ValueError(f"buffer of {buffer.numel()} {buffer.dtype} for {ref.nbytes} bytes "
                             f"of {ref.name}")
        raw = memoryview(buffer.numpy()).cast("B")
        if ref.nbytes:
            storage.read_into(ref.path, ref.start, raw)
            return buffer.view(torch_dtype).reshape(ref.shape), raw
        return torch.empty(0, dtype=torch_dtype).reshape(ref.shape), raw
    if buffer is not None and len(buffer) != ref.nbytes:
        raise ValueError(f"buffer of {len(buffer)} bytes for {ref.nbytes} bytes of {ref.name}")
    buf = buffer if buffer is not None else bytearray(ref.nbytes)
    if ref.nbytes:
        storage.read_into(ref.path, ref.start, memoryview(buf))
        t = torch.frombuffer(buf, dtype=torch_dtype)
    else:
        t = torch.empty(0, dtype=torch_dtype)
    return t.reshape(ref.shape), buf


@dataclass
class Checkpoint:
    """A lazily opened safetensors checkpoint.

    Attributes:
        storage: Where the checkpoint lives.
        weight_map: Tensor name → file, from the index (or the single file's header).
        layout: ``"sharded"`` or ``"single"``.
    """

    storage: Storage
    weight_map: dict[str, str]
    layout: str
    _headers: dict[str, SafetensorsHeader] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _config: dict[str, Any] | None = field(default=None, repr=False)
    _config_read: bool = field(default=False, repr=False)

    @property
    def uri(self) -> str:
        return self.storage.uri

    @classmethod
    def open(cls, uri_or_storage: str | Storage) -> Checkpoint:
        """Open a checkpoint by URI; reads the index (sharded) or the header (single file).

        Raises:
            CheckpointError: no safetensors checkpoint there, a pickle-only checkpoint, or a
                malformed index.
        """
        storage = (
            open_storage(uri_or_storage) if isinstance(uri_or_storage, str) else uri_or_storage
        )
        if storage.exists(INDEX_FILE):
            weight_map = _read_index(storage)
            return cls(storage, weight_map, "sharded")
        if storage.exists(SINGLE_FILE):
            header = _header(storage, SINGLE_FILE)
            ckpt = cls(storage, dict.fromkeys(header.tensors, SINGLE_FILE), "single")
            ckpt._headers[SINGLE_FILE] = header
            return ckpt
        pickles = [p for p in PICKLE_FILES if storage.exists(p)]
        if pickles:
            raise CheckpointError(
                f"{storage.uri}: only a pickle checkpoint ({pickles[0]}) is there; pickles are "
                "never loaded: convert it to safetensors (model.safetensors[.index.json])"
            )
        raise CheckpointError(
            f"{storage.uri}: no safetensors checkpoint ({INDEX_FILE} or {SINGLE_FILE}) found"
        )

    def header(self, path: str) -> SafetensorsHeader:
        """The (cached) parsed header of one file of the checkpoint."""
        with self._lock:
            cached = self._headers.get(path)
        if cached is not None:
            return cached
        header = _header(self.storage, path)
        with self._lock:
            self._headers[path] = header
        return header

    def ref(self, name: str) -> TensorRef:
        """The :class:`TensorRef` of tensor ``name`` (reads its file's header once)."""
        path = self.weight_map.get(name)
        if path is None:
            raise CheckpointError(f"{self.uri}: tensor {name!r} is not in the checkpoint")
        info = self.header(path).tensors.get(name)
        if info is None:
            raise CheckpointError(
                f"{self.uri}: the index maps tensor {name!r} to {path}, but that file's header "
                "does not contain it"
            )
        return TensorRef(name=name, dtype=info.dtype, shape=tuple(info.shape), start=info.start,
                         end=info.end, uri=self.uri, path=path)

    def versions(self, paths: set[str] | None = None) -> dict[str, str]:
        """Version tokens (ETag, commit, mtime) of the index and of the given files."""
        files = set(paths if paths is not None else self.weight_map.values())
        if self.layout == "sharded":
            files.add(INDEX_FILE)
        return {p: self.storage.version(p) for p in sorted(files)}

    def source_info(self, paths: set[str] | None = None, *,
                    config: bool = False) -> dict[str, Any]:
        """What identifies this checkpoint as an input: URI, layout, the version of the index
        and of the given files (default: every weights file), the Hub revision if any.

        ``config``: ``config.json`` too, where there is one (it decides how the weights are
        read: a corrected ``model_type`` is another input)."""
        files = set(paths if paths is not None else self.weight_map.values())
        if config and self.model_config() is not None:
            files.add(CONFIG_FILE)
        info: dict[str, Any] = {"uri": self.uri, "layout": self.layout,
                                "files": self.versions(files)}
        commit = getattr(self.storage, "commit", None)
        if commit:
            info["revision"] = commit
        return info

    @property
    def files(self) -> list[str]:
        """The weights files, sorted."""
        return sorted(set(self.weight_map.values()))

    def model_config(self) -> dict[str, Any] | None:
        """The parsed ``config.json`` next to the weights, or None when there is none.

        Raises:
            CheckpointError: it exists but is not a JSON object.
        """
        with self._lock:
            if self._config_read:
                return self._config
        where = self.storage.describe(CONFIG_FILE)
        try:
            raw = self.storage.read(CONFIG_FILE, max_bytes=MAX_CONFIG_BYTES)
        except NotFoundError:
            raw = None
        except StorageError as e:
            raise CheckpointError(f"{where}: cannot read: {e}") from e
        config = None
        if raw is not None:
            try:
                config = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{where}: not valid JSON: {e}") from e
            if not isinstance(config, dict):
                raise CheckpointError(f"{where}: not a JSON object")
        with self._lock:
            self._config, self._config_read = config, True
        return config


def _header(storage: Storage, path: str) -> SafetensorsHeader:
    try:
        return read_header(storage, path)
    except StorageError as e:
        raise CheckpointError(f"{storage.describe(path)}: cannot read: {e}") from e


def _read_index(storage: Storage) -> dict[str, str]:
    where = storage.describe(INDEX_FILE)
    raw = storage.read(INDEX_FILE, max_bytes=MAX_INDEX_BYTES)
    try:
        index = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{where}: not a JSON index: {e}") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{where}: missing or empty 'weight_map'")
    for name, path in weight_map.items():
        if not isinstance(path, str) or not path.endswith(".safetensors"):
            raise CheckpointError(f"{where}: tensor {name!r} maps to {path!r}, not a .safetensors")
        if path.startswith("/") or ".." in path.split("/"):
            raise CheckpointError(f"{where}: tensor {name!r} maps outside the checkpoint: {path!r}")
    return dict(weight_map)


__all__ = ["Checkpoint", "SafetensorsFormatError", "TensorRef", "read_ref"]
