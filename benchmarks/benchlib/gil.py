"""How much of its time a process runs Python holding the GIL, per process and per thread,
from py-spy (``pip install py-spy``; attaching to another process needs ptrace rights: root,
or ``kernel.yama.ptrace_scope`` 0).

One ``py-spy record --gil --threads --nonblocking --format raw`` per process: it samples
``rate`` times a second and keeps only the samples in which some thread holds the GIL, each
with the thread's id, so a process's GIL share is its kept samples over all its samples (at
most one thread holds the GIL at a time). py-spy prints its sample count only to a terminal:
here the samples are the seconds it ran times ``rate`` (it keeps up at 100 a second; it says
so on stderr when it cannot). ``--nonblocking`` reads the process's memory
without stopping it: the run is perturbed by py-spy's own CPU only (reported, left out of the
run's figures), at the price of a sample now and then read mid-update.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: A raw line's first frame with ``--threads``: ``thread (TID): name`` (the name optional;
#: TID the native id, in decimal or hex).
_THREAD = re.compile(r"^thread \((0x[0-9a-fA-F]+|\d+)\)(?::\s*([^;]*))?")
_SAMPLES = re.compile(r"Samples:\s*(\d+)")


def py_spy() -> str | None:
    """The py-spy executable (on ``PATH`` or beside this Python's), or None."""
    here = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(here) if here.is_file() else None)


def parse_raw(text: str) -> tuple[int, dict[int, int], dict[int, str]]:
    """``(GIL samples, {tid: GIL samples}, {tid: thread name})`` of py-spy's raw output:
    one line per distinct stack, ``frame;frame;... count``."""
    total = 0
    per: dict[int, int] = {}
    names: dict[int, str] = {}
    for line in text.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        total += k
        m = _THREAD.match(stack)
        if m:
            tid = int(m.group(1), 0)
            per[tid] = per.get(tid, 0) + k
            if m.group(2):
                names[tid] = m.group(2).strip()
    return total, per, names


def python_role(role: str) -> bool:
    """Whether a process of this role (:func:`benchlib.monitor.process_role`) runs our Python:
    the driver and the worker actors, not Ray's own processes nor idle workers."""
    return role == "driver" or (role[:1].isupper() and role != "Ray Data system actor")


class GilSampler:
    """py-spy on every Python process of a block, attached as the processes appear.

    ``candidates`` lists ``(pid, role)`` of the run's processes now; ``wanted`` says which to
    sample (by role); ``on_spawn`` is told each py-spy's pid (so that the process monitor
    leaves it out). :meth:`stop` ends them and gives :meth:`results`.
    """

    def __init__(self, out_dir: str | Path, candidates: Callable[[], Iterable[tuple[int, str]]],
                 wanted: Callable[[str], bool], on_spawn: Callable[[int], None],
                 rate: int = 100, poll_s: float = 0.5) -> None:
        exe = py_spy()
        if exe is None:
            raise RuntimeError("--gil needs py-spy: pip install py-spy")
        self.exe, self.rate, self.poll_s = exe, rate, poll_s
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.candidates, self.wanted, self.on_spawn = candidates, wanted, on_spawn
        self.spies: dict[int, tuple[subprocess.Popen[bytes], str, Path]] = {}
        self.ran_s: dict[int, float] = {}  # per sampled pid: from py-spy's start to its stop
        self._started: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _attach_new(self) -> None:
        for pid, role in self.candidates():
            if pid in self.spies or not self.wanted(role):
                continue
            out = self.out_dir / f"gil-{pid}.raw"
            err = open(self.out_dir / f"gil-{pid}.err", "wb")  # noqa: SIM115 (closed in stop)
            proc = subprocess.Popen(
                [self.exe, "record", "--gil", "--threads", "--nonblocking", "--format", "raw",
                 "--rate", str(self.rate), "-p", str(pid), "-o", str(out)],
                stdout=subprocess.DEVNULL, stderr=err)
            err.close()  # the child has its own descriptor
            self.on_spawn(proc.pid)
            self.spies[pid] = (proc, role, out)
            self._started[pid] = time.perf_counter()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._attach_new()

    def start(self) -> GilSampler:
        self._attach_new()
        self._thread = threading.Thread(target=self._run, name="bench-gil", daemon=True)
        self._thread.start()
        return self

    def __enter__(self) -> GilSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """End every py-spy (Control-C: it writes its output and exits)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for pid, (proc, _, _) in self.spies.items():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGINT)
            self.ran_s[pid] = time.perf_counter() - self._started[pid]
        for proc, _, _ in self.spies.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def results(self) -> dict[int, dict[str, Any]]:
        """Per sampled process: its role, py-spy's ``samples``, ``gil_samples``,
        ``gil_share`` (of its samples, some thread held the GIL), and per thread id the share
        of the samples in which that thread held it (``threads``, names in
        ``thread_names``). A process py-spy could not read is reported with its error."""
        out: dict[int, dict[str, Any]] = {}
        for pid, (proc, role, raw) in self.spies.items():
            err = (self.out_dir / f"gil-{pid}.err").read_text(errors="replace")
            m = _SAMPLES.search(err)
            ran = self.ran_s.get(pid, 0.0)
            samples = int(m.group(1)) if m else int(ran * self.rate)
            rec: dict[str, Any] = {"role": role, "samples": samples, "rate": self.rate,
                                   "sampled_s": round(ran, 3), "stderr": err.strip()[-300:]}
            if not samples or not raw.is_file():
                rec["error"] = (err.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
                out[pid] = rec
                continue
            gil, per, names = parse_raw(raw.read_text(errors="replace"))
            rec.update({"gil_samples": gil, "gil_share": round(min(gil / samples, 1.0), 4),
                        "threads": {tid: round(k / samples, 4) for tid, k in per.items()},
                        "thread_names": names})
            out[pid] = rec
        return out
