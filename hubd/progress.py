"""Progress on a terminal: a redrawn bar on a TTY, a few plain lines when piped, always on stderr."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


class ProgressBar:
    """Callable as a `ProgressCallback`. Quiet (phase changes only) when the stream is not a terminal."""

    def __init__(self, label: str, stream: TextIO | None = None, width: int = 30) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.width = width
        self.is_tty = self.stream.isatty()
        self._phase = ""
        self._started = time.monotonic()
        self._drawn = False

    def __call__(self, phase: str, done: int, total: int | None) -> None:
        if not self.is_tty:
            if phase != self._phase:
                self._phase = phase
                self.stream.write(f"{self.label}: {phase}\n")
                self.stream.flush()
            return
        self._phase = phase
        elapsed = max(time.monotonic() - self._started, 1e-6)
        rate = f"{human_bytes(done / elapsed)}/s" if done else ""
        if total:
            filled = int(self.width * min(done / total, 1.0))
            bar = "#" * filled + "-" * (self.width - filled)
            text = f"{self.label} {phase} [{bar}] {human_bytes(done)}/{human_bytes(total)} {rate}"
        else:
            text = f"{self.label} {phase} {human_bytes(done) if done else ''} {rate}"
        self.stream.write("\r\x1b[K" + text[:200])
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()


class ProgressBoard:
    """One progress line per model: redrawn in place on a TTY, a line per phase change otherwise."""

    def __init__(self, handles: list[str], stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.is_tty = self.stream.isatty()
        self.handles = list(dict.fromkeys(handles))
        self.lines = {h: "queued" for h in self.handles}
        self._phases: dict[str, str] = {}
        self._drawn = 0
        self._last = 0.0

    def update(self, handle: str, phase: str, done: int, total: int | None) -> None:
        if not self.is_tty:
            if self._phases.get(handle) != phase:
                self._phases[handle] = phase
                self.stream.write(f"{handle}: {phase}\n")
                self.stream.flush()
            return
        if total:
            filled = int(20 * min(done / total, 1.0))
            self.lines[handle] = (
                f"{phase} [{'#' * filled}{'-' * (20 - filled)}] {human_bytes(done)}/{human_bytes(total)}"
            )
        else:
            self.lines[handle] = f"{phase} {human_bytes(done) if done else ''}"
        now = time.monotonic()
        if now - self._last > 0.1:
            self._last = now
            self._draw()

    def finish(self, handle: str, outcome: str) -> None:
        self.lines[handle] = outcome
        if self.is_tty:
            self._draw()
        else:
            self.stream.write(f"{handle}: {outcome}\n")
            self.stream.flush()

    def _draw(self) -> None:
        width = max(len(h) for h in self.handles) if self.handles else 0
        out = "\x1b[F" * self._drawn
        for handle in self.handles:
            out += f"\x1b[K{handle:<{width}}  {self.lines.get(handle, '')}"[:220] + "\n"
        self.stream.write(out)
        self.stream.flush()
        self._drawn = len(self.handles)

    def close(self) -> None:
        if self.is_tty and self.handles:
            self._draw()
