"""The code measured and the Ray it runs on: the pipeline modules (of this checkout or an older
one), a fresh local Ray per benchmark, and the fixed cost of starting worker actors.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from safelora_ray.formats.synthetic import MiB


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
    return _package_has("pipelines/sanitize/projection") or (
        _package_has("pipelines") and _package_has("pipelines/projection"))


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
