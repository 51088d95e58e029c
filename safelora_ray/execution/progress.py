"""Progress of long work, made for people at a terminal and for log files.

At a terminal (stderr is a TTY) this is a tqdm bar. Anywhere else (a nightly's log file,
``ray job logs``, a CI log) a bar would write its carriage-return updates several times a
second into the file, so instead a plain one-line report is logged every
``SAFELORA_PROGRESS_INTERVAL_S`` seconds (default 30): done / total, percent, rate and ETA.
The total may become known later (a catalog still being listed): :meth:`Progress.set_total`.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any, TextIO

from safelora_ray.core.validate import env_number

logger = logging.getLogger(__name__)

#: Seconds between two progress lines when not writing to a terminal.
INTERVAL_S = env_number("SAFELORA_PROGRESS_INTERVAL_S", 30)


def _human(n: float, unit: str, scale: bool) -> str:
    if not scale:
        return f"{n:,.0f}"
    for prefix in ("", "k", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.1f} {prefix}{unit}" if prefix else f"{n:.0f} {unit}"
        n /= 1000
    return f"{n:.1f} P{unit}"


def _duration(seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """A progress report for ``desc``.

    Args:
        desc: What is progressing (``sanitize``).
        unit: Unit of the counts (``adapter``, ``B``).
        total: The total, when known.
        enabled: False shows nothing (``--no-progress``, ``--quiet``).
        unit_scale: Print counts with k/M/G prefixes (bytes).
        stream: Where a terminal bar goes (default stderr).
        interval_s: Seconds between two lines when not at a terminal.
    """

    def __init__(self, desc: str, unit: str, total: int | None = None, enabled: bool = True,
                 unit_scale: bool = False, stream: TextIO | None = None,
                 interval_s: float | None = None) -> None:
        self.desc, self.unit, self.unit_scale = desc, unit, unit_scale
        self.total = total
        self.n = 0
        self.interval_s = INTERVAL_S if interval_s is None else interval_s
        self._stream = stream or sys.stderr
        self._lock = threading.Lock()
        self._t0 = self._last = time.monotonic()
        self._bar: Any = None
        self.enabled = enabled
        if enabled and _isatty(self._stream):
            from tqdm.auto import tqdm

            self._bar = tqdm(desc=desc, unit=unit, total=total, unit_scale=unit_scale,
                             file=self._stream)

    @property
    def terminal(self) -> bool:
        """Whether this is a terminal bar (else periodic lines)."""
        return self._bar is not None

    def set_total(self, total: int) -> None:
        """The total, now that it is known."""
        with self._lock:
            self.total = total
            if self._bar is not None:
                self._bar.total = total
                self._bar.refresh()

    def update(self, n: int = 1) -> None:
        """``n`` more units done."""
        with self._lock:
            self.n += n
            if self._bar is not None:
                self._bar.update(n)
                return
            now = time.monotonic()
            if not self.enabled or now - self._last < self.interval_s:
                return
            self._last = now
            line = self.line(now)
        logger.info("%s", line)

    def line(self, now: float | None = None) -> str:
        """The one-line report: ``sanitize: 1,200/5,000 adapters (24%), 40.1/s, ETA 1m35s``."""
        elapsed = max((now or time.monotonic()) - self._t0, 1e-9)
        rate = self.n / elapsed
        unit = self.unit if self.unit_scale or self.unit.endswith("s") else self.unit + "s"
        done = _human(self.n, self.unit, self.unit_scale)
        if self.total:
            pct = 100.0 * self.n / self.total
            eta = _duration((self.total - self.n) / rate) if rate > 0 else "?"
            text = (f"{self.desc}: {done}/{_human(self.total, self.unit, self.unit_scale)}"
                    f"{'' if self.unit_scale else ' ' + unit} ({pct:.0f}%)")
        else:
            text = (f"{self.desc}: {done}{'' if self.unit_scale else ' ' + unit} "
                    "(total not known yet)")
            eta = None
        rate_s = (_human(rate, self.unit, True) if self.unit_scale else f"{rate:,.1f}") + "/s"
        text += f", {rate_s}, {_duration(elapsed)} elapsed"
        if eta is not None:
            text += f", ETA {eta}"
        return text

    def close(self) -> None:
        """End the report (the terminal bar is closed; nothing more is printed)."""
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            self.enabled = False


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


__all__ = ["INTERVAL_S", "Progress"]
