"""Fixtures for the launcher tests: a real moto server on 127.0.0.1, and data.

The server is started once per session and reset before every test, so each
test builds the images, template and instances it needs itself.
"""

from __future__ import annotations

import pytest
from launcher_support import ECR, Aws
from moto_support import JOB, PROJECT

from nightshift.launch import load_launcher
from nightshift.runconfig import RunConfig


@pytest.fixture
def aws(endpoint) -> Aws:
    return Aws(endpoint)


@pytest.fixture(scope="session")
def launcher():
    return load_launcher()


@pytest.fixture
def run_config() -> RunConfig:
    return RunConfig.parse(
        {
            "image": f"{ECR}/nightshift/example:v1",
            "job": JOB,
            "environment": {"ROWS": "1000"},
            "max_run_seconds": 3600,
        }
    )


@pytest.fixture
def make_settings(launcher, run_config):
    def make(template: str, **overrides):
        return launcher.Settings(
            project=PROJECT,
            job=JOB,
            launch_template_id=template,
            run_config=run_config,
            **overrides,
        )

    return make
