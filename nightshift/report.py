"""Human-readable output shared by the tasks."""

from __future__ import annotations

from typing import Any, TextIO


def show_config(resolved: dict[str, Any], out: TextIO) -> None:
    """Print nested settings as dotted `name = value` lines."""
    for name, value in _flatten(resolved):
        out.write(f"{name} = {value!r}\n")


def _flatten(data: Any, prefix: str = ""):
    if isinstance(data, dict):
        for key in sorted(data):
            yield from _flatten(data[key], f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix, data
