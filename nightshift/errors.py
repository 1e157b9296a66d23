"""Errors the tasks turn into one readable line instead of a traceback."""


class NightshiftError(Exception):
    """An expected failure: the message says what is wrong and what to do."""

    exit_code = 1


class ToolMissing(NightshiftError):
    """A program we drive is not installed."""

    exit_code = 3
