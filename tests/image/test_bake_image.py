"""A real local bake (vm): what `invoke bake-ami` leaves in build/images/."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from nightshift import bake

pytestmark = [pytest.mark.vm, pytest.mark.image]


def test_disk_is_a_standalone_qcow2(baked_image):
    """The disk needs no backing file: the base can be rebuilt under it."""
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(baked_image.disk)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert info["format"] == "qcow2"
    assert "backing-filename" not in info
    assert info["virtual-size"] >= 4 * 2**30


def test_kernel_and_initrd_came_back(baked_image):
    """The guest's kernel (a bzImage) and initrd sit next to the disk."""
    kernel = baked_image.kernel.read_bytes()
    assert kernel[0x202:0x206] == b"HdrS", "not a Linux bzImage"
    assert baked_image.initrd.stat().st_size > 1_000_000


def test_manifest_records_provenance(baked_image, project_config):
    """Name, created, source, git revision, target, registry: all in the manifest."""
    entry = next(
        build
        for build in json.loads(bake.manifest_path(project_config).read_text())[
            "builds"
        ]
        if build.get("custom_data", {}).get("name") == baked_image.name
    )
    data = entry["custom_data"]

    assert re.fullmatch(
        rf"{project_config.project}-{project_config.job}-\d{{14}}", data["name"]
    )
    assert data["target"] == "local"
    assert data["source"].startswith("debian-12-base:")
    assert data["git_revision"]
    # The one plain-HTTP registry the image's Docker trusts (localrun checks it).
    assert data["registry"] == project_config.guest_registry
    assert baked_image.registry == project_config.guest_registry
    assert baked_image.complete


def test_no_build_key_is_left_behind(baked_image, project_config):
    """The per-build SSH key is deleted when the bake ends."""
    keys = project_config.build_dir / "keys"
    assert not keys.exists() or not any(keys.glob("*/id_ed25519"))


def test_newest_local_image_finds_it(baked_image, project_config):
    assert bake.newest_local_image(project_config, baked_image.name) == baked_image
