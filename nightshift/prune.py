"""Retention for baked images: AMIs with their snapshots, and local disk images.

Every image gets a decision with its reasons, kept or removed, and a dry run
prints exactly that plan and changes nothing.  An AMI is kept when it is
among the newest N, younger than D days, named by the image pointer now or
in its recent history, named by any launch template version, or the image
of an instance that still exists in a state that can come back.  Only this
project's and job's own images are ever candidates.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

from nightshift.errors import NightshiftError

# An instance in one of these states holds (or may again boot from) its
# image; shutting-down is included because its volumes still exist.
HOLDING_STATES = ("pending", "running", "shutting-down", "stopping", "stopped")


@dataclass
class Decision:
    """One image and what retention does with it, with every reason."""

    image_id: str
    name: str
    created: datetime
    remove: bool = False
    reasons: list[str] = field(default_factory=list)
    snapshots: tuple[str, ...] = ()

    def line(self, dry_run: bool) -> str:
        verb = ("would remove" if dry_run else "removed") if self.remove else "keep"
        extra = ""
        if self.remove and self.snapshots:
            extra = f"; snapshots {', '.join(self.snapshots)}"
        return (
            f"{verb:<12} {self.image_id}  {self.created:%Y-%m-%d %H:%M}  {self.name}: "
            f"{'; '.join(self.reasons)}{extra}"
        )


def _age_rules(
    decisions: list[Decision], usable: set[str], *, keep: int, keep_days: int, now
) -> None:
    """The rules both targets share: newest N usable ones, and young ones."""
    if keep < 0 or keep_days < 0:
        raise NightshiftError("--keep and --keep-days: use 0 or more")
    newest = sorted(
        (d for d in decisions if d.image_id in usable),
        key=lambda d: (d.created, d.image_id),
        reverse=True,
    )
    for rank, decision in enumerate(newest[:keep], start=1):
        decision.reasons.append(f"newest {rank} of {keep} kept")
    limit = now - timedelta(days=keep_days)
    for decision in decisions:
        if decision.created > limit:
            days = (now - decision.created).total_seconds() / 86400
            decision.reasons.append(f"{days:.1f} days old, younger than {keep_days}")


def _finish(decisions: list[Decision], removal_reason: str) -> None:
    for decision in decisions:
        if not decision.reasons:
            decision.remove = True
            decision.reasons.append(removal_reason)


def _print_plan(
    decisions: list[Decision], dry_run: bool, out: TextIO, what: str
) -> None:
    removing = [d for d in decisions if d.remove]
    header = "dry run, nothing changed: " if dry_run else ""
    out.write(
        f"{header}{len(decisions)} {what}, {len(removing)} to remove, "
        f"{len(decisions) - len(removing)} to keep\n"
    )
    for decision in sorted(decisions, key=lambda d: d.created, reverse=True):
        out.write(decision.line(dry_run) + "\n")


# --- AMIs -------------------------------------------------------------------------


def _pages(client: Any, operation: str, key: str, **kwargs: Any) -> list[Any]:
    paginator = client.get_paginator(operation)
    return [item for page in paginator.paginate(**kwargs) for item in page[key]]


def _tags(resource: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}


def _snapshots(image: dict[str, Any]) -> tuple[str, ...]:
    return tuple(
        mapping["Ebs"]["SnapshotId"]
        for mapping in image.get("BlockDeviceMappings", [])
        if mapping.get("Ebs", {}).get("SnapshotId")
    )


def _template_images(ec2: Any) -> dict[str, list[str]]:
    """image id -> 'template version' labels, over every launch template here."""
    named: dict[str, list[str]] = {}
    for template in _pages(ec2, "describe_launch_templates", "LaunchTemplates"):
        versions = _pages(
            ec2,
            "describe_launch_template_versions",
            "LaunchTemplateVersions",
            LaunchTemplateId=template["LaunchTemplateId"],
        )
        for version in versions:
            image_id = version.get("LaunchTemplateData", {}).get("ImageId")
            if image_id:
                named.setdefault(image_id, []).append(
                    f"{template['LaunchTemplateName']} v{version['VersionNumber']}"
                )
    return named


def _instance_images(ec2: Any, image_ids: list[str]) -> dict[str, list[str]]:
    """image id -> 'instance (state)' for instances that still hold it."""
    held: dict[str, list[str]] = {}
    if not image_ids:
        return held
    instances = [
        instance
        for reservation in _pages(
            ec2,
            "describe_instances",
            "Reservations",
            Filters=[
                {"Name": "image-id", "Values": image_ids},
                {"Name": "instance-state-name", "Values": list(HOLDING_STATES)},
            ],
        )
        for instance in reservation["Instances"]
    ]
    for instance in instances:
        if instance["State"]["Name"] in HOLDING_STATES:
            held.setdefault(instance["ImageId"], []).append(
                f"{instance['InstanceId']} ({instance['State']['Name']})"
            )
    return held


def _pointer_images(ssm: Any, name: str, versions: int) -> tuple[dict[str, str], str]:
    """image id -> why the pointer protects it; plus a note when it is unset."""
    from nightshift.promote import pointer_history

    if not name:
        return {}, "no image pointer given"
    history = pointer_history(ssm, name)
    if not history:
        return {}, f"pointer {name} does not exist"
    protected: dict[str, str] = {}
    current = history[-1]
    protected[current["Value"]] = f"pointer {name} names it now (v{current['Version']})"
    for version in reversed(history[-versions:] if versions else []):
        protected.setdefault(
            version["Value"],
            f"pointer {name} named it in v{version['Version']}, one of its last "
            f"{versions} versions",
        )
    return protected, ""


def plan_amis(
    ec2: Any,
    ssm: Any,
    *,
    project: str,
    job: str,
    keep: int,
    keep_days: int,
    image_parameter: str = "",
    pointer_versions: int = 5,
    now: datetime,
) -> tuple[list[Decision], str]:
    """Decide for each of this job's AMIs; change nothing."""
    from nightshift.launch import load_launcher

    launcher = load_launcher()
    ours = _pages(
        ec2,
        "describe_images",
        "Images",
        Owners=["self"],
        Filters=[
            {"Name": f"tag:{launcher.TAG_PROJECT}", "Values": [project]},
            {"Name": f"tag:{launcher.TAG_JOB}", "Values": [job]},
        ],
    )
    # A filter is a hint, not a promise: check the tags again before acting.
    ours = [
        image
        for image in ours
        if (_tags(image).get(launcher.TAG_PROJECT), _tags(image).get(launcher.TAG_JOB))
        == (project, job)
    ]
    decisions = [
        Decision(
            image_id=image["ImageId"],
            name=image.get("Name", ""),
            created=datetime.fromisoformat(image["CreationDate"]).astimezone(UTC),
            snapshots=_snapshots(image),
        )
        for image in ours
    ]
    states = {image["ImageId"]: image.get("State", "") for image in ours}
    available = {i for i, state in states.items() if state == "available"}
    _age_rules(decisions, available, keep=keep, keep_days=keep_days, now=now)

    pointer, note = _pointer_images(ssm, image_parameter, pointer_versions)
    templates = _template_images(ec2)
    instances = _instance_images(ec2, [d.image_id for d in decisions])
    for decision in decisions:
        image_id = decision.image_id
        if states[image_id] not in ("available", "failed"):
            decision.reasons.append(f"state {states[image_id]}: a bake in progress")
        if image_id in pointer:
            decision.reasons.append(pointer[image_id])
        if image_id in templates:
            decision.reasons.append("launch template " + ", ".join(templates[image_id]))
        if image_id in instances:
            decision.reasons.append("instance " + ", ".join(instances[image_id]))
    _finish(
        decisions,
        f"older than {keep_days} days, not among the newest {keep}, not named by "
        "the pointer, a launch template or an instance",
    )

    for decision in decisions:
        if decision.remove and states[decision.image_id] == "failed":
            decision.reasons.append("its bake failed (state failed)")

    # Never delete a snapshot that an image we keep (of any job) still uses.
    removing = {d.image_id for d in decisions if d.remove}
    everything = _pages(ec2, "describe_images", "Images", Owners=["self"])
    in_use = {
        snapshot
        for image in everything
        if image["ImageId"] not in removing
        for snapshot in _snapshots(image)
    }
    for decision in decisions:
        shared = [s for s in decision.snapshots if s in in_use]
        if decision.remove and shared:
            decision.reasons.append(
                f"keeps snapshot(s) {', '.join(shared)}: another image uses them"
            )
            decision.snapshots = tuple(s for s in decision.snapshots if s not in in_use)
    return decisions, note


def prune_amis(
    *,
    project: str,
    job: str,
    region: str,
    keep: int = 10,
    keep_days: int = 14,
    image_parameter: str = "",
    pointer_versions: int = 5,
    endpoint_url: str | None = None,
    dry_run: bool = False,
    now: datetime | None = None,
    out: TextIO = sys.stdout,
) -> list[Decision]:
    """Deregister this job's old AMIs and delete their snapshots; print the plan."""
    from nightshift.promote import _aws_errors, _clients

    ec2, ssm = _clients(region, endpoint_url, "ec2", "ssm")
    now = now or datetime.now(UTC)
    with _aws_errors("prune-amis"):
        decisions, note = plan_amis(
            ec2,
            ssm,
            project=project,
            job=job,
            keep=keep,
            keep_days=keep_days,
            image_parameter=image_parameter,
            pointer_versions=pointer_versions,
            now=now,
        )
        if note:
            out.write(f"note: {note}\n")
        _print_plan(decisions, dry_run, out, f"AMI(s) of {project}/{job}")
        if dry_run:
            return decisions
        for decision in decisions:
            if not decision.remove:
                continue
            # Deregister first: EC2 refuses to delete a snapshot an AMI uses.
            ec2.deregister_image(ImageId=decision.image_id)
            for snapshot in decision.snapshots:
                ec2.delete_snapshot(SnapshotId=snapshot)
    return decisions


# --- local images --------------------------------------------------------------------


def prune_images(
    cfg: Any,
    *,
    keep: int = 3,
    keep_days: int = 14,
    dry_run: bool = False,
    now: datetime | None = None,
    out: TextIO = sys.stdout,
) -> list[Decision]:
    """The same rules for local images (build/images and Packer's manifest).

    There is no pointer locally: the newest complete image, the one
    `invoke run` boots, is always kept.
    """
    from nightshift import bake, selection

    now = now or datetime.now(UTC)
    images = bake.list_images(cfg)
    mine = [i for i in images if (i.project, i.job) == (cfg.project, cfg.job)]
    decisions = {
        image.name: Decision(
            image_id=image.name,
            name=str(image.directory),
            created=_aware(image.created),
        )
        for image in mine
    }
    complete = {image.name for image in mine if image.complete}
    _age_rules(
        list(decisions.values()), complete, keep=keep, keep_days=keep_days, now=now
    )
    try:
        booted = selection.newest_image(
            [image.to_candidate() for image in mine], project=cfg.project, job=cfg.job
        )
        decisions[booted.image_id].reasons.append(
            "the newest complete image: what `invoke run` boots"
        )
    except selection.NoImageError:
        pass
    plan = list(decisions.values())
    _finish(
        plan,
        f"older than {keep_days} days and not among the newest {keep} complete",
    )
    for name in decisions.keys() - complete:
        decisions[name].reasons.append("incomplete: disk, kernel or initrd missing")
    _print_plan(plan, dry_run, out, f"local image(s) of {cfg.project}/{cfg.job}")
    if dry_run:
        return plan

    removing = {d.image_id for d in plan if d.remove}
    if removing:
        _drop_manifest_entries(bake.manifest_path(cfg), removing)
        for image in mine:
            if image.name in removing:
                shutil.rmtree(image.directory, ignore_errors=True)
    return plan


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _drop_manifest_entries(path: Any, names: set[str]) -> None:
    """Rewrite Packer's manifest without these local builds, atomically."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise NightshiftError(f"cannot read {path} ({err}); nothing removed") from err
    manifest["builds"] = [
        build
        for build in manifest.get("builds", [])
        if not (
            build.get("custom_data", {}).get("target") == "local"
            and build.get("custom_data", {}).get("name") in names
        )
    ]
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(temporary, path)
