"""The main job end to end: a real VM pulls the job, runs it, reports, powers off."""

from __future__ import annotations

import io
import socket
from pathlib import Path

import pytest

from nightshift import localrun

pytestmark = [pytest.mark.vm, pytest.mark.image, pytest.mark.docker]

# Small enough to finish in seconds under TCG; the job's work is still real.
SMALL = {"ROWS": "50000", "GROUPS": "50"}


def run(cfg, baked, **overrides):
    out = io.StringIO()
    environment = {**SMALL, **overrides.pop("environment", {})}
    run_config = cfg.run_config(environment=environment, **overrides)
    summary = localrun.run(cfg, baked, run_config, out=out)
    # On failure pytest shows what the console said.
    print(out.getvalue())
    return summary


def test_job_succeeds(e2e_cfg, baked, job_pushed):
    """Exit 0, outcome success, the job's summary line on the console, VM off."""
    summary = run(e2e_cfg, baked)
    assert summary.powered_off and not summary.killed
    assert summary.outcome == "success", summary.reason
    assert summary.exit_code == 0
    assert any(line.startswith("SUMMARY ") for line in summary.job_lines)
    assert summary.image_digest == job_pushed.digest
    assert summary.record["peak_memory_bytes"] > 1_000_000
    assert summary.record["cpu_seconds"] > 0
    timings = summary.timings
    assert 0 < timings["boot_to_job_start"] < timings["total"]
    assert timings["job_end_to_power_off"] is not None
    # A run's console carries the run, not a login prompt or docker's
    # complaint that there was no leftover container to remove.
    console = Path(summary.console_log).read_text()
    assert "No such container" not in console
    assert " login:" not in console


def test_job_failure_is_reported(e2e_cfg, baked, job_pushed):
    """A job that exits 3 is a failure with exit code 3, and the VM still powers off."""
    summary = run(e2e_cfg, baked, environment={"FAIL_EXIT": "3"})
    assert summary.powered_off
    assert summary.outcome == "failure"
    assert summary.exit_code == 3
    assert "exited 3" in summary.reason


def test_max_run_time_stops_the_job(e2e_cfg, baked, job_pushed):
    """Past max_run_seconds the job gets SIGTERM; the VM is off within the grace."""
    grace = 10
    summary = run(
        e2e_cfg, baked,
        environment={"HOLD_SECONDS": "900"},
        max_run_seconds=20, stop_grace_seconds=grace,
    )  # fmt: skip
    assert summary.powered_off, "the harness had to kill the VM"
    assert summary.outcome == "timeout"
    guest = summary.record["timings"]
    overrun = guest["job_end"] - guest["job_start"] - 20
    assert 0 <= overrun <= grace + 5
    # The job saw SIGTERM and said so before exiting 143.
    assert summary.exit_code == 143
    assert any("SIGTERM" in line for line in summary.job_lines)


def test_max_run_time_before_the_container_starts(e2e_cfg, baked, job_pushed):
    """A limit that passes while `docker run` still creates the container stops it,
    with SIGTERM, even before the job has set its handler."""
    grace = 60
    summary = run(
        e2e_cfg, baked,
        environment={"HOLD_SECONDS": "900"},
        max_run_seconds=1, stop_grace_seconds=grace,
    )  # fmt: skip
    assert summary.powered_off, "the harness had to kill the VM"
    assert summary.outcome == "timeout"
    # 143, not 137: SIGTERM ended it (the container's init passed it on),
    # not the SIGKILL at the end of the grace, nor the job's 900 s hold.
    assert summary.exit_code == 143, summary.reason
    guest = summary.record["timings"]
    assert guest["job_end"] - guest["job_start"] < grace / 2


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_registry_down_is_a_pull_failure(e2e_cfg, baked):
    """No registry answers: pulls are retried until the deadline, then power-off.

    The guest's own loopback: Docker talks plain HTTP there, and nothing in
    the guest listens, so every attempt is refused.  (Another port on
    10.0.2.2 is refused before boot: the image trusts only its own.)
    """
    deadline = 25
    image = f"127.0.0.1:{unused_port()}/nightshift/example:latest"
    summary = run(e2e_cfg, baked, image=image, pull_deadline_seconds=deadline)
    assert summary.powered_off
    assert summary.outcome == "pull-failure"
    assert summary.record["pull_attempts"] >= 3
    guest = summary.record["timings"]
    assert guest["report"] - guest["agent_start"] <= deadline + 10
