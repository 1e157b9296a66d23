"""The tasks as a user meets them: a wrong value is one clear line, nothing starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def invoke(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "invoke", "--search-root", str(ROOT), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("section", "setting", "field"),
    [
        ("local", 'accelerator = "hvf"', "local.accelerator"),
        ("job", 'max_run_time = "forever"', "job.max_run_time"),
        ("job.environment", '"BAD NAME" = "1"', "job.environment.BAD NAME"),
        ("job", 'image = "Not An Image"', "job.image"),
    ],
)
@pytest.mark.parametrize("task", ["run", "demo", "bake-ami", "config"])
def test_wrong_value_is_one_line_and_starts_nothing(
    tmp_path, section, setting, field, task
):
    build = tmp_path / "build"
    sections = {"local": [f'build_dir = "{build}"'], section: []}
    sections[section].append(setting)
    path = tmp_path / "nightshift.toml"
    path.write_text(
        "".join(
            f"[{name}]\n" + "\n".join(lines) + "\n" for name, lines in sections.items()
        )
    )

    done = invoke(task, "--config", str(path))

    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"nightshift: configuration error: {field}: ")
    assert "Traceback" not in done.stdout + done.stderr
    # Nothing was built or booted: the build folder was never made.
    assert not build.exists()


def test_bad_option_value_is_named():
    done = invoke("run", "--target", "gcp")
    assert done.returncode == 2
    assert "--target: 'gcp' is not valid; use one of: local" in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--env", "ROWS"], "--env: 'ROWS' is not valid; use NAME=VALUE"),
        (["--env", "1X=2"], "--env.1X: '1X' is not valid"),
        (["--env", "=x"], "--env: '=x' is not valid; use NAME=VALUE"),
        (["--target", "aws"], "--target: 'aws' is not valid; runs on AWS start with"),
        (["--max-run-time", "soon"], "--max-run-time: 'soon' is not valid"),
    ],
)
def test_bad_run_option_is_named(args, message):
    done = invoke("run", *args)
    assert done.returncode == 2
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_project_file_is_found_beside_tasks_py(tmp_path):
    """From another folder the project's own nightshift.toml is read, not defaults."""
    done = invoke("config", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"# {ROOT / 'nightshift.toml'}," in done.stdout
    assert 'job.environment.ROWS = "400000"' in done.stdout


def test_missing_config_file_is_an_error(tmp_path):
    done = invoke("config", "--config", str(tmp_path / "absent.toml"))
    assert done.returncode == 2
    assert "--config" in done.stderr and "name an existing" in done.stderr


def test_bad_accelerator_option_is_named():
    done = invoke("run", "--accelerator", "foo")
    assert done.returncode == 2
    assert "--accelerator: 'foo' is not valid; use one of: tcg, kvm" in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["prune-images", "--keep", "abc"], "--keep: 'abc' is not valid"),
        (["prune-amis", "--keep-days", "-3"], "--keep-days: '-3' is not valid"),
        (["status", "--limit", "0"], "--limit: '0' is not valid"),
        (["bench", "--runs", "many"], "--runs: 'many' is not valid"),
        (["rollback", "--to-version", "x"], "--to-version: 'x' is not valid"),
        (["status", "--endpoint-url", "notaurl"], "--endpoint-url: 'notaurl'"),
    ],
)
def test_bad_number_or_endpoint_is_one_line(args, message):
    """Checked before any AWS client or VM is made: no traceback, exit 2."""
    done = invoke(*args)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stdout + done.stderr
