"""Helpers the job tests share (a module of its own: conftest is not importable)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from nightshift import config as nsconfig

ROOT = Path(__file__).resolve().parents[2]
JOB_SCRIPT = ROOT / "job" / "job.py"
# Persistent, so the registry's storage survives between sessions like the
# tasks' does; separate from build/registry so tests never mix with it.
TEST_BUILD_DIR = ROOT / "build" / "tests-job"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def job_cfg(port: int, **job: object) -> nsconfig.Config:
    data = {"local": {"registry_port": port, "build_dir": str(TEST_BUILD_DIR)}}
    if job:
        data["job"] = dict(job)
    return nsconfig.parse(data, root=ROOT)


def run_job(
    env: dict[str, str], *, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run job.py natively as the container would: unbuffered, env only."""
    full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}
    return subprocess.run(
        [sys.executable, "-u", str(JOB_SCRIPT)],
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def summary_of(output: str) -> dict[str, str]:
    """The SUMMARY line's key=value fields; fails if there is no such line."""
    lines = [line for line in output.splitlines() if line.startswith("SUMMARY ")]
    assert len(lines) == 1, f"expected one SUMMARY line in:\n{output}"
    return dict(field.split("=", 1) for field in lines[0].split()[1:])
