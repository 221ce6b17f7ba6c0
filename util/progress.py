"""Progress of a loop over batches: smoothed values, iterations per second and time left.

On a terminal one line is rewritten in place (at most five times a second); otherwise (a log file, CI) a plain
line is printed every ``every`` iterations and after the last, so logs stay readable::

    progress = Progress(len(loader), header="epoch 3", enabled=is_main_process())
    for batch in loader:
        ...
        progress.step(loss=loss.item(), lr=optimizer.param_groups[0]["lr"])
    progress.close()
"""

from __future__ import annotations

import datetime
import sys
import time
from typing import TextIO


class SmoothedValue:
    """The mean of the last ``window`` values and of all values so far."""

    def __init__(self, window: int = 20) -> None:
        self.window = window
        self.recent: list[float] = []
        self.total = 0.0
        self.count = 0

    def update(self, value: float) -> None:
        self.recent = (self.recent + [value])[-self.window :]
        self.total += value
        self.count += 1

    @property
    def median_window(self) -> float:
        return sorted(self.recent)[len(self.recent) // 2] if self.recent else float("nan")

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else float("nan")


def format_duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0.0))))


class Progress:
    """Prints ``header [i/total] name value (average) ... rate it/s ETA h:mm:ss`` for a loop of ``total`` steps.

    Args:
        total: number of iterations.
        header: text at the start of each line, e.g. ``"epoch 3"``.
        every: print every ``every`` iterations when the stream is not a terminal.
        enabled: False prints nothing (ranks other than 0); values are still averaged.
        shown: the names of the values to print (None: all).
        stream: where to print (stdout by default).
    """

    def __init__(
        self,
        total: int,
        header: str = "",
        every: int = 10,
        enabled: bool = True,
        shown: tuple[str, ...] | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self.total, self.header, self.every, self.enabled = total, header, max(1, every), enabled
        self.shown = shown
        self.stream = stream if stream is not None else sys.stdout
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.values: dict[str, SmoothedValue] = {}
        self.iteration = 0
        self.start = time.perf_counter()
        self._last_draw = 0.0

    def step(self, **values: float) -> None:
        """One iteration done; ``values`` (e.g. ``loss=1.3``) join their running averages."""
        self.iteration += 1
        for name, value in values.items():
            self.values.setdefault(name, SmoothedValue()).update(float(value))
        if not self.enabled:
            return
        last = self.iteration == self.total
        now = time.perf_counter()
        if self.interactive and (last or now - self._last_draw >= 0.2):
            self._last_draw = now
            self.stream.write("\r\033[K" + self.line())
            self.stream.flush()
        elif not self.interactive and (last or self.iteration % self.every == 0):
            print(self.line(), file=self.stream, flush=True)

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        rate = self.iteration / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.iteration) / rate if rate > 0 else 0.0
        width = len(str(self.total))
        shown = " ".join(
            f"{name} {value.median_window:.4g} ({value.global_avg:.4g})"
            for name, value in self.values.items()
            if self.shown is None or name in self.shown
        )
        return (
            f"{self.header} [{self.iteration:>{width}}/{self.total}] {shown}  {rate:.2f} it/s  "
            f"ETA {format_duration(eta)}"
        ).strip()

    def averages(self) -> dict[str, float]:
        """The average of every value over all iterations so far."""
        return {name: value.global_avg for name, value in self.values.items()}

    def close(self) -> None:
        """End the in-place line on a terminal and print the total time."""
        if not self.enabled:
            return
        if self.interactive:
            self.stream.write("\n")
        elapsed = time.perf_counter() - self.start
        print(
            f"{self.header} done: {self.iteration} iterations in {format_duration(elapsed)} "
            f"({elapsed / max(self.iteration, 1):.3f} s/it)",
            file=self.stream,
            flush=True,
        )
