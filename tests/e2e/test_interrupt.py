"""Ctrl-C during a run leaves nothing behind that the run started."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nightshift import services

pytestmark = [pytest.mark.vm, pytest.mark.image]


def qemu_processes(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "qemu-system" in cmdline and marker in cmdline:
            found.append(int(entry.name))
    return found


def test_ctrl_c_stops_the_vm_and_the_registry(e2e_cfg, baked, repo_root, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # A registry port of its own, so the run starts (and must stop) its own.
    toml = (repo_root / "nightshift.toml").read_text()
    toml = toml.replace("registry_port = 5000", f"registry_port = {port}")
    toml = toml.replace('build_dir = "build"', f'build_dir = "{e2e_cfg.build_dir}"')
    (tmp_path / "nightshift.toml").write_text(toml)

    log = tmp_path / "run.log"
    with open(log, "w") as output:
        run = subprocess.Popen(
            [sys.executable, "-m", "invoke", "--search-root", str(repo_root), "run",
             "--config", str(tmp_path / "nightshift.toml")],
            cwd=repo_root, stdout=output, stderr=subprocess.STDOUT, text=True,
            # As in a terminal: a shell that started this test in the
            # background may have left SIGINT ignored for its children.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip
    run_id = None
    deadline = time.monotonic() + 120
    while run_id is None and time.monotonic() < deadline and run.poll() is None:
        for line in log.read_text().splitlines():
            if line.startswith("booting "):
                run_id = line.split("(run ", 1)[1].split(",", 1)[0]
        time.sleep(0.5)
    assert run_id, log.read_text()
    deadline = time.monotonic() + 60
    while not qemu_processes(run_id) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert qemu_processes(run_id), "qemu never started"
    assert services.registry_answers(port)

    time.sleep(3)
    os.kill(run.pid, signal.SIGINT)
    run.wait(timeout=60)
    said = log.read_text()

    assert run.returncode == 130, said
    assert "interrupted" in said
    assert "Traceback" not in said
    assert qemu_processes(run_id) == []
    assert not services.registry_answers(port)
    # The run's folder says it was interrupted, and its overlay is gone.
    workdir = e2e_cfg.build_dir / "runs" / run_id
    record = json.loads((workdir / "result.json").read_text())
    assert record["outcome"] == "killed"
    assert "interrupted" in record["reason"]
    assert not (workdir / "disk.qcow2").exists()
