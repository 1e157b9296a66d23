"""Human-readable output shared by the tasks."""

from __future__ import annotations

import json
from typing import Any, TextIO


def show_config(resolved: dict[str, Any], out: TextIO) -> None:
    """Print nested settings as dotted `name = value` lines, values as in TOML."""
    for name, value in _flatten(resolved):
        out.write(f"{name} = {json.dumps(value, ensure_ascii=False)}\n")


def _flatten(data: Any, prefix: str = ""):
    if isinstance(data, dict):
        for key in sorted(data):
            yield from _flatten(data[key], f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix, data
