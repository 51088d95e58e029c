"""The ``safelora-ray`` command line: a thin layer over the Python API.

Exit codes:
    0  success (every adapter ok or skipped, for ``sanitize``)
    1  the run failed (bad inputs named in the message, storage or cluster errors)
    2  usage error (bad flags or parameter values)
    3  ``sanitize`` finished but some adapters failed (the others were written)
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from safelora_ray._version import __version__
from safelora_ray.errors import ConfigError, SafeLoraError
from safelora_ray.redact import configure_logging, redact

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_ray(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster address (default: $RAY_ADDRESS, else a new local Ray)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker actors; 0 = in this process (default: one per GPU, or one per "
                        "CPU without GPUs; a small job runs in this process when no Ray "
                        "cluster is configured)")
    dev = p.add_mutually_exclusive_group()
    dev.add_argument("--gpu", dest="use_gpu", action="store_true", default=None,
                     help="require GPU workers")
    dev.add_argument("--cpu", dest="use_gpu", action="store_false", help="use CPU workers only")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used by ``jobs/`` entrypoints and the tests)."""
    parser = argparse.ArgumentParser(
        prog="safelora-ray",
        description="Safe LoRA at fleet scale: build alignment sets, sanitize LoRA adapters.",
    )
    parser.add_argument("--version", action="version", version=f"safelora-ray {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="build an alignment set from a base/aligned model pair")
    b.add_argument("--base", required=True, help="base (unaligned) checkpoint URI")
    b.add_argument("--aligned", required=True, help="aligned (chat) checkpoint URI")
    b.add_argument("--targets", default="q_proj,v_proj",
                   help="comma-separated module-name suffixes (default: q_proj,v_proj)")
    b.add_argument("--out", required=True, help="where to write the alignment set (path or s3://)")
    b.add_argument("--max-file-gb", type=float, default=2.0,
                   help="cap on one output safetensors file, in GB (default 2)")
    b.add_argument("--timeout", type=float, default=3600.0,
                   help="seconds one output file may take before the build fails")
    _add_ray(b)
    _add_common(b)

    s = sub.add_parser("sanitize", help="sanitize a catalog of LoRA adapters (SPEC §2)")
    s.add_argument("--alignment", required=True, help="alignment set URI")
    s.add_argument("--adapters", required=True,
                   help="catalog: a directory tree or s3:// prefix of PEFT adapters, or a "
                        ".parquet/.jsonl manifest with a 'uri' column")
    s.add_argument("--out", required=True, help="output root (path or s3://)")
    sel = s.add_mutually_exclusive_group(required=True)
    sel.add_argument("--threshold", type=float,
                     help="project modules whose rounded cosine is <= T (paper: 0.35)")
    sel.add_argument("--num-proj-layers", type=int,
                     help="project the K modules with the smallest cosines (ties included)")
    s.add_argument("--strict-k", action="store_true",
                   help="with --num-proj-layers: exactly K modules, ties broken by name")
    s.add_argument("--force", action="store_true", help="redo adapters already in the ledger")
    s.add_argument("--batch-size", type=int, default=8, help="adapters per task (default 8)")
    s.add_argument("--max-in-flight", type=int, default=2,
                   help="batches queued per worker (default 2)")
    s.add_argument("--workers-per-gpu", type=int, default=1,
                   help="GPU workers sharing one GPU, each with its own copy of the alignment "
                        "set (default 1; 4 suits 7B sets on an 80 GB GPU)")
    s.add_argument("--run-id", default=None, help="report folder name (default: timestamp)")
    s.add_argument("--tenant-depth", type=int, default=1,
                   help="path components of an adapter id that name its tenant in the "
                        "reports (default 1: 'acme/chat-1' belongs to 'acme')")
    s.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds one batch may take before the run fails")
    _add_ray(s)
    _add_common(s)

    d = sub.add_parser("demo", help="run the whole pipeline on a synthetic model, locally")
    d.add_argument("--dir", default="safelora-demo",
                   help="where to write (default ./safelora-demo)")
    d.add_argument("--threshold", type=float, default=0.35)
    d.add_argument("--workers", type=int, default=None,
                   help="worker actors; 0 = in this process (default: one per CPU)")
    _add_common(d)

    i = sub.add_parser("inspect", help="print a readable summary of an alignment set")
    i.add_argument("uri", help="alignment set URI")
    i.add_argument("--modules", action="store_true", help="also list every module")
    _add_common(i)
    return parser


def _cmd_build(args: argparse.Namespace) -> int:
    from safelora_ray.build import BuildConfig, build

    cfg = BuildConfig(
        base=args.base, aligned=args.aligned, out=args.out, targets=args.targets,
        workers=args.workers, use_gpu=args.use_gpu,
        max_file_bytes=int(args.max_file_gb * 1024**3), task_timeout_s=args.timeout,
        progress=not args.no_progress, ray_address=args.ray_address,
    )
    res = build(cfg)
    verb = "reused" if res.reused else "built"
    print(f"{verb} alignment set {res.content_id}: {res.num_modules} modules at {res.uri}")
    if not res.reused:
        where = (f"on {res.workers} {res.device} worker(s)" if res.workers
                 else f"in this process ({res.device})")
        print(f"read {res.bytes_read / 1e6:.1f} MB of target tensors in {res.duration_s:.1f} s "
              f"{where}")
    return EXIT_OK


def _cmd_inspect(args: argparse.Namespace) -> int:
    from safelora_ray.formats.alignment_set import AlignmentSet

    aset = AlignmentSet.open(args.uri)
    print(aset.summary())
    if args.modules:
        print()
        print(f"{'module':60s} {'layer':>5s} {'form':>4s} {'stored shape':>14s} {'‖V‖_F':>10s}")
        for r in aset.rows.values():
            shape = "x".join(map(str, r.stored_shape))
            layer = "-" if r.layer is None else str(r.layer)
            print(f"{r.module:60s} {layer:>5s} {r.form:>4s} {shape:>14s} {r.norm:10.4g}")
    return EXIT_OK


def _cmd_sanitize(args: argparse.Namespace) -> int:
    from safelora_ray.reports import text_summary
    from safelora_ray.sanitize import SanitizeConfig, sanitize

    cfg = SanitizeConfig(
        alignment=args.alignment, adapters=args.adapters, out=args.out,
        threshold=args.threshold, num_proj_layers=args.num_proj_layers, strict_k=args.strict_k,
        force=args.force, workers=args.workers, use_gpu=args.use_gpu,
        batch_size=args.batch_size, max_in_flight=args.max_in_flight, run_id=args.run_id,
        workers_per_gpu=args.workers_per_gpu, tenant_depth=args.tenant_depth,
        progress=not args.no_progress, task_timeout_s=args.timeout,
        ray_address=args.ray_address,
    )
    result = sanitize(cfg)
    print(text_summary(result))
    return EXIT_OK if result.exit_ok else EXIT_PARTIAL


def _cmd_demo(args: argparse.Namespace) -> int:
    from safelora_ray.demo import run_demo

    return run_demo(args.dir, threshold=args.threshold, workers=args.workers,
                    progress=not args.no_progress)


_COMMANDS = {"build": _cmd_build, "sanitize": _cmd_sanitize, "inspect": _cmd_inspect,
             "demo": _cmd_demo}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``safelora-ray``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        return _COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"safelora-ray {args.command}: error: {redact(str(e))}", file=sys.stderr)
        return EXIT_USAGE
    except SafeLoraError as e:
        print(f"safelora-ray {args.command}: error: {redact(str(e))}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
