"""Progress of mmret's long loops (embedding a shard set, writing shards, mining, indexing) on stderr.

    with Progress("embedding data/digits/test", total=num_images, unit="images", enabled=progress) as bar:
        for batch in loader:
            ...
            bar.update(len(batch["image"]))
    with quiet_progress(args.quiet):        # a command's --quiet: no progress from anything it runs
        run()

What is shown depends on where stderr goes, decided when a loop starts:
- a terminal: a tqdm bar (redrawn in place, erased when the loop ends);
- anything else (a log file, CI, SLURM's output file, a notebook): a plain line at most every
  `$MMRET_PROGRESS_INTERVAL` seconds (default 10), e.g.
  `embedding data/digits/test: 1200/2200 images (54%), 98.4 images/s, ~10 s left`, and one closing line
  `embedding data/digits/test: done, 2200 images in 22 s (99.1 images/s)` when a loop that printed any ends.
  A loop shorter than the interval prints nothing, so a quick command's stderr holds only what it reports;
- nothing: `enabled=False`, or inside `quiet_progress()`.

Counts are of what the loop handles (images, samples, queries); without a known total only the count and the
rate are shown. A loop left by an exception ends without its closing line: the error is the last word.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import sys
import time
from collections.abc import Iterator
from typing import TextIO

INTERVAL_ENV = "MMRET_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 10.0  # seconds between plain lines

# Set by `quiet_progress` for the code it runs (a command's --quiet); a ContextVar, so it ends with the block.
_QUIET: contextvars.ContextVar[bool] = contextvars.ContextVar("mmret_progress_quiet", default=False)


@contextlib.contextmanager
def quiet_progress(quiet: bool = True) -> Iterator[None]:
    """No progress output from loops started inside the block when `quiet` (an enclosing quiet block stays in
    force either way)."""
    token = _QUIET.set(quiet or _QUIET.get())
    try:
        yield
    finally:
        _QUIET.reset(token)


def line_interval() -> float:
    """Seconds between plain progress lines: `$MMRET_PROGRESS_INTERVAL` (a number >= 0), else 10."""
    try:
        value = float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL))
    except ValueError:
        return DEFAULT_INTERVAL
    return value if value >= 0 and math.isfinite(value) else DEFAULT_INTERVAL


def is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def format_duration(seconds: float) -> str:
    """`0.4 s`, `42 s`, `3 min 05 s`, `2 h 04 min`."""
    if seconds < 9.95:
        return f"{max(0.0, seconds):.1f} s"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def format_rate(per_second: float) -> str:
    return f"{per_second:.1f}" if per_second < 100 else f"{per_second:.0f}"


class Progress:
    """The progress of one loop: a tqdm bar on a terminal, periodic plain lines elsewhere, or nothing.

    Args:
        description: what the loop does, e.g. "embedding data/digits/test".
        total: the number of items the loop will handle, when known (None: counts only).
        unit: what is counted, plural ("images", "samples").
        enabled: False shows nothing (a caller's own `progress=False`).
        stream: where to write (default: sys.stderr when the loop starts).
        interval: seconds between plain lines (default: `line_interval()`).
    """

    def __init__(
        self,
        description: str,
        total: int | None = None,
        unit: str = "items",
        *,
        enabled: bool = True,
        stream: TextIO | None = None,
        interval: float | None = None,
    ) -> None:
        self.description, self.unit = description, unit
        self.total = total if total is not None and total > 0 else None
        self.count = 0
        self.stream = stream if stream is not None else sys.stderr
        self.interval = line_interval() if interval is None else interval
        self.lines_printed = 0
        self.started = self._last_line = time.monotonic()
        self._closed = False
        self._bar = None
        if not enabled or _QUIET.get():
            self.mode = "off"
        elif is_terminal(self.stream):
            from tqdm import tqdm

            self.mode = "bar"
            self._bar = tqdm(total=self.total, desc=description, unit=f" {unit}", file=self.stream,
                             leave=False, dynamic_ncols=True, mininterval=0.5)  # fmt: skip
        else:
            self.mode = "lines"

    def update(self, count: int = 1) -> None:
        """Count `count` more items done."""
        self.count += count
        if self.mode == "bar":
            self._bar.update(count)
        elif self.mode == "lines":
            now = time.monotonic()
            if now - self._last_line >= self.interval:
                self._last_line = now
                self._write(self.status_line(now))

    def close(self, completed: bool = True) -> None:
        """End the display: the bar is erased; after plain lines, a closing line when `completed`."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "lines" and completed and self.lines_printed:
            elapsed = time.monotonic() - self.started
            rate = f" ({format_rate(self.count / elapsed)} {self.unit}/s)" if elapsed > 0 else ""
            self._write(
                f"{self.description}: done, {self.count} {self.unit} in {format_duration(elapsed)}{rate}"
            )

    def status_line(self, now: float | None = None) -> str:
        """`DESCRIPTION: N/TOTAL UNIT (P%), R UNIT/s, ~T left`, or `DESCRIPTION: N UNIT, R UNIT/s` without a total."""
        elapsed = (time.monotonic() if now is None else now) - self.started
        rate = self.count / elapsed if elapsed > 0 else 0.0
        if self.total is None:
            line = f"{self.description}: {self.count} {self.unit}"
        else:
            percent = math.floor(100 * min(self.count, self.total) / self.total)
            line = f"{self.description}: {self.count}/{self.total} {self.unit} ({percent}%)"
        if rate > 0:
            line += f", {format_rate(rate)} {self.unit}/s"
            if self.total is not None and self.count < self.total:
                line += f", ~{format_duration((self.total - self.count) / rate)} left"
        return line

    def _write(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()
        self.lines_printed += 1

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.close(completed=exc_type is None)
