"""An adapter's content digest: one hash over its framed config and weights bytes.

The digest names the exact bytes a sanitized output came from (the ledger's key, the
reports' ``source_digest``) and the bytes written (``output_digest``). It reads
``<scheme>:<hex>``:

- ``blake3`` (the default): a cryptographic hash that costs about a third of SHA-256's CPU
  even where SHA-256 runs on the CPU's own instructions (1.4 against 4.7 ms for a 7B r=8
  adapter's 8.4 MB, docs/benchmarks.md §14.1g). Every adapter of a fleet run is hashed
  twice (read, written), so this is a host's CPU per adapter, not a detail.
- ``sha256``: what records written before used; a digest in it is still recognised
  (:func:`adapter_digest` computes either, so a ledger keyed by one is compared in its own
  scheme), and the SafeMERGE safety adapter's digest stays in it (it is part of every record's
  key: another scheme would redo a whole fleet once).

The framing (``adapter_config.json\\0`` + config + ``\\0adapter_model.safetensors\\0`` +
weights) keeps the two parts from being confused with each other.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

import blake3

from safelora_ray.core.errors import AdapterError
from safelora_ray.formats.peft.config import CONFIG_NAME, WEIGHTS_NAME

logger = logging.getLogger(__name__)

#: The scheme of the digests this version computes.
DIGEST_SCHEME = "blake3"
#: Every scheme a digest may be in (the first is :data:`DIGEST_SCHEME`).
DIGEST_SCHEMES = ("blake3", "sha256")


def new_hasher(scheme: str = DIGEST_SCHEME) -> Any:
    """A fresh hash object of ``scheme`` (``update``/``hexdigest``; both release the GIL on
    large buffers)."""
    if scheme == "blake3":
        return blake3.blake3()
    if scheme == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown adapter digest scheme {scheme!r} (known: {DIGEST_SCHEMES})")


def digest_scheme(digest: object) -> str | None:
    """The scheme of ``digest`` (``"blake3:…"`` → ``"blake3"``); None for anything else."""
    if not isinstance(digest, str):
        return None
    scheme = digest.partition(":")[0]
    return scheme if scheme in DIGEST_SCHEMES else None


class OutputDigest:
    """The digest of an adapter fed its bytes as they are written (the config's first, as
    the digest frames them, then the weights file's as they go to disk): equal to
    :func:`adapter_digest` of the files, without reading them back."""

    #: One update may span several tensors (no per-tensor digests are taken).
    per_tensor = False

    def __init__(self, scheme: str = DIGEST_SCHEME) -> None:
        self.scheme = scheme
        self._h = new_hasher(scheme)
        self._known: str | None = None

    def adopt(self, value: str) -> None:
        """Take ``value`` (an adapter's digest in this scheme) as the digest of bytes known
        to be that adapter's, instead of hashing them again; nothing is to be fed after."""
        if digest_scheme(value) != self.scheme:
            raise ValueError(f"digest {value!r} is not in the scheme {self.scheme!r}")
        self._known = value

    def start(self, config_bytes: bytes | memoryview) -> None:
        self._h.update(CONFIG_NAME.encode() + b"\0")
        self._h.update(config_bytes)
        self._h.update(b"\0" + WEIGHTS_NAME.encode() + b"\0")

    def update(self, data: bytes | bytearray | memoryview, tensor: str | None = None) -> None:
        self._h.update(data)

    def value(self) -> str:
        return self._known or f"{self.scheme}:{self._h.hexdigest()}"


def adapter_digest(config_bytes: bytes | memoryview,
                   weights_bytes: bytes | bytearray | memoryview,
                   scheme: str = DIGEST_SCHEME) -> str:
    """``<scheme>:<hex>`` over the framed config and weights bytes."""
    d = OutputDigest(scheme)
    d.start(config_bytes)
    d.update(memoryview(weights_bytes))
    return d.value()


def output_digest(files: Sequence[tuple[str, str | bytes | bytearray]],
                  scheme: str = DIGEST_SCHEME) -> str:
    """The :func:`adapter_digest` of a written adapter, from ``write_adapter``'s result.

    Args:
        files: ``(relative path, local path or bytes)`` pairs including the config and the
            weights.
        scheme: The digest's scheme.

    Returns:
        ``<scheme>:<hex>``, equal to the ``digest`` of the adapter read back.

    Raises:
        AdapterError: ``files`` lacks the config or the weights.
    """
    paths = dict(files)
    for need in (CONFIG_NAME, WEIGHTS_NAME):
        if need not in paths:
            raise AdapterError(f"written adapter files lack {need}: {sorted(paths)}")
    d = OutputDigest(scheme)
    d.start(_file_bytes(paths[CONFIG_NAME]))
    weights = paths[WEIGHTS_NAME]
    if isinstance(weights, (bytes, bytearray)):  # written in memory
        d.update(weights)
    else:
        with open(weights, "rb") as f:
            while chunk := f.read(8 * 1024 * 1024):
                d.update(chunk)
    return d.value()


def _file_bytes(path: str | bytes | bytearray) -> bytes | bytearray:
    if isinstance(path, (bytes, bytearray)):
        return path
    with open(path, "rb") as f:
        return f.read()


__all__ = ["DIGEST_SCHEME", "DIGEST_SCHEMES", "OutputDigest", "adapter_digest",
           "digest_scheme", "new_hasher", "output_digest"]
