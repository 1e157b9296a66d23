"""The local base disk: a bare Debian 12 the local bake starts from.

It plays the part the official Debian AMI plays on AWS: networking, sshd,
Python for Ansible, and a boot service standing in for EC2's instance
metadata, which installs the per-build SSH key handed in through qemu's
fw_cfg.  No key is ever stored in the disk.  The result is cached under
build/base/<hash of its inputs>/ and rebuilt only when an input changes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from nightshift.config import Config
from nightshift.errors import NightshiftError, ToolMissing

# Bump when the build steps below change in a way the hashed inputs do not
# show (a new command, a different mkfs option); it invalidates every cache.
BUILDER_VERSION = 1

SUITE = "bookworm"
VARIANT = "minbase"
# Sparse: a fresh base costs well under 1 GB on disk, and the room is there
# for Docker's layers and a job image without resizing at bake time.
DISK_SIZE = "6G"
MIRRORS = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
# Mirrors drop a download now and then: apt retries it, here and in the image
# (mmdebstrap leaves the option there), where the bake installs Docker.
APT_OPTIONS = ('Acquire::Retries "3"',)
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",  # hostnamectl, timedatectl and Ansible's facts talk to it
    "kmod",  # modules-load.d needs modprobe
    "linux-image-cloud-amd64",
    "openssh-server",
    "python3",
    "sudo",  # Ansible's become; the AMI has it too
    "ca-certificates",
    "iproute2",
    "procps",
)
# qemu's user network: the DNS forwarder it offers at a fixed address.
QEMU_DNS = "10.0.2.3"
FW_CFG_KEY = "opt/nightshift/ssh-key"
UNITS_ENABLED = (
    "systemd-networkd.service",
    "systemd-networkd-wait-online.service",
    "local-metadata.service",
)

_METADATA_SCRIPT = f"""\
#!/bin/sh
# Stand-in for EC2's instance metadata at boot: install the SSH key qemu
# hands in through fw_cfg, and make host keys when the bake removed them.
set -eu

key=/sys/firmware/qemu_fw_cfg/by_name/{FW_CFG_KEY}/raw
modprobe qemu_fw_cfg 2>/dev/null || true
if [ -r "$key" ]; then
    install -d -m 0700 /root/.ssh
    install -m 0600 "$key" /root/.ssh/authorized_keys
    echo "local-metadata: installed the SSH key from fw_cfg"
fi

if ! ls /etc/ssh/ssh_host_*_key >/dev/null 2>&1; then
    ssh-keygen -A
    echo "local-metadata: generated SSH host keys"
fi
"""

_METADATA_UNIT = """\
# Installs what EC2 would give an instance: its SSH key, fresh host keys.
[Unit]
Description=Local instance metadata (SSH key from qemu fw_cfg)
# The key appears under /sys only once qemu_fw_cfg is loaded.
After=systemd-modules-load.service local-fs.target
# sshd refuses to start without host keys, and must see the key at once.
Before=ssh.service
ConditionVirtualization=vm

[Service]
Type=oneshot
ExecStart=/usr/local/lib/nightshift/local-metadata
RemainAfterExit=yes

[Install]
WantedBy=multi-user.target
"""

# Written into the root tree; part of the cache key, so an edit rebuilds.
FILES: dict[str, tuple[str, int]] = {
    "etc/systemd/network/20-wired.network": (
        "# Any ethernet NIC (virtio gives enp0s3 or ens3): DHCP from qemu or EC2.\n"
        "[Match]\nName=en*\n\n[Network]\nDHCP=yes\n",
        0o644,
    ),
    "etc/resolv.conf": (
        f"# qemu's user-network DNS forwarder.\nnameserver {QEMU_DNS}\n",
        0o644,
    ),
    "etc/modules-load.d/qemu_fw_cfg.conf": (
        "# Exposes qemu's -fw_cfg blobs under /sys/firmware/qemu_fw_cfg.\n"
        "qemu_fw_cfg\n",
        0o644,
    ),
    "etc/hostname": ("nightshift\n", 0o644),
    "etc/hosts": (
        "127.0.0.1\tlocalhost\n127.0.1.1\tnightshift\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\n",
        0o644,
    ),
    "etc/fstab": ("/dev/vda\t/\text4\tdefaults,errors=remount-ro\t0\t1\n", 0o644),
    # Empty, not absent: systemd makes a fresh ID at each first boot.
    "etc/machine-id": ("", 0o444),
    "usr/local/lib/nightshift/local-metadata": (_METADATA_SCRIPT, 0o755),
    "etc/systemd/system/local-metadata.service": (_METADATA_UNIT, 0o644),
}
# Per-instance state the package scripts left behind.
REMOVE_GLOBS = (
    "etc/ssh/ssh_host_*",
    "var/lib/dbus/machine-id",
    "var/cache/apt/archives/*.deb",
    "var/log/*.log",
    "root/.bash_history",
)


@dataclass(frozen=True)
class BaseImage:
    """A built base disk and the kernel and initrd to boot it directly."""

    disk: Path
    kernel: Path
    initrd: Path
    key: str

    @property
    def directory(self) -> Path:
        return self.disk.parent


def inputs() -> dict[str, object]:
    """Everything the base disk depends on; its hash names the cache entry."""
    return {
        "builder_version": BUILDER_VERSION,
        "suite": SUITE,
        "variant": VARIANT,
        "mirrors": list(MIRRORS),
        "apt_options": list(APT_OPTIONS),
        "packages": list(PACKAGES),
        "disk_size": DISK_SIZE,
        "files": {path: [text, mode] for path, (text, mode) in sorted(FILES.items())},
        "units": list(UNITS_ENABLED),
        "remove": list(REMOVE_GLOBS),
    }


def input_key() -> str:
    blob = json.dumps(inputs(), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cached(cfg: Config) -> BaseImage | None:
    """The current base image if it is built and complete, else None."""
    key = input_key()
    directory = cfg.build_dir / "base" / key
    image = BaseImage(
        disk=directory / "disk.qcow2",
        kernel=directory / "vmlinuz",
        initrd=directory / "initrd.img",
        key=key,
    )
    done = directory / "base.json"
    if done.exists() and all(
        p.exists() for p in (image.disk, image.kernel, image.initrd)
    ):
        return image
    return None


def ensure(cfg: Config, force: bool = False) -> BaseImage:
    """Return the cached base image, building it first when missing or forced."""
    base_root = cfg.build_dir / "base"
    base_root.mkdir(parents=True, exist_ok=True)

    # Tests and tasks may ask at the same time; one builds, the others wait.
    with _lock(base_root / ".lock"):
        image = cached(cfg)
        if image and not force:
            print(f"base image: cached {image.directory} (inputs unchanged)")
            return image
        return _build(base_root, input_key())


def _build(base_root: Path, key: str) -> BaseImage:
    _require_tools(("mmdebstrap", "mkfs.ext4", "qemu-img", "chroot"))
    if os.geteuid() != 0:
        raise NightshiftError(
            "building the base image needs root (mmdebstrap, file ownership); "
            "run `sudo invoke base-image` once"
        )

    work = base_root / f".work-{key}-{os.getpid()}"
    final = base_root / key
    shutil.rmtree(work, ignore_errors=True)
    root = work / "root"
    work.mkdir(parents=True)
    started = time.monotonic()
    try:
        _run(
            [
                "mmdebstrap",
                f"--variant={VARIANT}",
                "--mode=root",
                *(f"--aptopt={option}" for option in APT_OPTIONS),
                f"--include={','.join(PACKAGES)}",
                SUITE,
                str(root),
                *MIRRORS,
            ]
        )
        _configure(root)
        kernel, initrd = _boot_files(root)
        shutil.copy2(kernel, work / "vmlinuz")
        shutil.copy2(initrd, work / "initrd.img")

        raw = work / "disk.raw"
        _run(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-L",
                "root",
                "-d",
                str(root),
                str(raw),
                DISK_SIZE,
            ]
        )
        _run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(work / "disk.qcow2")])
        raw.unlink()
        shutil.rmtree(root)

        seconds = round(time.monotonic() - started, 1)
        record = {
            "key": key,
            "kernel": kernel.name,
            "build_seconds": seconds,
            **inputs(),
        }
        (work / "base.json").write_text(json.dumps(record, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        work.rename(final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise

    print(f"base image: built {final} in {seconds} s")
    return BaseImage(
        disk=final / "disk.qcow2",
        kernel=final / "vmlinuz",
        initrd=final / "initrd.img",
        key=key,
    )


def _configure(root: Path) -> None:
    for relative, (text, mode) in FILES.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        # resolv.conf may be a dangling symlink left by a resolver package.
        if path.is_symlink():
            path.unlink()
        path.write_text(text)
        path.chmod(mode)

    # The guest's own systemctl: enabling works offline in a chroot.
    _run(["chroot", str(root), "systemctl", "enable", *UNITS_ENABLED])

    for pattern in REMOVE_GLOBS:
        for path in root.glob(pattern):
            path.unlink()


def _boot_files(root: Path) -> tuple[Path, Path]:
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise NightshiftError(
            f"no kernel in {root}/boot; check that the package list "
            "still holds linux-image-cloud-amd64"
        )
    kernel = kernels[-1]
    initrd = root / "boot" / kernel.name.replace("vmlinuz-", "initrd.img-", 1)
    if not initrd.exists():
        raise NightshiftError(f"{initrd} is missing; initramfs-tools did not run")
    return kernel, initrd


def _require_tools(names: Sequence[str]) -> None:
    missing = [name for name in names if not shutil.which(name)]
    if missing:
        raise ToolMissing(
            f"missing {', '.join(missing)}; install the Debian packages "
            "mmdebstrap, e2fsprogs and qemu-utils"
        )


def _run(command: Sequence[str]) -> None:
    """Echo a command, run it with its output streaming, fail in one line."""
    print("+ " + " ".join(command), flush=True)
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        raise NightshiftError(f"{command[0]} failed with exit code {result.returncode}")


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
