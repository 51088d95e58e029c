"""Memory and CPU time of every process of a run (the driver, Ray's, the workers), sampled in a
background thread, by role.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import psutil

from benchlib.cpu import CpuBlock
from benchlib.runs import mib

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


def _name_this_thread(name: str) -> None:
    """Set the OS name (``comm``) of the calling thread, so that the per-thread CPU tables
    show the monitor's own thread by name (Python < 3.14 leaves it the process's)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


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


def process_role(proc: psutil.Process, driver: int) -> str:
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
    if os.path.basename(head) in ("raylet", "gcs_server"):  # the raylet's command line
        return "ray system"                                # names default_worker.py too
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
    seconds only, and less often when it costs more (at most 5 % of a core): the kernel walks
    every mapping for it (~2 ms a small process, ~55 ms one holding 4 GiB), which every 50 ms
    would take a third of a core or more from the run.

    Roles come from the processes' Ray titles (``SafeLoraWorker``, ``ray system``, ...);
    :meth:`label` refines them (which worker holds the alignment set).

    :meth:`block` measures the CPU time of every thread of every process inside a part of
    the run (the sanitize apart from the build), read every ``thread_interval`` seconds
    (:mod:`benchlib.cpu`). The monitor's own cost is kept: ``cost`` in :meth:`summary`.
    """

    def __init__(self, interval: float = 0.05, pids: Sequence[int] | None = None,
                 pss_interval: float = 0.5, thread_interval: float = 1.0) -> None:
        self.interval = interval
        self.pss_interval = pss_interval
        self.thread_interval = thread_interval
        self.list_interval = 0.25
        self._listed: tuple[float, list[psutil.Process]] | None = None
        self.blocks: dict[str, CpuBlock] = {}
        self._open: CpuBlock | None = None
        self._block_lock = threading.Lock()
        self._excluded: set[int] = set()
        self.monitor_tid: int | None = None
        self._memory_cost_s = 0.0
        self._pss_next = 0.0
        self.pss_samples = 0
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

    def _procs(self, fresh: bool = True) -> list[psutil.Process]:
        """The processes of the run. ``fresh=False`` (the memory samples) reuses the list
        while it is younger than ``list_interval``: listing a process's descendants reads the
        stat file of every process of the machine (60 % of a sample's cost); a process that
        starts in between is seen at the next listing, its ``VmHWM`` keeping its peak."""
        now = time.perf_counter()
        if not fresh and self._listed is not None and now < self._listed[0]:
            return self._listed[1]
        if self.only is not None:
            procs = [psutil.Process(p) for p in self.only if psutil.pid_exists(p)]
        else:
            me = psutil.Process(self.driver)
            try:
                procs = [p for p in (me, *me.children(recursive=True))
                         if p.pid not in self._excluded]
            except psutil.Error:
                procs = [me]
        self._listed = (now + self.list_interval, procs)
        return procs

    def exclude(self, pids: Sequence[int]) -> None:
        """Leave these processes (the measuring tools, such as py-spy) out of every figure."""
        self._excluded.update(pids)

    def pids(self) -> list[int]:
        """The processes of the run now (the driver and its descendants, less the excluded)."""
        return [p.pid for p in self._procs()]

    def _sample_threads(self) -> None:
        with self._block_lock:
            if self._open is not None:
                self._open.sample(self.pids())

    @contextlib.contextmanager
    def block(self, name: str) -> Iterator[CpuBlock]:
        """Measure the CPU time of every thread of the run inside this block (read at its
        start, every ``thread_interval`` seconds, and at its end), kept as ``blocks[name]``."""
        blk = self.blocks[name] = CpuBlock()
        with self._block_lock:
            self._open = blk
            blk.sample(self.pids())
        try:
            yield blk
        finally:
            with self._block_lock:
                blk.sample(self.pids())
                self._open = None

    def _sample(self, first: bool = False) -> None:
        total = anon = pss = 0
        now: dict[int, dict[str, int]] = {}
        with_pss = first or time.perf_counter() >= self._pss_next
        pss_cost = 0.0
        for p in self._procs(fresh=first):
            if p.pid in self._excluded:
                continue
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
                c0 = time.thread_time()
                pss += _pss(p.pid)
                pss_cost += time.thread_time() - c0
            try:
                ct = p.cpu_times()
                cpu = ct.user + ct.system
            except (psutil.Error, OSError):
                cpu = None
            rec = self.peaks.get(p.pid)
            if rec is None:
                rec = self.peaks[p.pid] = {"pid": p.pid, "role": process_role(p, self.driver),
                                           "peak_rss": 0, "peak_anon": 0, "cpu_s": 0.0}
            elif _specificity(rec["role"]) < 10:  # else final: no command line to read
                role = process_role(p, self.driver)
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
        if with_pss:
            # The kernel walks every page of a process for its PSS: ~55 ms for a 4 GiB
            # holder of a 7B set. Spaced so that it takes at most 5 % of a core.
            self._pss_next = time.perf_counter() + max(self.pss_interval, 20 * pss_cost)
            self.pss_samples += 1
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
        _name_this_thread("bench-monitor")
        self.monitor_tid = threading.get_native_id()
        next_threads = time.perf_counter() + self.thread_interval
        while not self._stop.wait(self.interval):
            c0 = time.thread_time()
            self._sample()
            self._memory_cost_s += time.thread_time() - c0
            if time.perf_counter() >= next_threads:
                next_threads = time.perf_counter() + self.thread_interval
                self._sample_threads()  # its CPU time: the block's cost_s

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

    def role_of(self, pid: int) -> str:
        """The process's role: its label, else the most specific one sampled."""
        return self.labels.get(pid) or self.peaks.get(pid, {}).get("role", "?")

    def summary(self) -> dict[str, Any]:
        """Per role: process count, the largest per-process peak RSS, their sum, the role's
        RSS at the run's peak moment, and the CPU seconds used inside the measured blocks;
        the run's peak total (RSS and its anonymous part), and every process."""
        roles: dict[str, dict[str, Any]] = {}
        for pid, rec in self.peaks.items():
            if not rec["peak_rss"]:
                continue  # gone before it could be read
            r = roles.setdefault(self.role_of(pid), {
                "processes": 0, "max_peak_rss": 0, "sum_peak_rss": 0, "cpu_s": 0.0,
                "rss_at_peak": 0, "anon_at_peak": 0})
            r["processes"] += 1
            r["max_peak_rss"] = max(r["max_peak_rss"], rec["peak_rss"])
            r["sum_peak_rss"] += rec["peak_rss"]
            r["cpu_s"] = round(r["cpu_s"] + rec["cpu_s"], 3)
        at_peak = self.peak_moment.get("pids", {})
        for pid, st in at_peak.items():
            r = roles.get(self.role_of(pid))
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
                # CPU time of the monitor's own sampling (in the driver's figures): memory
                # every `interval`, every thread's CPU every `thread_interval` and at the
                # blocks' start and end
                "cost": {"memory_sampling_s": round(self._memory_cost_s, 4),
                         "memory_samples": self.samples, "pss_samples": self.pss_samples,
                         "thread_sampling_s": round(sum(b.cost_s for b in
                                                        self.blocks.values()), 4),
                         "thread_samples": sum(b.samples for b in self.blocks.values()),
                         "interval_s": self.interval,
                         "thread_interval_s": self.thread_interval},
                "cpu_s": round(sum(rec["cpu_s"] for rec in self.peaks.values()), 3),
                "processes": sorted(({**rec, "role": self.role_of(pid)}
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
