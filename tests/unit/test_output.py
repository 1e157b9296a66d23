"""A task's stdout once its reader has gone (`invoke run | head`)."""

from __future__ import annotations

import os

from nightshift.output import ReaderSafe, reader_safe


def _pipe() -> tuple[int, ReaderSafe]:
    read_end, write_end = os.pipe()
    return read_end, ReaderSafe(open(write_end, "w", encoding="utf-8"))


def test_writes_reach_the_reader_while_it_reads():
    read_end, out = _pipe()
    out.write("booting\n")
    out.flush()
    assert os.read(read_end, 100) == b"booting\n"
    assert not out.reader_gone
    os.close(read_end)
    out.stream.close()


def test_a_reader_that_leaves_turns_writes_into_no_ops():
    read_end, out = _pipe()
    os.close(read_end)

    out.write("after the reader left\n")
    out.flush()  # the pipe error surfaces here, and is kept inside
    assert out.reader_gone
    assert out.write("more\n") == len("more\n")
    out.flush()
    assert not out.isatty()
    # The descriptor now leads to /dev/null, so the interpreter's own flush
    # at exit and children started later write without an error.
    assert os.readlink(f"/proc/self/fd/{out.fileno()}") == "/dev/null"
    out.stream.close()


def test_wrapping_twice_keeps_one_wrapper():
    read_end, out = _pipe()
    assert reader_safe(out) is out
    os.close(read_end)
    out.stream.close()
