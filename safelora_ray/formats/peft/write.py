"""Writing the sanitized copy of a PEFT LoRA adapter: the same tensors, dtypes and metadata with
some B replaced, the config byte for byte, and the adapter's other non-weight files.
"""

from __future__ import annotations

import logging
import os
import posixpath
import shutil
from collections.abc import Mapping

import torch

from safelora_ray.core.errors import AdapterError, SafeLoraError
from safelora_ray.formats.peft.config import CONFIG_NAME, WEIGHTS_NAME, Fail
from safelora_ray.formats.peft.digest import OutputDigest
from safelora_ray.formats.peft.pairing import _first_non_finite
from safelora_ray.formats.peft.read import Adapter
from safelora_ray.formats.safetensors import SafetensorsWriter, TensorInfo, file_prefix
from safelora_ray.storage.base import Storage
from safelora_ray.storage.uri import normalize_relpath

logger = logging.getLogger(__name__)


def write_adapter(
    adapter: Adapter,
    new_b: Mapping[str, torch.Tensor],
    out_dir: str | None,
    storage_for_extras: Storage | None,
    prefix: str,
    digest: OutputDigest | None = None,
    *,
    new_a: Mapping[str, torch.Tensor] | None = None,
    config_bytes: bytes | None = None,
) -> list[tuple[str, str | bytes | bytearray]]:
    """Write the sanitized adapter into the local directory ``out_dir`` (or into memory).

    ``adapter_model.safetensors`` gets the input's tensors in the input's order, dtypes and
    ``__metadata__``, with lora_B of each module in ``new_b`` replaced (cast to B's dtype);
    every other tensor keeps its exact bytes. ``adapter_config.json`` is copied byte for byte,
    and the extra (non-weight) files are copied from ``storage_for_extras``. Skipped weight
    files are not copied: they would carry unsanitized weights.

    Args:
        adapter: The adapter as read by :func:`read_adapter`.
        new_b: Replacement B per module name (any float dtype, any device).
        out_dir: Local directory to write into (created if needed); None: into memory
            (for an upload: no local file written, read back and removed).
        storage_for_extras: Storage the adapter was read from, to copy its extra files;
            None to copy none.
        prefix: The adapter directory inside ``storage_for_extras``.
        digest: Fed every byte of the config and weights as they are written: then it holds
            :func:`output_digest` of the result without reading the files back.
        new_a: Replacement A per module (SafeMERGE writes both factors, SPEC §5).
        config_bytes: The output's ``adapter_config.json`` instead of the input's; with it, a
            module's rank may change (its new A and B must agree on it, and the config must
            give it: see :func:`~safelora_ray.formats.peft.config.unit_scaling_config`).

    Returns:
        ``(relative path, local path)`` pairs in publish order, ``adapter_config.json`` last
        (its presence marks an adapter as complete); ``(relative path, bytes)`` in memory.

    Raises:
        AdapterError: ``new_b`` names an unknown module, has a wrong shape, or becomes
            non-finite in B's dtype; or an extra file cannot be copied.
    """

    def fail(reason: str) -> AdapterError:
        return AdapterError(f"adapter {adapter.adapter_id!r}: {reason}")

    replaced: dict[str, torch.Tensor] = {}
    for which, new in (("B", new_b), ("A", new_a or {})):
        for module, t in new.items():
            mod = adapter.modules.get(module)
            if mod is None:
                raise fail(f"no LoRA module {module!r} to replace {which} of")
            old = mod.b if which == "B" else mod.a
            # Only a new config may change a rank (the dimension B and A share).
            fixed = 0 if which == "B" else 1
            same = (tuple(t.shape) == tuple(old.shape) if config_bytes is None
                    else t.dim() == 2 and t.shape[fixed] == old.shape[fixed])
            if not same:
                raise fail(f"module {module!r}: new lora_{which} has shape {list(t.shape)}, "
                           f"expected {list(old.shape)}")
            key = mod.b_key if which == "B" else mod.a_key
            replaced[key] = t.detach().to(device="cpu", dtype=old.dtype).contiguous()
    for module in new_a or {}:
        mod = adapter.modules[module]
        b = replaced.get(mod.b_key, mod.b)
        if replaced[mod.a_key].shape[0] != b.shape[1]:
            raise fail(f"module {module!r}: new lora_A has rank {replaced[mod.a_key].shape[0]} "
                       f"but lora_B {b.shape[1]}")
    bad = _first_non_finite(replaced)
    if bad is not None:
        mod = next(m for m in adapter.modules.values() if bad in (m.a_key, m.b_key))
        which = "B" if bad == mod.b_key else "A"
        raise fail(f"module {mod.module!r}: new lora_{which} has non-finite values in "
                   f"{replaced[bad].dtype}")

    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
    files: list[tuple[str, str | bytes | bytearray]] = []

    weights_local = os.path.join(out_dir or "", WEIGHTS_NAME)
    layout = [(name, info.dtype, tuple(replaced[name].shape) if name in replaced else info.shape)
              for name, info in adapter.tensor_infos.items()]
    config_out = adapter.config_bytes if config_bytes is None else config_bytes
    # An adapter written back as it was read (nothing replaced, the same header: the same
    # bytes) has the digest taken when it was read: not hashed a second time.
    same = (digest is not None and not replaced and config_out == adapter.config_bytes
            and digest.scheme in adapter.digests and adapter.weights is not None
            and _same_prefix(adapter.weights, file_prefix(layout, adapter.metadata)))
    if digest is not None:
        if same:
            digest.adopt(adapter.digests[digest.scheme])
        else:
            digest.start(config_out)
    with SafetensorsWriter(weights_local, layout, adapter.metadata,
                           hasher=None if same else digest,
                           in_memory=out_dir is None) as writer:
        for names, data in _pieces(adapter, writer.tensors, replaced):
            if data is None:
                writer.write(names[0], replaced.get(names[0], adapter.tensors[names[0]]))
            else:
                writer.write_run(len(names), data)
    files.append((WEIGHTS_NAME, weights_local if writer.data is None else writer.data))

    if storage_for_extras is not None:
        prefix = prefix.strip("/")
        for rel, size in adapter.extra_files:
            try:
                rel_ok = normalize_relpath(rel)
            except SafeLoraError as e:
                raise fail(f"extra file {rel!r} has an unsafe path: {e}") from e
            if not rel_ok:
                continue
            src = posixpath.join(prefix, rel_ok)
            if out_dir is None:
                files.append((rel_ok, _read_extra(storage_for_extras, src, size, fail)))
                continue
            local = os.path.join(out_dir, *rel_ok.split("/"))
            _copy_extra(storage_for_extras, src, size, local, fail)
            files.append((rel_ok, local))

    if out_dir is None:
        files.append((CONFIG_NAME, bytes(config_out)))
        return files
    config_local = os.path.join(out_dir, CONFIG_NAME)
    with open(config_local, "wb") as f:
        f.write(config_out)
    files.append((CONFIG_NAME, config_local))
    return files


def _same_prefix(weights: bytearray | memoryview, prefix: bytes) -> bool:
    return len(weights) >= len(prefix) and memoryview(weights)[:len(prefix)] == prefix


def _pieces(adapter: Adapter, planned: Mapping[str, TensorInfo],
            replaced: Mapping[str, torch.Tensor]) -> list[tuple[list[str], memoryview | None]]:
    """The output's tensors in layout order, grouped for writing: runs of tensors kept as they
    are and lying back to back in the input come with their bytes in the input's buffer
    (written whole: one write and one hash a run, not one a tensor); any other tensor comes
    alone, with None."""
    src = None if adapter.weights is None else memoryview(adapter.weights)
    pieces: list[tuple[list[str], memoryview | None]] = []
    run: list[str] = []
    start = end = 0
    for name, info in planned.items():
        old = adapter.tensor_infos.get(name)
        kept = (src is not None and old is not None and name not in replaced
                and old.nbytes == info.nbytes > 0 and old.end <= src.nbytes)
        if kept and run and old.start == end:
            run.append(name)
            end = old.end
            continue
        if run:
            pieces.append((run, src[start:end]))
            run = []
        if kept:
            run, start, end = [name], old.start, old.end
        else:
            pieces.append(([name], None))
    if run:
        pieces.append((run, src[start:end]))
    return pieces


def _read_extra(storage: Storage, path: str, size: int, fail: Fail) -> bytes:
    try:
        # Extras are small (README, tokenizer files); allow some growth since listing.
        return storage.read(path, max_bytes=max(size, 1) * 2 + 1024**2)
    except SafeLoraError as e:
        raise fail(f"cannot copy extra file {storage.describe(path)}: {e}") from e


def _copy_extra(storage: Storage, path: str, size: int, local: str, fail: Fail) -> None:
    os.makedirs(os.path.dirname(local), exist_ok=True)
    try:
        src = storage.local_path(path)
        if src is not None:
            shutil.copyfile(src, local)
        else:
            data = _read_extra(storage, path, size, fail)
            with open(local, "wb") as f:
                f.write(data)
    except AdapterError:  # already says which file
        raise
    except (OSError, SafeLoraError) as e:
        raise fail(f"cannot copy extra file {storage.describe(path)}: {e}") from e

