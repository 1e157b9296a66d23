"""The example job run natively: results, exit codes and signals."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import tomllib

import pytest
from jobhelpers import JOB_SCRIPT, ROOT, run_job, summary_of


def test_success_prints_summary_and_writes_result(tmp_path):
    """A small run exits 0, prints SUMMARY and writes the file it names."""
    done = run_job({"ROWS": "20000", "GROUPS": "50", "OUTPUT_DIR": str(tmp_path)})

    assert done.returncode == 0, done.stderr
    summary = summary_of(done.stdout)
    assert summary["rows"] == "20000" and summary["groups"] == "50"
    result = tmp_path / "result.json"
    assert summary["output"] == str(result)
    assert hashlib.sha256(result.read_bytes()).hexdigest() == summary["sha256"]
    document = json.loads(result.read_text())
    assert sum(group["count"] for group in document["per_group"]) == 20000
    assert len(document["per_group"]) == 50
    overall = document["overall"]
    assert overall["p50"] <= overall["p90"] <= overall["p99"]
    for group in document["per_group"]:
        if group["count"]:
            assert group["min"] <= group["p50"] <= group["p99"] <= group["max"]


def test_progress_lines_carry_timings(tmp_path):
    """Progress lines start with elapsed seconds, so slow phases show."""
    done = run_job({"ROWS": "1000", "OUTPUT_DIR": str(tmp_path)})

    timed = [line for line in done.stdout.splitlines() if line.startswith("[")]
    assert any("generated 1000 records in" in line for line in timed)
    assert any("sorted and aggregated" in line for line in timed)


def test_same_seed_same_result(tmp_path):
    """The seed alone decides the result; another seed changes it."""
    env = {"ROWS": "5000", "GROUPS": "10", "OUTPUT_DIR": str(tmp_path)}

    first = summary_of(run_job(env).stdout)["sha256"]
    again = summary_of(run_job(env).stdout)["sha256"]
    other = summary_of(run_job({**env, "SEED": "7"}).stdout)["sha256"]

    assert first == again
    assert first != other


def test_default_size_is_quick_natively(tmp_path):
    """nightshift.toml's ROWS finishes in a few seconds (TCG is 10-20x slower)."""
    project = tomllib.loads((ROOT / "nightshift.toml").read_text())
    env = {**project["job"]["environment"], "OUTPUT_DIR": str(tmp_path)}

    started = time.monotonic()
    done = run_job(env)
    took = time.monotonic() - started

    assert done.returncode == 0, done.stderr
    assert summary_of(done.stdout)["rows"] == env["ROWS"]
    assert took < 10, f"ROWS={env['ROWS']} took {took:.1f}s natively"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ROWS", "abc"),
        ("ROWS", "0"),
        ("GROUPS", "-3"),
        ("SEED", "1.5"),
        ("FAIL_EXIT", "300"),
        ("HOLD_SECONDS", "soon"),
    ],
)
def test_bad_env_value_exits_2_naming_it(tmp_path, name, value):
    """A bad value stops at once with exit 2 and one line naming the variable."""
    done = run_job({name: value, "OUTPUT_DIR": str(tmp_path)})

    assert done.returncode == 2
    assert f"{name}={value!r}" in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "result.json").exists()


def test_fail_exit_fails_after_the_work(tmp_path):
    """FAIL_EXIT=3 does the work, then exits 3 saying why."""
    done = run_job({"ROWS": "1000", "FAIL_EXIT": "3", "OUTPUT_DIR": str(tmp_path)})

    assert done.returncode == 3
    assert summary_of(done.stdout)
    assert "exit code 3 (FAIL_EXIT)" in done.stdout


def test_unwritable_output_dir_exits_1_clearly():
    """A result that cannot be written is a clear failure, not a traceback."""
    done = run_job({"ROWS": "100", "OUTPUT_DIR": "/proc/nightshift-out"})

    assert done.returncode == 1
    assert done.stderr.startswith("job: failed:")
    assert "Traceback" not in done.stderr


def _start(env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-u", str(JOB_SCRIPT)],
        env={"PATH": os.environ["PATH"], **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for(process: subprocess.Popen, text: str) -> None:
    for line in process.stdout:
        if text in line:
            return
    raise AssertionError(f"the job ended before printing {text!r}")


@pytest.mark.parametrize(
    ("env", "phase"),
    [
        ({"ROWS": "50000000"}, "generated records:"),
        ({"ROWS": "1000", "HOLD_SECONDS": "60"}, "holding for"),
    ],
    ids=["while-working", "while-holding"],
)
def test_sigterm_stops_within_two_seconds(tmp_path, env, phase):
    """SIGTERM ends the job with 143 within 2 s, saying it was stopped."""
    process = _start({**env, "OUTPUT_DIR": str(tmp_path / "out")})
    try:
        _wait_for(process, phase)
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=5)
        took = time.monotonic() - sent
    finally:
        process.kill()

    assert process.returncode == 143
    assert took < 2, f"took {took:.2f}s to stop"
    assert "stopped by SIGTERM" in rest
    if "HOLD_SECONDS" not in env:
        assert not (tmp_path / "out" / "result.json").exists()
