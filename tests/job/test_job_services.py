"""The local services: a real docker-registry started, reused and stopped."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess

import pytest
from jobhelpers import free_port, job_cfg

from nightshift import services
from nightshift.errors import NightshiftError

needs_registry = pytest.mark.skipif(
    not shutil.which("docker-registry"),
    reason="docker-registry is missing: apt-get install docker-registry",
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_registry_answers_is_false_on_a_free_port():
    """Nothing listening is not a registry."""
    assert not services.registry_answers(free_port())


@needs_registry
def test_registry_starts_answers_and_stops():
    """A registry it starts answers /v2/ on loopback and is gone afterwards."""
    port = free_port()
    cfg = job_cfg(port)

    with services.registry(cfg, log=print) as reg:
        assert reg.started and reg.pid
        assert reg.address == f"127.0.0.1:{port}"
        assert services.registry_answers(port)
        # The same check a person makes, with curl, as the guest's side would
        # see it through qemu's 10.0.2.2 -> host loopback mapping.
        curl = subprocess.run(
            ["curl", "-fsS", "-o", "/dev/null", "-w", "%{http_code}", f"{reg.url}/v2/"],
            capture_output=True,
            text=True,
        )
        assert curl.stdout == "200", curl.stderr
        config = (cfg.build_dir / "registry" / f"config-{port}.yml").read_text()
        assert f"addr: 127.0.0.1:{port}" in config

    assert not services.registry_answers(port)
    assert not _alive(reg.pid)


@needs_registry
def test_registry_reuses_a_running_one_and_leaves_it():
    """A registry already answering is used as is and left running."""
    port = free_port()
    cfg = job_cfg(port)

    with services.registry(cfg, log=print) as outer:
        with services.registry(cfg, log=print) as inner:
            assert not inner.started and inner.pid is None
        assert services.registry_answers(port)
        assert _alive(outer.pid)
    assert not services.registry_answers(port)


@needs_registry
def test_registry_port_held_by_something_else_is_a_clear_error():
    """A port taken by a non-registry names the setting to change."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]

        with (
            pytest.raises(NightshiftError, match="local.registry_port"),
            services.registry(job_cfg(port), log=print),
        ):
            pass


@needs_registry
def test_registry_stops_on_an_exception():
    """An error inside the block still stops the registry it started."""
    port = free_port()

    with pytest.raises(RuntimeError), services.registry(job_cfg(port), log=print):
        assert services.registry_answers(port)
        raise RuntimeError("boom")

    assert not services.registry_answers(port)


@needs_registry
def test_registry_stops_when_saying_so_fails():
    """A log whose reader has gone (BrokenPipeError) still gets it stopped."""
    port = free_port()

    def log(message: str) -> None:
        if message.startswith("stopping"):
            raise BrokenPipeError(32, "Broken pipe")
        print(message)

    with (
        pytest.raises(BrokenPipeError),
        services.registry(job_cfg(port), log=log) as reg,
    ):
        assert services.registry_answers(port)

    assert not services.registry_answers(port)
    assert not _alive(reg.pid)


def test_unreachable_docker_host_is_a_clear_error(monkeypatch, tmp_path):
    """DOCKER_HOST naming a dead engine fails in one line naming DOCKER_HOST."""
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/nothing.sock")

    with (
        pytest.raises(NightshiftError, match="DOCKER_HOST=unix://"),
        services.docker_engine(job_cfg(free_port()), log=print),
    ):
        pass


def test_manifest_digest_of_a_missing_registry_is_a_clear_error():
    """Asking a registry that is not there says so instead of a traceback."""
    with pytest.raises(NightshiftError, match="does not answer"):
        services.manifest_digest(f"127.0.0.1:{free_port()}", "a/b", "latest")
