"""A run cut short from outside leaves nothing behind that it started.

Ctrl-C stops the VM; a reader that goes away (`invoke run | head`) does
not: the run goes on to the power-off and keeps its result.
"""

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


def own_registry_config(e2e_cfg, repo_root: Path, tmp_path: Path) -> tuple[Path, int]:
    """The project file with a registry port of its own, so the run starts
    (and must stop) its own registry.  The job image stays on the session's
    registry: the baked image trusts that one only."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    toml = (repo_root / "nightshift.toml").read_text()
    toml = toml.replace("registry_port = 5000", f"registry_port = {port}")
    toml = toml.replace('# image = ""', f'image = "{e2e_cfg.local_image()}"')
    toml = toml.replace('build_dir = "build"', f'build_dir = "{e2e_cfg.build_dir}"')
    path = tmp_path / "nightshift.toml"
    path.write_text(toml)
    return path, port


def invoke_run(repo_root: Path, config: Path) -> list[str]:
    return [sys.executable, "-m", "invoke", "--search-root", str(repo_root), "run",
            "--config", str(config)]  # fmt: skip


def test_ctrl_c_stops_the_vm_and_the_registry(e2e_cfg, baked, repo_root, tmp_path):
    config, port = own_registry_config(e2e_cfg, repo_root, tmp_path)

    log = tmp_path / "run.log"
    with open(log, "w") as output:
        run = subprocess.Popen(
            invoke_run(repo_root, config),
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


def test_a_reader_that_leaves_does_not_stop_the_run(
    e2e_cfg, baked, repo_root, tmp_path
):
    """`invoke run | head -1`: the run still ends in power-off and a result.

    The image trusts only the registry port it was baked for, so this run
    uses the session's registry; services.registry's own test covers a
    registry that must stop though its message cannot be printed.
    """
    errors = tmp_path / "stderr.log"
    with open(errors, "w") as stderr:
        run = subprocess.Popen(
            [sys.executable, "-m", "invoke", "--search-root", str(repo_root), "run"],
            cwd=repo_root, stdout=subprocess.PIPE, stderr=stderr, text=True,
        )  # fmt: skip
    assert run.stdout is not None
    run_id = None
    for line in run.stdout:
        if line.startswith("booting "):
            run_id = line.split("(run ", 1)[1].split(",", 1)[0]
            break
    run.stdout.close()  # what head does once it has its line
    assert run_id, errors.read_text()

    run.wait(timeout=600)
    said = errors.read_text()

    assert run.returncode == 0, said
    assert "Traceback" not in said and "Exception ignored" not in said, said
    assert qemu_processes(run_id) == []
    record = json.loads(
        (e2e_cfg.build_dir / "runs" / run_id / "result.json").read_text()
    )
    assert record["outcome"] == "success", record
