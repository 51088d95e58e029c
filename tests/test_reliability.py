"""Reliability and security (issue #5): a corpus of bad inputs run through a real fleet.

One catalog holds good adapters of three tenants mixed with one adapter per bad-input case;
a single fleet run on a local Ray must refuse each bad one with an error naming the adapter
and what is wrong, sanitize every good one exactly as the dense float64 reference says, write
nothing for the bad ones, leave no temp files and leave every input byte-identical. Bad
checkpoints (``build``), bad alignment sets (``sanitize``), bad ids (a manifest fleet run) and
bad nightly configs are tried the same way. The security part checks that pickles are never
unpickled (armed pickle bombs), that size caps hold against huge sparse files, that outputs
stay under ``--out`` and inside their tenant's prefix, that symlinks out of a catalog are
reported rather than followed or lost, and that secrets never reach logs or reports.

:data:`CORPUS` lists every case; ``docs/reliability.md`` mirrors it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file

from safelora_ray import BuildConfig, build
from safelora_ray.cli.demo import write_adapter
from safelora_ray.cli.nightly import NightlyConfig
from safelora_ray.cli.nightly import main as nightly_main
from safelora_ray.core.errors import (
    AlignmentSetError,
    SafeLoraError,
    StorageError,
)
from safelora_ray.formats.alignment_set import AlignmentSet
from safelora_ray.formats.checkpoint import Checkpoint
from safelora_ray.formats.peft import read_adapter
from safelora_ray.pipelines.sanitize.driver import SanitizeConfig, SanitizeResult, sanitize
from safelora_ray.pipelines.sanitize.ledger import ledger_path
from safelora_ray.planning.catalog import iter_catalog
from safelora_ray.storage import open_storage
from safelora_ray.storage.local import LocalStorage
from tests.factory import Arch, aligned_from, llama_tensors, write_checkpoint
from tests.reference import dense_c, sanitize_dense

pytestmark = pytest.mark.usefixtures("ray_local")

PFX = "base_model.model."
TARGETS = ("q_proj", "v_proj")
ARCH = Arch(layers=2, hidden=32, heads=4, kv_heads=4, intermediate=48, vocab=64)
MODULES = tuple(f"model.layers.{i}.self_attn.{p}" for i in range(ARCH.layers) for p in TARGETS)
HIDDEN = (".tmp-", ".staging-", ".trash-")
THRESHOLD = 0.35
MAX_ADAPTER_BYTES = 1024**2  # the fleet run's cap; every good adapter is ~5 KB


# ----------------------------------------------------------------------------------------------
# The corpus: every bad input tried, where it enters, and what its error must say
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One bad input.

    Attributes:
        id: Case id (adapter cases: also the adapter directory name).
        where: ``adapter`` (directory fleet run), ``id`` (manifest fleet run), ``checkpoint``
            (build), ``alignment`` (sanitize with a broken set), ``config`` (nightly YAML).
        what: What is wrong, in words (the doc's table).
        must: Substrings the error message must contain.
    """

    id: str
    where: str
    what: str
    must: tuple[str, ...]


def _c(id: str, where: str, what: str, *must: str) -> Case:
    return Case(id, where, what, tuple(must))


ST = "adapter_model.safetensors"
CFG = "adapter_config.json"

CORPUS: tuple[Case, ...] = (
    # -- adapters: the weights file ------------------------------------------------------------
    _c("st-truncated", "adapter", "weights file cut 100 bytes short", "file is truncated"),
    _c("st-empty", "adapter", "weights file of 0 bytes", "file is 0 bytes, too short"),
    _c("st-too-short", "adapter", "weights file of 5 bytes", "file is 5 bytes, too short"),
    _c("st-header-len-0", "adapter", "header length 0", "header length is 0"),
    _c("st-header-past-end", "adapter", "header length past the end of the file",
       "runs past the end of the file"),
    _c("st-header-len-2p62", "adapter", "header length 2^62",
       "header length 4611686018427387904 exceeds the limit"),
    _c("st-header-not-utf8", "adapter", "header bytes not UTF-8", "not valid UTF-8"),
    _c("st-header-not-json", "adapter", "header not JSON", "header is not valid JSON"),
    _c("st-header-array", "adapter", "header is a JSON array", "header is a JSON array"),
    _c("st-offsets-overlap", "adapter", "two tensors' data_offsets overlap", "leave an overlap"),
    _c("st-offsets-gap", "adapter", "a gap between two tensors' data", "leave a gap"),
    _c("st-offsets-reversed", "adapter", "data_offsets end before begin", "end before begin"),
    _c("st-trailing-bytes", "adapter", "bytes after the last tensor", "trailing data"),
    _c("st-unknown-dtype", "adapter", "dtype F31", "unknown dtype 'F31'"),
    _c("st-shape-bytes", "adapter", "shape disagrees with the byte count",
       "hold 512 bytes but shape [4, 31] of F32 needs 496"),
    _c("st-negative-shape", "adapter", "negative dimension", "non-negative integers"),
    _c("st-duplicate-key", "adapter", "a tensor name twice in the header",
       "duplicate JSON key"),
    _c("st-unknown-field", "adapter", "extra field in a tensor entry", "unexpected field"),
    _c("st-metadata-type", "adapter", "__metadata__ value not a string",
       "__metadata__['format'] must be a string"),
    _c("st-int-dtype", "adapter", "lora_A stored as I32", "has dtype I32"),
    # -- adapters: values and pairing -----------------------------------------------------------
    _c("nan-in-b", "adapter", "NaN in a lora_B", "non-finite values (1 NaN, 0 Inf)",
       "layers.1.self_attn.q_proj.lora_B"),
    _c("inf-in-a", "adapter", "Inf in a lora_A", "non-finite values (0 NaN, 1 Inf)",
       "layers.0.self_attn.v_proj.lora_A"),
    _c("rank-config", "adapter", "tensors r=4, config r=8",
       "the tensors have r=4 but adapter_config.json gives r=8"),
    _c("rank-a-vs-b", "adapter", "lora_A r=4, lora_B r=3", "rank mismatch: lora_A is [4, 32]"),
    _c("lone-lora-a", "adapter", "a lora_A without its lora_B", "but no lora_B"),
    _c("no-lora-modules", "adapter", "no lora_A/lora_B pairs at all", "has no LoRA modules"),
    _c("module-not-in-set", "adapter", "a k_proj module; the set has q/v only",
       "have no entry in alignment set", "self_attn.k_proj"),
    _c("other-base-model", "adapter", "built for a hidden-48 model",
       "alignment set's weight is 32x32", "another base model"),
    _c("conv-lora", "adapter", "4-D (conv) LoRA factors", "conv LoRA"),
    _c("embedding-lora", "adapter", "lora_embedding_A/B tensors", "embedding LoRA"),
    _c("dora", "adapter", "use_dora + magnitude vectors", "DoRA adapter"),
    # -- adapters: the config --------------------------------------------------------------------
    _c("config-not-json", "adapter", "config cut mid-object", "adapter_config.json is not valid"),
    _c("config-not-utf8", "adapter", "config bytes not UTF-8", "adapter_config.json is not valid"),
    _c("config-array", "adapter", "config is a JSON array", "is a JSON array, not an object"),
    _c("config-no-peft-type", "adapter", "no peft_type", "has no peft_type"),
    _c("config-not-lora", "adapter", "peft_type IA3", "peft_type 'IA3'", "not LoRA"),
    _c("config-r-not-int", "adapter", "r is a string", "r must be a positive integer"),
    _c("config-bad-regex", "adapter", "rank_pattern key is not a regex",
       "is not a valid regular expression"),
    _c("config-too-big", "adapter", "2 MiB (sparse) config", "more than the 1048576 allowed"),
    # -- adapters: files, links, sizes, names ----------------------------------------------------
    _c("pickle-only", "adapter", "only adapter_model.bin (an armed pickle bomb)",
       "pickle-only adapter", "never unpickled"),
    _c("weights-missing", "adapter", "config but no weights", "adapter_model.safetensors is "
       "missing"),
    _c("weights-too-big", "adapter", "8 GiB sparse weights file over max_adapter_bytes",
       "more than the 1048576 allowed"),
    _c("weights-symlink-out", "adapter", "weights file is a symlink out of the catalog",
       "outside the storage root"),
    _c("config-symlink-out", "adapter", "adapter_config.json is a symlink out of the catalog",
       "outside the storage root", "never followed"),
    _c("dir-symlink-out", "adapter", "the adapter directory is a symlink out of the catalog",
       "outside the storage root", "never followed"),
    _c("bad name", "adapter", "directory name with a space", "unsupported characters"),
    _c("_private", "adapter", "directory name starting with '_'", "reserved"),
    # -- ids in a manifest -------------------------------------------------------------------------
    _c("id-dotdot", "id", "id '../escape'", "'..' segment"),
    _c("id-absolute", "id", "id '/abs/path'", "empty or absolute"),
    _c("id-cross-tenant", "id", "id 'tenant-0/../tenant-1/x'", "'..' segment"),
    _c("id-duplicate", "id", "the same id twice", "appears twice"),
    _c("id-backslash", "id", "id 'tenant-0\\\\x'", "empty or absolute"),
    _c("uri-missing", "id", "uri of a directory that does not exist",
       "adapter_config.json is missing"),
    _c("uri-bad-scheme", "id", "an https:// (pre-signed) uri", "unsupported URI scheme"),
    # -- checkpoints (build) -----------------------------------------------------------------------
    _c("ckpt-truncated-shard", "checkpoint", "a base shard cut short", "file is truncated"),
    _c("ckpt-header-2p62", "checkpoint", "a shard's header length is 2^62", "exceeds the limit"),
    _c("ckpt-pickle-only", "checkpoint", "only pytorch_model.bin (an armed pickle bomb)",
       "only a pickle checkpoint", "never loaded"),
    _c("ckpt-index-not-json", "checkpoint", "index is not JSON", "not a JSON index"),
    _c("ckpt-index-escape", "checkpoint", "index maps a tensor to ../x.safetensors",
       "maps outside the checkpoint"),
    _c("ckpt-shard-symlink-out", "checkpoint", "a shard is a symlink out of the checkpoint",
       "outside the storage root"),
    _c("ckpt-shape-mismatch", "checkpoint", "aligned q_proj is 32x31", "self_attn.q_proj"),
    _c("ckpt-missing-target", "checkpoint", "aligned lacks a v_proj", "self_attn.v_proj"),
    _c("ckpt-identical", "checkpoint", "aligned == base for one module (‖V‖ = 0)",
       "model.layers.0.self_attn.q_proj"),
    _c("ckpt-nan", "checkpoint", "NaN in an aligned target weight", "model.layers.1."),
    _c("ckpt-int-dtype", "checkpoint", "a target stored as I32", "is not a float type"),
    # -- alignment sets (sanitize) -----------------------------------------------------------------
    _c("set-absent", "alignment", "nothing at --alignment", "no alignment set"),
    _c("set-interrupted", "alignment", "alignment.json missing (build interrupted)",
       "incomplete alignment set"),
    _c("set-manifest-missing", "alignment", "manifest.parquet missing",
       "manifest.parquet is missing"),
    _c("set-manifest-garbage", "alignment", "manifest.parquet is not Parquet", "unreadable"),
    _c("set-metadata-not-json", "alignment", "alignment.json is not JSON", "not JSON"),
    _c("set-format-version", "alignment", "format_version 99", "format version 99"),
    _c("set-count-mismatch", "alignment", "num_modules disagrees with the manifest",
       "manifest has 4 modules"),
    _c("set-shard-truncated", "alignment", "a shard cut short", "file is truncated"),
    _c("set-shard-missing", "alignment", "a shard file deleted", "is missing"),
    _c("set-shard-wrong-shape", "alignment", "manifest stored_shape disagrees with the shard",
       "the manifest says float32"),
    _c("set-metadata-too-big", "alignment", "32 MiB (sparse) alignment.json",
       "more than the 16777216 allowed"),
    # -- nightly configs ---------------------------------------------------------------------------
    _c("yaml-invalid", "config", "not YAML", "not valid YAML"),
    _c("yaml-top-list", "config", "top level is a list", "top level must be a mapping"),
    _c("yaml-unknown-key", "config", "an unknown top-level key", "unknown keys"),
    _c("yaml-two-selections", "config", "threshold and num_proj_layers", "exactly one of"),
    _c("yaml-pair-fields", "config", "a pair without base/aligned", "missing or malformed"),
    _c("yaml-catalog-slash", "config", "a catalog name with '/'", "may not contain '/'"),
    _c("yaml-shared-base-id", "config", "one base model id in two pairs", "maps to both"),
    _c("yaml-bad-ttl", "config", "lock.ttl_s = -1", "ttl_s must be positive"),
    _c("yaml-bad-sanitize-key", "config", "an unknown sanitize option",
       "unknown sanitize keys"),
)

CASES = {c.id: c for c in CORPUS}
assert len(CASES) == len(CORPUS), "case ids must be unique"


def _cases(where: str) -> list[Case]:
    return [c for c in CORPUS if c.where == where]


# ----------------------------------------------------------------------------------------------
# Shared helpers (test_faults and test_load use them too)
# ----------------------------------------------------------------------------------------------


@dataclass
class World:
    """A tiny base/aligned pair, its q/v alignment set and the dense float64 reference."""

    root: Path
    base: Path
    aligned: Path
    alignment: str
    c: dict[str, torch.Tensor]
    v: dict[str, torch.Tensor]
    base_tensors: dict[str, torch.Tensor]
    aligned_tensors: dict[str, torch.Tensor]


def make_world(root: Path, workers: int = 1) -> World:
    """Write the pair (base in 2 shards + index, aligned single-file) and build the set."""
    base_t = llama_tensors(ARCH, seed=0, dtype=torch.float32)
    aligned_t = aligned_from(base_t, seed=1)
    base = write_checkpoint(root / "base", base_t, shards=2)
    aligned = write_checkpoint(root / "aligned", aligned_t, shards=1)
    res = build(BuildConfig(base=str(base), aligned=str(aligned), out=str(root / "set"),
                            targets=list(TARGETS), workers=workers, progress=False))
    assert res.num_modules == len(MODULES)
    c = {m: dense_c(base_t[m + ".weight"], aligned_t[m + ".weight"]) for m in MODULES}
    v = {m: aligned_t[m + ".weight"].double() - base_t[m + ".weight"].double() for m in MODULES}
    return World(root, base, aligned, res.uri, c, v, base_t, aligned_t)


def good_modules(world: World, seed: int, r: int = 4, dtype: torch.dtype = torch.float32,
                 modules: tuple[str, ...] = MODULES
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random A and B; every other module's B leans on the alignment direction (high cosine),
    the others are random (low cosine), so a threshold selection is never trivial."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for j, m in enumerate(modules):
        d_out, d_in = world.c[m].shape[0], world.v[m].shape[1]
        a = torch.randn(r, d_in, generator=g) * 0.1
        if (j + seed) % 2 == 0:
            b = world.v[m] @ torch.randn(d_in, r, generator=g, dtype=torch.float64)
            b = (b / b.norm() * 0.3).float()
        else:
            b = torch.randn(d_out, r, generator=g) * 0.05
        out[m] = (a.to(dtype), b.to(dtype))
    return out


def write_good(path: Path, world: World, seed: int, r: int = 4,
               dtype: torch.dtype = torch.float32, readme: bool = True) -> Path:
    """A good PEFT LoRA q/v adapter (``save_pretrained`` layout) with a README."""
    write_adapter(path, good_modules(world, seed, r, dtype), r)
    if readme:
        (path / "README.md").write_text(f"adapter {seed}\n")
    return path


def tree_hash(root: Path) -> dict[str, str]:
    """sha256 of every file (symlinks followed, except out of ``root``'s tree: their target
    path is recorded), and the target of every symlink under ``root``."""
    out: dict[str, str] = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel + " ->"] = os.readlink(p)
                continue
            if p.is_file():
                out[rel] = _file_sha(p)
    return out


def _file_sha(p: Path) -> str:
    st = p.stat()
    if st.st_size > 64 * 1024**2:  # huge sparse files: size and allocated blocks only
        return f"size={st.st_size} blocks={st.st_blocks}"
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(1024**2):
            h.update(chunk)
    return h.hexdigest()


def leftovers(root: Path) -> list[str]:
    """Temporary / staging / trash entries left under ``root``."""
    return [str(p) for p in root.rglob("*") if p.name.startswith(HIDDEN)] if root.exists() else []


def outputs_under(out: Path) -> set[str]:
    """Ids of the adapters written under ``out`` (directories holding adapter_config.json)."""
    return {p.parent.relative_to(out).as_posix() for p in out.rglob(CFG)
            if not p.relative_to(out).parts[0].startswith("_")}


def report_list(out: Path, run_id: str) -> list[dict[str, Any]]:
    return pq.read_table(out / "_reports" / run_id / "adapters.parquet").to_pylist()


def report_rows(out: Path, run_id: str) -> dict[str, dict[str, Any]]:
    """The run's adapter rows by id; an id reported twice fails the test."""
    rows = report_list(out, run_id)
    ids = [r["adapter_id"] for r in rows]
    assert len(ids) == len(set(ids)), "an adapter was reported twice"
    return {r["adapter_id"]: r for r in rows}


def lora_of(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    t = load_file(str(path / ST))
    out = {}
    for k, a in t.items():
        if k.endswith(".lora_A.weight"):
            m = k[len(PFX):-len(".lora_A.weight")]
            out[m] = (a, t[f"{PFX}{m}.lora_B.weight"])
    return out


def _header(path: Path) -> bytes:
    raw = path.read_bytes()
    return raw[: 8 + int.from_bytes(raw[:8], "little")]


def check_sanitized(src: Path, dst: Path, world: World, threshold: float = THRESHOLD
                    ) -> set[str]:
    """The output of one adapter equals the dense float64 reference (SPEC §2): projected B
    to float32 rounding, every other byte identical to the input. Returns the projected set."""
    lora = lora_of(src)
    new_b, _cos, selected, _pdst = sanitize_dense({m: world.c[m] for m in lora}, lora,
                                                  threshold=threshold)
    assert (dst / CFG).read_bytes() == (src / CFG).read_bytes()
    assert _header(dst / ST) == _header(src / ST)
    t_in, t_out = load_file(str(src / ST)), load_file(str(dst / ST))
    assert list(t_in) == list(t_out)
    for k, t in t_in.items():
        m = k[len(PFX):-len(".lora_B.weight")]
        if k.endswith(".lora_B.weight") and m in selected:
            want = new_b[m].to(t.dtype).double()
            torch.testing.assert_close(t_out[k].double(), want, rtol=1e-5,
                                       atol=1e-6 * float(want.abs().max()))
        else:
            assert t_out[k].view(torch.uint8).numpy().tobytes() == \
                t.view(torch.uint8).numpy().tobytes(), k
    return selected


def bytes_lost(expected: dict[str, Path], out: Path) -> int:
    """Bytes of the expected outputs (id → reference output directory) that are missing from
    ``out`` or differ there: the "bytes lost" figure of docs/reliability.md (must be 0)."""
    lost = 0
    for adapter_id, ref in expected.items():
        for p in ref.rglob("*"):
            if not p.is_file():
                continue
            got = out / adapter_id / p.relative_to(ref)
            data = p.read_bytes()
            if not got.is_file() or got.read_bytes() != data:
                lost += len(data)
    return lost


def record_figures(name: str, **figures: Any) -> None:
    """Append one line of figures to ``$SAFELORA_FIGURES`` (JSON lines) when it is set: what
    docs/reliability.md reports. Tests never need it; it only makes the figures rerunnable."""
    path = os.environ.get("SAFELORA_FIGURES")
    print(f"[figures] {name}: {json.dumps(figures, sort_keys=True)}")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": name, **figures}, sort_keys=True) + "\n")


def run_sanitize(alignment: str, adapters: str | Path, out: Path, **kw: Any) -> SanitizeResult:
    kw.setdefault("workers", 2)
    kw.setdefault("threshold", THRESHOLD)
    return sanitize(SanitizeConfig(alignment=alignment, adapters=str(adapters), out=str(out),
                                   progress=False, task_timeout_s=300, **kw))


# -- safetensors surgery ------------------------------------------------------------------------


def _split(raw: bytes) -> tuple[dict[str, Any], bytes]:
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _st(header: dict[str, Any] | bytes, data: bytes, n: int | None = None) -> bytes:
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(hb) if n is None else n) + hb + data


def _with_header(edit: Callable[[dict[str, Any], list[str]], None]) -> Callable[[bytes], bytes]:
    def apply(raw: bytes) -> bytes:
        hdr, data = _split(raw)
        edit(hdr, [k for k in hdr if k != "__metadata__"])
        return _st(hdr, data)
    return apply


def _dup_key(raw: bytes) -> bytes:
    hdr, data = _split(raw)
    k = next(k for k in hdr if k != "__metadata__")
    hb = json.dumps(hdr).encode()
    return _st(hb[:-1] + b", " + json.dumps({k: hdr[k]})[1:-1].encode() + b"}", data)


def _gap(raw: bytes) -> bytes:
    hdr, data = _split(raw)
    for k in [k for k in hdr if k != "__metadata__"][1:]:
        hdr[k]["data_offsets"] = [o + 8 for o in hdr[k]["data_offsets"]]
    return _st(hdr, data + b"\0" * 8)


def _overlap(hdr: dict[str, Any], keys: list[str]) -> None:
    hdr[keys[1]]["data_offsets"] = [o - 8 for o in hdr[keys[1]]["data_offsets"]]


def _set(key_index: int, field: str, value: Any) -> Callable[[bytes], bytes]:
    def edit(hdr: dict[str, Any], keys: list[str]) -> None:
        hdr[keys[key_index]][field] = value
    return _with_header(edit)


_WEIGHT_EDITS: dict[str, Callable[[bytes], bytes]] = {
    "st-truncated": lambda raw: raw[:-100],
    "st-empty": lambda raw: b"",
    "st-too-short": lambda raw: raw[:5],
    "st-header-len-0": lambda raw: _st(b"", b"", n=0),
    "st-header-past-end": lambda raw: _st(_split(raw)[0], _split(raw)[1],
                                          n=len(raw) + 1_000_000),
    "st-header-len-2p62": lambda raw: _st(_split(raw)[0], _split(raw)[1], n=2**62),
    "st-header-not-utf8": lambda raw: _st(b'{"\xff\xfe": 1}      ', b""),
    "st-header-not-json": lambda raw: _st(b"{not json at all}", _split(raw)[1]),
    "st-header-array": lambda raw: _st(b"[1, 2, 3]", b""),
    "st-offsets-overlap": _with_header(_overlap),
    "st-offsets-gap": _gap,
    "st-offsets-reversed": _set(0, "data_offsets", [100, 50]),
    "st-trailing-bytes": lambda raw: raw + b"\0" * 16,
    "st-unknown-dtype": _set(0, "dtype", "F31"),
    "st-shape-bytes": _set(0, "shape", [4, 31]),
    "st-negative-shape": _set(0, "shape", [-4, 32]),
    "st-duplicate-key": _dup_key,
    "st-unknown-field": _set(0, "extra", 1),
    "st-metadata-type": _with_header(lambda h, k: h.__setitem__("__metadata__", {"format": 1})),
    "st-int-dtype": _set(0, "dtype", "I32"),
}


class PickleBomb:
    """Unpickling this creates ``marker`` (a directory): proof that something unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.marker,))


def write_pickle_bomb(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(PickleBomb(marker)))


def _raw_adapter(path: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    from safelora_ray.formats.safetensors import save_tensors

    path.mkdir(parents=True, exist_ok=True)
    save_tensors(path / ST, tensors, {"format": "pt"})
    (path / CFG).write_text(json.dumps(config, indent=2))


def _config(path: Path) -> dict[str, Any]:
    return json.loads((path / CFG).read_text())


def make_bad_adapter(case: str, path: Path, world: World, outside: Path, marker: Path,
                     seed: int) -> None:
    """Write the bad adapter of ``case`` at ``path`` (``outside``: a directory out of the
    catalog for the symlink cases; ``marker``: the pickle bomb's marker)."""
    if case in _WEIGHT_EDITS:
        write_good(path, world, seed)
        (path / ST).write_bytes(_WEIGHT_EDITS[case]((path / ST).read_bytes()))
        return
    mods = good_modules(world, seed)
    if case in ("nan-in-b", "inf-in-a"):
        if case == "nan-in-b":
            mods["model.layers.1.self_attn.q_proj"][1][3, 1] = float("nan")
        else:
            mods["model.layers.0.self_attn.v_proj"][0][0, 2] = float("inf")
        write_adapter(path, mods, 4)
    elif case == "rank-config":
        write_adapter(path, mods, 4)
        (path / CFG).write_text(json.dumps({**_config(path), "r": 8}))
    elif case in ("rank-a-vs-b", "lone-lora-a", "no-lora-modules", "module-not-in-set",
                  "other-base-model", "conv-lora", "embedding-lora"):
        write_adapter(path, mods, 4)
        cfg = _config(path)
        t = load_file(str(path / ST))
        k_b = f"{PFX}model.layers.0.self_attn.q_proj.lora_B.weight"
        k_a = f"{PFX}model.layers.0.self_attn.q_proj.lora_A.weight"
        if case == "rank-a-vs-b":
            t[k_b] = t[k_b][:, :3].contiguous()
        elif case == "lone-lora-a":
            del t[k_b]
        elif case == "no-lora-modules":
            t = {f"{PFX}lm_head.weight": torch.zeros(64, 32)}
        elif case == "module-not-in-set":
            t[f"{PFX}model.layers.0.self_attn.k_proj.lora_A.weight"] = torch.randn(4, 32)
            t[f"{PFX}model.layers.0.self_attn.k_proj.lora_B.weight"] = torch.randn(32, 4)
        elif case == "other-base-model":
            t = {k: torch.randn(4, 48) if ".lora_A." in k else torch.randn(48, 4) for k in t}
        elif case == "conv-lora":
            t[k_a], t[k_b] = t[k_a].reshape(4, 32, 1, 1), t[k_b].reshape(32, 4, 1, 1)
        else:
            t[f"{PFX}model.embed_tokens.lora_embedding_A"] = torch.randn(4, 64)
            t[f"{PFX}model.embed_tokens.lora_embedding_B"] = torch.randn(32, 4)
        _raw_adapter(path, t, cfg)
    elif case == "dora":
        write_adapter(path, mods, 4, use_dora=True)
    elif case.startswith("config-") and case != "config-symlink-out":
        write_good(path, world, seed)
        cfg = _config(path)
        raw = {
            "config-not-json": b'{"peft_type": "LORA", ',
            "config-not-utf8": b'\xff\xfe{"peft_type": "LORA"}',
            "config-array": b"[]",
            "config-no-peft-type": json.dumps({k: v for k, v in cfg.items()
                                               if k != "peft_type"}).encode(),
            "config-not-lora": json.dumps({**cfg, "peft_type": "IA3"}).encode(),
            "config-r-not-int": json.dumps({**cfg, "r": "four"}).encode(),
            "config-bad-regex": json.dumps({**cfg, "rank_pattern": {"q_proj(": 4}}).encode(),
            "config-too-big": json.dumps(cfg).encode(),
        }[case]
        (path / CFG).write_bytes(raw)
        if case == "config-too-big":
            os.truncate(path / CFG, 2 * 1024**2)  # sparse: never occupies 2 MiB
    elif case == "pickle-only":
        write_good(path, world, seed)
        (path / ST).unlink()
        write_pickle_bomb(path / "adapter_model.bin", marker)
    elif case == "weights-missing":
        write_good(path, world, seed)
        (path / ST).unlink()
    elif case == "weights-too-big":
        write_good(path, world, seed)
        os.truncate(path / ST, 8 * 1024**3)  # sparse 8 GiB
    elif case == "weights-symlink-out":
        write_good(path, world, seed)
        target = outside / "weights" / ST
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(path / ST, target)
        (path / ST).symlink_to(target)
    elif case == "config-symlink-out":
        write_good(path, world, seed)
        target = outside / "config" / CFG
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(path / CFG, target)
        (path / CFG).symlink_to(target)
    elif case == "dir-symlink-out":
        target = write_good(outside / "adapter-dir", world, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(target, target_is_directory=True)
    elif case in ("bad name", "_private"):
        write_good(path, world, seed)
    else:  # pragma: no cover - a CORPUS entry without a builder
        raise AssertionError(f"no builder for adapter case {case!r}")


def _adapter_id(case: Case, i: int) -> str:
    """Where the case's adapter goes in the mixed catalog (spread over three tenants)."""
    if case.id in ("bad name", "_private"):
        return case.id
    return f"tenant-{i % 3}/{case.id}"


# ----------------------------------------------------------------------------------------------
# Module fixtures
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> World:
    return make_world(tmp_path_factory.mktemp("world"))


GOOD_PER_TENANT = 4


@dataclass
class Fleet:
    """The mixed catalog, its one fleet run and what was observed around it."""

    root: Path
    outside: Path
    out: Path
    marker: Path
    good: list[str]
    bad: dict[str, str]  # case id -> adapter id
    result: SanitizeResult
    rows: dict[str, dict[str, Any]]
    before: dict[str, dict[str, str]]
    after: dict[str, dict[str, str]]
    rerun: SanitizeResult
    rerun_rows: dict[str, dict[str, Any]]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, world: World) -> Fleet:
    """One catalog: 12 good adapters of 3 tenants (one also carrying armed pickle files next
    to its safetensors) + one adapter per adapter case; sanitized once, then rerun."""
    tmp = tmp_path_factory.mktemp("fleet")
    root, outside, out = tmp / "catalog", tmp / "outside", tmp / "out"
    marker = tmp / "PICKLE-BOMB-WENT-OFF"
    good = []
    for t in range(3):
        for k in range(GOOD_PER_TENANT):
            adapter_id = f"tenant-{t}/good-{k}"
            write_good(root / adapter_id, world, seed=10 * t + k)
            good.append(adapter_id)
    # Pickled weights beside the safetensors: never opened, never copied.
    write_pickle_bomb(root / "tenant-0/good-0/adapter_model.bin", marker)
    write_pickle_bomb(root / "tenant-0/good-0/training_args.bin", marker)
    bad = {}
    for i, case in enumerate(_cases("adapter")):
        adapter_id = _adapter_id(case, i)
        make_bad_adapter(case.id, root / adapter_id, world, outside, marker, seed=100 + i)
        bad[case.id] = adapter_id
    before = {"catalog": tree_hash(root), "outside": tree_hash(outside)}
    result = run_sanitize(world.alignment, root, out, run_id="mixed", batch_size=4,
                          max_adapter_bytes=MAX_ADAPTER_BYTES)
    rows = report_rows(out, "mixed")
    after = {"catalog": tree_hash(root), "outside": tree_hash(outside)}
    rerun = run_sanitize(world.alignment, root, out, run_id="mixed-again", batch_size=4,
                         max_adapter_bytes=MAX_ADAPTER_BYTES)
    return Fleet(root, outside, out, marker, good, bad, result, rows, before, after, rerun,
                 report_rows(out, "mixed-again"))


# ----------------------------------------------------------------------------------------------
# 1. The adapter corpus in one fleet run
# ----------------------------------------------------------------------------------------------


def test_corpus_size() -> None:
    """Issue #5 asks for at least 30 distinct bad inputs across all kinds of input."""
    assert len(CORPUS) >= 30
    assert {c.where for c in CORPUS} == {"adapter", "id", "checkpoint", "alignment", "config"}


def test_fleet_run_completes_for_everything_else(fleet: Fleet, world: World) -> None:
    res = fleet.result
    assert (res.ok, res.skipped, res.error) == (len(fleet.good), 0, len(fleet.bad)), res.errors
    assert set(fleet.rows) == set(fleet.good) | set(fleet.bad.values())
    # Every good adapter, whatever bad neighbours shared its batch, equals the reference.
    projected = 0
    for adapter_id in fleet.good:
        assert fleet.rows[adapter_id]["status"] == "ok"
        projected += len(check_sanitized(fleet.root / adapter_id, fleet.out / adapter_id, world))
    assert 0 < projected < len(fleet.good) * len(MODULES)
    # Pickled files beside the weights were neither opened nor copied.
    assert not (fleet.out / "tenant-0/good-0/adapter_model.bin").exists()
    assert not (fleet.out / "tenant-0/good-0/training_args.bin").exists()
    assert (fleet.out / "tenant-0/good-0/README.md").read_text() == "adapter 0\n"
    # No partial output, nothing else written, no temp files, inputs byte-identical.
    assert outputs_under(fleet.out) == set(fleet.good)
    assert not leftovers(fleet.out) and not leftovers(fleet.root)
    assert fleet.after == fleet.before
    assert not fleet.marker.exists(), "a pickle was unpickled"
    # Bytes lost: every expected output is there, byte for byte (a clean run of the good
    # adapters alone gives the same bytes: checked in test_faults); here against the reference.
    ledger = {p.relative_to(fleet.out / "_ledger").as_posix()[:-5]
              for p in (fleet.out / "_ledger").rglob("*.json")}
    assert ledger == set(fleet.good)
    lost = sum(f.stat().st_size for i in fleet.good for f in (fleet.root / i).iterdir()
               if f.suffix != ".bin" and not (fleet.out / i / f.name).is_file())
    assert lost == 0
    record_figures("fleet_corpus", adapters=len(fleet.rows), good=len(fleet.good),
                   bad=len(fleet.bad), ok=res.ok, error=res.error, runs_completed=2,
                   bytes_lost=lost, inputs_unchanged=fleet.after == fleet.before)


def test_fleet_rerun_refuses_again_and_skips_the_rest(fleet: Fleet) -> None:
    res = fleet.rerun
    assert (res.ok, res.skipped, res.error) == (0, len(fleet.good), len(fleet.bad))
    for case_id, adapter_id in fleet.bad.items():
        assert fleet.rerun_rows[adapter_id]["error"] == fleet.rows[adapter_id]["error"], case_id
    assert tree_hash(fleet.root) == fleet.before["catalog"]
    assert not leftovers(fleet.out)


@pytest.mark.parametrize("case", [c.id for c in _cases("adapter")])
def test_bad_adapter(fleet: Fleet, case: str) -> None:
    adapter_id = fleet.bad[case]
    row = fleet.rows[adapter_id]
    assert row["status"] == "error"
    err = row["error"]
    assert repr(adapter_id) in err, err  # names the adapter...
    for text in CASES[case].must:  # ...and what is wrong with it
        assert text in err, (case, err)
    assert row["output_digest"] is None and row["bytes_out"] == 0
    assert not (fleet.out / adapter_id).exists()
    assert not (fleet.out / ledger_path(adapter_id)).exists()
    record_figures("case", case=case, where="adapter", error=err)


# ----------------------------------------------------------------------------------------------
# 2. Ids (a manifest fleet run): nothing escapes --out or crosses a tenant prefix
# ----------------------------------------------------------------------------------------------


def test_bad_ids_in_a_manifest(tmp_path: Path, world: World) -> None:
    src = tmp_path / "src"
    good = {f"tenant-{t}/ok": write_good(src / f"g{t}", world, seed=40 + t) for t in range(3)}
    lines = [{"id": i, "uri": str(p)} for i, p in good.items()]
    bad_ids = {
        "id-dotdot": "../escape",
        "id-absolute": "/abs/path",
        "id-cross-tenant": "tenant-0/../tenant-1/x",
        "id-backslash": "tenant-0\\x",
    }
    lines += [{"id": i, "uri": str(good["tenant-0/ok"])} for i in bad_ids.values()]
    lines.append({"id": "tenant-2/ok", "uri": str(good["tenant-1/ok"])})  # id-duplicate
    lines.append({"id": "tenant-2/missing", "uri": str(tmp_path / "nowhere")})
    signed = ("https://acme.s3.amazonaws.com/t/a?X-Amz-Algorithm=AWS4-HMAC-SHA256"
              "&X-Amz-Signature=0123abcd")
    lines.append({"id": "tenant-2/presigned", "uri": signed})
    manifest = tmp_path / "catalog.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "sub" / "out"
    before = tree_hash(src), sorted(p.name for p in tmp_path.iterdir())
    res = run_sanitize(world.alignment, manifest, out, run_id="ids", batch_size=2)
    rows = report_list(out, "ids")  # the duplicate id has two rows: ok, then refused
    assert res.ok == 3 and res.error == 7, res.errors
    assert len(rows) == len(lines)
    errors = {r["adapter_id"]: r["error"] for r in rows if r["status"] == "error"}
    for case, bad_id in bad_ids.items():
        assert all(t in errors[bad_id] for t in CASES[case].must), errors[bad_id]
    dup = [e for e in errors.values() if "appears twice" in e]
    assert len(dup) == 1 and all(t in dup[0] for t in CASES["id-duplicate"].must)
    assert all(t in errors["tenant-2/missing"] for t in CASES["uri-missing"].must)
    assert all(t in errors["tenant-2/presigned"] for t in CASES["uri-bad-scheme"].must)
    for case, bad_id in [*bad_ids.items(), ("uri-missing", "tenant-2/missing"),
                         ("uri-bad-scheme", "tenant-2/presigned")]:
        record_figures("case", case=case, where="id", error=errors[bad_id])
    record_figures("case", case="id-duplicate", where="id", error=dup[0])
    # Only the three good ids were written, each under its own tenant prefix; nothing was
    # created beside --out or above it.
    assert outputs_under(out) == set(good)
    for adapter_id, srcdir in good.items():
        check_sanitized(srcdir, out / adapter_id, world)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["out"]
    assert (tree_hash(src), sorted(p.name for p in tmp_path.iterdir() if p.name != "sub")) \
        == before
    assert not (tmp_path / "escape").exists() and not Path("/abs/path").exists()
    assert not leftovers(out)


def test_outputs_never_follow_symlinks_out_of_out(tmp_path: Path, world: World) -> None:
    """A symlink planted inside --out (a tenant prefix pointing elsewhere, or into another
    tenant's prefix) is never written through: that tenant's adapters fail, the rest are ok."""
    cat = tmp_path / "catalog"
    for t in ("tenant-a", "tenant-b", "tenant-c"):
        write_good(cat / t / "x", world, seed=ord(t[-1]))
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    out.mkdir()
    (out / "tenant-b").symlink_to(elsewhere, target_is_directory=True)
    res = run_sanitize(world.alignment, cat, out, run_id="links")
    rows = report_rows(out, "links")
    assert rows["tenant-a/x"]["status"] == "ok" and rows["tenant-c/x"]["status"] == "ok"
    assert rows["tenant-b/x"]["status"] == "error" and res.error == 1
    assert "outside the storage root" in rows["tenant-b/x"]["error"]
    assert list(elsewhere.iterdir()) == []
    assert not leftovers(out) and not leftovers(elsewhere)


# ----------------------------------------------------------------------------------------------
# 3. Checkpoints (build): a clear error, no alignment set, inputs untouched
# ----------------------------------------------------------------------------------------------


def _break_checkpoint(case: str, base: Path, aligned: Path, marker: Path,
                      base_tensors: dict[str, torch.Tensor]) -> None:
    shards = sorted(base.glob("model-*.safetensors"))
    if case == "ckpt-truncated-shard":
        raw = shards[0].read_bytes()
        shards[0].write_bytes(raw[: len(raw) - 64])
    elif case == "ckpt-header-2p62":
        raw = shards[1].read_bytes()
        shards[1].write_bytes(struct.pack("<Q", 2**62) + raw[8:])
    elif case == "ckpt-pickle-only":
        for p in base.glob("model*"):
            p.unlink()
        write_pickle_bomb(base / "pytorch_model.bin", marker)
    elif case == "ckpt-index-not-json":
        (base / "model.safetensors.index.json").write_text("{ not json")
    elif case == "ckpt-index-escape":
        index = json.loads((base / "model.safetensors.index.json").read_text())
        name = "model.layers.0.self_attn.q_proj.weight"
        index["weight_map"][name] = "../aligned/model.safetensors"
        (base / "model.safetensors.index.json").write_text(json.dumps(index))
    elif case == "ckpt-shard-symlink-out":
        elsewhere = base.parent / "elsewhere"
        elsewhere.mkdir()
        shutil.move(shards[0], elsewhere / shards[0].name)
        shards[0].symlink_to(elsewhere / shards[0].name)
    else:
        tensors = load_file(str(aligned / "model.safetensors"))
        if case == "ckpt-shape-mismatch":
            w = tensors["model.layers.0.self_attn.q_proj.weight"]
            tensors["model.layers.0.self_attn.q_proj.weight"] = w[:, :31].contiguous()
        elif case == "ckpt-missing-target":
            del tensors["model.layers.1.self_attn.v_proj.weight"]
        elif case == "ckpt-identical":
            name = "model.layers.0.self_attn.q_proj.weight"
            tensors[name] = base_tensors[name].clone()
        elif case == "ckpt-nan":
            tensors["model.layers.1.self_attn.v_proj.weight"][2, 3] = float("nan")
        elif case == "ckpt-int-dtype":
            w = tensors["model.layers.1.self_attn.q_proj.weight"]
            tensors["model.layers.1.self_attn.q_proj.weight"] = (w * 1000).to(torch.int32)
        else:  # pragma: no cover
            raise AssertionError(case)
        write_checkpoint(aligned, tensors, shards=1)


@pytest.mark.parametrize("case", [c.id for c in _cases("checkpoint")])
def test_bad_checkpoint(tmp_path: Path, world: World, case: str) -> None:
    base, aligned = tmp_path / "base", tmp_path / "aligned"
    shutil.copytree(world.base, base)
    shutil.copytree(world.aligned, aligned)
    marker = tmp_path / "PICKLE-BOMB-WENT-OFF"
    _break_checkpoint(case, base, aligned, marker, world.base_tensors)
    before = tree_hash(tmp_path)
    out = tmp_path / "set"
    with pytest.raises(SafeLoraError) as info:
        build(BuildConfig(base=str(base), aligned=str(aligned), out=str(out),
                          targets=list(TARGETS), workers=2, progress=False,
                          task_timeout_s=300))
    err = str(info.value)
    for text in CASES[case].must:
        assert text in err, (case, err)
    # No alignment set: whatever shards an actor wrote are not a set without alignment.json.
    assert not (out / "alignment.json").exists()
    with pytest.raises(AlignmentSetError):
        AlignmentSet.open(str(out))
    assert tree_hash(base) == {k[5:]: v for k, v in before.items() if k.startswith("base/")}
    assert tree_hash(aligned) == {k[8:]: v for k, v in before.items()
                                  if k.startswith("aligned/")}
    assert not marker.exists(), "a pickle was unpickled"
    record_figures("case", case=case, where="checkpoint", error=err)


# ----------------------------------------------------------------------------------------------
# 4. Alignment sets (sanitize): the run fails with a clear error and writes no adapter
# ----------------------------------------------------------------------------------------------


def _break_set(case: str, s: Path) -> None:
    md = json.loads((s / "alignment.json").read_text())
    shards = sorted(s.glob("shards/*.safetensors"))
    if case == "set-absent":
        shutil.rmtree(s)
        s.mkdir()
    elif case == "set-interrupted":
        (s / "alignment.json").unlink()
    elif case == "set-manifest-missing":
        (s / "manifest.parquet").unlink()
    elif case == "set-manifest-garbage":
        (s / "manifest.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    elif case == "set-metadata-not-json":
        (s / "alignment.json").write_text("{ not json")
    elif case == "set-format-version":
        (s / "alignment.json").write_text(json.dumps({**md, "format_version": 99}))
    elif case == "set-count-mismatch":
        (s / "alignment.json").write_text(json.dumps({**md, "num_modules": 5}))
    elif case == "set-shard-truncated":
        raw = shards[-1].read_bytes()
        shards[-1].write_bytes(raw[:-16])
    elif case == "set-shard-missing":
        shards[0].unlink()
    elif case == "set-shard-wrong-shape":
        import pyarrow as pa

        table = pq.read_table(s / "manifest.parquet")
        shapes = [[int(x) + (1 if i == 0 else 0) for x in shp] for i, shp in
                  enumerate(table.column("stored_shape").to_pylist())]
        i = table.column_names.index("stored_shape")
        table = table.set_column(i, table.schema.field(i), pa.array(shapes,
                                                                   pa.list_(pa.int64())))
        pq.write_table(table, s / "manifest.parquet")
        # A manifest wrong from the start (its digest agrees): the shard check still names it.
        digest = hashlib.sha256((s / "manifest.parquet").read_bytes()).hexdigest()
        md["integrity"]["manifest"] = f"sha256:{digest}"
        (s / "alignment.json").write_text(json.dumps(md))
    elif case == "set-metadata-too-big":
        os.truncate(s / "alignment.json", 32 * 1024**2)
    else:  # pragma: no cover
        raise AssertionError(case)


@pytest.mark.parametrize("case", [c.id for c in _cases("alignment")])
def test_bad_alignment_set(tmp_path: Path, world: World, case: str) -> None:
    s = tmp_path / "set"
    shutil.copytree(world.alignment, s)
    _break_set(case, s)
    cat = tmp_path / "catalog"
    for k in range(3):
        write_good(cat / f"t/a{k}", world, seed=70 + k)
    before = tree_hash(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(SafeLoraError) as info:
        run_sanitize(str(s), cat, out, run_id="bad-set", batch_size=1, workers=1)
    err = str(info.value)
    for text in CASES[case].must:
        assert text in err, (case, err)
    assert str(s) in err or "shards/" in err  # names the set or the file
    assert outputs_under(out) == set()
    assert not leftovers(out)
    assert {k: v for k, v in tree_hash(tmp_path).items() if not k.startswith("out")} == before
    record_figures("case", case=case, where="alignment", error=err)


# ----------------------------------------------------------------------------------------------
# 5. Nightly configs: exit 2 with the reason, nothing written
# ----------------------------------------------------------------------------------------------


def _nightly_config(tmp_path: Path) -> dict[str, Any]:
    return {
        "output_root": str(tmp_path / "out"), "alignment_root": str(tmp_path / "sets"),
        "catalogs": [{"name": "main", "uri": str(tmp_path / "catalog")}],
        "pairs": [{"name": "p", "base": str(tmp_path / "b"), "aligned": str(tmp_path / "a"),
                   "targets": ["q_proj", "v_proj"], "base_model_ids": ["m"]}],
        "selection": {"threshold": 0.35}, "lock": {"ttl_s": 600},
    }


def _bad_yaml(case: str, cfg: dict[str, Any]) -> str:
    pair = cfg["pairs"][0]
    edits: dict[str, Any] = {
        "yaml-invalid": None,
        "yaml-top-list": [cfg],
        "yaml-unknown-key": {**cfg, "surprise": 1},
        "yaml-two-selections": {**cfg, "selection": {"threshold": 0.3, "num_proj_layers": 2}},
        "yaml-pair-fields": {**cfg, "pairs": [{"name": "p"}]},
        "yaml-catalog-slash": {**cfg, "catalogs": [{"name": "a/b", "uri": "/x"}]},
        "yaml-shared-base-id": {**cfg, "pairs": [pair, {**pair, "name": "q"}]},
        "yaml-bad-ttl": {**cfg, "lock": {"ttl_s": -1}},
        "yaml-bad-sanitize-key": {**cfg, "sanitize": {"batch": 3}},
    }
    if case == "yaml-invalid":
        return "output_root: [unclosed\n  - {"
    return yaml.safe_dump(edits[case])


@pytest.mark.parametrize("case", [c.id for c in _cases("config")])
def test_bad_nightly_config(tmp_path: Path, case: str,
                            capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nightly.yaml"
    path.write_text(_bad_yaml(case, _nightly_config(tmp_path)))
    assert nightly_main(["--config", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    for text in CASES[case].must:
        assert text in err, (case, err)
    assert not (tmp_path / "out").exists() and not (tmp_path / "sets").exists()
    with pytest.raises(SafeLoraError):
        NightlyConfig.load(str(path))
    record_figures("case", case=case, where="config", error=err.strip())


# ----------------------------------------------------------------------------------------------
# 6. Security
# ----------------------------------------------------------------------------------------------


def test_pickle_bombs_are_armed(tmp_path: Path) -> None:
    """Control for the pickle cases: the bomb does go off when something unpickles it."""
    marker = tmp_path / "control-marker"
    write_pickle_bomb(tmp_path / "bomb.bin", marker)
    code = ("import pickle, sys; pickle.loads(open(sys.argv[1], 'rb').read())")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "bomb.bin")], check=True,
                   timeout=60)
    assert marker.is_dir()


def test_pickle_never_loaded_by_the_readers(tmp_path: Path, world: World) -> None:
    """Checkpoints and adapters holding pickles next to (or instead of) safetensors."""
    marker = tmp_path / "PICKLE-BOMB-WENT-OFF"
    ckpt = tmp_path / "ckpt"
    shutil.copytree(world.aligned, ckpt)
    for name in ("pytorch_model.bin", "model.pt", "optimizer.pt", "training_args.bin"):
        write_pickle_bomb(ckpt / name, marker)
    assert Checkpoint.open(str(ckpt)).layout == "single"  # the pickles are never opened
    adapter = write_good(tmp_path / "adapter", world, seed=5)
    for name in ("adapter_model.bin", "rng_state.pth", "scheduler.pt"):
        write_pickle_bomb(adapter / name, marker)
    ad = read_adapter(open_storage(str(tmp_path)), "adapter", "a")
    assert sorted(ad.skipped_files) == ["adapter_model.bin", "rng_state.pth", "scheduler.pt"]
    assert not marker.exists()


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("what", ["adapter-weights", "adapter-config", "checkpoint-index",
                                  "checkpoint-header", "alignment-metadata", "manifest-catalog",
                                  "nightly-config"])
def test_size_caps_hold_against_huge_sparse_files(tmp_path: Path, world: World,
                                                  what: str) -> None:
    """Every reader refuses an oversized file by its size, before reading it: a 4-16 GiB
    sparse file raises a clear error and the process's peak memory does not move."""
    huge = 16 * 1024**3
    call: Callable[[], Any]
    if what == "adapter-weights":
        p = write_good(tmp_path / "a", world, seed=1)
        os.truncate(p / ST, huge)
        call = lambda: read_adapter(open_storage(str(tmp_path)), "a", "a",  # noqa: E731
                                    max_bytes=MAX_ADAPTER_BYTES)
        must = "more than the 1048576 allowed"
    elif what == "adapter-config":
        p = write_good(tmp_path / "a", world, seed=1)
        os.truncate(p / CFG, huge)
        call = lambda: read_adapter(open_storage(str(tmp_path)), "a", "a")  # noqa: E731
        must = "more than the 1048576 allowed"
    elif what == "checkpoint-index":
        shutil.copytree(world.base, tmp_path / "c")
        os.truncate(tmp_path / "c" / "model.safetensors.index.json", huge)
        call = lambda: Checkpoint.open(str(tmp_path / "c"))  # noqa: E731
        must = "more than the 67108864 allowed"
    elif what == "checkpoint-header":
        (tmp_path / "c").mkdir()
        with open(tmp_path / "c" / "model.safetensors", "wb") as f:
            f.write(struct.pack("<Q", 99_000_000))  # under the library's cap, past the end
        call = lambda: Checkpoint.open(str(tmp_path / "c"))  # noqa: E731
        must = "runs past the end of the file"
    elif what == "alignment-metadata":
        shutil.copytree(world.alignment, tmp_path / "s")
        os.truncate(tmp_path / "s" / "alignment.json", huge)
        call = lambda: AlignmentSet.open(str(tmp_path / "s"))  # noqa: E731
        must = "more than the 16777216 allowed"
    elif what == "manifest-catalog":
        (tmp_path / "m.jsonl").write_text("")
        os.truncate(tmp_path / "m.jsonl", huge)
        call = lambda: list(iter_catalog(str(tmp_path / "m.jsonl")))  # noqa: E731
        must = "more than the 1073741824 allowed"
    else:
        (tmp_path / "n.yaml").write_text("")
        os.truncate(tmp_path / "n.yaml", huge)
        call = lambda: NightlyConfig.load(str(tmp_path / "n.yaml"))  # noqa: E731
        must = "more than the 16777216 allowed"
    rss0 = _maxrss_mb()
    with pytest.raises(SafeLoraError) as info:
        call()
    assert must in str(info.value), str(info.value)
    assert _maxrss_mb() - rss0 < 64, "an oversized file was read into memory"


def test_local_listing_reports_symlinks_out_of_the_root(tmp_path: Path) -> None:
    """The fix for the silent gap: escaping symlinks are still never listed or read, but a
    caller can have them reported (the catalog turns them into error rows)."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (outside / "d").mkdir(parents=True)
    (outside / "f.json").write_text("{}")
    (root / "in").mkdir(parents=True)
    (root / "in" / "ok.txt").write_text("ok")
    (root / "in" / "file-link").symlink_to(outside / "f.json")
    (root / "dir-link").symlink_to(outside / "d", target_is_directory=True)
    (root / "inside-dir-link").symlink_to(root / "in", target_is_directory=True)
    s = LocalStorage(str(root))
    assert [o.path for o in s.list()] == ["in/ok.txt"]  # the contract is unchanged
    refused: list[tuple[str, bool, str]] = []
    assert [o.path for o in s.list(on_refused=lambda *r: refused.append(r))] == ["in/ok.txt"]
    assert [(r, d) for r, d, _ in refused] == [("dir-link", True), ("in/file-link", False)]
    assert all("outside the storage root" in m for _, _, m in refused)
    for path in ("in/file-link", "dir-link/x"):
        with pytest.raises(StorageError, match="outside the storage root"):
            s.read(path)


def test_catalog_reports_adapters_behind_escaping_symlinks(tmp_path: Path, world: World) -> None:
    cat, outside = tmp_path / "catalog", tmp_path / "outside"
    write_good(cat / "t/ok", world, seed=1)
    write_good(outside / "adapter", world, seed=2)
    (outside / "notes").mkdir()
    (cat / "t/dir").symlink_to(outside / "adapter", target_is_directory=True)
    (cat / "t/notes").symlink_to(outside / "notes", target_is_directory=True)  # no adapter
    write_good(cat / "t/cfg", world, seed=3)
    (cat / "t/cfg" / CFG).unlink()
    (cat / "t/cfg" / CFG).symlink_to(outside / "adapter" / CFG)
    items = list(iter_catalog(str(cat)))
    refs = [i.adapter_id for i in items if not isinstance(i, tuple)]
    errors = dict(i for i in items if isinstance(i, tuple))
    assert refs == ["t/ok"]
    assert sorted(errors) == ["t/cfg", "t/dir"]
    assert all("outside the storage root" in e for e in errors.values())


# -- secrets -------------------------------------------------------------------------------------


def _ray_pids(marker: str) -> set[int]:
    pids = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{d}/environ", "rb") as f:
                if marker.encode() in f.read().split(b"\0"):
                    pids.add(int(d))
    return pids


def _all_text(root: Path) -> Iterator[tuple[Path, bytes]]:
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            with contextlib.suppress(OSError):
                yield p, p.read_bytes()


@pytest.mark.timeout(300)
def test_secrets_never_reach_logs_or_reports(tmp_path: Path, world: World, s3_bucket: str,
                                             s3_admin_client: Any, s3_server: str) -> None:
    """A sanitize run over S3 with sentinel credentials, at DEBUG log level, with failing
    adapters and pre-signed URLs in its manifest: the sentinels appear in no output, no
    report, and no log of the driver or of any Ray process."""
    # The S3 server's own secret (a real server checks it): the one that works must not leak.
    # (A session token cannot be sent to it: SeaweedFS takes the request for STS credentials
    # and refuses the key; tokens are covered by the manifest's X-Amz-Security-Token.)
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    signature = f"SIGNATURE-SENTINEL-{uuid.uuid4().hex}"
    s3 = s3_admin_client
    for k in range(2):
        src = write_good(tmp_path / "src" / f"a{k}", world, seed=90 + k)
        for f in src.iterdir():
            s3.upload_file(str(f), s3_bucket, f"tenants/t/a{k}/{f.name}")
    for f in Path(world.alignment).rglob("*"):
        if f.is_file():
            s3.upload_file(str(f), s3_bucket,
                           f"set/{f.relative_to(world.alignment).as_posix()}")
    lines = [
        {"id": "t/a0", "uri": f"s3://{s3_bucket}/tenants/t/a0"},
        {"id": "t/a1", "uri": f"s3://{s3_bucket}/tenants/t/a1"},
        {"id": "t/nobucket", "uri": "s3://no-such-bucket-0123/tenants/x"},
        {"id": "t/presigned", "uri": f"https://{s3_bucket}.s3.amazonaws.com/t/a0?"
                                    f"X-Amz-Credential=AKIDEXAMPLE%2F20261123&"
                                    f"X-Amz-Signature={signature}"},
        {"id": "t/token", "uri": f"s3://{s3_bucket}/tenants/t/a0?X-Amz-Security-Token="
                                 f"{signature}"},
    ]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    s3.upload_file(str(tmp_path / "m.jsonl"), s3_bucket, "manifest.jsonl")
    ray_tmp = Path(tempfile.mkdtemp(prefix="slr-sec-", dir="/tmp"))  # short AF_UNIX paths
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(AWS_SECRET_ACCESS_KEY=secret, RAY_TMPDIR=str(ray_tmp),
               AWS_ENDPOINT_URL=s3_server)
    marker = f"RAY_TMPDIR={ray_tmp}"
    out = f"s3://{s3_bucket}/out"
    log = tmp_path / "driver.log"
    try:
        with open(log, "wb") as f:
            proc = subprocess.run(
                [sys.executable, "-m", "safelora_ray.cli.main", "sanitize",
                 "--alignment", f"s3://{s3_bucket}/set",
                 "--adapters", f"s3://{s3_bucket}/manifest.jsonl", "--out", out,
                 "--threshold", "0.35", "--workers", "1", "--run-id", "sec",
                 "--no-progress", "--log-level", "DEBUG"],
                env=env, stdout=f, stderr=subprocess.STDOUT, timeout=240)
        driver_log = log.read_bytes()
        assert proc.returncode == 3, driver_log.decode(errors="replace")[-3000:]
        texts = [(log, driver_log), *_all_text(ray_tmp)]
        assert any("session_" in str(p) for p, _ in texts)  # the Ray logs were there to read
    finally:
        for pid in _ray_pids(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
    objects = s3.list_objects_v2(Bucket=s3_bucket, Prefix="out/")["Contents"]
    for obj in objects:
        body = s3.get_object(Bucket=s3_bucket, Key=obj["Key"])["Body"].read()
        texts.append((Path(obj["Key"]), body))
    keys = {o["Key"] for o in objects}
    assert "out/t/a0/adapter_config.json" in keys and "out/_reports/sec/summary.json" in keys
    shutil.rmtree(ray_tmp, ignore_errors=True)
    # The failures are reported (by id)...
    summary = json.loads(s3.get_object(Bucket=s3_bucket,
                                       Key="out/_reports/sec/summary.json")["Body"].read())
    assert summary["counts"]["ok"] == 2 and summary["counts"]["error"] == 3
    # ...and no secret appears anywhere: not the key nor the URLs' signature and token.
    for sentinel in (secret, signature):
        leaks = [str(p) for p, data in texts if sentinel.encode() in data]
        assert not leaks, f"{sentinel[:15]}... leaked into {leaks[:5]}"


def test_redact_masks_signed_urls_passwords_and_secret_env(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from safelora_ray.core.redact import redact

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    text = ("cannot read https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&"
            "X-Amz-Credential=AKID%2F20261123&X-Amz-Signature=abc123&x=1 and "
            "s3://b/k?X-Amz-Security-Token=tok and http://user:pa55@host/x, key "
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY; adapter 'tenant-a/x' is fine")
    got = redact(text)
    assert got is not None
    for secret in ("AKID", "abc123", "tok ", "pa55", "wJalrXUtnFEMI"):
        assert secret not in got, got
    for kept in ("X-Amz-Algorithm=AWS4-HMAC-SHA256", "&x=1", "s3://b/k?", "@host/x",
                 "adapter 'tenant-a/x' is fine"):
        assert kept in got, got
    assert redact(None) is None and redact("") == ""
