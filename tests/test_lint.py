"""The linters, run as tests so that CI's one command runs them too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run(*command: str, cwd: Path = ROOT, env: dict | None = None):
    done = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=600,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout}\n{done.stderr}"


def tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} is missing from the venv: ./bootstrap test installs it")
    return str(path)


def test_ruff_lint():
    run(tool("ruff"), "check", ".")


def test_ruff_format():
    run(tool("ruff"), "format", "--check", ".")


def test_yamllint():
    run(tool("yamllint"), "--strict", ".")


def test_ansible_lint_production_profile():
    run(
        tool("ansible-lint"), "--offline", "--profile", "production", "ansible/",
        env={"ANSIBLE_ROLES_PATH": str(ROOT / "ansible/roles")},
    )  # fmt: skip


def test_shellcheck():
    scripts = [ROOT / "bootstrap", ROOT / ".ci/run"]
    run(tool("shellcheck"), *map(str, scripts))
