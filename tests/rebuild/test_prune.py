"""Retention of AMIs (against mock_aws) and of local images (a build dir)."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime

import pytest
from moto import mock_aws
from moto_support import JOB, PROJECT, REGION
from rebuild_support import PARAMETER, Aws

from nightshift import bake, prune
from nightshift import config as nsconfig

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
RULES = {"keep": 2, "keep_days": 7, "pointer_versions": 3}


def add_data_snapshot(aws: Aws, image_id: str) -> str:
    """A second volume's snapshot on an image (moto gives each AMI just one)."""
    ami = aws.backend.amis[image_id]
    volume = aws.backend.create_volume(size=8, zone_name=f"{REGION}a")
    snapshot = aws.backend.create_snapshot(
        volume.id, "data volume", owner_id=ami.owner_id, from_ami=image_id
    )
    aws.backend.delete_volume(volume.id)
    base = type(ami)

    class TwoVolumes(base):
        # moto's model metaclass files each model under moto.<service>.
        __module__ = base.__module__

        @property
        def block_device_mappings(self):
            data = {"SnapshotId": snapshot.id, "VolumeSize": 8, "VolumeType": "gp3"}
            return [
                *base.block_device_mappings.fget(self),
                {"DeviceName": "/dev/xvdb", "Ebs": data},
            ]

    ami.__class__ = TwoVolumes
    return snapshot.id


@pytest.fixture
def account():
    """A year of nightly images, each kept or not for one reason (see the names)."""
    with mock_aws():
        aws = Aws()
        made = {
            name: aws.image(created, state=state)
            for name, created, state in [
                ("failed", "2026-07-01T01:30:00", "failed"),
                ("unused", "2026-08-01T01:30:00", "available"),
                ("pointer-v1", "2026-08-10T01:30:00", "available"),
                ("pointer-v2", "2026-08-20T01:30:00", "available"),
                ("pointer-v3", "2026-09-01T01:30:00", "available"),
                ("pointer-v4", "2026-09-10T01:30:00", "available"),
                ("template", "2026-09-20T01:30:00", "available"),
                ("running", "2026-10-01T01:30:00", "available"),
                ("stopped", "2026-10-05T01:30:00", "available"),
                ("terminated", "2026-10-10T01:30:00", "available"),
                ("pointer-now", "2026-11-01T01:30:00", "available"),
                ("second-newest", "2026-11-10T01:30:00", "available"),
                ("young", "2026-12-01T01:30:00", "available"),
            ]
        }
        made["other-job"] = aws.image("2026-01-01T01:30:00", job="other")
        data_snapshot = add_data_snapshot(aws, made["unused"])

        for name in ("pointer-v1", "pointer-v2", "pointer-v3", "pointer-v4"):
            aws.point(made[name])
        aws.point(made["pointer-now"])

        template = aws.template()
        aws.ec2.create_launch_template_version(
            LaunchTemplateId=template, LaunchTemplateData={"ImageId": made["template"]}
        )

        def run(name: str) -> str:
            return aws.ec2.run_instances(ImageId=made[name], MinCount=1, MaxCount=1)[
                "Instances"
            ][0]["InstanceId"]

        run("running")
        aws.ec2.stop_instances(InstanceIds=[run("stopped")])
        aws.ec2.terminate_instances(InstanceIds=[run("terminated")])
        yield aws, made, data_snapshot


REMOVED = {"failed", "unused", "pointer-v1", "pointer-v2", "terminated"}


def snapshots_of(aws: Aws, image_ids) -> set[str]:
    images = aws.ec2.describe_images(ImageIds=list(image_ids))["Images"]
    return {
        mapping["Ebs"]["SnapshotId"]
        for image in images
        for mapping in image["BlockDeviceMappings"]
        if "Ebs" in mapping
    }


def run_prune(**overrides):
    out = io.StringIO()
    decisions = prune.prune_amis(
        project=PROJECT,
        job=JOB,
        region=REGION,
        image_parameter=PARAMETER,
        now=NOW,
        out=out,
        **{**RULES, **overrides},
    )
    print(out.getvalue())
    return decisions, out.getvalue()


@pytest.mark.moto
def test_retention_removes_exactly_the_unprotected_old_images(account):
    """Old, unnamed, unused images go with all their snapshots; nothing else."""
    aws, made, data_snapshot = account
    doomed = {made[name] for name in REMOVED}
    doomed_snapshots = snapshots_of(aws, doomed)
    assert data_snapshot in doomed_snapshots and len(doomed_snapshots) == 6
    images_before, snapshots_before = aws.images(), aws.snapshots()

    decisions, _ = run_prune()

    assert {d.image_id for d in decisions if d.remove} == doomed
    assert aws.images() == images_before - doomed
    assert aws.snapshots() == snapshots_before - doomed_snapshots


@pytest.mark.moto
def test_every_kept_image_says_why(account):
    aws, made, _ = account
    decisions, printed = run_prune(dry_run=True)
    reasons = {d.image_id: "; ".join(d.reasons) for d in decisions}

    assert made["other-job"] not in reasons  # never a candidate
    assert "names it now" in reasons[made["pointer-now"]]
    assert "one of its last 3 versions" in reasons[made["pointer-v3"]]
    assert "one of its last 3 versions" in reasons[made["pointer-v4"]]
    assert f"{PROJECT}-{JOB} v2" in reasons[made["template"]]
    assert "(running)" in reasons[made["running"]]
    assert "(stopped)" in reasons[made["stopped"]]
    assert "newest 2 of 2" in reasons[made["second-newest"]]
    assert "younger than 7" in reasons[made["young"]]
    assert "newest 1 of 2" in reasons[made["young"]]
    for name in REMOVED:
        assert "older than 7 days" in reasons[made[name]]
        assert f"would remove {made[name]}" in printed


@pytest.mark.moto
def test_dry_run_changes_nothing(account):
    """The plan is printed, and every image and snapshot is still there."""
    aws, _, _ = account
    images_before, snapshots_before = aws.images(), aws.snapshots()

    decisions, printed = run_prune(dry_run=True)

    assert printed.startswith("dry run, nothing changed: 13 AMI(s)")
    assert sum(d.remove for d in decisions) == len(REMOVED)
    assert aws.images() == images_before
    assert aws.snapshots() == snapshots_before


@pytest.mark.moto
def test_a_second_run_removes_nothing_more(account):
    """Idempotence: what the first run kept, the second keeps for the same reasons."""
    run_prune()
    decisions, _ = run_prune()
    assert not [d for d in decisions if d.remove]


# --- local images -----------------------------------------------------------------


def local_build(tmp_path, images):
    """A build dir as the bake leaves it: image folders and Packer's manifest."""
    cfg = nsconfig.parse({"project": {"name": PROJECT, "job": JOB}}, root=tmp_path)
    builds = [{"name": "nightshift", "artifact_id": "ami-0aws", "custom_data": {
        "name": "aws-image", "target": "aws", "created": "2026-01-01T00:00:00Z",
        "project": PROJECT, "job": JOB,
    }}]  # fmt: skip
    for name, created, complete in images:
        folder = cfg.build_dir / "images" / name
        folder.mkdir(parents=True)
        for file in ("disk.qcow2", "vmlinuz", "initrd.img")[: 3 if complete else 1]:
            (folder / file).write_bytes(b"x")
        builds.append({"name": "nightshift", "custom_data": {
            "name": name, "target": "local", "created": created,
            "project": PROJECT, "job": JOB, "source": "base",
        }})  # fmt: skip
    bake.manifest_path(cfg).write_text(json.dumps({"builds": builds}))
    return cfg


def test_local_prune_keeps_the_newest_complete_image_always(tmp_path):
    """Even with keep=0 and no grace, `invoke run` still has its image."""
    cfg = local_build(
        tmp_path,
        [
            ("oldest", "2026-10-01T00:00:00Z", True),
            ("booted", "2026-11-01T00:00:00Z", True),
            ("broken", "2026-11-02T00:00:00Z", False),
        ],
    )
    out = io.StringIO()
    decisions = prune.prune_images(cfg, keep=0, keep_days=0, now=NOW, out=out)

    removed = {d.image_id for d in decisions if d.remove}
    assert removed == {"oldest", "broken"}
    assert [i.name for i in bake.list_images(cfg)] == ["booted"]
    assert bake.newest_local_image(cfg).name == "booted"
    assert not (cfg.build_dir / "images" / "oldest").exists()
    assert not (cfg.build_dir / "images" / "broken").exists()
    manifest = json.loads(bake.manifest_path(cfg).read_text())
    assert "aws-image" in [b["custom_data"]["name"] for b in manifest["builds"]]


def test_local_prune_keeps_newest_n_and_young_ones_and_dry_run_changes_nothing(
    tmp_path,
):
    cfg = local_build(
        tmp_path,
        [
            ("a", "2026-09-01T00:00:00Z", True),
            ("b", "2026-10-01T00:00:00Z", True),
            ("c", "2026-11-01T00:00:00Z", True),
            ("d", "2026-11-30T00:00:00Z", True),
            ("e", "2026-12-02T00:00:00Z", True),
        ],
    )
    manifest = bake.manifest_path(cfg).read_text()
    out = io.StringIO()
    decisions = prune.prune_images(
        cfg, keep=2, keep_days=7, dry_run=True, now=NOW, out=out
    )

    assert {d.image_id for d in decisions if d.remove} == {"a", "b", "c"}
    assert bake.manifest_path(cfg).read_text() == manifest
    assert all((cfg.build_dir / "images" / name).is_dir() for name in "abcde")
    assert "would remove" in out.getvalue()
