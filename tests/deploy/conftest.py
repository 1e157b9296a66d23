"""Fixtures for the deploy tests: a moto server on 127.0.0.1 and a job's config.

The server runs once per session and is reset before each test, so every test
deploys what it needs itself.  Credentials are fake: nothing here can reach
a real account.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import requests
from moto.server import ThreadedMotoServer

from nightshift import config as nsconfig

ROOT = Path(__file__).resolve().parents[2]
REGION = "eu-west-1"
ACCOUNT = "123456789012"  # moto's default account


@pytest.fixture(autouse=True)
def fake_credentials(monkeypatch):
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)


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


def make_config(endpoint: str, tmp_path: Path, **sections) -> nsconfig.Config:
    """A project file like nightshift.toml, aimed at the moto server."""
    data = {
        "project": {"name": "nightshift", "job": "example"},
        "job": {
            "context": str(ROOT / "job"),
            "max_run_time": "1h",
            "environment": {"ROWS": "1000"},
        },
        "schedule": {"cron": "cron(0 3 * * ? *)", "enabled": True},
        "aws": {
            "region": REGION,
            "instance_types": ["m6i.large", "m5.large"],
            "root_volume_gb": 40,
            "notification_email": "ops@example.com",
            "log_retention_days": 14,
            "keep_images": 7,
            "endpoint_url": endpoint,
        },
        "local": {"build_dir": str(tmp_path / "build")},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return nsconfig.parse(data, root=ROOT)


@pytest.fixture
def cfg(endpoint, tmp_path) -> nsconfig.Config:
    return make_config(endpoint, tmp_path)


class Lines(list):
    """A log callable that keeps what was said, for assertions."""

    def __call__(self, message: str) -> None:
        print(message)
        self.append(message)

    @property
    def text(self) -> str:
        return "\n".join(self)


@pytest.fixture
def lines() -> Lines:
    return Lines()
