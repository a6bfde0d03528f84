"""Progress on stderr: rich bars (rate, ETA) on a terminal, a few plain lines when piped, nothing when quiet.

rich draws the bars: it keeps them at the bottom of the terminal while other output scrolls above, measures
rate and time remaining over a window, and honours NO_COLOR and TERM=dumb. Results go to stdout only after the
bar is closed, so a path printed by `hubd pull` never lands on the bar's line. rich is imported when the first bar
is drawn, never by a command whose output is piped or quiet (it costs a start-up tens of milliseconds).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def _bars(stream: TextIO) -> Progress:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        TextColumn("{task.fields[phase]}"),
        BarColumn(bar_width=14),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(file=stream, highlight=False),
        redirect_stdout=False,  # stdout is for results, and may be a pipe: never drawn into the bars
    )


def _short(label: str, width: int = 24) -> str:
    """Handles differ at their end (model, version): keep that part when one is too long for the line."""
    return label if len(label) <= width else "…" + label[-(width - 1) :]


def _update(progress: Progress, task: TaskID, phase: str, done: int, total: int | None) -> None:
    if total is None and not done:  # verify, publish: no byte counts of their own; keep the download's
        progress.update(task, phase=phase)
    else:
        progress.update(task, completed=done, total=total, phase=phase)


class ProgressBar:
    """Callable as a `ProgressCallback`: one bar on a terminal, phase changes only when piped."""

    def __init__(self, label: str, stream: TextIO | None = None, quiet: bool = False) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.is_tty = self.stream.isatty()
        self._phase = ""
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def __call__(self, phase: str, done: int, total: int | None) -> None:
        if self.quiet:
            return
        if not self.is_tty:
            if phase != self._phase:
                self._phase = phase
                self.stream.write(f"{self.label}: {phase}\n")
                self.stream.flush()
            return
        if self._progress is None:
            self._progress = _bars(self.stream)
            self._progress.start()
            self._task = self._progress.add_task(_short(self.label), total=total, phase=phase)
        assert self._task is not None
        _update(self._progress, self._task, phase, done, total)

    def close(self) -> None:
        """Leave the bar's last state on its own line; safe to call twice."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class ProgressBoard:
    """One bar per model on a terminal, a line per phase change otherwise, nothing when quiet."""

    def __init__(self, handles: list[str], stream: TextIO | None = None, quiet: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.is_tty = self.stream.isatty()
        self.handles = list(dict.fromkeys(handles))
        self._phases: dict[str, str] = {}
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}
        if self.is_tty and not quiet and self.handles:
            self._progress = _bars(self.stream)
            self._tasks = {h: self._progress.add_task(_short(h), total=None, phase="queued") for h in self.handles}
            self._progress.start()

    def update(self, handle: str, phase: str, done: int, total: int | None) -> None:
        if self._progress is not None:
            _update(self._progress, self._tasks[handle], phase, done, total)
        elif not self.quiet and self._phases.get(handle) != phase:
            self._phases[handle] = phase
            self.stream.write(f"{handle}: {phase}\n")
            self.stream.flush()

    def finish(self, handle: str, outcome: str) -> None:
        if self._progress is not None:
            task = self._tasks[handle]
            done = next(t.completed for t in self._progress.tasks if t.id == task)
            self._progress.update(task, phase=outcome, total=done or 1, completed=done or 1)
        elif not self.quiet:
            self.stream.write(f"{handle}: {outcome}\n")
            self.stream.flush()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
