"""Fixtures for the deploy tests: a moto server on 127.0.0.1 and a job's config.

The server runs once per session and is reset before each test, so every test
deploys what it needs itself.  Credentials are fake: nothing here can reach
a real account.
"""

from __future__ import annotations

import pytest
from deploy_support import make_config

from nightshift import config as nsconfig

ACCOUNT = "123456789012"  # moto's default account


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
