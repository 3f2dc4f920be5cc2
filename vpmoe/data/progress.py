"""A rich progress bar for long data jobs: done/total, tokens/s and ETA.

Design choice: one tiny wrapper so render and build show the same columns; `enabled=False` (tests,
`--quiet`) makes it a no-op. The rate counts tokens produced since this run started, so a resumed
build reports its own speed, not one inflated by work reused from disk.
"""
from __future__ import annotations

import time

from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as _RichProgress
from rich.text import Text


def scaled(x: float) -> str:
    """A count with a k/M/G suffix and three significant digits: 812, 12.3k, 1.25M (a tiny input's
    rate reads as itself, not as 0.00M)."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= 0.9995 * div:  # what would round up to 1000 takes the next suffix
            v = x / div
            return f"{v:.3g}{suffix}" if v < 999.5 else f"{v:.0f}{suffix}"
    return f"{x:.0f}"


class _TokensPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        elapsed = time.monotonic() - task.fields["t0"]
        rate = task.fields["tokens"] / elapsed if elapsed > 0 else 0.0
        return Text(f"{scaled(rate):>6} tok/s  {scaled(task.fields['tokens']):>6} tok")


class Progress:
    def __init__(self, total: int | None, unit: str, description: str, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        self._bar = _RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn(unit), _TokensPerSecond(), TimeRemainingColumn())
        self._task = self._bar.add_task(description, total=total, tokens=0, t0=time.monotonic())

    def __enter__(self) -> "Progress":
        if self.enabled:
            self._bar.start()
        return self

    def advance(self, n: int, tokens: int = 0) -> None:
        if self.enabled:
            task = self._bar.tasks[0]
            self._bar.update(self._task, advance=n, tokens=task.fields["tokens"] + tokens)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._bar.stop()
