"""CPU time of every thread of every process of a measured block (``/proc/PID/task/TID/stat``):
which thread is the busiest, and how much CPU the processes use in all.

A thread runs on one core at a time, so the busiest thread's CPU per adapter is the cap it
puts on a fleet's rate (3 ms an adapter caps it at 20,000 a minute) whatever the other
cores do. The sampler is read far less often than memory (every second, and at the block's
start and end): reading the stat file of hundreds of threads every 50 ms would itself load a
small machine. Its own cost is measured (:attr:`CpuBlock.cost_s`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

#: Clock ticks per second of ``utime`` / ``stime`` (100 on Linux).
TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def _stat(path: str) -> tuple[str, int] | None:
    """``(comm, utime + stime in ticks)`` of a ``/proc/.../stat`` file, or None when gone.
    ``comm`` is in parentheses and may hold spaces or parentheses: split at the last ``)``."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError:
        return None
    try:
        head, _, tail = raw.rpartition(b")")
        comm = head[head.index(b"(") + 1:].decode(errors="replace")
        rest = tail.split()
        # fields 14 and 15 of proc(5); rest[0] is field 3 (state)
        return comm, int(rest[11]) + int(rest[12])
    except (ValueError, IndexError):
        return None


def process_ticks(pid: int) -> int | None:
    """CPU ticks of a whole process (its exited threads included), or None when gone."""
    st = _stat(f"/proc/{pid}/stat")
    return None if st is None else st[1]


def thread_ticks(pid: int) -> dict[int, tuple[str, int]]:
    """``{tid: (name, ticks)}`` of every live thread of a process (empty when gone)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return {}
    out = {}
    for t in tids:
        st = _stat(f"/proc/{pid}/task/{t}/stat")
        if st is not None:
            out[int(t)] = st
    return out


@dataclass
class _Counter:
    """Ticks of one process or thread inside the block: ``base`` its reading when first seen
    (0 for one born inside the block), ``last`` its latest reading."""
    base: int
    last: int
    name: str = ""


@dataclass
class CpuBlock:
    """CPU time of the processes (and each of their threads) inside one measured block.

    Call :meth:`sample` with the processes of the run at the block's start (the baselines),
    now and then, and at its end. A process or thread first seen at the start counts from
    that reading; one first seen later was born inside the block and counts from 0. A thread
    that exits between two samples loses its CPU since the previous one in the per-thread
    figures (not in its process's, read from the process's own counters).
    """

    procs: dict[int, _Counter] = field(default_factory=dict)
    threads: dict[tuple[int, int], _Counter] = field(default_factory=dict)
    samples: int = 0
    cost_s: float = 0.0  # CPU time the sampling itself took (the sampling thread's)
    t0: float = 0.0
    wall_s: float = 0.0

    def sample(self, pids: Iterable[int]) -> None:
        c0 = time.thread_time()
        first = self.samples == 0
        if first:
            self.t0 = time.perf_counter()
        for pid in pids:
            ticks = process_ticks(pid)
            if ticks is None:
                continue
            rec = self.procs.get(pid)
            if rec is None:
                self.procs[pid] = _Counter(ticks if first else 0, ticks)
            else:
                rec.last = max(rec.last, ticks)
            for tid, (name, tt) in thread_ticks(pid).items():
                th = self.threads.get((pid, tid))
                if th is None:
                    self.threads[(pid, tid)] = _Counter(tt if first else 0, tt, name)
                else:
                    th.last, th.name = max(th.last, tt), name
        self.samples += 1
        self.wall_s = time.perf_counter() - self.t0
        self.cost_s += time.thread_time() - c0

    def process_cpu_s(self, pid: int) -> float:
        rec = self.procs[pid]
        return (rec.last - rec.base) * TICK_S

    def thread_rows(self) -> list[dict[str, Any]]:
        """Every thread seen, busiest first: ``pid``, ``tid``, ``name``, ``cpu_s``."""
        rows = [{"pid": pid, "tid": tid, "name": c.name, "cpu_s": (c.last - c.base) * TICK_S}
                for (pid, tid), c in self.threads.items()]
        return sorted(rows, key=lambda r: -r["cpu_s"])


def summarize(block: CpuBlock, adapters: int, role_of: Callable[[int], str],
              exclude_tids: Iterable[int] = (), top: int = 15) -> dict[str, Any]:
    """The block's figures per adapter, its per-process table and its busiest threads.

    ``exclude_tids``: threads of the measuring itself (the monitor's sampling thread); their
    CPU is left out of every figure and reported as ``monitor_cpu_s``.
    """
    skip = set(exclude_tids)
    threads = block.thread_rows()
    monitor_s = sum(t["cpu_s"] for t in threads if t["tid"] in skip)
    threads = [t for t in threads if t["tid"] not in skip]
    per_ad = 1000.0 / adapters if adapters else float("nan")
    skipped: dict[int, float] = {}
    for t in block.thread_rows():
        if t["tid"] in skip:
            skipped[t["pid"]] = skipped.get(t["pid"], 0.0) + t["cpu_s"]
    procs = []
    for pid in block.procs:
        mine = [t for t in threads if t["pid"] == pid]
        cpu = max(block.process_cpu_s(pid) - skipped.get(pid, 0.0), 0.0)
        busiest = mine[0] if mine else None
        procs.append({"role": role_of(pid), "pid": pid, "cpu_s": round(cpu, 3),
                      # CPU of threads that exited between two readings (in the process's
                      # counters, not in any thread's row): short-lived threads
                      "unattributed_cpu_s": round(max(cpu - sum(t["cpu_s"] for t in mine),
                                                      0.0), 3),
                      "threads": len(mine),
                      "busiest_thread": busiest["name"] if busiest else None,
                      "busiest_thread_cpu_s": round(busiest["cpu_s"], 3) if busiest else 0.0})
    procs.sort(key=lambda r: -r["cpu_s"])
    total = sum(p["cpu_s"] for p in procs)
    top_rows = [{"role": role_of(t["pid"]), "pid": t["pid"], "tid": t["tid"],
                 "name": t["name"], "cpu_s": round(t["cpu_s"], 3),
                 "ms_per_adapter": round(t["cpu_s"] * per_ad, 3)} for t in threads[:top]]
    busiest = threads[0] if threads else {"cpu_s": 0.0}
    return {"adapters": adapters, "wall_s": round(block.wall_s, 3),
            "samples": block.samples, "sampling_cpu_s": round(block.cost_s, 4),
            "monitor_cpu_s": round(monitor_s, 3),
            "total_cpu_s": round(total, 3),
            "total_cpu_ms_per_adapter": round(total * per_ad, 3),
            "max_thread_cpu_s": round(busiest["cpu_s"], 3),
            "max_thread_cpu_ms_per_adapter": round(busiest["cpu_s"] * per_ad, 3),
            "threads_seen": len(threads), "processes": procs, "threads": top_rows}


PROCESS_HEADERS = ["role", "pid", "CPU s", "ms / adapter", "threads", "busiest thread",
                   "its CPU s", "exited threads' CPU s", "GIL held"]
THREAD_HEADERS = ["role", "pid", "thread (tid)", "CPU s", "ms / adapter", "GIL held"]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f} %"


def process_rows(s: dict[str, Any], gil: dict[int, dict[str, Any]] | None = None
                 ) -> list[list[Any]]:
    """The per-process table (``gil``: :func:`benchlib.gil.GilSampler.results`)."""
    per_ad = 1000.0 / s["adapters"] if s["adapters"] else float("nan")
    rows = []
    for p in s["processes"]:
        g = (gil or {}).get(p["pid"])
        rows.append([p["role"], p["pid"], p["cpu_s"], round(p["cpu_s"] * per_ad, 2),
                     p["threads"], p["busiest_thread"] or "-", p["busiest_thread_cpu_s"],
                     p["unattributed_cpu_s"], _pct(g.get("gil_share")) if g else "-"])
    rows.append(["all processes (the monitor's own thread left out)", "", s["total_cpu_s"],
                 s["total_cpu_ms_per_adapter"], s["threads_seen"], "", "", "", ""])
    return rows


def thread_rows(s: dict[str, Any], gil: dict[int, dict[str, Any]] | None = None
                ) -> list[list[Any]]:
    """The busiest threads' table."""
    rows = []
    for t in s["threads"]:
        g = (gil or {}).get(t["pid"]) or {}
        share = g.get("threads", {}).get(t["tid"])
        # Ray names every thread of a worker after its title: py-spy knows Python's names
        py_name = g.get("thread_names", {}).get(t["tid"])
        name = f"{t['name']} / {py_name}" if py_name else t["name"]
        rows.append([t["role"], t["pid"], f"{name} ({t['tid']})", t["cpu_s"],
                     t["ms_per_adapter"], _pct(share)])
    return rows
