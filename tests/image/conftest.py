"""Fixtures for the image tests: Packer on PATH, a throwaway key, the image."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nightshift import bake
from nightshift import config as nsconfig

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = str(Path(sys.executable).parent)


def packer_env() -> dict[str, str]:
    """The environment bake.py gives Packer: the venv's ansible-playbook first."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PACKER_NO_COLOR"] = "1"
    return env


def _packer(*args: str) -> subprocess.CompletedProcess[str]:
    # From the repository root, as bake.py runs it: the template's paths
    # (ansible/playbook.yml) are relative to it.
    return subprocess.run(
        ["packer", *args], cwd=ROOT, env=packer_env(), capture_output=True, text=True
    )


@pytest.fixture(scope="session")
def packer(packer_version):
    """Run packer from the repository root; returns the completed process."""
    return _packer


@pytest.fixture(scope="session")
def packer_version() -> tuple[int, int, int]:
    if not shutil.which("packer"):
        pytest.skip("packer is missing: apt-get install packer (or HashiCorp's 1.10+)")
    return bake.packer_version()


@pytest.fixture(scope="session")
def local_vars(tmp_path_factory, keypair) -> list[str]:
    """Packer -var flags for the local source, pointing at stand-in files."""
    base = tmp_path_factory.mktemp("base")
    files = {name: base / name for name in ("disk.qcow2", "vmlinuz", "initrd.img")}
    for path in files.values():
        path.write_bytes(b"")
    values = {
        "base_disk": files["disk.qcow2"],
        "base_kernel": files["vmlinuz"],
        "base_initrd": files["initrd.img"],
        "ssh_private_key_file": keypair,
        "ssh_public_key_file": f"{keypair}.pub",
        "build_dir": tmp_path_factory.mktemp("build"),
    }
    return [f"-var={name}={value}" for name, value in values.items()]


@pytest.fixture(scope="session")
def project_config() -> nsconfig.Config:
    return nsconfig.load(ROOT / "nightshift.toml")


@pytest.fixture(scope="session")
def baked_image(baked) -> bake.LocalImage:
    """The image the end-to-end tests boot (tests/conftest.py bakes it once)."""
    return baked
