"""The live progress line: items done / total, images/s, ETA. A carriage-return line on a terminal,
a plain line every few seconds otherwise (CI logs, ``ray job logs``)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _eta(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    def __init__(self, total: int, stream: TextIO | None = None, every_s: float = 5.0, planning: bool = False) -> None:
        self.total = total
        self.planning = planning
        """True while the plan is still growing ``total``: the line says so and the ETA waits."""
        self.done = 0
        self.images = 0
        self.start = time.monotonic()
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.every_s = 0.2 if self.tty else every_s
        self._last = 0.0
        self._last_state: tuple[int, int, bool] | None = None

    def add(self, planned: int) -> None:
        self.total += planned

    def update(self, done: int, images: int) -> None:
        self.done += done
        self.images += images
        now = time.monotonic()
        if now - self._last >= self.every_s or (self.done >= self.total and not self.planning):
            self._last = now
            self._print()

    def finish(self) -> None:
        """The final line, if the last one printed was not complete (the plan may have grown after it)."""
        self.planning = False
        if self._last_state != (self.done, self.total, False):
            self._print()

    def rate(self) -> float:
        elapsed = time.monotonic() - self.start
        return self.images / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        per_item = elapsed / self.done if self.done else float("inf")
        eta = _eta(per_item * (self.total - self.done)) if self.done and not self.planning else "?"
        total = f"{self.total}+ (planning)" if self.planning else str(self.total)
        return f"[genpipe] {self.done}/{total} items  {self.rate():.2f} images/s  ETA {eta}"

    def _print(self) -> None:
        self._last_state = (self.done, self.total, self.planning)
        end = "\r" if self.tty and (self.done < self.total or self.planning) else "\n"
        print(self.line(), end=end, file=self.stream, flush=True)
