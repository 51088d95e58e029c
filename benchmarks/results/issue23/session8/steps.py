"""Issue 23, eighth session: what one 7B-shaped adapter (16 layers, r = 8 on q/v, bf16,
4 MiB) costs the client per step, on one thread of a quiet machine: read from local disk
(``read_adapter``: digest, checks, views), its SHA-256 alone, the finite check per tensor
(:func:`_first_non_finite`, as before) and in runs (:func:`_first_non_finite_in`, now), and
G = A Aᵀ (``adapter_grams``). Run from the repository root with
``PYTHONPATH=.:benchmarks .venv/bin/python benchmarks/results/issue23/session8/steps.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from benchlib.gram import per_adapter_grams
from benchlib.models import LLAMA2_7B, write_adapters

from safelora_ray.formats.peft import pairing
from safelora_ray.formats.peft.read import WEIGHTS_NAME, parse_buffer_header, read_adapter
from safelora_ray.storage import open_storage


def timed(name: str, f: Callable[[], object], reps: int = 200) -> None:
    f()
    t0 = time.perf_counter()
    for _ in range(reps):
        f()
    print(f"{name:40s} {(time.perf_counter() - t0) / reps * 1e3:7.3f} ms")


def main() -> None:
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="steps-"))
    write_adapters(root, dataclasses.replace(LLAMA2_7B, layers=16), 1)
    path = next(root.glob("tenant-*/adapter-*"))
    storage, rel = open_storage(str(root)), str(path.relative_to(root))
    buf = bytearray((path / WEIGHTS_NAME).stat().st_size)
    ad = read_adapter(storage, rel, "a", buffer=lambda n: buf)
    raw = bytearray((path / WEIGHTS_NAME).read_bytes())
    header = parse_buffer_header(raw, "p", "u")
    named = {k: ad.tensors[k] for k in ad.tensors}
    timed("read_adapter (local, page cache)", lambda: read_adapter(storage, rel, "a",
                                                                   buffer=lambda n: buf))
    timed("SHA-256 of the 4 MiB", lambda: hashlib.sha256(raw).digest())
    timed("finite check, per tensor (before)", lambda: pairing._first_non_finite(named))
    timed("finite check, in runs (now)",
          lambda: pairing._first_non_finite_in(raw, header, named))
    timed("G = A A^T, float64 (adapter_grams)", lambda: per_adapter_grams(ad))


if __name__ == "__main__":
    main()
