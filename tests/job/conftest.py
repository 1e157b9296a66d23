"""Fixtures for the job tests: the job script, a test config, real services.

The Docker tests use the real engine and registry through nightshift's own
context managers, on a registry port of their own so they never touch a
registry someone else runs on the configured port.
"""

from __future__ import annotations

import contextlib
import os

import pytest
from jobhelpers import free_port, job_cfg

from nightshift import config as nsconfig
from nightshift import services
from nightshift.errors import ToolMissing


@pytest.fixture(scope="session")
def cfg() -> nsconfig.Config:
    return job_cfg(free_port())


@pytest.fixture(scope="session")
def docker_client(cfg):
    """A Docker client; dockerd is started for the session if none runs."""
    was_running = services.engine_answers()
    with contextlib.ExitStack() as stack:
        try:
            client = stack.enter_context(services.docker_engine(cfg, log=print))
        except ToolMissing as err:
            pytest.skip(str(err))
        yield client
    if not was_running and not os.environ.get("DOCKER_HOST"):
        # The session started it, so the session must have stopped it.
        assert not services.engine_answers(), "dockerd still answers after its block"


@pytest.fixture(scope="session")
def registry(cfg, docker_client):
    """A registry on a port of the session's own; stopped at the end."""
    with contextlib.ExitStack() as stack:
        try:
            reg = stack.enter_context(services.registry(cfg, log=print))
        except ToolMissing as err:
            pytest.skip(str(err))
        yield reg
    assert not services.registry_answers(reg.port), "registry still answers"
