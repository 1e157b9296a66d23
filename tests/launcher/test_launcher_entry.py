"""The Lambda entry point: settings from the environment, JSON logs, the zip."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from launcher_support import TICK
from moto_support import JOB, PROJECT

from nightshift.errors import NightshiftError
from nightshift.launch import describe, lambda_zip, launch
from nightshift.runconfig import ConfigError

pytestmark = pytest.mark.moto


def deploy_env(run_config, **changes) -> dict[str, str]:
    """The environment the deploy gives the function."""
    return {
        "NIGHTSHIFT_PROJECT": PROJECT,
        "NIGHTSHIFT_JOB": JOB,
        "NIGHTSHIFT_LAUNCH_TEMPLATE_ID": "lt-0123456789abcdef0",
        "NIGHTSHIFT_IMAGE_PARAMETER": "/nightshift/example/ami",
        "NIGHTSHIFT_SUBNET_IDS": "subnet-1, subnet-2",
        "NIGHTSHIFT_INSTANCE_TYPES": "m6i.large, m5.large",
        "NIGHTSHIFT_SPOT": "false",
        "NIGHTSHIFT_OVERLAP_POLICY": "skip",
        "NIGHTSHIFT_SNS_TOPIC_ARN": "",
        "NIGHTSHIFT_MAX_RUN_SECONDS": "2h",
        "NIGHTSHIFT_REAPER_GRACE_SECONDS": "900",
        "NIGHTSHIFT_RUN_CONFIG": run_config.to_user_data(),
        **changes,
    }


@pytest.fixture
def lambda_env(aws, run_config, monkeypatch, launcher):
    """The deploy's environment pointed at moto, read by a fresh handler."""
    env = deploy_env(
        run_config,
        NIGHTSHIFT_LAUNCH_TEMPLATE_ID=aws.template(),
        NIGHTSHIFT_SUBNET_IDS=",".join(aws.subnets()[:2]),
    )
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # boto3 (1.28+) honours this, as the Lambda's own clients will.
    monkeypatch.setenv("AWS_ENDPOINT_URL", aws.endpoint)
    launcher.reset()
    yield env
    launcher.reset()


class Context:
    aws_request_id = "req-0001"


def test_settings_from_environment(launcher, run_config):
    settings = launcher.Settings.from_env(deploy_env(run_config))

    assert settings.instance_types == ("m6i.large", "m5.large")
    assert settings.subnet_ids == ("subnet-1", "subnet-2")
    assert settings.max_run_seconds == 7200
    assert settings.reap_after_seconds == 7200 + 900
    assert settings.run_config.job == JOB


def test_max_run_defaults_to_the_run_configuration(launcher, run_config):
    env = deploy_env(run_config)
    del env["NIGHTSHIFT_MAX_RUN_SECONDS"]
    settings = launcher.Settings.from_env(env)
    config = settings.run_config
    assert settings.max_run_seconds == (
        config.pull_deadline_seconds
        + config.max_run_seconds
        + config.stop_grace_seconds
    )


@pytest.mark.parametrize(
    ("name", "value", "field"),
    [
        ("NIGHTSHIFT_LAUNCH_TEMPLATE_ID", None, "NIGHTSHIFT_LAUNCH_TEMPLATE_ID"),
        (
            "NIGHTSHIFT_LAUNCH_TEMPLATE_ID",
            "my-template",
            "NIGHTSHIFT_LAUNCH_TEMPLATE_ID",
        ),
        ("NIGHTSHIFT_PROJECT", None, "NIGHTSHIFT_PROJECT"),
        ("NIGHTSHIFT_RUN_CONFIG", None, "NIGHTSHIFT_RUN_CONFIG"),
        ("NIGHTSHIFT_RUN_CONFIG", "{not json", "NIGHTSHIFT_RUN_CONFIG"),
        ("NIGHTSHIFT_RUN_CONFIG", '{"job": "example"}', "NIGHTSHIFT_RUN_CONFIG.image"),
        (
            "NIGHTSHIFT_RUN_CONFIG",
            '{"image": "r/x:1", "job": "other"}',
            "NIGHTSHIFT_RUN_CONFIG.job",
        ),
        ("NIGHTSHIFT_SPOT", "yes", "NIGHTSHIFT_SPOT"),
        ("NIGHTSHIFT_OVERLAP_POLICY", "queue", "NIGHTSHIFT_OVERLAP_POLICY"),
        ("NIGHTSHIFT_MAX_RUN_SECONDS", "forever", "NIGHTSHIFT_MAX_RUN_SECONDS"),
        ("NIGHTSHIFT_SNS_TOPIC_ARN", "my-topic", "NIGHTSHIFT_SNS_TOPIC_ARN"),
    ],
)
def test_bad_setting_names_it(launcher, run_config, name, value, field):
    env = deploy_env(run_config)
    if value is None:
        del env[name]
    else:
        env[name] = value

    with pytest.raises(ConfigError) as caught:
        launcher.Settings.from_env(env)

    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(self.format(record))


def test_handler_launches_and_logs_json(aws, launcher, lambda_env):
    image = aws.image("2026-12-02T03:00:00")
    aws.ssm.put_parameter(Name="/nightshift/example/ami", Value=image, Type="String")
    captured = Lines()
    captured.setFormatter(launcher.JsonFormatter())
    launcher.log.addHandler(captured)

    try:
        result = launcher.handler(TICK, Context())
    finally:
        launcher.log.removeHandler(captured)

    assert result["decision"] == "launched"
    assert result["image_id"] == image
    assert json.loads(json.dumps(result)) == result
    records = [json.loads(line) for line in captured.lines]
    assert records and all(r["request_id"] == "req-0001" for r in records)
    chosen = [r for r in records if r["message"] == "image chosen"]
    assert chosen and chosen[0]["source"] == "SSM parameter /nightshift/example/ami"
    final = records[-1]
    assert (
        final["decision"] == "launched"
        and final["instance_id"] == result["instance_id"]
    )


def test_handler_with_a_missing_setting_fails_naming_it(
    launcher, lambda_env, monkeypatch
):
    monkeypatch.delenv("NIGHTSHIFT_JOB")
    launcher.reset()

    with pytest.raises(ConfigError, match="^NIGHTSHIFT_JOB: "):
        launcher.handler(TICK, Context())


# --- the deployment zip --------------------------------------------------------


BOTO_STACK = (
    "boto3",
    "botocore",
    "s3transfer",
    "jmespath",
    "dateutil",
    "urllib3",
    "six",
)


def test_zip_runs_with_only_the_stdlib_and_boto3(aws, run_config, tmp_path):
    """Unzip, then launch through the handler with nothing else importable."""
    archive = lambda_zip(tmp_path / "build" / "launcher.zip")
    assert sorted(zipfile.ZipFile(archive).namelist()) == [
        "launcher.py",
        "nightshift/__init__.py",
        "nightshift/runconfig.py",
        "nightshift/selection.py",
    ]
    task = tmp_path / "task"
    zipfile.ZipFile(archive).extractall(task)

    # A site directory holding only boto3 and its dependencies, like the runtime.
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    packages = Path(__import__("boto3").__file__).parent.parent
    for name in BOTO_STACK:
        source = packages / name
        source = source if source.exists() else packages / f"{name}.py"
        (runtime / source.name).symlink_to(source)

    image = aws.image("2026-12-02T03:00:00")
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": f"{task}:{runtime}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "eu-west-1",
        "AWS_DEFAULT_REGION": "eu-west-1",  # the Lambda runtime sets both
        "AWS_ENDPOINT_URL": aws.endpoint,
        "NIGHTSHIFT_PROJECT": PROJECT,
        "NIGHTSHIFT_JOB": JOB,
        "NIGHTSHIFT_LAUNCH_TEMPLATE_ID": aws.template(),
        "NIGHTSHIFT_RUN_CONFIG": run_config.to_user_data(),
    }
    probe = f"""
import json, sys
import launcher
class Context:
    aws_request_id = "zip-1"
result = launcher.handler({json.dumps(TICK)}, Context())
ours = {{
    name: module.__file__ for name, module in sys.modules.items()
    if name == "launcher" or name.startswith("nightshift")
}}
print(json.dumps({{"result": result, "ours": ours}}))
"""
    # -S: no site-packages at all (not the venv's, not the editable nightshift);
    # the working directory is not the checkout, whose nightshift/ would shadow.
    done = subprocess.run(
        [sys.executable, "-S", "-c", probe],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["result"]["decision"] == "launched"
    assert report["result"]["image_id"] == image
    assert report["ours"] == {
        "launcher": str(task / "launcher.py"),
        "nightshift": str(task / "nightshift" / "__init__.py"),
        "nightshift.runconfig": str(task / "nightshift" / "runconfig.py"),
        "nightshift.selection": str(task / "nightshift" / "selection.py"),
    }
    assert len(aws.instances()) == 1


def test_zip_is_reproducible(tmp_path):
    one = lambda_zip(tmp_path / "a.zip").read_bytes()
    two = lambda_zip(tmp_path / "b.zip").read_bytes()
    assert one == two


# --- the laptop's dry run --------------------------------------------------------


def test_dry_run_shows_the_launch_and_launches_nothing(aws, run_config):
    image = aws.image("2026-12-02T03:00:00")
    template = aws.template()

    outcome = launch(
        project=PROJECT,
        job=JOB,
        launch_template_id=template,
        run_config=run_config,
        region="eu-west-1",
        endpoint_url=aws.endpoint,
        instance_types=("m6i.large",),
    )

    assert outcome.decision == "would-launch"
    assert outcome.image_id == image
    assert aws.instances() == []
    text = describe(outcome)
    assert image in text and template in text and "m6i.large" in text
    assert "on shutdown:   terminate" in text


def test_dry_run_without_an_image_is_one_clear_error(aws, run_config, monkeypatch):
    from nightshift.launch import load_launcher

    [handler] = load_launcher().log.handlers
    stream = io.StringIO()
    monkeypatch.setattr(handler, "stream", stream)
    with pytest.raises(NightshiftError, match="no image qualifies"):
        launch(
            project=PROJECT,
            job=JOB,
            launch_template_id=aws.template(),
            run_config=run_config,
            region="eu-west-1",
            endpoint_url=aws.endpoint,
        )

    # At a terminal the launcher speaks in plain lines, without a traceback...
    err = stream.getvalue()
    assert "launcher: failed (decision=failed" in err
    assert "Traceback" not in err and '"level"' not in err
    # ...and afterwards logs JSON again, as it does in Lambda.
    assert type(handler.formatter).__name__ == "JsonFormatter"


def test_dry_run_replace_terminates_nothing(aws, run_config):
    image = aws.image("2026-12-02T03:00:00")
    old = aws.run_tagged(
        image,
        {
            "nightshift:project": PROJECT,
            "nightshift:job": JOB,
            "nightshift:run-id": "x",
        },
    )

    outcome = launch(
        project=PROJECT,
        job=JOB,
        launch_template_id=aws.template(),
        run_config=run_config,
        region="eu-west-1",
        endpoint_url=aws.endpoint,
        overlap_policy="replace",
    )

    assert outcome.decision == "would-launch"
    assert f"would terminate {old}" in describe(outcome)
    assert [i["InstanceId"] for i in aws.instances()] == [old]
