"""The job image goes to ECR with a token from boto3.

moto's ECR has no registry data plane, so a real local registry (Debian's
docker-registry) stands in for the ECR endpoint; the login uses the token
moto hands out, and the build and push are the real Docker SDK calls.
"""

from __future__ import annotations

import shutil
import socket

import pytest

from nightshift import deploy, services

pytestmark = [pytest.mark.moto, pytest.mark.docker]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def engine(cfg):
    for tool, package in (
        ("dockerd", "docker.io"),
        ("docker-registry", "docker-registry"),
    ):
        if not shutil.which(tool):
            pytest.skip(
                f"{tool} is missing; install it with: apt-get install {package}"
            )
    with services.docker_engine(cfg) as client:
        yield client


def test_push_tags_revision_and_latest(cfg, engine, lines):
    port = _free_port()
    with services.registry(cfg, port) as registry:
        pushed = deploy.push_job_image(
            cfg, engine, registry=registry.address, log=lines
        )
        assert any(
            line.startswith(f"logging in to {registry.address}") for line in lines
        )
        revision, latest = pushed.tags
        assert latest.endswith("/nightshift/example:latest")
        assert revision.startswith(f"{registry.address}/nightshift/example:")
        for tag in ("latest", revision.rsplit(":", 1)[1]):
            digest = services.manifest_digest(
                registry.address, "nightshift/example", tag
            )
            assert digest == pushed.digest
