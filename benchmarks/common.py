"""Shared pieces of the benchmarks: inputs in the real formats, Ray set-up, process memory,
timing, and JSON + table output.

The scripts in this folder import it as ``common`` (they are run as ``python
benchmarks/bench_*.py``, which puts this folder first on ``sys.path``). Nothing here imports
from ``tests/``: the checkpoint writers are re-implemented below in the same on-disk format as
``tests/factory.py`` (Hugging Face layout, safetensors, optional sparse holes).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import datetime as _dt
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import psutil
import torch

logger = logging.getLogger("benchmarks")

GiB = 1024**3
MiB = 1024**2

# ---------------------------------------------------------------------------------------------
# Architectures
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arch:
    """A Llama-like architecture (GQA when ``kv_heads < heads``); tensor names as in HF."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def layer_shapes(self, layer: int) -> list[tuple[str, tuple[int, ...]]]:
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        p = f"model.layers.{layer}."
        return [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]

    def shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every tensor of ``LlamaForCausalLM``, in the order ``save_pretrained`` shards them."""
        out: list[tuple[str, tuple[int, ...]]] = [
            ("model.embed_tokens.weight", (self.vocab, self.hidden))]
        for layer in range(self.layers):
            out.extend(self.layer_shapes(layer))
        out.append(("model.norm.weight", (self.hidden,)))
        out.append(("lm_head.weight", (self.vocab, self.hidden)))
        return out

    @property
    def params(self) -> int:
        return sum(numel(s) for _, s in self.shapes())


#: Llama-2-7B (no GQA), Llama-2-70B (GQA, 8 kv heads) and a ~100M-class pair for the fleet.
LLAMA2_7B = Arch(layers=32, hidden=4096, heads=32, kv_heads=32, intermediate=11008, vocab=32000)
LLAMA2_70B = Arch(layers=80, hidden=8192, heads=64, kv_heads=8, intermediate=28672, vocab=32000)
FLEET_100M = Arch(layers=12, hidden=768, heads=12, kv_heads=12, intermediate=2048, vocab=32000)
TINY = Arch(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=96, vocab=128)


def numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def is_target(name: str, targets: Sequence[str]) -> bool:
    return name.endswith(".weight") and name[: -len(".weight")].rsplit(".", 1)[-1] in targets


# ---------------------------------------------------------------------------------------------
# Deterministic weights (base, aligned) and adapters
# ---------------------------------------------------------------------------------------------


def _gen(seed: int, *keys: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr((seed, *keys)).encode()))


#: rank of the aligned − base update, its scale, and the noise on top of it.
UPDATE_RANK = 8
UPDATE_SCALE = 2e-3
NOISE_SCALE = 2e-4


def base_weight(name: str, shape: Sequence[int], seed: int) -> torch.Tensor:
    """The base model's tensor ``name`` (bf16, N(0, 0.02²))."""
    return (torch.randn(*shape, generator=_gen(seed, name, "w")) * 0.02).to(torch.bfloat16)


def update_basis(name: str, shape: Sequence[int], seed: int) -> torch.Tensor:
    """U (d_out x UPDATE_RANK): the column space of the aligned − base update of ``name``."""
    return torch.randn(shape[0], UPDATE_RANK, generator=_gen(seed, name, "U"))


def aligned_weight(name: str, shape: Sequence[int], seed: int) -> torch.Tensor:
    """The aligned model's tensor: base + a rank-8 update + noise, stored in bf16."""
    w = base_weight(name, shape, seed).to(torch.float32)
    if len(shape) == 2:
        u = update_basis(name, shape, seed)
        wt = torch.randn(UPDATE_RANK, shape[1], generator=_gen(seed, name, "W"))
        w.addmm_(u, wt, alpha=UPDATE_SCALE / UPDATE_RANK**0.5)
        w.add_(torch.randn(*shape, generator=_gen(seed, name, "n")), alpha=NOISE_SCALE)
    return w.to(torch.bfloat16)


_FILLER: bytes | None = None


def _filler() -> bytes:
    """16 MiB of valid bf16 values (N(0, 0.02²)) to tile over non-target tensors."""
    global _FILLER
    if _FILLER is None:
        t = (torch.randn(8 * MiB, generator=torch.Generator().manual_seed(7)) * 0.02)
        _FILLER = t.to(torch.bfloat16).view(torch.uint8).numpy().tobytes()
    return _FILLER


def write_checkpoint(
    path: str | Path,
    entries: Sequence[tuple[str, tuple[int, ...]]],
    tensor: Callable[[str, tuple[int, ...]], torch.Tensor | None],
    *,
    fill: str = "dense",
    max_shard_bytes: int = 10 * GiB,
) -> dict[str, int]:
    """Write an HF-layout bf16 checkpoint, one tensor in memory at a time.

    Args:
        path: Checkpoint directory.
        entries: ``(name, shape)`` in ``save_pretrained`` order; shards are cut in this order
            at ``max_shard_bytes`` (one ``model.safetensors`` when everything fits).
        tensor: The bf16 tensor for a name, or None for "content does not matter".
        fill: What None tensors become: ``dense`` (real bf16 values written to disk) or
            ``holes`` (sparse-file holes: apparent size only, read back as zeros).
        max_shard_bytes: Shard size cap.

    Returns:
        ``{"apparent_bytes", "allocated_bytes", "files"}``.
    """
    if fill not in ("dense", "holes"):
        raise ValueError(f"fill must be dense or holes, got {fill!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in entries:
        n = numel(shape) * 2
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    weight_map: dict[str, str] = {}
    total = 0
    files: list[Path] = []
    for s, chunk in enumerate(shards):
        fname = ("model.safetensors" if len(shards) == 1
                 else f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors")
        total += _write_safetensors(path / fname, chunk, tensor, fill)
        files.append(path / fname)
        weight_map.update(dict.fromkeys((n for n, _ in chunk), fname))
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return {"apparent_bytes": sum(f.stat().st_size for f in files),
            "allocated_bytes": sum(f.stat().st_blocks * 512 for f in files),
            "files": len(files)}


def _write_safetensors(fname: Path, chunk: Sequence[tuple[str, tuple[int, ...]]],
                       tensor: Callable[[str, tuple[int, ...]], torch.Tensor | None],
                       fill: str) -> int:
    ordered = sorted(chunk)  # the safetensors library's order for one dtype: by name
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape in ordered:
        n = numel(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    data_start = 8 + len(hb)
    with open(fname, "wb") as f:
        f.write(len(hb).to_bytes(8, "little"))
        f.write(hb)
        for name, shape in ordered:
            start = data_start + header[name]["data_offsets"][0]
            n = numel(shape) * 2
            t = tensor(name, shape)
            if t is not None:
                if t.dtype != torch.bfloat16 or tuple(t.shape) != tuple(shape):
                    raise ValueError(f"{name}: expected bf16 {shape}, got {t.dtype} {t.shape}")
                f.seek(start)
                f.write(memoryview(t.contiguous().view(torch.uint8).numpy()))
            elif fill == "dense":
                f.seek(start)
                block = _filler()
                left = n
                while left:
                    k = min(left, len(block))
                    f.write(memoryview(block)[:k])
                    left -= k
        f.truncate(data_start + off)
    return off


def write_pair(root: str | Path, arch: Arch, *, targets: Sequence[str] = ("q_proj", "v_proj"),
               seed: int = 0, fill: str = "dense", max_shard_bytes: int = 10 * GiB,
               entries: Sequence[tuple[str, tuple[int, ...]]] | None = None,
               ) -> dict[str, Any]:
    """Write ``base/`` and ``aligned/`` under ``root``: targets real and different, every
    other tensor identical filler (``dense``) or sparse holes (``holes``).

    Returns:
        ``{"base", "aligned", "target_bytes", "apparent_bytes", "allocated_bytes", ...}``
        (bytes per model).
    """
    root = Path(root)
    entries = list(entries if entries is not None else arch.shapes())

    def make(which: str) -> Callable[[str, tuple[int, ...]], torch.Tensor | None]:
        def tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
            if not is_target(name, targets):
                return None
            return (aligned_weight if which == "aligned" else base_weight)(name, shape, seed)
        return tensor

    info = {}
    for which in ("base", "aligned"):
        info[which] = write_checkpoint(root / which, entries, make(which), fill=fill,
                                       max_shard_bytes=max_shard_bytes)
    target_bytes = sum(numel(s) * 2 for n, s in entries if is_target(n, targets))
    return {"base": str(root / "base"), "aligned": str(root / "aligned"),
            "target_bytes_per_model": target_bytes,
            "target_modules": sum(1 for n, _ in entries if is_target(n, targets)),
            "apparent_bytes_per_model": info["base"]["apparent_bytes"],
            "allocated_bytes_per_model": info["base"]["allocated_bytes"],
            "files_per_model": info["base"]["files"], "fill": fill,
            "params": sum(numel(s) for _, s in entries)}


def write_adapters(root: str | Path, arch: Arch, n: int, *, rank: int = 8, seed: int = 0,
                   targets: Sequence[str] = ("q_proj", "v_proj"),
                   lean_every: int = 3) -> list[Path]:
    """Write ``n`` PEFT LoRA adapters (``adapter_config.json`` + ``adapter_model.safetensors``,
    bf16, rank ``rank`` on every layer's target modules) as ``root/tenant-T/adapter-NNNNN``.

    One module in ``lean_every`` has B leaning on the alignment update's column space (high
    cosine: kept); the others are random (low cosine: projected at τ = 0.35), so the selection
    is a real mix.
    """
    from safelora_ray.cli.demo import write_adapter

    root = Path(root)
    shapes = dict(arch.shapes())
    modules = [f"model.layers.{i}.self_attn.{t}" for i in range(arch.layers) for t in targets]
    bases = {m: update_basis(m + ".weight", shapes[m + ".weight"], seed) for m in modules}

    def one(k: int) -> Path:
        g = _gen(seed, "adapter", k)
        lora = {}
        for j, m in enumerate(modules):
            d_out, d_in = shapes[m + ".weight"]
            a = torch.randn(rank, d_in, generator=g) * 0.01
            b = torch.randn(d_out, rank, generator=g) * 0.01
            if (j + k) % lean_every == 0:
                b = b + bases[m] @ torch.randn(UPDATE_RANK, rank, generator=g) * 0.05
            lora[m] = (a.to(torch.bfloat16), b.to(torch.bfloat16))
        p = root / f"tenant-{k % 8}" / f"adapter-{k:05d}"
        write_adapter(p, lora, rank)
        return p

    # Each adapter has its own generator, so threads give the same bytes (torch's kernels
    # and the file writes release the GIL: 2,048 7B-shaped adapters take ~1 min, not ~4).
    threads = max(1, min(8, (os.cpu_count() or 1) // 2, n))
    with cf.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, range(n)))


def link_catalog(pool: Sequence[Path], pool_root: Path, dest: Path) -> Path:
    """A directory-tree catalog of the given adapters made of hard links (no extra disk)."""
    for p in pool:
        rel = p.relative_to(pool_root)
        (dest / rel).mkdir(parents=True, exist_ok=True)
        for f in p.iterdir():
            os.link(f, dest / rel / f.name)
    return dest


def target_refs(base_uri: str, aligned_uri: str, targets: Sequence[str]) -> list[Any]:
    """The TensorRefs a build reads (base and aligned of every target module), in plan order."""
    from safelora_ray.formats.checkpoint import Checkpoint
    from safelora_ray.planning.plan import plan_build

    plan = plan_build(Checkpoint.open(base_uri), Checkpoint.open(aligned_uri), list(targets))
    return [r for m in plan.modules for r in (m.base, m.aligned)]


def evict_page_cache(paths: Iterable[str | Path]) -> int:
    """Ask the kernel to drop the cached pages of these files (``POSIX_FADV_DONTNEED``, no root
    needed; clean pages only, so files are fsynced first). Returns the number of files."""
    n = 0
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            n += 1
        finally:
            os.close(fd)
    return n


def checkpoint_files(*dirs: str | Path) -> list[Path]:
    return [f for d in dirs for f in sorted(Path(d).glob("*.safetensors"))]


def io_floor(src: str | Path, scratch: str | Path) -> dict[str, Any]:
    """The plain sequential I/O a sanitize of the catalog under ``src`` cannot avoid: read
    every file of every adapter, and write the same bytes to as many files under ``scratch``
    (one directory per adapter, as the outputs), each fsynced before the next. One thread,
    one file at a time; the two are timed apart (read a file, then write it).

    Returns:
        ``{"files", "bytes", "read_s", "write_fsync_s", "s"}`` (``s`` = read + write).
    """
    src, scratch = Path(src), Path(scratch)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    buf = bytearray(max((p.stat().st_size for p in files), default=0))
    view = memoryview(buf)
    read_s = write_s = 0.0
    total = 0
    made: set[Path] = set()
    for p in files:
        t0 = time.perf_counter()
        with open(p, "rb", buffering=0) as f:
            n = 0
            while True:
                k = f.readinto(view[n:])
                if not k:
                    break
                n += k
        t1 = time.perf_counter()
        dest = scratch / p.relative_to(src)
        if dest.parent not in made:
            dest.parent.mkdir(parents=True, exist_ok=True)
            made.add(dest.parent)
        with open(dest, "wb", buffering=0) as f:
            w = 0
            while w < n:
                w += f.write(view[w:n])
            os.fsync(f.fileno())
        t2 = time.perf_counter()
        read_s += t1 - t0
        write_s += t2 - t1
        total += n
    shutil.rmtree(scratch, ignore_errors=True)
    return {"files": len(files), "bytes": total, "read_s": round(read_s, 4),
            "write_fsync_s": round(write_s, 4), "s": round(read_s + write_s, 4)}


def write_floor(nbytes: Sequence[int], scratch: str | Path) -> dict[str, Any]:
    """Time to write and fsync files of these sizes under ``scratch`` with plain sequential
    I/O (one thread, 64 MiB writes of non-zero bytes, each file fsynced): the least a build
    that writes a set of such files needs. The files are removed afterwards."""
    scratch = Path(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    block = memoryview((_filler() * 4)[: 64 * MiB])
    t0 = time.perf_counter()
    for i, n in enumerate(nbytes):
        with open(scratch / f"part-{i:05d}", "wb", buffering=0) as f:
            left = n
            while left:
                left -= f.write(block[: min(left, len(block))])
            os.fsync(f.fileno())
    dt = time.perf_counter() - t0
    shutil.rmtree(scratch, ignore_errors=True)
    return {"files": len(nbytes), "bytes": int(sum(nbytes)), "s": round(dt, 4),
            "gbps": gbps(sum(nbytes), dt)}


# ---------------------------------------------------------------------------------------------
# Storage: local or S3 through a moto server started here
# ---------------------------------------------------------------------------------------------


class MotoS3:
    """A moto S3 server on 127.0.0.1 (a free port) with the AWS environment pointing at it.

    Must be started **before** ``ray.init`` so that the Ray workers inherit the environment.
    Objects live in the server's process (this driver): its memory counts in the driver's RSS.
    """

    def __init__(self, workdir: Path) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        empty = workdir / "aws-none"
        empty.write_text("")
        os.environ.update({
            "AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(empty),
            "AWS_SHARED_CREDENTIALS_FILE": str(empty),
        })
        for var in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
            os.environ.pop(var, None)
        import boto3

        self.client = boto3.session.Session().client("s3", endpoint_url=self.endpoint)
        self.bucket = "safelora-bench"
        self.client.create_bucket(Bucket=self.bucket)

    def upload_tree(self, local: str | Path, prefix: str) -> str:
        """Upload a directory tree; returns its ``s3://`` URI."""
        from boto3.s3.transfer import TransferConfig

        cfg = TransferConfig(multipart_chunksize=64 * MiB, max_concurrency=4)
        local = Path(local)
        for f in sorted(p for p in local.rglob("*") if p.is_file()):
            key = f"{prefix}/{f.relative_to(local).as_posix()}"
            self.client.upload_file(str(f), self.bucket, key, Config=cfg)
        return f"s3://{self.bucket}/{prefix}"

    def uri(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.server.stop()


# ---------------------------------------------------------------------------------------------
# Ray
# ---------------------------------------------------------------------------------------------


def _package_has(sub: str) -> bool:
    """Whether the safelora_ray package imported (the first on ``sys.path``: an older
    checkout through ``PYTHONPATH``) has this subpackage or module. Checked on disk: an
    editable install of another checkout would otherwise supply it."""
    import safelora_ray

    root = Path(safelora_ray.__file__).parent
    return (root / sub).is_dir() or (root / f"{sub}.py").is_file()


def pipeline(name: str) -> Any:
    """``safelora_ray.pipelines.<name>`` (for a package, the public names of its ``config``,
    ``worker`` and ``driver`` modules together), or ``safelora_ray.<name>`` in the code before
    commit a98145a (so that the same benchmark measures the code before a redesign too)."""
    import importlib
    import types

    if not _package_has("pipelines"):
        return importlib.import_module(f"safelora_ray.{name}")
    mod = importlib.import_module(f"safelora_ray.pipelines.{name}")
    if not hasattr(mod, "__path__"):
        return mod
    names: dict[str, Any] = {}
    for part in ("config", "worker", "driver"):
        try:
            sub = importlib.import_module(f"{mod.__name__}.{part}")
        except ModuleNotFoundError as e:
            if e.name != f"{mod.__name__}.{part}":
                raise
            continue
        names.update({k: v for k, v in vars(sub).items() if not k.startswith("_")})
    return types.SimpleNamespace(**names)


def holder_design() -> bool:
    """Whether the code measured has set holders and I/O workers (issue 11, commit 36cc1b4),
    rather than one copy of the set in every sanitize worker."""
    return _package_has("pipelines") and _package_has("pipelines/projection")


#: Ray's object store for the benchmarks (``--object-store-mb``): None = Ray's default (30 % of
#: the memory), as a cluster has. A small store makes Ray spill objects to disk: the H100
#: fleet run of 2026-11-27 (with 512 MiB, this module's old setting) spent most of its time so.
OBJECT_STORE_MB: int | None = None


def start_ray(num_cpus: int | None = None, num_gpus: int | None = None) -> float:
    """Start a fresh local Ray for this benchmark (never joins another cluster on the machine).

    Returns:
        Seconds ``ray.init`` took.
    """
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    kwargs: dict[str, Any] = {}
    if num_gpus is not None:
        kwargs["num_gpus"] = num_gpus
    if OBJECT_STORE_MB is not None:
        kwargs["object_store_memory"] = OBJECT_STORE_MB * MiB
    # The node environment the product gives a local Ray it starts (malloc arenas), where the
    # code measured has one.
    try:
        from safelora_ray.execution.ray_utils import LOCAL_NODE_ENV
        node_env = {k: v for k, v in LOCAL_NODE_ENV.items()
                    if k == "MALLOC_ARENA_MAX" and k not in os.environ}
    except ImportError:
        node_env = {}
    os.environ.update(node_env)
    try:
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 log_to_driver=False, configure_logging=False, **kwargs)
    finally:
        for k in node_env:
            os.environ.pop(k, None)
    dt = time.perf_counter() - t0
    store = ray.cluster_resources().get("object_store_memory", 0)
    print(f"  Ray started in {dt:.1f} s, object store {store / 2**30:.1f} GiB", flush=True)
    return dt


def actor_startup_s(n: int | None, use_gpu: bool) -> float:
    """Seconds to start ``n`` actors that import torch and safelora_ray and answer once: the
    fixed Ray cost every build / sanitize call pays before its first byte is read."""
    import ray

    from safelora_ray.execution import resolve_workers

    @ray.remote
    class _Probe:
        def __init__(self) -> None:
            pipeline("build")
            pipeline("sanitize")

        def ping(self) -> int:
            return os.getpid()

    plan = resolve_workers(n, use_gpu, None, small=False)
    specs = getattr(plan, "specs", None)  # the code before 36cc1b4: one resource for all
    wanted = ([(s.num_cpus, s.num_gpus) for s in specs] if specs is not None
              else [(plan.num_cpus, plan.num_gpus)] * plan.num_workers)
    t0 = time.perf_counter()
    actors = [_Probe.options(num_cpus=c, num_gpus=g).remote() for c, g in wanted]
    ray.get([a.ping.remote() for a in actors])
    dt = time.perf_counter() - t0
    for a in actors:
        ray.kill(a)
    return dt


# ---------------------------------------------------------------------------------------------
# Memory of every process of the session
# ---------------------------------------------------------------------------------------------

#: Fields of ``/proc/PID/status`` read per sample (kB): the peak (``VmHWM``), the current
#: resident set and its three parts. ``RssFile`` is mapped files (shared libraries, mapped
#: checkpoints: page cache the process maps), ``RssShmem`` shared memory (Ray's object store
#: is mapped by every worker that reads from it).
_STATUS_FIELDS = {"VmHWM:": "hwm", "VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file",
                  "RssShmem:": "shmem"}


def _status(pid: int) -> dict[str, int] | None:
    """``VmHWM``, ``VmRSS``, ``RssAnon``, ``RssFile``, ``RssShmem`` of a process in bytes, or
    None when it is gone."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = _STATUS_FIELDS.get(line[:line.find(":") + 1])
                if key is not None:
                    out[key] = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return out if "rss" in out else None


def _pss(pid: int) -> int:
    """The process's proportional set size in bytes (``Pss`` of ``/proc/PID/smaps_rollup``:
    each shared page divided among the processes mapping it), 0 when unreadable."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _reset_hwm(pid: int) -> None:
    """Reset a process's ``VmHWM`` to its current RSS (Linux ``clear_refs`` 5); best effort."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


#: Generic roles, least specific first; any other role is an actor's class name. A process
#: is re-classified when a later sample gives a more specific role (an idle worker becomes an
#: actor; a command line read mid-exec looks like ``bash``).
_GENERIC_ROLES = ("?", "ray worker (starting)", "ray worker (idle)", "ray system")
_RAY_SYSTEM_TITLES = ("DashboardAgent", "RuntimeEnvAgent", "JobAgent")
#: Ray Data's processes: its task workers (titled after the operator they run), and the
#: actors its executor starts (statistics, autoscaling, actor locations).
_RAY_DATA_TASKS = ("MapBatches(", "Map(", "ReadItems", "FromItems", "_map_task")
_RAY_DATA_SYSTEM = ("StatsActor", "AutoscalingCoordinator", "ActorLocationTracker",
                    "SplitCoordinator")


def _specificity(role: str) -> int:
    if role in _GENERIC_ROLES:
        return 1 + _GENERIC_ROLES.index(role)
    if role == "driver" or role[:1].isupper():  # an actor class name
        return 10
    return 0  # some other program name, seen mid-exec


def _role(proc: psutil.Process, driver: int) -> str:
    if proc.pid == driver:
        return "driver"
    try:
        cmd = proc.cmdline()
    except (psutil.Error, OSError):
        return "?"
    head = cmd[0] if cmd else proc.name()
    if head.startswith("ray::"):
        words = head[5:].split()
        title = words[0] if words else "worker"
        if title.startswith("IDLE"):
            return "ray worker (idle)"
        if title.startswith(_RAY_SYSTEM_TITLES):
            return "ray system"
        if title.startswith(_RAY_DATA_TASKS):  # a task worker's title changes per task
            return "Ray Data task worker"
        if title.lstrip("_").startswith(_RAY_DATA_SYSTEM):
            return "Ray Data system actor"
        return title.split(".")[0].lstrip("_") or "ray worker"
    text = " ".join(cmd)
    if "default_worker.py" in text:
        return "ray worker (starting)"
    for key in ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "agent"):
        if key in text:
            return "ray system"
    return proc.name() or "other"


class ProcessMonitor:
    """Memory and CPU time of the driver and of every process it started (Ray's GCS, raylet,
    workers), sampled in a background thread.

    Per process the peak is the kernel's ``VmHWM`` (exact, reset when the monitor starts),
    read every ``interval`` seconds while the process lives (a process that exits between two
    samples loses at most its last ``interval`` of growth). For the run as a whole, each
    sample sums the current RSS of every process; ``peak_total`` is the largest such sum seen
    (the run's RSS at its peak moment, not a sum of per-process peaks reached at different
    times), and ``peak_moment`` what each process and role held in that sample. Shared pages
    (torch's libraries, Ray's object store) count in every process that maps them, so the
    sum is an upper bound; its anonymous part (``RssAnon``: heaps, tensors) is reported
    apart, as is its own peak, and so is the largest sum of PSS (``peak_total_pss``: shared
    pages divided among the processes mapping them, so that a page counts once in the sum —
    the run's real memory, page cache it maps included). PSS is read every ``pss_interval``
    seconds only: the kernel walks every mapping for it (~2 ms a process, 23 ms a sample of
    a 2-worker Ray here), which every 50 ms would take a third of a core from the run.

    Roles come from the processes' Ray titles (``SafeLoraWorker``, ``ray system``, ...);
    :meth:`label` refines them (which worker holds the alignment set).
    """

    def __init__(self, interval: float = 0.05, pids: Sequence[int] | None = None,
                 pss_interval: float = 0.5) -> None:
        self.interval = interval
        self.pss_interval = pss_interval
        self._pss_next = 0.0
        self.driver = os.getpid()
        self.only = list(pids) if pids is not None else None
        self.peaks: dict[int, dict[str, Any]] = {}
        self.peak_total = 0
        self.peak_anon = 0
        self.peak_pss = 0
        self.peak_moment: dict[str, Any] = {}
        self.samples = 0
        self.labels: dict[int, str] = {}
        self._t0 = time.perf_counter()
        self._cpu_last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _procs(self) -> list[psutil.Process]:
        if self.only is not None:
            return [psutil.Process(p) for p in self.only if psutil.pid_exists(p)]
        me = psutil.Process(self.driver)
        try:
            return [me, *me.children(recursive=True)]
        except psutil.Error:
            return [me]

    def _sample(self, first: bool = False) -> None:
        total = anon = pss = 0
        now: dict[int, dict[str, int]] = {}
        with_pss = first or time.perf_counter() >= self._pss_next
        if with_pss:
            self._pss_next = time.perf_counter() + self.pss_interval
        for p in self._procs():
            if first:
                _reset_hwm(p.pid)
            st = _status(p.pid)
            if st is None:
                continue
            rss = st["rss"]
            now[p.pid] = st
            total += rss
            anon += st.get("anon", 0)
            if with_pss:
                pss += _pss(p.pid)
            try:
                ct = p.cpu_times()
                cpu = ct.user + ct.system
            except (psutil.Error, OSError):
                cpu = None
            rec = self.peaks.get(p.pid)
            if rec is None:
                rec = self.peaks[p.pid] = {"pid": p.pid, "role": _role(p, self.driver),
                                           "peak_rss": 0, "peak_anon": 0, "cpu_s": 0.0}
            elif rec["role"] != "driver":
                role = _role(p, self.driver)
                if _specificity(role) > _specificity(rec["role"]):
                    rec["role"] = role
            if cpu is not None:
                last = self._cpu_last.get(p.pid)
                # CPU time spent since the previous sample (or since the process started,
                # when it started inside the measured block).
                rec["cpu_s"] += cpu - last if last is not None else (0.0 if first else cpu)
                self._cpu_last[p.pid] = cpu
            rec["peak_rss"] = max(rec["peak_rss"], st.get("hwm", 0), rss)
            rec["peak_anon"] = max(rec["peak_anon"], st.get("anon", 0))
        self.samples += 1
        self.peak_anon = max(self.peak_anon, anon)
        self.peak_pss = max(self.peak_pss, pss)
        if total > self.peak_total:
            self.peak_total = total
            self.peak_moment = {
                "t_s": round(time.perf_counter() - self._t0, 3),
                "pids": {pid: {k: st.get(k, 0) for k in ("rss", "anon", "file", "shmem")}
                         for pid, st in now.items()}}

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> ProcessMonitor:
        """Start sampling (again: peaks and CPU time accumulate over every ``with`` block)."""
        self._stop = threading.Event()
        self._cpu_last = {}
        self._t0 = time.perf_counter()
        self._sample(first=True)
        self._thread = threading.Thread(target=self._run, name="bench-monitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()

    def label(self, roles: dict[int, str]) -> None:
        """Give these processes (by pid) a more precise role than their Ray title, e.g.
        ``SafeLoraWorker (holder)``. Applies to every sample, past and future."""
        self.labels.update(roles)

    def _role_of(self, pid: int) -> str:
        return self.labels.get(pid) or self.peaks.get(pid, {}).get("role", "?")

    def summary(self) -> dict[str, Any]:
        """Per role: process count, the largest per-process peak RSS, their sum, the role's
        RSS at the run's peak moment, and the CPU seconds used inside the measured blocks;
        the run's peak total (RSS and its anonymous part), and every process."""
        roles: dict[str, dict[str, Any]] = {}
        for pid, rec in self.peaks.items():
            if not rec["peak_rss"]:
                continue  # gone before it could be read
            r = roles.setdefault(self._role_of(pid), {
                "processes": 0, "max_peak_rss": 0, "sum_peak_rss": 0, "cpu_s": 0.0,
                "rss_at_peak": 0, "anon_at_peak": 0})
            r["processes"] += 1
            r["max_peak_rss"] = max(r["max_peak_rss"], rec["peak_rss"])
            r["sum_peak_rss"] += rec["peak_rss"]
            r["cpu_s"] = round(r["cpu_s"] + rec["cpu_s"], 3)
        at_peak = self.peak_moment.get("pids", {})
        for pid, st in at_peak.items():
            r = roles.get(self._role_of(pid))
            if r is not None:
                r["rss_at_peak"] += st["rss"]
                r["anon_at_peak"] += st["anon"]
        moment = {k: sum(st[k] for st in at_peak.values())
                  for k in ("rss", "anon", "file", "shmem")}
        return {"roles": roles, "peak_total_rss": self.peak_total,
                "peak_total_anon": self.peak_anon, "peak_total_pss": self.peak_pss,
                "peak_moment": {"t_s": self.peak_moment.get("t_s"),
                                "processes": len(at_peak), **moment},
                "samples": self.samples,
                "cpu_s": round(sum(rec["cpu_s"] for rec in self.peaks.values()), 3),
                "processes": sorted(({**rec, "role": self._role_of(pid)}
                                     for pid, rec in self.peaks.items()),
                                    key=lambda r: r["pid"])}


MEMORY_HEADERS = ["role", "processes", "max peak RSS per process, MiB", "sum of peaks, MiB",
                  "RSS at the run's peak, MiB", "CPU s"]


def memory_rows(summary: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for role, r in sorted(summary["roles"].items()):
        rows.append([role, r["processes"], mib(r["max_peak_rss"]), mib(r["sum_peak_rss"]),
                     mib(r.get("rss_at_peak", 0)), round(r["cpu_s"], 2)])
    pm = summary.get("peak_moment") or {}
    rows.append(["all processes at the run's peak moment (RSS; anon / file / shmem)", "",
                 "", "", f"{mib(summary['peak_total_rss'])} ({mib(pm.get('anon', 0))} / "
                 f"{mib(pm.get('file', 0))} / {mib(pm.get('shmem', 0))})",
                 round(summary["cpu_s"], 2)])
    rows.append(["largest sum of anonymous RSS (heaps, tensors; no page cache)", "", "", "",
                 mib(summary.get("peak_total_anon", 0)), ""])
    rows.append(["largest sum of PSS (a shared page counted once)", "", "", "",
                 mib(summary.get("peak_total_pss", 0)), ""])
    return rows


# ---------------------------------------------------------------------------------------------
# What each worker actor holds (asked of the actors themselves)
# ---------------------------------------------------------------------------------------------


def _worker_state(ctx: Any) -> dict[str, Any]:
    """Runs on a worker (a task function): its pid, device, slots, and the bytes of the
    alignment set it keeps resident: ``set_bytes`` its own copy (a GPU holder's, or the copy a
    CPU node's first I/O worker put in the node's object store), ``mapped_bytes`` the object
    store's pages it computes with (no copy of its own); an I/O worker of a GPU node holds the
    set's metadata only."""
    set_bytes = mapped = 0
    for slot in ctx.slots():
        held = ctx.peek(slot)
        obj = held[1] if held else None
        set_bytes += int(getattr(obj, "store_bytes", 0) or 0)  # a CPU node's shared set
        engine = getattr(obj, "engine", obj)  # a holder's service, or an engine
        matrices = getattr(engine, "matrices", None)
        if matrices is not None and hasattr(matrices, "nbytes"):
            if getattr(matrices, "mapped", False):
                mapped += int(matrices.nbytes)
            else:
                set_bytes += int(matrices.nbytes)
        own = getattr(obj, "_own_engine", None)  # a sanitizer computing its own products
        if own is not None:
            set_bytes += int(own.matrices.nbytes)
    cuda = None
    if str(ctx.device).startswith("cuda"):
        cuda = {"allocated": int(torch.cuda.memory_allocated()),
                "reserved": int(torch.cuda.memory_reserved())}
    return {"pid": os.getpid(), "device": ctx.device, "node_id": ctx.node_id,
            "slots": sorted(ctx.slots()), "set_bytes": set_bytes, "mapped_bytes": mapped,
            "cuda": cuda}


def worker_states(session: Any, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """Ask every worker actor of a ``worker_session`` what it holds (see
    :func:`_worker_state`). Empty when the session's actors cannot be listed."""
    import ray

    actors = session_actors(session)
    if not actors or not ray.is_initialized() or not holder_design():
        return []  # the code before 36cc1b4: every worker holds the set
    # Shipped by reference: Ray puts the driver's script folder (benchmarks/) on the
    # workers' sys.path, so they import `common` too.
    refs = [a.call.options(concurrency_group="control").remote(_worker_state)
            for a in actors]
    out = []
    for ref in refs:
        try:
            got = ray.get(ref, timeout=timeout_s)
        except Exception as e:  # a worker that died: nothing to label
            logger.warning("could not ask a worker what it holds: %s", e)
            continue
        out.append(getattr(got, "result", got))
    return out


def session_actors(session: Any) -> list[Any]:
    """The worker actors of a ``worker_session`` (its own list: ``(key, handle)`` pairs, or
    handles in the code before 36cc1b4)."""
    items = list(getattr(session, "_actors", []))
    return [x[1] if isinstance(x, tuple) else x for x in items]


#: Process roles of a job's workers: a job is over once none of them is left.
JOB_WORKER_ROLES = ("SafeLoraWorker", "MapWorker")


def release_freed_memory() -> None:
    """Give the heap memory this process freed back to the OS (glibc ``malloc_trim``), so
    that what the baseline or the input writers allocated and freed in the driver does not
    count in the next measured run's RSS (~0.5 GB after the 134M baseline). No-op elsewhere."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(name or "libc.so.6").malloc_trim(0)


def wait_workers_gone(timeout_s: float = 30.0) -> float:
    """Wait until the worker actors this process's jobs started (``SafeLoraWorker``, Ray
    Data's ``MapWorker``) have exited: ``ray.kill`` returns at once, and a dying worker of
    one job must not count in the next job's memory. Returns the seconds waited."""
    t0 = time.perf_counter()
    me = psutil.Process(os.getpid())
    while time.perf_counter() - t0 < timeout_s:
        try:
            procs = me.children(recursive=True)
        except psutil.Error:
            break
        if not any(_role(p, me.pid).startswith(JOB_WORKER_ROLES) for p in procs):
            break
        time.sleep(0.1)
    return round(time.perf_counter() - t0, 3)


def worker_roles(states: Sequence[dict[str, Any]]) -> dict[int, str]:
    """``{pid: "SafeLoraWorker (holder)"}`` and the like, from :func:`worker_states`: a
    holder keeps alignment matrices resident; an I/O worker has sanitized batches (its
    ``sanitizer`` slot); a CPU node's first worker is both (``holder+io``)."""
    roles = {}
    for s in states:
        io = "sanitizer" in s["slots"]
        role = ("holder+io" if io else "holder") if s["set_bytes"] else ("io" if io else "idle")
        roles[s["pid"]] = f"SafeLoraWorker ({role})"
    return roles


# ---------------------------------------------------------------------------------------------
# Timing, machine, output
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def timer() -> Iterator[dict[str, float]]:
    """``with timer() as t: ...`` then ``t["s"]`` is the elapsed wall time."""
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        yield t
    finally:
        t["s"] = time.perf_counter() - t0


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def mib(n: float) -> float:
    return round(n / MiB, 1)


def gbps(nbytes: float, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 3) if seconds > 0 else float("nan")


def _commit(path: Path) -> str | None:
    """The git commit of the checkout the measured code was imported from (``+dirty`` with
    uncommitted changes to it), or None."""
    import subprocess

    try:
        head = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--", "."],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head[:12] + ("+dirty" if dirty else "")


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    import ray

    import safelora_ray

    gpu = None
    if torch.cuda.is_available():
        gpu = {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
               "capability": list(torch.cuda.get_device_capability(0))}
    cpu_model = platform.processor()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg()
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname_hash": f"{zlib.crc32(platform.node().encode()):08x}",
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gib": round(psutil.virtual_memory().total / GiB, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "ray": ray.__version__,
        "safelora_ray": safelora_ray.__version__,
        "safelora_ray_commit": _commit(Path(safelora_ray.__file__).parent),
        "gpu": gpu,
        "loadavg_at_start": [round(x, 2) for x in load],
        # Other processes were already busy when the run started: the figures are noisy.
        "shared_machine": load[0] > 0.5,
    }


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    cells = [[cell(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(
        c.rjust(w) if isinstance(v, int | float) else c.ljust(w)
        for c, v, w in zip(cells[i], r, widths, strict=True)) + " |"
        for i, r in enumerate(rows)]
    return "\n".join([line, sep, *body])


def emit(result: dict[str, Any], tables: Sequence[tuple[str, Sequence[str],
                                                        Sequence[Sequence[Any]]]],
         out_json: str | None) -> None:
    """Print the tables, then the JSON (also written to ``out_json`` when given)."""
    for title, headers, rows in tables:
        print(f"\n## {title}\n")
        print(format_table(headers, rows))
    text = json.dumps(_finite(result), indent=2, default=_json_default, allow_nan=False)
    if out_json:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(text + "\n")
        print(f"\nJSON written to {out_json}")
    else:
        print("\n" + text)


def _finite(o: Any) -> Any:
    """NaN / inf (a figure not measured) become null: the output is strict JSON."""
    if isinstance(o, float) and (o != o or o in (float("inf"), float("-inf"))):
        return None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_finite(v) for v in o]
    return o


def _json_default(o: Any) -> Any:
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    if isinstance(o, Path):
        return str(o)
    return str(o)


def common_args(p: argparse.ArgumentParser, *, storage: bool = True) -> None:
    """Flags every benchmark has."""
    p.add_argument("--workers", type=int, default=None,
                   help="Ray worker actors (default: one per GPU, else one per CPU)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda = GPU workers (use_gpu=True; the --gpu of the CLI)")
    p.add_argument("--gpu", dest="device", action="store_const", const="cuda",
                   help="same as --device cuda")
    if storage:
        p.add_argument("--storage", choices=("local", "s3"), default="local",
                       help="where inputs and outputs live (s3: a moto server started here)")
    p.add_argument("--repeats", type=int, default=3, help="runs per figure (median reported)")
    p.add_argument("--workdir", default=None,
                   help="where inputs are written (default: a temp dir, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the workdir")
    p.add_argument("--out-json", default=None, help="write the JSON result here")
    p.add_argument("--smoke", action="store_true", help="tiniest sizes (for the smoke test)")
    p.add_argument("--object-store-mb", type=int, default=None,
                   help="Ray's object store (default: Ray's own, 30%% of the memory)")


def apply_common(args: argparse.Namespace) -> None:
    """Settings of :func:`common_args` that apply to the whole script."""
    global OBJECT_STORE_MB
    OBJECT_STORE_MB = args.object_store_mb


def scale_args(p: argparse.ArgumentParser, layers: int) -> None:
    """The flags of the 70B-shaped benchmarks (real q/v layers, hole layers, shard size)."""
    p.add_argument("--layers", type=int, default=layers,
                   help="layers with real q_proj/v_proj (80 = the full 70B target set)")
    p.add_argument("--total-layers", type=int, default=LLAMA2_70B.layers,
                   help="layers of hole tensors (80 = Llama-2-70B)")
    p.add_argument("--shard-gb", type=float, default=10.0, help="checkpoint shard size (GB)")


def scale_arch(args: argparse.Namespace) -> tuple[Arch, int]:
    """The architecture and number of real layers of :func:`scale_args` (``--smoke``: 70B
    names at tiny widths, the same code path in seconds)."""
    if args.smoke:
        args.repeats = 1
        return replace(TINY, layers=4), 2
    arch = replace(LLAMA2_70B, layers=args.total_layers)
    return arch, min(args.layers, arch.layers)


@contextlib.contextmanager
def workdir(arg: str | None, keep: bool, prefix: str) -> Iterator[Path]:
    if arg:
        path = Path(arg)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=os.environ.get("BENCH_TMPDIR")))
    try:
        yield path
    finally:
        if keep:
            print(f"workdir kept: {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("safelora_ray", "werkzeug", "botocore", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)


# ---------------------------------------------------------------------------------------------
# Build measurement (shared by bench_build and bench_scale)
# ---------------------------------------------------------------------------------------------


def raw_read_s(refs: Sequence[Any], base_uri: str, aligned_uri: str, threads: int) -> dict:
    """Time reading exactly the build's target byte ranges with the same Storage class
    (``read_into`` into reused buffers), with ``threads`` concurrent readers (1 = sequential).
    """
    import concurrent.futures as cf

    from safelora_ray.storage import open_storage

    storages = {base_uri: open_storage(base_uri), aligned_uri: open_storage(aligned_uri)}
    biggest = max(r.nbytes for r in refs)
    local = threading.local()

    def read(ref: Any) -> int:
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = bytearray(biggest)
        storages[ref.uri].read_into(ref.path, ref.start, memoryview(buf)[: ref.nbytes])
        return ref.nbytes

    t0 = time.perf_counter()
    if threads <= 1:
        total = sum(read(r) for r in refs)
    else:
        with cf.ThreadPoolExecutor(threads) as pool:
            total = sum(pool.map(read, refs))
    dt = time.perf_counter() - t0
    counted = sum(s.bytes_read for s in storages.values())
    assert counted == total, (counted, total)
    return {"threads": threads, "bytes": total, "s": round(dt, 4), "gbps": gbps(total, dt)}


def reader_ceiling_s(base_uri: str, aligned_uri: str, targets: Sequence[str],
                     scratch: str) -> dict:
    """One build worker's reader with no compute: its prefetch thread (ranged reads of base and
    aligned in two threads into reused buffers, then their source digest hashed in parallel
    chunks) over every target module, each released once taken, as the build does after
    computing it. The most one worker can feed its device; a GPU build
    is bounded by it."""
    from safelora_ray.formats.checkpoint import Checkpoint
    from safelora_ray.planning.plan import plan_build

    ShardBuilder = pipeline("build").ShardBuilder

    plan = plan_build(Checkpoint.open(base_uri), Checkpoint.open(aligned_uri), list(targets))
    files = plan.shards[0]  # one worker: the whole plan
    builder = ShardBuilder(files, scratch, "cpu")
    modules = getattr(builder, "_modules", None)
    release = getattr(builder, "release", None)
    if modules is None or release is None:  # the build changed: nothing to measure
        return {"s": None, "gbps": None}
    t0 = time.perf_counter()
    try:
        for i in range(len(files)):
            for item in modules(i):
                release(item)
    finally:
        builder.close()
    dt = time.perf_counter() - t0
    return {"bytes": plan.input_bytes, "s": round(dt, 4), "gbps": gbps(plan.input_bytes, dt)}


def measure_build(*, base_uri: str, aligned_uri: str, out_uri: Callable[[int], str],
                  targets: Sequence[str], workers: int | None, use_gpu: bool, repeats: int,
                  read_threads: int, cold_files: Sequence[Path] | None = None,
                  build_kwargs: dict[str, Any] | None = None) -> dict:
    """Per repeat: raw sequential read, raw threaded read, then the build, of the same bytes.

    With ``cold_files`` the files' cached pages are dropped before each of the three.
    ``build_kwargs``: more BuildConfig fields (``projection``, ``energy``...).
    """
    build, BuildConfig = pipeline("build").build, pipeline("build").BuildConfig

    refs = target_refs(base_uri, aligned_uri, targets)
    target_bytes = sum(r.nbytes for r in refs)
    runs = []
    for rep in range(repeats):
        rec: dict[str, Any] = {"repeat": rep}
        for key, threads in (("raw_seq", 1), ("raw_threads", read_threads)):
            if cold_files:
                evict_page_cache(cold_files)
            rec[key] = raw_read_s(refs, base_uri, aligned_uri, threads)
        if cold_files:
            evict_page_cache(cold_files)
        with tempfile.TemporaryDirectory(prefix="bench-scratch-") as scratch:
            rec["reader_ceiling"] = reader_ceiling_s(base_uri, aligned_uri, targets, scratch)
        if cold_files:
            evict_page_cache(cold_files)
        with ProcessMonitor() as mon, timer() as t:
            res = build(BuildConfig(base=base_uri, aligned=aligned_uri, out=out_uri(rep),
                                    targets=list(targets), workers=workers, use_gpu=use_gpu,
                                    progress=False, **(build_kwargs or {})))
        assert res.source_bytes == target_bytes, (res.source_bytes, target_bytes)
        rec.update({
            "build_s": round(t["s"], 3), "build_duration_s": round(res.duration_s, 3),
            "bytes_read": res.bytes_read, "read_ratio": round(res.bytes_read / target_bytes, 5),
            "build_gbps": gbps(target_bytes, t["s"]), "workers": res.workers,
            "device": res.device, "stats": {k: round(v, 3) for k, v in res.stats.items()},
            "num_modules": res.num_modules, "memory": mon.summary(),
            "stored_bytes": res.stored_bytes,
        })
        best_raw = min(rec["raw_seq"]["s"], rec["raw_threads"]["s"])
        rec["build_over_raw"] = round(t["s"] / best_raw, 2) if best_raw > 0 else None
        out = out_uri(rep)
        if "://" not in out:  # a local set: write + fsync its bytes with plain sequential I/O
            sizes = [f.stat().st_size for f in sorted(Path(out).rglob("*")) if f.is_file()]
            # A 70B set (~22 GB) and its floor do not both fit beside the pair on a 64 GB
            # disk: then the set (checked by the build itself) goes first.
            if shutil.disk_usage(Path(out).parent).free < 1.2 * sum(sizes):
                shutil.rmtree(out, ignore_errors=True)
                rec["set_removed_before_write_floor"] = True
            rec["raw_write"] = write_floor(sizes, Path(out).parent / f".write-floor-{rep}")
            floor = max(best_raw, rec["raw_write"]["s"])
            rec["build_over_floor"] = round(t["s"] / floor, 2) if floor > 0 else None
        runs.append(rec)
        print(f"  repeat {rep}: build {t['s']:.2f} s ({rec['build_gbps']} GB/s), raw read "
              f"{rec['raw_seq']['s']:.2f} s seq / {rec['raw_threads']['s']:.2f} s "
              f"x{read_threads}, bytes read / target = {rec['read_ratio']}", flush=True)
    mid = sorted(runs, key=lambda r: r["build_s"])[len(runs) // 2]
    summary = {
        "target_bytes": target_bytes,
        "num_modules": runs[0]["num_modules"],
        "bytes_read": runs[0]["bytes_read"],
        "read_ratio": runs[0]["read_ratio"],
        "build_s_median": median([r["build_s"] for r in runs]),
        "raw_seq_s_median": median([r["raw_seq"]["s"] for r in runs]),
        "raw_threads_s_median": median([r["raw_threads"]["s"] for r in runs]),
        "reader_ceiling_s_median": median([r["reader_ceiling"]["s"] or float("nan")
                                           for r in runs]),
        "read_threads": read_threads,
        "median_run": mid["repeat"],
    }
    summary["build_gbps_median"] = gbps(target_bytes, summary["build_s_median"])
    summary["raw_seq_gbps_median"] = gbps(target_bytes, summary["raw_seq_s_median"])
    summary["raw_threads_gbps_median"] = gbps(target_bytes, summary["raw_threads_s_median"])
    summary["reader_ceiling_gbps_median"] = gbps(target_bytes,
                                                 summary["reader_ceiling_s_median"])
    best = min(summary["raw_seq_s_median"], summary["raw_threads_s_median"])
    summary["build_over_raw_median"] = round(summary["build_s_median"] / best, 2)
    if all("raw_write" in r for r in runs):
        # The bound: build ≤ 1.25 x max(read the target bytes, write the set's bytes)
        summary["set_bytes"] = runs[0]["raw_write"]["bytes"]
        summary["raw_write_s_median"] = median([r["raw_write"]["s"] for r in runs])
        summary["raw_write_gbps_median"] = gbps(summary["set_bytes"],
                                                summary["raw_write_s_median"])
        floor = max(best, summary["raw_write_s_median"])
        summary["build_over_floor_median"] = round(summary["build_s_median"] / floor, 2)
    return {"summary": summary, "runs": runs}


def build_tables(m: dict, arch_line: str) -> list[tuple[str, list[str], list[list[Any]]]]:
    s = m["summary"]
    runs = m["runs"]
    mid = next(r for r in runs if r["repeat"] == s["median_run"])
    main = [
        ["target tensor bytes (base + aligned)", f"{s['target_bytes']:,}"],
        ["target modules", s["num_modules"]],
        ["bytes read by the build", f"{s['bytes_read']:,}"],
        ["bytes read / target bytes", f"{s['read_ratio']:.4f}"],
        ["raw read, sequential (s, GB/s)",
         f"{s['raw_seq_s_median']:.3f} s, {s['raw_seq_gbps_median']} GB/s"],
        [f"raw read, {s['read_threads']} threads (s, GB/s)",
         f"{s['raw_threads_s_median']:.3f} s, {s['raw_threads_gbps_median']} GB/s"],
        ["one worker's reader loop, no compute (read + source digest; s, GB/s)",
         f"{s['reader_ceiling_s_median']:.3f} s, {s['reader_ceiling_gbps_median']} GB/s"],
        ["build wall time (s, GB/s of target bytes)",
         f"{s['build_s_median']:.3f} s, {s['build_gbps_median']} GB/s"],
        ["build time / best raw read time", f"{s['build_over_raw_median']:.2f}"],
        *([["set bytes written + fsynced, plain sequential (s, GB/s)",
            f"{s['raw_write_s_median']:.3f} s, {s['raw_write_gbps_median']} GB/s "
            f"({s['set_bytes']:,} bytes)"],
           ["build time / max(best raw read, raw write) (target ≤ 1.25)",
            f"{s['build_over_floor_median']:.2f}"]] if "build_over_floor_median" in s else []),
        ["repeats (median reported)", len(runs)],
    ]
    st = mid["stats"]
    w = max(1, mid["workers"])
    where = [
        ["workers x device", f"{mid['workers']} x {mid['device']}"],
        ["read_s (sum over workers; overlapped with compute)", st.get("read_s")],
        ["compute_s (sum over workers)", st.get("compute_s")],
        ["write_s (sum over workers)", st.get("write_s")],
        ["(compute_s + write_s) / workers", round((st.get("compute_s", 0)
                                                   + st.get("write_s", 0)) / w, 3)],
        ["build wall time (median run)", mid["build_s"]],
    ]
    return [
        (f"build: {arch_line}", ["figure", "value"], main),
        ("where the time goes (median run)", ["figure", "seconds"], where),
        ("peak RSS and CPU time by process role (median run)", MEMORY_HEADERS,
         memory_rows(mid["memory"])),
    ]
