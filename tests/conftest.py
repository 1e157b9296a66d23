"""Shared fixtures: the repository root, and for tests that boot VMs the baked
local image and the job image in a real registry.

Everything there is real: the image is baked by Packer and Ansible (once,
then cached by its inputs), the job image is built by a real Docker engine
and served by a real registry on 127.0.0.1, and every run boots a qemu VM
that must power itself off.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import requests
from moto.server import ThreadedMotoServer

from nightshift import bake, config, jobimage, services

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(autouse=True)
def fake_credentials(monkeypatch):
    """Fake AWS credentials for every test, so none can reach a real account."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def moto_server():
    """moto's HTTP server on a free loopback port, shared by the whole session."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def endpoint(moto_server, fake_credentials):
    """The session's moto server, emptied first: each test makes its own data."""
    requests.post(f"{moto_server}/moto-api/reset", timeout=10).raise_for_status()
    return moto_server


@pytest.fixture(scope="session")
def keypair(tmp_path_factory) -> Path:
    """A throwaway ed25519 key pair; returns the private key's path."""
    key = tmp_path_factory.mktemp("key") / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True
    )
    return key


NEEDED = {
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "packer": "packer",
    "dockerd": "docker.io",
    "docker-registry": "docker-registry",
    "mmdebstrap": "mmdebstrap",
}


def _missing_tools() -> list[str]:
    return [package for tool, package in NEEDED.items() if not shutil.which(tool)]


@pytest.fixture(scope="session")
def e2e_cfg(repo_root: Path) -> config.Config:
    missing = _missing_tools()
    if missing:
        pytest.skip(
            f"needs {', '.join(missing)}: run ./bootstrap test, or "
            f"apt-get install {' '.join(missing)}"
        )
    return config.load(repo_root / "nightshift.toml")


@pytest.fixture(scope="session")
def baked(e2e_cfg, job_pushed):
    """The newest local image with the job's layers in it, baked if inputs changed."""
    return bake.ensure_local_image(e2e_cfg, warm_cache=True)


@pytest.fixture(scope="session")
def registry(e2e_cfg):
    with services.docker_engine(e2e_cfg) as client, services.registry(e2e_cfg) as reg:
        yield client, reg


@pytest.fixture(scope="session")
def job_pushed(e2e_cfg, registry):
    client, reg = registry
    return jobimage.build_and_push(e2e_cfg, client, reg)
