"""Reading a PEFT LoRA adapter: both files with one whole-object read each, validated strictly
and paired (SPEC §2: DoRA, non-LoRA PEFT types, embedding/conv LoRA, pickle-only adapters,
lone or mis-ranked factors and non-finite values are refused with a message naming the
adapter and the culprit).

A PEFT LoRA adapter is a directory holding ``adapter_config.json`` and
``adapter_model.safetensors``.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from safelora_ray.core.errors import AdapterError, ChangedError, NotFoundError, SafeLoraError
from safelora_ray.formats.peft.config import (
    CONFIG_NAME,
    MAX_CONFIG_BYTES,
    PICKLE_WEIGHTS_NAME,
    WEIGHTS_NAME,
    _parse_config,
    check_config,
)
from safelora_ray.formats.peft.digest import DIGEST_SCHEME, adapter_digest
from safelora_ray.formats.peft.pairing import LoraModule, _pair_modules
from safelora_ray.formats.safetensors import (
    TensorInfo,
    buffer_tensor,
    parse_buffer_header,
    require_little_endian,
)
from safelora_ray.storage.base import ObjectInfo, Storage

logger = logging.getLogger(__name__)

#: Default cap on ``adapter_model.safetensors`` (read whole into memory).
DEFAULT_MAX_ADAPTER_BYTES = 4 * 1024**3

#: Suffixes of files that hold weights; they are listed as skipped and never opened (a pickle
#: is code, and an unsanitized copy of the weights must not travel with the sanitized one).
WEIGHT_SUFFIXES = (
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".pkl",
    ".pickle",
    ".safetensors",
    ".gguf",
    ".h5",
    ".msgpack",
)


@dataclass
class Adapter:
    """A validated PEFT LoRA adapter held in memory.

    Attributes:
        adapter_id: Identifier used in messages and reports.
        uri: The adapter directory's URI.
        config: Parsed ``adapter_config.json``.
        config_bytes: Its raw bytes (written back unchanged).
        metadata: The safetensors ``__metadata__`` map, or None.
        tensors: Every tensor of ``adapter_model.safetensors`` by name, in file order; views
            into one buffer holding the file.
        modules: LoRA modules by module name, in file order of their A tensor.
        untouched: Names of tensors kept as they are (LoRA biases, ``modules_to_save``
            weights, anything else that is not a lora_A/lora_B pair).
        modules_to_save: Module names from the config's ``modules_to_save``.
        extra_files: ``(path relative to the adapter, size)`` of the other non-weight files.
        skipped_files: Relative paths of other weight files (never opened, never copied).
        digest: ``<scheme>:<hex>`` over the config and weights bytes (see
            :func:`~safelora_ray.formats.peft.digest.adapter_digest`), in the first scheme
            :func:`read_adapter` was asked for.
        base_model: The config's ``base_model_name_or_path`` (may be None).
        nbytes: Size of ``adapter_model.safetensors`` in bytes.
        tensor_infos: The header entry of every tensor (dtype string, shape, offsets).
        digests: The digest in each scheme asked for, by scheme.
        weights: The bytes of ``adapter_model.safetensors`` that :attr:`tensors` view (a
            writer copies runs of unchanged tensors from it whole); None when the tensors
            were made otherwise.
    """

    adapter_id: str
    uri: str
    config: dict[str, Any]
    config_bytes: bytes
    metadata: dict[str, str] | None
    tensors: dict[str, torch.Tensor]
    modules: dict[str, LoraModule]
    untouched: list[str]
    modules_to_save: list[str]
    extra_files: list[tuple[str, int]]
    skipped_files: list[str]
    digest: str
    base_model: str | None
    nbytes: int
    tensor_infos: dict[str, TensorInfo] = field(default_factory=dict, repr=False)
    digests: dict[str, str] = field(default_factory=dict, repr=False)
    weights: bytearray | memoryview | None = field(default=None, repr=False)


def read_adapter(
    storage: Storage,
    prefix: str,
    adapter_id: str,
    *,
    max_bytes: int = DEFAULT_MAX_ADAPTER_BYTES,
    buffer: Callable[[int], bytearray] | None = None,
    listing: Sequence[ObjectInfo] | None = None,
    schemes: Sequence[str] = (DIGEST_SCHEME,),
) -> Adapter:
    """Read, validate and pair one PEFT LoRA adapter.

    Args:
        storage: Where the adapter lives.
        prefix: The adapter directory inside ``storage`` (``""`` for its root).
        adapter_id: Name used in every message.
        max_bytes: Largest ``adapter_model.safetensors`` accepted.
        buffer: Gives a buffer of at least the size asked for, to read the weights into
            (a reused one: reading into fresh memory costs a page fault per 4 KiB); default
            a new bytearray. The adapter's tensors are views into it.
        listing: ``storage.list(prefix)`` when the caller has it already (one request saved
            on an object store). The files are then read as listed: one rewritten since is a
            :class:`~safelora_ray.core.errors.ChangedError` (raised as is, not as an
            :class:`AdapterError`: the caller lists again), never a mix of two versions.
        schemes: The digests to take of its bytes; :attr:`Adapter.digest` is in the first
            (a second one compares the adapter with a record keyed in another scheme).

    Returns:
        The adapter, its tensors views into a single buffer holding the weights file.

    Raises:
        AdapterError: The adapter is missing, malformed or not covered by the rule; the
            message starts with ``adapter '<adapter_id>':`` and names the file, tensor or
            module at fault.
    """
    require_little_endian()
    prefix = prefix.strip("/")
    uri = storage.describe(prefix)

    def fail(reason: str) -> AdapterError:
        return AdapterError(f"adapter {adapter_id!r}: {reason}")

    # One listing gives every file and its size; no per-file existence probes.
    try:
        listed = _list_dir(storage, prefix, listing)
    except SafeLoraError as e:
        raise fail(f"cannot list {uri}: {e}") from e
    sizes = dict(listed)
    cut = len(prefix) + 1 if prefix else 0
    pinned = {o.path[cut:]: o.version for o in listing or ()}

    if CONFIG_NAME not in sizes:
        raise fail(f"{CONFIG_NAME} is missing in {uri}")
    config_path = posixpath.join(prefix, CONFIG_NAME)
    try:
        config_bytes = storage.read(config_path, max_bytes=MAX_CONFIG_BYTES,
                                    if_version=pinned.get(CONFIG_NAME))
    except ChangedError:
        raise
    except SafeLoraError as e:
        raise fail(f"cannot read {CONFIG_NAME}: {e}") from e
    config = _parse_config(config_bytes, fail)
    check_config(config, fail)

    if WEIGHTS_NAME not in sizes:
        if PICKLE_WEIGHTS_NAME in sizes:
            raise fail(
                f"pickle-only adapter: {uri} has {PICKLE_WEIGHTS_NAME} but no {WEIGHTS_NAME}; "
                "pickles are never unpickled; convert the adapter to safetensors"
            )
        # Listings skip what the storage refuses to serve (a symlink out of its root): name
        # the reason rather than calling the file missing.
        try:
            storage.size(posixpath.join(prefix, WEIGHTS_NAME))
        except NotFoundError:
            pass
        except SafeLoraError as e:
            raise fail(f"cannot read {WEIGHTS_NAME}: {e}") from e
        raise fail(f"{WEIGHTS_NAME} is missing in {uri}")

    weights_path = posixpath.join(prefix, WEIGHTS_NAME)
    weights_uri = storage.describe(weights_path)
    size = sizes[WEIGHTS_NAME]
    if size > max_bytes:
        raise fail(f"{WEIGHTS_NAME} is {size} bytes, more than the {max_bytes} allowed")
    # Writable (not bytes) so the tensor views are; filled by one read. A caller's buffer is
    # used as it is: no second one is allocated and zero-filled (8 MB under the GIL for a 7B
    # adapter, docs/benchmarks.md §14.1e).
    buf: bytearray | memoryview = (memoryview(buffer(size))[:size]
                                   if buffer is not None and size else bytearray(size))
    try:
        if size:
            storage.read_into(weights_path, 0, memoryview(buf),
                              if_version=pinned.get(WEIGHTS_NAME))
    except ChangedError:
        raise
    except SafeLoraError as e:
        raise fail(f"cannot read {WEIGHTS_NAME}: {e}") from e
    try:
        header = parse_buffer_header(buf, weights_path, weights_uri)
    except SafeLoraError as e:
        raise fail(f"{WEIGHTS_NAME} is not a valid safetensors file: {e}") from e

    tensors: dict[str, torch.Tensor] = {}
    for name, info in header.tensors.items():
        try:
            tensors[name] = buffer_tensor(buf, weights_uri, info)
        except SafeLoraError as e:
            raise fail(f"{WEIGHTS_NAME}: {e}") from e

    modules, untouched = _pair_modules(config, header, tensors, fail, buf)

    extra_files: list[tuple[str, int]] = []
    skipped_files: list[str] = []
    for rel, n in listed:
        if rel in (CONFIG_NAME, WEIGHTS_NAME):
            continue
        if is_weight_file(rel):
            skipped_files.append(rel)
        else:
            extra_files.append((rel, n))
    if skipped_files:
        logger.info(
            "adapter %r: not opening weight file(s) %s (only %s is read)",
            adapter_id,
            ", ".join(skipped_files),
            WEIGHTS_NAME,
        )

    digests = {sc: adapter_digest(config_bytes, buf, sc) for sc in dict.fromkeys(schemes)}
    return Adapter(
        adapter_id=adapter_id,
        uri=uri,
        config=config,
        config_bytes=config_bytes,
        metadata=header.metadata,
        tensors=tensors,
        modules=modules,
        untouched=untouched,
        modules_to_save=list(config.get("modules_to_save") or []),
        extra_files=extra_files,
        skipped_files=skipped_files,
        digest=digests[schemes[0]],
        base_model=config.get("base_model_name_or_path"),
        nbytes=size,
        tensor_infos=dict(header.tensors),
        digests=digests,
        weights=buf,
    )


def is_weight_file(path: str) -> bool:
    """Whether ``path`` names a weights file (by suffix, case-insensitively)."""
    return path.lower().endswith(WEIGHT_SUFFIXES)


def _list_dir(storage: Storage, prefix: str,
              listing: Sequence[ObjectInfo] | None = None) -> list[tuple[str, int]]:
    """``(path relative to prefix, size)`` of every object under the directory ``prefix``
    (from ``listing``, ``storage.list(prefix)`` made by the caller, when given)."""
    out: list[tuple[str, int]] = []
    cut = len(prefix) + 1 if prefix else 0
    for obj in storage.list(prefix) if listing is None else listing:
        if prefix and not obj.path.startswith(prefix + "/"):
            continue  # a sibling that merely shares the name's beginning
        out.append((obj.path[cut:], obj.size))
    return out
