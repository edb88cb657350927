"""Progress of the long commands (build, verify, gc, copy, merge) on stderr, with an ETA.

On a terminal (the stream is a TTY) a tqdm bar redrawn in place: done/total, rate and
``[elapsed<remaining]``. Anywhere else (a log file, a pipe, a batch job's output) nothing is
redrawn and no carriage return is written: one whole line, ending in a newline, every
`interval` seconds (default 30, or the FEATSTORE_PROGRESS_INTERVAL environment variable), e.g.

    featstore build: 1200/5000 units (24%), 41.3 units/s, elapsed 0:00:29, ETA 0:01:32

Work that ends within the first interval prints no line at all. ``enabled=False`` (the
commands' ``--no-progress``) turns both off. tqdm is imported only for a bar, so that
`featstore --help` needs neither it nor torch.
"""

from __future__ import annotations

import os
import sys
import threading
import time

__all__ = ["Progress", "DEFAULT_INTERVAL_S", "format_eta", "NO_PROGRESS_HELP"]

DEFAULT_INTERVAL_S = 30.0
_INTERVAL_ENV = "FEATSTORE_PROGRESS_INTERVAL"

# The --no-progress help of every command that has one.
NO_PROGRESS_HELP = ("show no progress. By default the progress, with an ETA, goes to stderr: a bar on a terminal, "
                    f"else one whole line every {DEFAULT_INTERVAL_S:.0f} s ({_INTERVAL_ENV} sets the seconds); "
                    "use it for quiet scripts")


def _default_interval() -> float:
    try:
        return max(0.0, float(os.environ.get(_INTERVAL_ENV, DEFAULT_INTERVAL_S)))
    except ValueError:
        return DEFAULT_INTERVAL_S


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def format_eta(seconds: float | None) -> str:
    """H:MM:SS, or '?' when unknown.

    Example:
        >>> from featstore.progress import format_eta
        >>> format_eta(3725.4), format_eta(None)
        ('1:02:05', '?')
    """
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _amount(n: float, unit: str) -> str:
    if unit != "B":
        return f"{int(n)}"
    for prefix in ("", "k", "M", "G", "T"):
        if abs(n) < 1000 or prefix == "T":
            return f"{n:.0f} B" if not prefix else f"{n:.1f} {prefix}B"
        n /= 1000
    return f"{n:.1f} TB"


class Progress:
    """Progress of one piece of long work: a bar on a terminal, whole lines elsewhere.

    Args:
        total: units of work (None: unknown; then no percentage and no ETA).
        desc: what is running, e.g. "featstore build"; starts each line.
        unit: what is counted ("unit", "entry", "file"; "B" counts bytes, shown scaled).
        enabled: False shows nothing (``--no-progress``).
        stream: where to write (default: sys.stderr at the time of the call).
        interval: seconds between lines when the stream is not a terminal (default 30, or
            FEATSTORE_PROGRESS_INTERVAL).
        tty: force the bar (True) or the lines (False); default: the stream's isatty().

    Thread-safe: `update` may be called from worker threads.

    Example:
        >>> import io
        >>> from featstore.progress import Progress
        >>> out = io.StringIO()
        >>> with Progress(4, desc="demo", unit="unit", stream=out, interval=0) as p:
        ...     p.update(2)
        >>> print(out.getvalue(), end="")
        demo: 2/4 units (50%), ... ETA 0:00:00
    """

    def __init__(self, total: int | float | None, *, desc: str, unit: str = "unit", enabled: bool = True,
                 stream=None, interval: float | None = None, tty: bool | None = None):
        self.total = total if total else None
        self.desc, self.unit, self.enabled = desc, unit, enabled
        self.stream = sys.stderr if stream is None else stream
        self.interval = _default_interval() if interval is None else interval
        self.n = 0
        self.postfix = ""
        self.t0 = time.perf_counter()
        self._lock = threading.Lock()
        self._last_line = self.t0
        self._bar = None
        if enabled and (_is_tty(self.stream) if tty is None else tty):
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit=unit, unit_scale=unit == "B",
                             dynamic_ncols=True,
                             smoothing=0.05, file=self.stream)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int | float = 1) -> None:
        with self._lock:
            self.n += n
            if self._bar is not None:
                self._bar.update(n)
                return
            if not self.enabled:
                return
            now = time.perf_counter()
            if now - self._last_line >= self.interval:
                self._last_line = now
                self._write_line(now)

    def set_postfix_str(self, text: str, refresh: bool = False) -> None:
        """Extra text after the rate (e.g. frames/s of a build), on the bar and in the lines."""
        with self._lock:
            self.postfix = text
            if self._bar is not None:
                self._bar.set_postfix_str(text, refresh=refresh)

    def line(self, now: float | None = None) -> str:
        """The progress as one line (no newline), as written when the stream is not a terminal."""
        now = time.perf_counter() if now is None else now
        elapsed = max(now - self.t0, 1e-9)
        rate = self.n / elapsed
        units = self.unit if self.unit == "B" else f"{self.unit}s"
        if self.total:
            done = f"{_amount(self.n, self.unit)}/{_amount(self.total, self.unit)}"
            done += "" if self.unit == "B" else f" {units}"
            done += f" ({100 * self.n / self.total:.0f}%)"
            eta = format_eta((self.total - self.n) / rate if rate > 0 else None)
        else:
            done = _amount(self.n, self.unit) + ("" if self.unit == "B" else f" {units}")
            eta = "?"
        speed = f"{_amount(rate, 'B')}/s" if self.unit == "B" else f"{rate:.1f} {units}/s"
        extra = f", {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {done}, {speed}{extra}, elapsed {format_eta(elapsed)}, ETA {eta}"

    def _write_line(self, now: float) -> None:
        try:
            self.stream.write(self.line(now) + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: progress is not worth an error
            self.enabled = False

    def close(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            self.enabled = False
