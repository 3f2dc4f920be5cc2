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


class _TokensPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        elapsed = time.monotonic() - task.fields["t0"]
        rate = task.fields["tokens"] / elapsed if elapsed > 0 else 0.0
        return Text(f"{rate / 1e6:6.2f}M tok/s  {task.fields['tokens'] / 1e6:8.1f}M tok")


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
