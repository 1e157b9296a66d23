"""nightshift.bake without a VM: version gates, input checks, the manifest."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import socket
from datetime import UTC, datetime
from pathlib import Path

import pytest

from nightshift import bake, baseimage, localrun, services
from nightshift import config as nsconfig
from nightshift.errors import NightshiftError
from nightshift.runconfig import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cfg(tmp_path) -> nsconfig.Config:
    """The project's settings with build output in a temporary folder."""
    return nsconfig.parse({"local": {"build_dir": str(tmp_path / "build")}}, root=ROOT)


@pytest.fixture
def no_external_commands(monkeypatch):
    """Fail the test if the bake reaches Packer, ssh-keygen or the base build."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"an external step ran: {args}")

    monkeypatch.setattr(bake, "_run", refuse)
    monkeypatch.setattr(bake.baseimage, "ensure", refuse)


@pytest.mark.parametrize(
    ("text", "version"),
    [
        ("Packer v1.6.6\n", (1, 6, 6)),
        ("Packer v1.11.2\n\nYour version of Packer is out of date!", (1, 11, 2)),
        ("1.10.0", (1, 10, 0)),
    ],
)
def test_parse_version(text, version):
    """`packer version` output of old and new releases."""
    assert bake.parse_version(text) == version


def test_parse_version_rejects_garbage():
    """Output without a version is a clear error, not a crash."""
    with pytest.raises(NightshiftError, match="cannot read a Packer version"):
        bake.parse_version("command not found")


def test_legacy_packer_gets_a_staged_directory(cfg):
    """Packer 1.6.6 builds from a copy under build/, not from packer/."""
    directory = bake.template_dir(cfg, (1, 6, 6), "local")

    assert directory == cfg.build_dir / "packer-legacy"
    assert not (directory / "plugins.pkr.hcl").exists()
    assert (directory / "source-local.pkr.hcl").exists()


@pytest.mark.parametrize("version", [(1, 10, 0), (1, 11, 2)])
def test_modern_packer_builds_the_template_itself(cfg, version):
    """Packer 1.10+ loads packer/ as it is, for both targets."""
    assert bake.template_dir(cfg, version, "local") == ROOT / "packer"
    assert bake.template_dir(cfg, version, "aws") == ROOT / "packer"


@pytest.mark.parametrize("version", [(1, 6, 6), (1, 8, 7), (1, 9, 4)])
def test_aws_target_needs_modern_packer(cfg, version):
    """An AMI bake on old Packer says which version and step it needs."""
    with pytest.raises(NightshiftError, match=r"Packer >= 1\.10 with `packer init`"):
        bake.template_dir(cfg, version, "aws")


def test_installed_legacy_packer_refuses_aws_before_anything_runs(
    cfg, no_external_commands
):
    """With Debian's Packer, --target aws stops before any command or VM."""
    if bake.packer_version() >= bake.AWS_PACKER:
        pytest.skip("this Packer can bake AMIs")
    with pytest.raises(NightshiftError, match="--target aws needs Packer >= 1.10"):
        bake.bake(cfg, target="aws")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"accelerator": "foo"}, "accelerator"),
        ({"target": "gcp"}, "target"),
    ],
)
def test_bad_option_fails_before_any_command(cfg, no_external_commands, kwargs, field):
    """A wrong option names itself and the allowed values; nothing starts."""
    with pytest.raises(ConfigError) as caught:
        bake.bake(cfg, **kwargs)

    assert caught.value.field == field
    assert "use one of" in str(caught.value)


def test_bad_architecture_fails_with_its_name():
    """architecture=sparc is stopped in Python before Packer sees it."""
    with pytest.raises(ConfigError, match="architecture: 'sparc'.*amd64, arm64"):
        bake.check_variables({"accelerator": "tcg", "architecture": "sparc"})


def test_missing_base_file_is_named(tmp_path):
    """A variable pointing at a missing file says which and how to make it."""
    with pytest.raises(ConfigError, match="base_disk.*invoke base-image"):
        bake.check_variables(
            {
                "accelerator": "tcg",
                "architecture": "amd64",
                "base_disk": str(tmp_path / "missing.qcow2"),
            }
        )


def test_warm_cache_is_refused_for_aws(cfg, no_external_commands):
    """--warm-cache --target aws says so instead of baking without it."""
    with pytest.raises(NightshiftError, match="local target only"):
        bake.bake(cfg, target="aws", warm_cache=True)


def test_warm_cache_needs_the_job_image_before_any_vm(tmp_path, no_external_commands):
    """With an empty registry the bake stops at once and says what to run."""
    if not shutil.which("docker-registry"):
        pytest.skip("docker-registry is missing: apt-get install docker-registry")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    empty = nsconfig.parse(
        {"local": {"registry_port": port, "build_dir": str(tmp_path / "build")}},
        root=ROOT,
    )
    with pytest.raises(NightshiftError, match="invoke job-image"):
        bake.bake(empty, warm_cache=True)
    assert not services.registry_answers(port), "the bake left its registry running"


def test_a_project_file_elsewhere_bakes_nightshifts_own_template(tmp_path):
    """--config in another folder: the template, role and agent still come
    from nightshift, so the inputs are the same and change with its files."""
    base = baseimage.BaseImage(
        disk=tmp_path / "disk.qcow2", kernel=tmp_path / "k", initrd=tmp_path / "i",
        key="0123456789abcdef",
    )  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    here = nsconfig.parse({}, root=ROOT)
    there = nsconfig.parse({}, root=elsewhere)

    assert bake.SOURCE == ROOT
    assert bake.inputs_key(there, base) == bake.inputs_key(here, base)
    assert bake.inputs_key(there, base) != bake.inputs_key(there, base, "other:1")


# --- the manifest ---


def _write_manifest(cfg, entries):
    images = cfg.build_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    builds = []
    for name, created, complete, project in entries:
        folder = images / name
        folder.mkdir()
        files = ("disk.qcow2", "vmlinuz", "initrd.img") if complete else ("disk.qcow2",)
        for file in files:
            (folder / file).write_bytes(b"x")
        builds.append(
            {
                "name": "local",
                "builder_type": "qemu",
                "artifact_id": "VM",
                "files": [{"name": str(folder / "disk.qcow2"), "size": 1}],
                "custom_data": {
                    "name": name,
                    "created": created,
                    "source": "debian-12-base:abc",
                    "git_revision": "1234abcd",
                    "target": "local",
                    "project": project,
                    "job": "example",
                    "registry": "10.0.2.2:5000",
                },
            }
        )
    builds.append({"name": "aws", "custom_data": {"name": "ami", "target": "aws"}})
    bake.manifest_path(cfg).write_text(json.dumps({"builds": builds}))


@pytest.fixture
def three_images(cfg):
    _write_manifest(
        cfg,
        [
            ("nightshift-example-1", "2026-12-01T10:00:00Z", True, "nightshift"),
            ("nightshift-example-3", "2026-12-03T10:00:00Z", False, "nightshift"),
            ("other-example-4", "2026-12-04T10:00:00Z", True, "other"),
            ("nightshift-example-2", "2026-12-02T10:00:00Z", True, "nightshift"),
        ],
    )
    return cfg


def test_list_images_newest_first_local_only(three_images):
    """Local entries only, newest first, with their completeness."""
    images = bake.list_images(three_images)

    assert [image.name for image in images] == [
        "other-example-4",
        "nightshift-example-3",
        "nightshift-example-2",
        "nightshift-example-1",
    ]
    assert [image.complete for image in images] == [True, False, True, True]
    assert images[0].created == datetime(2026, 12, 4, 10, tzinfo=UTC)


def test_newest_local_image_follows_the_selection_rule(three_images):
    """Newest complete image of this project and job: not 3 (incomplete), not 4."""
    image = bake.newest_local_image(three_images)

    assert image.name == "nightshift-example-2"
    assert image.disk == three_images.build_dir / "images" / image.name / "disk.qcow2"
    assert image.kernel.name == "vmlinuz"
    assert image.initrd.name == "initrd.img"


def test_newest_local_image_by_name(three_images):
    """A name picks that image, even when a newer one exists."""
    assert bake.newest_local_image(three_images, "nightshift-example-1").name == (
        "nightshift-example-1"
    )


@pytest.mark.parametrize(
    ("name", "message"),
    [("nightshift-example-3", "incomplete"), ("nope", "no local image named nope")],
)
def test_newest_local_image_by_bad_name(three_images, name, message):
    with pytest.raises(NightshiftError, match=message):
        bake.newest_local_image(three_images, name)


def test_no_image_is_one_clear_error(cfg):
    """Without a manifest the error names the filters and the fix."""
    with pytest.raises(NightshiftError, match="no image qualifies.*invoke bake-ami"):
        bake.newest_local_image(cfg)


def test_print_images(three_images):
    """One line per image: name, path, created, source; incomplete ones marked."""
    out = io.StringIO()
    bake.print_images(three_images, out)
    lines = out.getvalue().splitlines()

    assert len(lines) == 4
    assert lines[0].startswith("other-example-4  ")
    assert "2026-12-04T10:00:00+00:00" in lines[0]
    assert "debian-12-base:abc" in lines[0]
    assert "incomplete" in lines[1]


def test_print_images_without_any(cfg):
    out = io.StringIO()
    bake.print_images(cfg, out)
    assert "no local images" in out.getvalue()


@pytest.mark.parametrize(
    ("settings", "refused"),
    [
        ({}, False),
        ({"local": {"registry_port": 5001}}, True),
        # An image on another registry is not the baked-in trust's business.
        ({"local": {"registry_port": 5001}, "job": {"image": "ghcr.io/a/b:1"}}, False),
    ],
)
def test_a_run_from_a_registry_the_image_does_not_trust_is_refused(
    three_images, settings, refused
):
    """An image baked for port 5000 would try HTTPS on 5001 and fail slowly."""
    image = bake.newest_local_image(three_images)
    assert image.registry == "10.0.2.2:5000"
    run_config = nsconfig.parse(settings, root=ROOT).run_config()

    if refused:
        with pytest.raises(
            NightshiftError, match="bake an image for the new port"
        ) as caught:
            localrun.check_registry(image, run_config)
        assert "10.0.2.2:5000" in str(caught.value)
        assert "registry_port back to 5000" in str(caught.value)
    else:
        localrun.check_registry(image, run_config)


def test_an_image_from_before_the_registry_was_recorded_is_run(three_images):
    image = dataclasses.replace(bake.newest_local_image(three_images), registry="")
    run_config = nsconfig.parse({"local": {"registry_port": 5001}}).run_config()
    localrun.check_registry(image, run_config)


def test_local_image_converts_to_a_candidate(three_images):
    candidate = bake.list_images(three_images)[1].to_candidate()
    assert (candidate.image_id, candidate.complete, candidate.owner) == (
        "nightshift-example-3",
        False,
        "self",
    )


def test_a_failed_step_names_what_went_wrong_in_its_error(tmp_path, capsys):
    """The error carries Packer's and Ansible's failure lines, not just a pointer."""
    script = tmp_path / "step.sh"
    script.write_text(
        "echo '==> qemu.local: Provisioning with Ansible...'\n"
        "echo 'TASK [nightshift : Pull the job image] ***'\n"
        "echo 'fatal: [default]: FAILED! => changed=false'\n"
        "echo '  msg: manifest unknown'\n"
        "echo \"Build 'qemu.local' errored after 2 minutes: Error executing Ansible\"\n"
        "exit 1\n"
    )
    with pytest.raises(NightshiftError) as failed:
        bake._run(["sh", str(script)], tmp_path, None, failure="packer build failed")
    message = str(failed.value)
    assert message.startswith("packer build failed\n")
    assert "fatal: [default]: FAILED!" in message
    assert "msg: manifest unknown" in message
    assert "errored after 2 minutes" in message
    assert "Provisioning with Ansible" not in message
    # Everything was still streamed as it came.
    assert "Provisioning with Ansible" in capsys.readouterr().out


def test_a_step_that_succeeds_raises_nothing(tmp_path, capsys):
    bake._run(["sh", "-c", "echo fine"], tmp_path, None)
    assert capsys.readouterr().out.endswith("fine\n")


def test_a_reader_that_leaves_does_not_stop_the_step(tmp_path, monkeypatch):
    """`invoke bake-ami | head`: Packer still runs to its end (and stops its VM)."""

    class GoneReader(io.StringIO):
        def write(self, text):
            raise BrokenPipeError

    done = tmp_path / "done"
    monkeypatch.setattr("sys.stdout", GoneReader())
    bake._run(["sh", "-c", f"seq 100000; touch {done}"], tmp_path, None)
    assert done.exists()
