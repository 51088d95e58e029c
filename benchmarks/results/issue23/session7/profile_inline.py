"""Issue 23, seventh session: where an in-process sanitize s3:// → s3:// spends its CPU.

SeaweedFS on loopback, a 7B-shaped set (16 layers) built onto it, N (600) adapters uploaded,
the node's copy of the set made and mapped before the clock (a warm run), the null product;
then one sanitize per entry of PROFS (``none``, ``pyspy``: every thread on a CPU,
``gil``: the thread holding the GIL, ``native``: with C frames, blocking and slow), py-spy
attached to this process for its length, its raw output in OUT (/tmp). Summarise one with
``python agg_pyspy.py OUT/pyspy-1.txt``. Run from the repository root with
``PYTHONPATH=. .venv/bin/python benchmarks/results/issue23/session7/profile_inline.py``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["SAFELORA_BENCH_NULL_PRODUCT"] = "1"  # read when the product's modules load
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from bench_s3 import upload_parallel
from benchlib.models import LLAMA2_7B, write_adapters, write_pair
from benchlib.s3 import SeaweedS3


def warm_catalog(root: Path, s3: SeaweedS3) -> str:
    """The 16-layer 7B-shaped set built onto ``s3`` and N (600) adapters uploaded (``cat``),
    the node's copy of the set made and mapped (SAFELORA_SET_CACHE under ``root``): a warm
    run's start. Returns the set's URI."""
    from safelora_ray import BuildConfig, build
    from safelora_ray.formats.alignment_set import AlignmentSet
    from safelora_ray.pipelines.sanitize.shared_set import SharedSet

    os.environ["SAFELORA_SET_CACHE"] = str(root / "set-cache")
    arch = dataclasses.replace(LLAMA2_7B, layers=16)
    pair = write_pair(root / "pair", arch, fill="holes")
    aset = build(BuildConfig(base=pair["base"], aligned=pair["aligned"],
                             out=s3.uri("set"), workers=0, progress=False)).uri
    shutil.rmtree(root / "pair")
    write_adapters(root / "cat", arch, int(os.environ.get("N", "600")))
    upload_parallel(s3, root / "cat", "cat")
    SharedSet.map_local(AlignmentSet.open(aset))
    return aset


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="prof-"))
    out_dir = Path(os.environ.get("OUT", "/tmp"))
    from safelora_ray import SanitizeConfig, sanitize

    s3 = SeaweedS3(root)
    try:
        aset = warm_catalog(root, s3)
        spy_bin = str(Path(sys.executable).with_name("py-spy"))
        for rep, prof in enumerate(os.environ.get("PROFS", "none,pyspy").split(",")):
            time.sleep(5)
            spy = None
            if prof != "none":
                cmd = [spy_bin, "record", "-p", str(os.getpid()), "-r", "100", "-f", "raw",
                       "--threads", "-o", str(out_dir / f"{prof}-{rep}.txt")]
                cmd += {"gil": ["--gil", "--nonblocking"], "native": ["--native"]}.get(
                    prof, ["--nonblocking"])
                spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
                time.sleep(1)
            c0, t0 = os.times(), time.perf_counter()
            r = sanitize(SanitizeConfig(alignment=aset, adapters=s3.uri("cat"),
                                        out=s3.uri(f"out-{rep}"), threshold=0.35, workers=0,
                                        progress=False))
            s, c1 = time.perf_counter() - t0, os.times()
            if spy is not None:
                spy.send_signal(2)
                spy.wait(60)
            cpu = c1.user + c1.system - c0.user - c0.system
            print(f"{prof}: {s:.1f} s, client CPU {cpu:.1f} s, {r.ok} ok", flush=True)
    finally:
        s3.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
