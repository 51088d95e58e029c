"""The ``safelora-ray`` command line: a thin layer over the Python API.

Exit codes:
    0    success (every adapter ok or skipped, for ``sanitize``)
    1    the run failed (bad inputs named in the message, storage or cluster errors)
    2    usage error (bad flags or parameter values)
    3    ``sanitize`` / ``nightly`` finished but some adapters failed (the others were written)
    4    another run holds the lease on the output (``nightly``, ``sanitize``,
         ``project-model``; ``--wait`` queues behind it)
    130  interrupted (Ctrl-C); nothing partial was left, a rerun resumes
    141  stdout's reader went away before all output was written (``| head``); 128 + SIGPIPE
    143  terminated (SIGTERM: ``ray job stop``, a pod's deletion), as Ctrl-C; 129 for SIGHUP

This module imports only the standard library and safelora-ray's light modules at the top:
``--help`` and usage errors answer without loading torch or Ray.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

from safelora_ray._version import __version__
from safelora_ray.core import interrupts
from safelora_ray.core.errors import ConfigError, LeaseHeldError, SafeLoraError, system_error_line
from safelora_ray.core.redact import configure_logging, redact

logger = logging.getLogger(__name__)

C = TypeVar("C")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_LOCKED = 4
EXIT_INTERRUPTED = 130
EXIT_PIPE = 141


def _add_selection(p: argparse.ArgumentParser, k_help: str, required: bool) -> None:
    """SPEC §2's selection: --threshold or --num-proj-layers (and --strict-k)."""
    sel = p.add_mutually_exclusive_group(required=required)
    sel.add_argument("--threshold", type=float,
                     help="project the modules whose rounded cosine is ≤ T, T in [-1, 1] "
                          "(paper: 0.35)")
    sel.add_argument("--num-proj-layers", type=int, help=f"{k_help} (ties included)")
    p.add_argument("--strict-k", action="store_true",
                   help="with --num-proj-layers: exactly K modules, ties broken by name")


def _add_common(p: argparse.ArgumentParser, json_help: str | None = None) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--log-level", default=None, choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="log level (default INFO; it reaches the workers too)")
    g.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    g.add_argument("-q", "--quiet", action="store_true",
                   help="only warnings and errors, no progress")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress (at a terminal: a bar; otherwise a line every 30 s)")
    g.add_argument("--json", action="store_true",
                   help=json_help or "print a machine-readable JSON summary on stdout "
                        "(the human one goes to stderr)")


#: ``--workers`` of the commands whose workers each compute on a device.
DEVICE_WORKERS_HELP = ("worker actors; 0 = in this process (default: one per GPU, or one per "
                       "CPU without GPUs; a small job runs in this process when no Ray "
                       "cluster is configured)")


def _add_ray(p: argparse.ArgumentParser, workers_help: str = DEVICE_WORKERS_HELP) -> None:
    g = p.add_argument_group("where it runs")
    g.add_argument("--ray-address", default=None,
                   help="Ray cluster: host:6379 or ray://host:10001 (default: $RAY_ADDRESS, "
                        "else a new local Ray)")
    g.add_argument("--workers", type=int, default=None, help=workers_help)
    dev = g.add_mutually_exclusive_group()
    dev.add_argument("--gpu", dest="use_gpu", action="store_true", default=None,
                     help="require GPU workers")
    dev.add_argument("--cpu", dest="use_gpu", action="store_false", help="use CPU workers only")


def _wait_s(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text!r}")
    return value


def _add_wait(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", type=_wait_s, nargs="?", const=math.inf, default=None,
                   metavar="SECONDS",
                   help="when another run writes to --out, wait until it is done (at most "
                        "SECONDS; without a number, as long as it takes) instead of exiting "
                        "with 4")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used by the ``jobs/`` entrypoints and the tests)."""
    parser = argparse.ArgumentParser(
        prog="safelora-ray",
        description="Safe LoRA at fleet scale: build alignment sets from a base/aligned model "
                    "pair, sanitize catalogs of LoRA adapters, project full fine-tunes.",
        epilog="exit codes: 0 ok, 1 failed, 2 usage error, 3 some adapters failed, "
               "4 output locked by another run, 130 interrupted, 141 stdout's reader went away, "
               "143 terminated",
    )
    parser.add_argument("--version", action="version", version=f"safelora-ray {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = sub.add_parser("build", help="build an alignment set from a base/aligned model pair",
                       description="Build an alignment set: C = V Vᵀ/‖V‖_F per target module, "
                                   "V = W_aligned − W_base.")
    b.add_argument("--base", required=True, help="base (unaligned) checkpoint URI")
    b.add_argument("--aligned", required=True, help="aligned (chat) checkpoint URI")
    b.add_argument("--targets", default="q_proj,v_proj",
                   help="comma-separated module-name suffixes (default: q_proj,v_proj)")
    b.add_argument("--out", required=True, help="where to write the alignment set (path or s3://)")
    b.add_argument("--max-file-gb", type=float, default=2.0,
                   help="cap on one output safetensors file, in GB (default 2)")
    b.add_argument("--timeout", type=float, default=3600.0,
                   help="seconds one output file may take before the build fails")
    b.add_argument("--projection", choices=["fast", "exact"], default="fast",
                   help="fast: the paper's C = V Vᵀ/‖V‖_F (default); exact: the truncated "
                        "projection U_k U_kᵀ (an SVD per module; needs --rank or --energy)")
    b.add_argument("--rank", type=int, default=None,
                   help="with --projection exact: keep k directions per module")
    b.add_argument("--energy", type=float, default=None,
                   help="with --projection exact: keep the smallest k with "
                        "Σ_{i≤k}σᵢ²/Σσᵢ² ≥ E (e.g. 0.9)")
    _add_ray(b)
    _add_common(b)

    s = sub.add_parser("sanitize", help="sanitize a catalog of LoRA adapters (Safe LoRA)",
                       description="Project the LoRA updates that drift from the alignment "
                                   "direction: B ← C B for the selected modules of each adapter.")
    s.add_argument("--alignment", required=True, help="alignment set URI")
    s.add_argument("--adapters", required=True,
                   help="catalog: a directory tree or s3:// prefix of PEFT adapters, or a "
                        ".parquet/.jsonl manifest with a 'uri' column")
    s.add_argument("--out", required=True,
                   help="output root (path or s3://), apart from the catalog; one per catalog")
    s.add_argument("--method", choices=["safelora", "salora", "safemerge"], default="safelora",
                   help="safelora: an alignment set from 'build' (B ← C B); salora: SaLoRA "
                        "safety modules from 'salora-modules' (B ← (I − V_s V_sᵀ) B; with "
                        "neither --threshold nor --num-proj-layers every module is folded); "
                        "safemerge: Safe LoRA's set and test, the modules with cos < τ merged "
                        "with --safety-adapter (SPEC §5)")
    m = s.add_argument_group("SafeMERGE (--method safemerge)")
    m.add_argument("--safety-adapter", default=None, metavar="URI",
                   help="the safety LoRA adapter (path, s3:// or hf://) merged into the "
                        "drifting modules")
    m.add_argument("--weights", default=None, metavar="W_F,W_S",
                   help="weights of the task and the safety adapter (default 0.8,0.2)")
    m.add_argument("--combination", default=None, choices=["linear", "cat"],
                   help="linear (the official code's; equal ranks; default) or cat (the exact "
                        "weighted sum, any ranks)")
    _add_selection(s, "per adapter: project its K modules with the smallest cosines",
                   required=False)
    s.add_argument("--force", action="store_true", help="redo adapters already in the ledger")
    s.add_argument("--allow-empty", action="store_true",
                   help="an empty catalog is not an error")
    s.add_argument("--batch-size", type=int, default=8, help="adapters per task (default 8)")
    s.add_argument("--max-in-flight", type=int, default=None,
                   help="batches queued per worker (default 2; 3 where the catalog or the "
                        "output is on an object store)")
    s.add_argument("--workers-per-gpu", type=int, default=1,
                   help="holders of the alignment set per GPU, each with its own copy "
                        "(default 1)")
    s.add_argument("--run-id", default=None,
                   help="report folder name (default: UTC timestamp + random suffix)")
    s.add_argument("--tenant-depth", type=int, default=1,
                   help="path components of an adapter id that name its tenant in the "
                        "reports (default 1: 'acme/chat-1' belongs to 'acme')")
    s.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds one batch may take before the run fails")
    _add_wait(s)
    _add_ray(s, workers_help="I/O workers (read, check, write adapters); 0 = in this process "
                             "(default: one per CPU left beside the holders of the set; a "
                             "small job runs in this process when no Ray cluster is "
                             "configured)")
    _add_common(s)

    n = sub.add_parser("nightly", help="the nightly run over every configured catalog",
                       description="List every configured catalog, group adapters by model "
                                   "pair, build missing alignment sets, sanitize incrementally.")
    n.add_argument("--config", required=True, help="nightly YAML (path or s3://)")
    n.add_argument("--run-id", default=None, help="run id (default: UTC timestamp + random)")
    n.add_argument("--dry-run", action="store_true",
                   help="list and group adapters, print the plan, write nothing")
    _add_common(n, json_help="print the run record as JSON on stdout")

    pm = sub.add_parser("project-model",
                        help="project a full fine-tune of the aligned model (SPEC §3)")
    pm.add_argument("--alignment", required=True, help="alignment set URI")
    pm.add_argument("--aligned", required=True,
                    help="the aligned checkpoint the fine-tune started from")
    pm.add_argument("--finetuned", required=True, help="the fully fine-tuned checkpoint")
    pm.add_argument("--out", required=True,
                    help="where the projected checkpoint is written (path or s3://)")
    _add_selection(pm, "project the K modules with the smallest cosines over the whole model",
                   required=True)
    pm.add_argument("--reports", default=None,
                    help="where the reports go (default: <out>/_safelora)")
    pm.add_argument("--timeout", type=float, default=3600.0,
                    help="seconds one output file may take before the run fails")
    _add_wait(pm)
    _add_ray(pm)
    _add_common(pm)

    m = sub.add_parser("salora-modules",
                       help="compute SaLoRA safety modules of an aligned model (SPEC §4)")
    m.add_argument("--model", required=True, help="aligned checkpoint URI (with config.json)")
    m.add_argument("--calibration", required=True,
                   help="safety calibration JSONL: prompt/response, or input_ids/labels")
    m.add_argument("--targets", default="q_proj,v_proj",
                   help="comma-separated module-name suffixes (default: q_proj,v_proj)")
    m.add_argument("--safety-rank", type=int, default=32,
                   help="r_s, safety directions per module (default 32, as SaLoRA)")
    m.add_argument("--out", required=True, help="where to write the safety-module set")
    m.add_argument("--dtype", default="float32",
                   choices=["float32", "bfloat16", "float16", "float64"],
                   help="forward dtype (default float32; Σ is float64 whatever it is)")
    m.add_argument("--mode", default="auto", choices=["auto", "whole", "layers"],
                   help="whole model on each worker's device, one decoder layer at a time, or "
                        "auto: whole when the weights take at most half the free memory")
    m.add_argument("--batch-tokens", type=int, default=4096,
                   help="padded positions per forward batch (default 4096)")
    m.add_argument("--export-cs", default=None, metavar="FILE.safetensors",
                   help="also write C_s per module, keyed by PEFT module name, for training")
    m.add_argument("--force", action="store_true",
                   help="replace an existing --export-cs file (an earlier export of the same "
                        "set is replaced without it)")
    m.add_argument("--max-file-gb", type=float, default=2.0,
                   help="cap on one output safetensors file, in GB (default 2)")
    m.add_argument("--timeout", type=float, default=3600.0,
                   help="seconds one layer may take before the run fails")
    _add_ray(m)
    _add_common(m)

    e = sub.add_parser("salora-export",
                       help="write C_s = I − V_s V_sᵀ of a safety-module set for training")
    e.add_argument("--alignment", required=True, help="safety-module set URI")
    e.add_argument("--out", required=True, help="the .safetensors file to write")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    e.add_argument("--force", action="store_true",
                   help="replace an existing file at --out (an earlier export of the same "
                        "set is replaced without it)")
    _add_common(e)

    d = sub.add_parser("demo", help="run the whole pipeline on a synthetic model, locally")
    d.add_argument("--dir", default="safelora-demo",
                   help="where to write (default ./safelora-demo)")
    d.add_argument("--threshold", type=float, default=0.35)
    d.add_argument("--workers", type=int, default=None,
                   help="worker actors; 0 = in this process (default: one per CPU)")
    _add_common(d)

    i = sub.add_parser("inspect",
                       help="say what a location holds: alignment set, adapter, checkpoint, ...")
    i.add_argument("uri", help="a path or URI")
    i.add_argument("--modules", action="store_true", help="also list every module")
    i.add_argument("--verify", action="store_true",
                   help="alignment set: read every shard whole and check it against the "
                        "digests written when it was built (exit 1 naming a shard that differs)")
    _add_common(i, json_help="print the description as JSON on stdout")
    return parser


# ---------------------------------------------------------------------------------------------
# Commands: each returns (exit code, JSON summary or None)
# ---------------------------------------------------------------------------------------------

Outcome = tuple[int, "dict[str, Any] | None"]



def _max_file_bytes(args: argparse.Namespace) -> int:
    """``--max-file-gb`` in bytes (a positive, finite number of GB)."""
    from safelora_ray.core.validate import check_positive

    check_positive(args.max_file_gb, "max_file_gb")
    return int(args.max_file_gb * 1024**3)

def _config(cls: type[C], args: argparse.Namespace, **extra: Any) -> C:
    """A command's config: each field from the flag of the same name, ``--timeout`` as
    ``task_timeout_s``, and ``extra`` (flags that need converting)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    given = {k: v for k, v in vars(args).items() if k in names}
    return cls(**given, task_timeout_s=args.timeout, **extra)


def _cmd_build(args: argparse.Namespace) -> Outcome:
    from safelora_ray.pipelines.build.config import BuildConfig
    from safelora_ray.pipelines.build.driver import build

    cfg = _config(BuildConfig, args, max_file_bytes=_max_file_bytes(args))
    res = build(cfg)
    verb = "reused" if res.reused else "built"
    _say(args, f"{verb} alignment set {res.content_id}: {res.num_modules} modules at {res.uri}")
    if not res.reused:
        where = (f"on {res.workers} {res.device} worker(s)" if res.workers
                 else f"in this process ({res.device})")
        _say(args, f"read {res.bytes_read / 1e6:.1f} MB of target tensors in "
                   f"{res.duration_s:.1f} s {where}")
    return EXIT_OK, {
        "command": "build", "status": "reused" if res.reused else "built", "uri": res.uri,
        "content_id": res.content_id, "modules": res.num_modules,
        "source_bytes": res.source_bytes, "bytes_read": res.bytes_read,
        "stored_bytes": res.stored_bytes, "duration_s": round(res.duration_s, 3),
        "workers": res.workers, "device": res.device}


def _cmd_inspect(args: argparse.Namespace) -> Outcome:
    from safelora_ray.cli.inspection import as_json, describe, render

    d = describe(args.uri, verify=args.verify)
    _say(args, render(d, modules=args.modules))
    return EXIT_OK, {"command": "inspect", **as_json(d)}


def _cmd_sanitize(args: argparse.Namespace) -> Outcome:
    from safelora_ray.pipelines.sanitize.driver import SanitizeConfig, sanitize
    from safelora_ray.reports import text_summary

    cfg = _config(SanitizeConfig, args, wait_s=args.wait)
    result = sanitize(cfg)
    _say(args, text_summary(result))
    code = EXIT_OK if result.exit_ok else EXIT_PARTIAL
    return code, {
        "command": "sanitize", "status": "success" if result.exit_ok else "partial",
        "run_id": result.run_id, "out": result.out, "report": result.report_uri,
        "alignment_id": result.alignment_id,
        "counts": {"total": result.total, "ok": result.ok, "skipped": result.skipped,
                   "error": result.error},
        "modules": result.modules, "projected": result.projected,
        "bytes_in": result.bytes_in, "bytes_out": result.bytes_out,
        "duration_s": round(result.duration_s, 3),
        "errors": [{"adapter_id": a, "error": e} for a, e in result.errors]}


def _cmd_nightly(args: argparse.Namespace) -> Outcome:
    from safelora_ray.cli.nightly_config import NightlyConfig
    from safelora_ray.cli.nightly_run import run_nightly, summary_text

    cfg = NightlyConfig.load(args.config)
    record = run_nightly(cfg, run_id=args.run_id, dry_run=args.dry_run,
                         progress=args.progress, say=lambda text: _say(args, text))
    _say(args, summary_text(record))
    status = record["status"]
    code = {"success": EXIT_OK, "dry-run": EXIT_OK, "partial": EXIT_PARTIAL}.get(status,
                                                                                EXIT_FAILED)
    return code, {"command": "nightly", **record}


def _cmd_project_model(args: argparse.Namespace) -> Outcome:
    from safelora_ray.pipelines.project_model.driver import FinetuneConfig, project_model

    cfg = _config(FinetuneConfig, args, wait_s=args.wait)
    res = project_model(cfg)
    summary = {"command": "project-model", "status": "reused" if res.reused else "projected",
               "uri": res.uri, "modules": res.modules, "selected": res.selected,
               "selected_modules": res.selected_modules, "tau": res.tau,
               "bytes_read": res.bytes_read, "must_read_bytes": res.must_read_bytes,
               "duration_s": round(res.duration_s, 3), "reports": res.reports_uri,
               "workers": res.workers, "device": res.device}
    if res.reused:
        _say(args, f"reused {res.uri}: already projected from these inputs "
                   f"({res.selected} of {res.modules} modules)")
        return EXIT_OK, summary
    _say(args, f"projected {res.selected} of {res.modules} target modules (τ = {res.tau}) "
               f"into {res.uri}")
    where = (f"on {res.workers} {res.device} worker(s)" if res.workers
             else f"in this process ({res.device})")
    _say(args, f"read {res.bytes_read / 1e6:.1f} MB "
               f"({res.bytes_read / max(1, res.must_read_bytes):.3f} x what must be read) in "
               f"{res.duration_s:.1f} s {where}; reports at {res.reports_uri}")
    return EXIT_OK, summary


def _cmd_salora_modules(args: argparse.Namespace) -> Outcome:
    from safelora_ray.pipelines.salora.modules import SaloraConfig, salora_modules

    cfg = _config(SaloraConfig, args, max_file_bytes=_max_file_bytes(args))
    res = salora_modules(cfg)
    verb = "reused" if res.reused else "computed"
    _say(args, f"{verb} safety-module set {res.content_id}: {res.num_modules} modules at "
               f"{res.uri}")
    if not res.reused:
        where = (f"on {res.workers} {res.device} worker(s)" if res.workers
                 else f"in this process ({res.device})")
        _say(args, f"{res.samples} samples, {res.tokens} counted tokens, forward {res.mode} "
                   f"{where}: {res.stats.get('tokens_per_s', 0):.0f} tokens/s, "
                   f"{res.duration_s:.1f} s in all")
    if res.export_cs:
        _say(args, f"C_s per module written to {res.export_cs}")
    return EXIT_OK, {"command": "salora-modules", "status": verb, "uri": res.uri,
                     "content_id": res.content_id, "modules": res.num_modules,
                     "samples": res.samples, "tokens": res.tokens,
                     "duration_s": round(res.duration_s, 3), "export_cs": res.export_cs}


def _cmd_salora_export(args: argparse.Namespace) -> Outcome:
    from safelora_ray.pipelines.salora.export import export_cs

    n = export_cs(args.alignment, args.out, dtype=args.dtype, force=args.force)
    _say(args, f"C_s of {n} modules written to {args.out}")
    return EXIT_OK, {"command": "salora-export", "modules": n, "out": args.out}


def _cmd_demo(args: argparse.Namespace) -> Outcome:
    from safelora_ray.cli.demo import run_demo

    return run_demo(args.dir, threshold=args.threshold, workers=args.workers,
                    progress=args.progress, say=lambda text: _say(args, text))


_COMMANDS: dict[str, Callable[[argparse.Namespace], Outcome]] = {
    "build": _cmd_build, "sanitize": _cmd_sanitize, "inspect": _cmd_inspect,
    "nightly": _cmd_nightly, "demo": _cmd_demo, "project-model": _cmd_project_model,
    "salora-modules": _cmd_salora_modules, "salora-export": _cmd_salora_export}


def _say(args: argparse.Namespace, text: str) -> None:
    """Human output: stdout, or stderr when stdout carries the JSON summary."""
    print(text, file=sys.stderr if getattr(args, "json", False) else sys.stdout, flush=True)


def _err(args: argparse.Namespace, message: str) -> None:
    print(f"safelora-ray {args.command}: error: {redact(message)}", file=sys.stderr,
          flush=True)


def _level(args: argparse.Namespace) -> str:
    if args.verbose:
        return "DEBUG"
    if args.quiet:
        return "WARNING"
    return args.log_level or "INFO"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``safelora-ray``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose and args.quiet:
        parser.error("-v/--verbose and -q/--quiet exclude each other")
    configure_logging(_level(args))
    args.progress = not (args.no_progress or args.quiet)
    interrupts.install()  # SIGTERM / SIGHUP end the run as Ctrl-C does
    try:
        code, summary = _COMMANDS[args.command](args)
    except ConfigError as e:
        _err(args, str(e))
        return EXIT_USAGE
    except LeaseHeldError as e:
        hint = "; pass --wait to run after it" if hasattr(args, "wait") else ""
        _err(args, f"another run is in progress: {e}{hint}")
        return EXIT_LOCKED
    except SafeLoraError as e:
        _err(args, str(e))
        return EXIT_FAILED
    except Exception as e:
        # What the pipelines did not name themselves: a file system or S3 error still gets
        # one line (a programming error keeps its traceback).
        line = system_error_line(e)
        if line is None:
            raise
        _err(args, line)
        return EXIT_FAILED
    except KeyboardInterrupt as e:
        # The pipelines wound down already: work in progress finished or was stopped, workers
        # ended, temp files removed, leases given back. A rerun resumes where this one stopped.
        print(f"safelora-ray {args.command}: {interrupts.describe(e)}; nothing partial was "
              "left behind, run the same command again to resume", file=sys.stderr, flush=True)
        return interrupts.exit_code(e)
    except BrokenPipeError:
        return _stdout_closed()
    if args.json and summary is not None:
        try:
            print(json.dumps(summary, indent=2, ensure_ascii=False, default=str), flush=True)
        except BrokenPipeError:
            return _stdout_closed()
    return code


def _stdout_closed() -> int:
    """stdout's reader went away (``| head``): no traceback, and, as the Python docs advise,
    stdout pointed at devnull so that the interpreter's last flush does not fail again; the
    exit code is a SIGPIPE death's, as other tools in a pipeline give."""
    # Not a real file (a test's capture): nothing to flush, nothing to redirect.
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_PIPE


def run(argv: Sequence[str] | None = None) -> NoReturn:
    """The process entry point (the ``safelora-ray`` command, ``python -m safelora_ray``, the
    ``jobs/`` scripts): :func:`main`, then an exit that skips the interpreter's teardown of
    native thread pools.

    pyarrow's pool, torn down at exit, aborts the process now and then with "terminate called
    without an active exception" (apache/arrow#34314): exit 134 after a run that succeeded
    (about one ``inspect`` of a set in three here), which a scheduler reads as a failure.
    What Python's own exit does still happens first: the output is flushed, threads are
    joined (``threading._shutdown``) and the ``atexit`` handlers run (Ray's shutdown, temp
    dirs, logging's flush).
    """
    code = main(argv)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    shutdown_threads = getattr(threading, "_shutdown", None)
    if shutdown_threads is not None:
        shutdown_threads()
    atexit._run_exitfuncs()
    os._exit(code)


if __name__ == "__main__":
    run()
