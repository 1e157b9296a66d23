"""Standard output that outlives its reader.

`invoke run | head` closes the pipe while a VM is still up. A task must
still wait for the power-off, keep the result and stop what it started, so
once the reader has gone the task's output goes to /dev/null instead of
raising BrokenPipeError in whatever step happened to be printing.
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import TextIO


class ReaderSafe(io.TextIOBase):
    """A text stream that drops its writes, quietly, after the reader leaves."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.reader_gone = False

    def write(self, text: str) -> int:
        if not self.reader_gone:
            try:
                self.stream.write(text)
            except BrokenPipeError:
                self._drop()
        return len(text)

    def flush(self) -> None:
        if not self.reader_gone:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self._drop()

    def isatty(self) -> bool:
        return not self.reader_gone and self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    def _drop(self) -> None:
        self.reader_gone = True
        # Point the descriptor at /dev/null: what is still buffered, the
        # interpreter's flush at exit and any child started from now on
        # then write without an error.
        with contextlib.suppress(OSError, ValueError):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self.stream.fileno())
            os.close(null)


def reader_safe(stream: TextIO) -> TextIO:
    """stream wrapped once in ReaderSafe (a stream already wrapped is kept)."""
    return stream if isinstance(stream, ReaderSafe) else ReaderSafe(stream)
