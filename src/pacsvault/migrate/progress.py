"""A progress bar on stderr for long copies: redrawn in place at a terminal, plain lines
(every tenth and at the end) when stderr is a file or a pipe (systemd, a script, tests)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

_WIDTH = 30
_REDRAW = 0.1  # seconds between redraws at a terminal


class Progress:
    def __init__(self, label: str, total: int, *, done: int = 0,
                 stream: TextIO | None = None) -> None:
        self.label = label
        self.total = max(total, 0)
        self.done = done
        self._stream = stream if stream is not None else sys.stderr
        self._tty = bool(getattr(self._stream, "isatty", lambda: False)())
        self._started = time.monotonic()
        self._drawn = 0.0
        self._tenth = -1
        self._printed = -1
        self._first = done
        self._line(force=True)

    def advance(self, count: int = 1) -> None:
        self.done += count
        self._line()

    def close(self) -> None:
        self._line(force=True, final=True)
        if self._tty:
            self._stream.write("\n")
            self._stream.flush()

    def _text(self) -> str:
        elapsed = max(time.monotonic() - self._started, 1e-6)
        rate = (self.done - self._first) / elapsed
        if self.total:
            filled = min(_WIDTH, self.done * _WIDTH // self.total)
            bar = "#" * filled + "." * (_WIDTH - filled)
            return f"{self.label} [{bar}] {self.done}/{self.total} ({rate:.1f}/s)"
        return f"{self.label}: {self.done} ({rate:.1f}/s)"

    def _line(self, *, force: bool = False, final: bool = False) -> None:
        now = time.monotonic()
        if self._tty:
            if force or now - self._drawn >= _REDRAW:
                self._drawn = now
                self._stream.write("\r" + self._text())
                self._stream.flush()
            return
        tenth = self.done * 10 // self.total if self.total else 0
        if not (force or tenth > self._tenth) or (final and self.done == self._printed):
            return
        self._printed = self.done
        self._stream.write(self._text() + "\n")
        self._tenth = tenth
        self._stream.flush()
