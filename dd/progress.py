"""Progress that reads well both in a terminal and in a log file.

In a terminal a job shows one tqdm bar. When the output is not a terminal (redirected to a file, CI, ``nohup``) a
redrawn bar would fill the file with carriage-return frames, so :func:`progress_bar` returns a :class:`LineProgress`
instead: one line every ``interval_s`` seconds or whenever another tenth of the work is done, e.g. ::

    pairs (rank 0 of 1): 2560/10000 pair (26%), 41.3 pair/s, elapsed 01:02, ETA 03:00

Pure Python plus tqdm (no Lightning); the Lightning training bar built on it is :mod:`dd.tasks.progress`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Protocol, TextIO

from tqdm import tqdm

#: seconds between two summary lines when less than a tenth of the work got done meanwhile
DEFAULT_INTERVAL_S = 10.0
DEFAULT_FRACTION = 0.1


class Progress(Protocol):
    """What jobs use of a progress display: tqdm's ``update`` and ``close``."""

    def update(self, n: int = 1) -> object: ...

    def close(self) -> None: ...


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default: stderr, where progress goes) is an interactive terminal."""
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def progress_bar(total: int | None, desc: str, unit: str, stream: TextIO | None = None,
                 interval_s: float = DEFAULT_INTERVAL_S) -> Progress:
    """A tqdm bar on a terminal, otherwise a :class:`LineProgress` with the same ``update`` / ``close``."""
    stream = stream if stream is not None else sys.stderr
    if is_terminal(stream):
        return tqdm(total=total, desc=desc, unit=unit, file=stream)
    return LineProgress(total, desc, unit, stream=stream, interval_s=interval_s)


class LineProgress:
    """Periodic one-line summaries (count, percentage, rate, elapsed time, ETA) for output that is not a terminal.

    A line is written when ``interval_s`` seconds have passed since the last one or when the count crosses another
    multiple of ``fraction * total``; :meth:`close` writes a last line unless the latest one is already current.
    ``initial`` counts work done before this run (a resumed job): it shows in the count but not in the rate.
    ``postfix`` (e.g. ``"loss 2.31"``) is appended to each line.
    """

    def __init__(self, total: int | None, desc: str, unit: str, *, stream: TextIO | None = None,
                 interval_s: float = DEFAULT_INTERVAL_S, fraction: float = DEFAULT_FRACTION, initial: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream if stream is not None else sys.stderr
        self.interval_s, self.fraction, self.clock = interval_s, fraction, clock
        self.initial = self.n = self.shown_n = initial
        self.start = self.shown_at = clock()
        self.postfix = ""
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.shown_at >= self.interval_s or self._crossed_a_mark():
            self._show(now)

    def close(self) -> None:
        if not self.closed and self.n != self.shown_n:
            self._show(self.clock())
        self.closed = True

    def summary(self, now: float) -> str:
        """The line for the current count at time ``now``."""
        elapsed = now - self.start
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        count = f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"
        parts = [f"{self.desc}: {count}" + (f" ({100 * self.n / self.total:.0f}%)" if self.total else ""),
                 _speed(rate, self.unit), f"elapsed {tqdm.format_interval(elapsed)}"]
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"ETA {tqdm.format_interval((self.total - self.n) / rate)}")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)

    def _crossed_a_mark(self) -> bool:
        if not self.total:
            return False
        step = self.fraction * self.total
        return int(self.n // step) > int(self.shown_n // step)

    def _show(self, now: float) -> None:
        print(self.summary(now), file=self.stream, flush=True)
        self.shown_n, self.shown_at = self.n, now


def _speed(rate: float, unit: str) -> str:
    """Items per second, or seconds per item when that reads better (slow steps)."""
    if rate <= 0:
        return f"0 {unit}/s"
    return f"{rate:.1f} {unit}/s" if rate >= 1 else f"{1 / rate:.2f} s/{unit}"
