"""What every benchmark script shares around its runs: flags, work directory, logging, timing,
the machine's description, and the tables + JSON it prints.
"""

from __future__ import annotations

import argparse
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
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import psutil
import torch

from benchlib import runtime
from benchlib.models import LLAMA2_70B, TINY
from safelora_ray.formats.synthetic import Arch, GiB, MiB


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
    runtime.OBJECT_STORE_MB = args.object_store_mb


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
