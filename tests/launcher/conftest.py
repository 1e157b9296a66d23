"""Fixtures for the launcher tests: a real moto server on 127.0.0.1, and data.

The server is started once per session and reset before every test, so each
test builds the images, template and instances it needs itself.
"""

from __future__ import annotations

import socket

import pytest
import requests
from launcher_support import ECR, JOB, PROJECT, REGION, Aws
from moto.server import ThreadedMotoServer

from nightshift.launch import load_launcher
from nightshift.runconfig import RunConfig


@pytest.fixture(autouse=True)
def fake_credentials(monkeypatch):
    """Fake credentials, so nothing here can reach a real account."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_REGION", REGION)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def moto_server():
    """moto's HTTP server on a free loopback port, for the whole session."""
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def endpoint(moto_server, fake_credentials):
    requests.post(f"{moto_server}/moto-api/reset", timeout=10).raise_for_status()
    return moto_server


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
