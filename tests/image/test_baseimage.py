"""The local base disk: its cache key, its cache, and (vm) what boots from it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from nightshift import baseimage
from nightshift import config as nsconfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cfg(tmp_path) -> nsconfig.Config:
    return nsconfig.parse({"local": {"build_dir": str(tmp_path / "build")}}, root=ROOT)


def _fake_base(cfg) -> Path:
    directory = cfg.build_dir / "base" / baseimage.input_key()
    directory.mkdir(parents=True)
    for name in ("disk.qcow2", "vmlinuz", "initrd.img", "base.json"):
        (directory / name).write_bytes(b"x")
    return directory


def test_key_is_stable():
    """The same inputs give the same cache entry."""
    assert baseimage.input_key() == baseimage.input_key()
    assert len(baseimage.input_key()) == 16


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PACKAGES", (*baseimage.PACKAGES, "vim")),
        ("SUITE", "trixie"),
        ("BUILDER_VERSION", baseimage.BUILDER_VERSION + 1),
        ("DISK_SIZE", "8G"),
    ],
)
def test_key_changes_with_each_input(monkeypatch, name, value):
    """Packages, suite, builder version and size each rebuild the base."""
    before = baseimage.input_key()
    monkeypatch.setattr(baseimage, name, value)
    assert baseimage.input_key() != before


def test_key_changes_with_a_file_written_into_the_disk(monkeypatch):
    files = dict(baseimage.FILES)
    files["etc/hostname"] = ("renamed\n", 0o644)
    before = baseimage.input_key()
    monkeypatch.setattr(baseimage, "FILES", files)
    assert baseimage.input_key() != before


def test_cached_needs_every_file(cfg):
    """A half-written entry (no base.json or a missing file) is not a cache hit."""
    assert baseimage.cached(cfg) is None
    directory = _fake_base(cfg)
    assert baseimage.cached(cfg).disk == directory / "disk.qcow2"

    (directory / "initrd.img").unlink()
    assert baseimage.cached(cfg) is None


def test_ensure_uses_the_cache_without_building(cfg, monkeypatch):
    directory = _fake_base(cfg)

    def refuse(*args):
        raise AssertionError("rebuilt a current base image")

    monkeypatch.setattr(baseimage, "_build", refuse)
    image = baseimage.ensure(cfg)

    assert image.directory == directory
    assert image.key == baseimage.input_key()


def test_force_rebuilds(cfg, monkeypatch):
    _fake_base(cfg)
    built = []
    monkeypatch.setattr(baseimage, "_build", lambda root, key: built.append(key))
    baseimage.ensure(cfg, force=True)
    assert built == [baseimage.input_key()]


def test_no_key_material_goes_into_the_disk():
    """The builder's key arrives by fw_cfg at boot; nothing secret is baked."""
    text = "\n".join(content for content, _ in baseimage.FILES.values())
    for marker in ("ssh-ed25519 ", "ssh-rsa ", "PRIVATE KEY"):
        assert marker not in text
    assert "etc/ssh/ssh_host_*" in baseimage.REMOVE_GLOBS
    assert baseimage.FILES["etc/machine-id"][0] == ""


def test_metadata_service_runs_before_sshd():
    unit = baseimage.FILES["etc/systemd/system/local-metadata.service"][0]
    assert "Before=ssh.service" in unit
    assert "After=systemd-modules-load.service" in unit
    assert "local-metadata.service" in baseimage.UNITS_ENABLED


# --- vm: boot the real base disk and log in with a key handed in by fw_cfg ---


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ssh(port: int, key: Path, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "ssh",
            "-i",
            str(key),
            "-p",
            str(port),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ConnectTimeout=5",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
            "root@127.0.0.1",
            command,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def booted_base(tmp_path_factory, keypair):
    """The base disk booted (through a throwaway overlay) with a fw_cfg key."""
    for tool in ("qemu-system-x86_64", "qemu-img", "mmdebstrap", "ssh"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is missing: run ./bootstrap (Debian packages)")
    if os.geteuid() != 0:
        pytest.skip("building the base image needs root")

    base = baseimage.ensure(nsconfig.load(ROOT / "nightshift.toml"))
    work = tmp_path_factory.mktemp("vm")
    overlay = work / "overlay.qcow2"
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            str(base.disk),
            str(overlay),
        ],
        check=True,
    )
    port = _free_port()
    console = work / "console.log"
    vm = subprocess.Popen(
        [
            "qemu-system-x86_64", "-accel", "tcg", "-m", "1024", "-smp", "2",
            "-display", "none", "-no-reboot",
            "-serial", f"file:{console}",
            "-kernel", str(base.kernel), "-initrd", str(base.initrd),
            "-append", "root=/dev/vda rw console=ttyS0",
            "-drive", f"file={overlay},if=virtio,format=qcow2",
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22",
            "-device", "virtio-net-pci,netdev=n0",
            "-fw_cfg", f"name={baseimage.FW_CFG_KEY},file={keypair}.pub",
        ]
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if vm.poll() is not None:
                pytest.fail(
                    f"qemu exited early; console:\n{console.read_text()[-3000:]}"
                )
            try:
                if _ssh(port, keypair, "true").returncode == 0:
                    break
            except subprocess.TimeoutExpired:
                pass
            time.sleep(3)
        else:
            pytest.fail(f"no SSH within 300 s; console:\n{console.read_text()[-3000:]}")
        yield port
        _ssh(port, keypair, "systemctl poweroff")
        vm.wait(timeout=120)
    finally:
        if vm.poll() is None:
            vm.kill()
            vm.wait()


@pytest.mark.vm
@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("systemctl is-active local-metadata.service", "active"),
        ("systemctl is-active systemd-networkd.service", "active"),
        ("systemctl is-enabled systemd-networkd-wait-online.service", "enabled"),
        ("systemctl show -p Before --value local-metadata.service", "ssh.service"),
        ("test -s /etc/ssh/ssh_host_ed25519_key && echo regenerated", "regenerated"),
        ("lsmod | grep -o '^qemu_fw_cfg'", "qemu_fw_cfg"),
        ("ip route show default", "via 10.0.2.2"),
        ("cat /etc/resolv.conf", "nameserver 10.0.2.3"),
        ("hostname", "nightshift"),
        ("findmnt -n -o SOURCE /", "/dev/vda"),
        ("python3 -c 'print(42)'", "42"),
    ],
)
def test_base_boots_as_a_fresh_instance(booted_base, keypair, command, expected):
    """The booted base has its key, fresh host keys, DHCP networking, python3."""
    result = _ssh(booted_base, keypair, command)
    assert expected in result.stdout, result.stdout + result.stderr


@pytest.mark.vm
def test_key_came_from_fw_cfg(booted_base, keypair):
    """authorized_keys holds exactly the key qemu handed in."""
    result = _ssh(booted_base, keypair, "cat /root/.ssh/authorized_keys")
    assert result.stdout.strip() == Path(f"{keypair}.pub").read_text().strip()
