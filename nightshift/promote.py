"""The promotion gate for a freshly baked AMI, and the way back.

promote() boots the new AMI once in smoke mode, through the launcher's own
launch code, waits for the instance's run record and for the instance to
terminate itself, and only then writes the SSM image pointer that every
scheduled launch reads.  rollback() points it back at the image it named
before, found in the parameter's history.  Both take an endpoint_url so that
tests (and a cautious person) can aim them at moto.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, TextIO

from nightshift.errors import NightshiftError
from nightshift.runconfig import LogConfig, ReportConfig, RunConfig

# Tags the smoke instance gets besides the launcher's own, so a person (or
# a cost report) can tell it from a scheduled run.
TAG_PURPOSE = "nightshift:purpose"
TAG_CANDIDATE = "nightshift:candidate-image"
# The launcher's run ids are <time>-<digest>; smoke ones get this prefix, so
# their records in runs/<run_id> are never mistaken for a scheduled run's.
SMOKE_PREFIX = "smoke-"
# Every write of the pointer says who wrote it and why; rollback reads these
# back from the history to know what a rollback already undid.
_ROLLBACK_NOTE = re.compile(r"^nightshift rollback: version (\d+) -> version (\d+)")
_AMI = re.compile(r"^ami-[0-9a-f]{8,17}$")


class PromotionFailed(NightshiftError):
    """The smoke run did not pass; the pointer was left as it was."""

    exit_code = 4


@dataclass(frozen=True)
class Promotion:
    """What promote() did: the image, its smoke run and the pointer's values."""

    image_id: str
    previous: str
    promoted: bool
    reason: str
    run_id: str = ""
    instance_id: str = ""
    outcome: str = ""
    seconds: float = 0.0
    version: int = 0


@dataclass(frozen=True)
class Rollback:
    """What rollback() did: the pointer went from one version's value to another's."""

    parameter: str
    from_image: str
    to_image: str
    from_version: int
    to_version: int
    version: int = 0


# --- clients ---------------------------------------------------------------------


def _clients(region: str, endpoint_url: str | None, *names: str) -> list[Any]:
    import boto3

    session = boto3.session.Session(region_name=region)
    return [session.client(name, endpoint_url=endpoint_url or None) for name in names]


def _code(err: Exception) -> str:
    return getattr(err, "response", {}).get("Error", {}).get("Code", "")


@contextlib.contextmanager
def _aws_errors(what: str) -> Iterator[None]:
    """Turn botocore's errors into one line naming the call that failed."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as err:
        message = err.response.get("Error", {}).get("Message", "")
        raise NightshiftError(
            f"{what}: {err.operation_name} failed: {_code(err)}: {message}"
        ) from err
    except BotoCoreError as err:
        raise NightshiftError(
            f"{what}: cannot reach AWS ({err}); check credentials, region and "
            "endpoint_url"
        ) from err


# --- the pointer and its history ----------------------------------------------------


def pointer_history(ssm: Any, name: str) -> list[dict[str, Any]]:
    """Every stored version of the parameter, oldest first ([] if it is missing)."""
    versions: list[dict[str, Any]] = []
    token = None
    while True:
        args = {"Name": name, "MaxResults": 50}
        if token:
            args["NextToken"] = token
        try:
            page = ssm.get_parameter_history(**args)
        except Exception as err:
            if _code(err) == "ParameterNotFound":
                return []
            raise
        versions += page["Parameters"]
        token = page.get("NextToken")
        if not token:
            return sorted(versions, key=lambda v: v["Version"])


def _write_pointer(ssm: Any, name: str, image_id: str, note: str) -> int:
    """Overwrite the pointer keeping its data type; return the new version."""
    data_type = "aws:ec2:image"
    try:
        data_type = ssm.get_parameter(Name=name)["Parameter"].get("DataType", "text")
    except Exception as err:
        if _code(err) != "ParameterNotFound":
            raise
    return ssm.put_parameter(
        Name=name,
        Value=image_id,
        Type="String",
        DataType=data_type,
        Overwrite=True,
        Description=note[:1024],
    )["Version"]


def _tags(resource: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}


def check_image(ec2: Any, image_id: str, *, project: str, job: str) -> dict[str, Any]:
    """The image, if the launcher would accept it as the pointer's value."""
    from nightshift.launch import load_launcher

    launcher = load_launcher()
    found = ec2.describe_images(
        Owners=["self"], Filters=[{"Name": "image-id", "Values": [image_id]}]
    )["Images"]
    if not found:
        raise NightshiftError(f"image {image_id} is not one of this account's images")
    image, tags = found[0], _tags(found[0])
    if (tags.get(launcher.TAG_PROJECT), tags.get(launcher.TAG_JOB)) != (project, job):
        raise NightshiftError(
            f"image {image_id} is not tagged {launcher.TAG_PROJECT}={project} and "
            f"{launcher.TAG_JOB}={job}; the launcher would refuse it"
        )
    if image.get("State") != "available":
        raise NightshiftError(
            f"image {image_id} is {image.get('State')}, not available; wait for the "
            "bake to finish"
        )
    return image


def candidate(image: dict[str, Any]) -> Any:
    """An EC2 image as nightshift.selection compares images."""
    from nightshift.launch import load_launcher
    from nightshift.selection import Candidate

    launcher, tags = load_launcher(), _tags(image)
    return Candidate(
        image_id=image["ImageId"],
        created=datetime.fromisoformat(image["CreationDate"]),
        project=tags.get(launcher.TAG_PROJECT, ""),
        job=tags.get(launcher.TAG_JOB, ""),
        complete=image.get("State") == "available",
    )


def newest_tagged_image(ec2: Any, *, project: str, job: str) -> str:
    """The newest available image of this project and job: what the bake made."""
    from nightshift.launch import load_launcher
    from nightshift.selection import NoImageError, newest_image

    launcher = load_launcher()
    found = ec2.describe_images(
        Owners=["self"],
        Filters=[
            {"Name": f"tag:{launcher.TAG_PROJECT}", "Values": [project]},
            {"Name": f"tag:{launcher.TAG_JOB}", "Values": [job]},
        ],
    )["Images"]
    try:
        chosen = newest_image(
            [candidate(image) for image in found], project=project, job=job
        )
    except NoImageError as err:
        raise NightshiftError(f"{err}; run `invoke bake-ami --target aws`") from err
    return chosen.image_id


# --- the smoke run ------------------------------------------------------------------


def smoke_run_config(
    base: RunConfig,
    *,
    log_group: str,
    region: str,
    command: Iterable[str] = (),
    environment: dict[str, str] | None = None,
    max_run_seconds: int | None = None,
) -> RunConfig:
    """The run configuration of a smoke run: mode smoke, reporting to the log only.

    The record goes to the job's log group (runs/<run_id>), which is what the
    gate reads; no topic and no metrics, so a smoke run neither mails the
    job's subscribers nor counts as a run of the job.
    """
    return replace(
        base,
        mode="smoke",
        command=tuple(command) or base.command,
        environment={**base.environment, **(environment or {})},
        max_run_seconds=max_run_seconds or base.max_run_seconds,
        log=LogConfig(driver="awslogs", group=log_group, region=region),
        report=ReportConfig(region=region, log_group=log_group),
    )


def _smoke_tick(launcher: Any, image_id: str, now: datetime) -> Any:
    """The launcher's Tick, keyed per image and time, with a smoke- run id."""

    class SmokeTick(launcher.Tick):
        @property
        def run_id(self) -> str:
            return SMOKE_PREFIX + super().run_id

    return SmokeTick(key=f"smoke:{image_id}:{now.isoformat()}", scheduled=now)


def run_record(logs: Any, group: str, run_id: str) -> dict[str, Any] | None:
    """The instance's result record in runs/<run_id>, or None while there is none."""
    try:
        events = logs.get_log_events(
            logGroupName=group, logStreamName=f"runs/{run_id}", startFromHead=True
        )["events"]
    except Exception as err:
        if _code(err) == "ResourceNotFoundException":
            return None
        raise
    record = None
    for event in events:
        try:
            data = json.loads(event["message"])
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict) and "outcome" in data:
            record = data
    return record


def job_output(logs: Any, group: str, stream: str, lines: int = 20) -> list[str]:
    """The last lines the job's container wrote (awslogs), for a failure message."""
    try:
        events = logs.get_log_events(
            logGroupName=group, logStreamName=stream, limit=lines, startFromHead=False
        )["events"]
    except Exception:  # only decoration for a failure already being reported
        return []
    return [event["message"].rstrip() for event in events]


def _state(ec2: Any, instance_id: str) -> str:
    found = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    return found[0]["Instances"][0]["State"]["Name"] if found else "terminated"


def promote(
    *,
    project: str,
    job: str,
    image_parameter: str,
    launch_template_id: str,
    run_config: RunConfig,
    log_group: str,
    region: str,
    image_id: str = "",
    endpoint_url: str | None = None,
    subnet_ids: tuple[str, ...] = (),
    instance_types: tuple[str, ...] = (),
    smoke_command: Iterable[str] = (),
    smoke_environment: dict[str, str] | None = None,
    timeout_seconds: int = 1800,
    poll_seconds: float = 10.0,
    record_grace_seconds: float = 120.0,
    out: TextIO = sys.stdout,
    sleep: Callable[[float], None] = time.sleep,
) -> Promotion:
    """Smoke-test image_id (default: the newest tagged) and then point to it.

    Raises PromotionFailed, leaving the pointer as it was, when the smoke run
    reports anything but success, does not report within timeout_seconds,
    or its instance does not terminate itself.
    """
    from nightshift.launch import load_launcher

    launcher = load_launcher()
    if not image_parameter:
        raise NightshiftError("--image-parameter: name the SSM image pointer")
    if not log_group:
        raise NightshiftError("--log-group: name the job's log group (run records)")
    ec2, ssm, logs = _clients(region, endpoint_url, "ec2", "ssm", "logs")

    with _aws_errors("promote"):
        image_id = image_id or newest_tagged_image(ec2, project=project, job=job)
        check_image(ec2, image_id, project=project, job=job)
        history = pointer_history(ssm, image_parameter)
        # The deploy creates the pointer as " " (SSM refuses ""): unset.
        previous = history[-1]["Value"].strip() if history else ""
        if previous == image_id:
            out.write(f"{image_parameter} already names {image_id}; nothing to do\n")
            return Promotion(image_id, previous, False, "already promoted")

        config = smoke_run_config(
            run_config,
            log_group=log_group,
            region=region,
            command=smoke_command,
            environment=smoke_environment,
        )
        settings = launcher.Settings(
            project=project,
            job=job,
            launch_template_id=launch_template_id,
            run_config=config,
            subnet_ids=tuple(subnet_ids),
            instance_types=tuple(instance_types),
            # On-demand: a spot refusal must not fail the promotion.
            spot=False,
        )
        now = datetime.now(UTC).replace(microsecond=0)
        tick = _smoke_tick(launcher, image_id, now)
        image = launcher.Image(image_id, "candidate for promotion")
        out.write(f"smoke run {tick.run_id}: launching {image_id}\n")
        try:
            instance, _, attempts = launcher.launch_instance(ec2, settings, image, tick)
        except launcher.LaunchError as err:
            raise PromotionFailed(
                f"the smoke run of {image_id} could not launch ({err}); "
                f"{image_parameter} still names {previous or '(nothing)'}"
            ) from err
        instance_id = instance["InstanceId"]
        ec2.create_tags(
            Resources=[instance_id],
            Tags=[
                {"Key": TAG_PURPOSE, "Value": "smoke"},
                {"Key": TAG_CANDIDATE, "Value": image_id},
            ],
        )
        out.write(
            f"smoke run {tick.run_id}: {instance_id} ({attempts[-1].placement})\n"
        )

        started = time.monotonic()
        record, state = _wait(
            ec2,
            logs,
            log_group,
            tick.run_id,
            instance_id,
            timeout_seconds=timeout_seconds,
            poll_seconds=poll_seconds,
            record_grace_seconds=record_grace_seconds,
            sleep=sleep,
        )
        seconds = round(time.monotonic() - started, 1)
        kept = f"{image_parameter} still names {previous or '(nothing)'}"

        def fail(why: str) -> PromotionFailed:
            lines = job_output(logs, log_group, f"{job}/{tick.run_id}")
            if lines:
                out.write("last lines of the smoke run's output:\n")
                out.writelines(f"  {line}\n" for line in lines)
            return PromotionFailed(f"{image_id} not promoted: {why}; {kept}")

        if record is None:
            if state != "terminated":
                launcher.terminate(ec2, [instance_id], dry_run=False)
                raise fail(
                    f"no run record in {log_group} runs/{tick.run_id} after "
                    f"{timeout_seconds}s; terminated {instance_id}"
                )
            raise fail(
                f"{instance_id} terminated without writing a run record to "
                f"{log_group} runs/{tick.run_id}"
            )
        outcome = record.get("outcome", "?")
        if outcome != "success":
            if state != "terminated":
                launcher.terminate(ec2, [instance_id], dry_run=False)
            raise fail(
                f"the smoke run ended {outcome}: {record.get('reason', 'no reason')}"
            )
        if state != "terminated":
            launcher.terminate(ec2, [instance_id], dry_run=False)
            raise fail(
                f"the smoke run passed but {instance_id} was still {state} "
                f"{timeout_seconds}s later (the image must power itself off); "
                "terminated it"
            )

        version = _write_pointer(
            ssm,
            image_parameter,
            image_id,
            f"nightshift promote: {image_id} passed smoke run {tick.run_id} "
            f"({instance_id})",
        )
    reason = f"smoke run {tick.run_id} passed in {seconds}s"
    out.write(
        f"promoted {image_id}: {image_parameter} version {version} "
        f"(was {previous or 'unset'}); {reason}\n"
    )
    return Promotion(
        image_id,
        previous,
        True,
        reason,
        run_id=tick.run_id,
        instance_id=instance_id,
        outcome=outcome,
        seconds=seconds,
        version=version,
    )


def _wait(
    ec2: Any,
    logs: Any,
    group: str,
    run_id: str,
    instance_id: str,
    *,
    timeout_seconds: float,
    poll_seconds: float,
    record_grace_seconds: float,
    sleep: Callable[[float], None],
) -> tuple[dict[str, Any] | None, str]:
    """Poll until the record is in and the instance is gone, or time runs out."""
    deadline = time.monotonic() + timeout_seconds
    record, state, gone_since = None, "pending", None
    while True:
        if record is None:
            record = run_record(logs, group, run_id)
        state = _state(ec2, instance_id)
        if state == "terminated":
            if record is not None:
                return record, state
            # The agent writes the record before it powers off, but log
            # ingestion lags: give it a little while before giving up.
            gone_since = gone_since or time.monotonic()
            if time.monotonic() - gone_since >= record_grace_seconds:
                return None, state
        elif record is not None and record.get("outcome") != "success":
            # A failed run: no need to watch it power off.
            return record, state
        if time.monotonic() >= deadline:
            return record, state
        sleep(poll_seconds)


# --- rollback -------------------------------------------------------------------------


def rollback_target(
    history: list[dict[str, Any]], to_version: int | None = None
) -> dict[str, Any]:
    """The version a rollback restores: the image the pointer named before this one.

    A rollback's own write names the version it restored, so rolling back
    twice goes two images back instead of returning to where it started.
    """
    if not history:
        raise NightshiftError("the image pointer has no history: nothing to roll to")
    current = history[-1]
    if to_version is not None:
        for version in history:
            if version["Version"] == to_version:
                return version
        known = ", ".join(str(v["Version"]) for v in history)
        raise NightshiftError(
            f"--to-version: version {to_version} is not in the history ({known})"
        )
    before = current["Version"]
    note = _ROLLBACK_NOTE.match(current.get("Description") or "")
    if note:
        before = int(note.group(2))
    for version in reversed(history):
        if (
            version["Version"] < before
            and version["Value"] != current["Value"]
            and _AMI.match(version["Value"])
        ):
            return version
    raise NightshiftError(
        f"no earlier image in the pointer's history before version {before} "
        f"(it names {current['Value']}); nothing to roll back to"
    )


def rollback(
    *,
    project: str,
    job: str,
    image_parameter: str,
    region: str,
    endpoint_url: str | None = None,
    to_version: int | None = None,
    out: TextIO = sys.stdout,
) -> Rollback:
    """Point the image parameter back at the image it named before."""
    if not image_parameter:
        raise NightshiftError("--image-parameter: name the SSM image pointer")
    ec2, ssm = _clients(region, endpoint_url, "ec2", "ssm")
    with _aws_errors("rollback"):
        history = pointer_history(ssm, image_parameter)
        target = rollback_target(history, to_version)
        current = history[-1]
        if target["Value"] == current["Value"]:
            raise NightshiftError(
                f"version {target['Version']} names {target['Value']}, which the "
                "pointer names now; nothing to change"
            )
        try:
            check_image(ec2, target["Value"], project=project, job=job)
        except NightshiftError as err:
            raise NightshiftError(
                f"cannot roll back to version {target['Version']}: {err}; pick "
                "another with --to-version"
            ) from err
        version = _write_pointer(
            ssm,
            image_parameter,
            target["Value"],
            f"nightshift rollback: version {current['Version']} -> version "
            f"{target['Version']} ({current['Value']} -> {target['Value']})",
        )
    out.write(
        f"rolled back {image_parameter}: {current['Value']} (version "
        f"{current['Version']}) -> {target['Value']} (version {target['Version']}), "
        f"now version {version}\n"
    )
    return Rollback(
        image_parameter,
        current["Value"],
        target["Value"],
        current["Version"],
        target["Version"],
        version,
    )


def aws_job_image(cfg: Any, *, endpoint_url: str | None = None) -> str:
    """The job image on AWS: [job] image, else the account's ECR repository."""
    if cfg.job_settings.image:
        return cfg.job_settings.image
    (sts,) = _clients(cfg.aws.region, endpoint_url, "sts")
    with _aws_errors("job image"):
        account = sts.get_caller_identity()["Account"]
    return f"{account}.dkr.ecr.{cfg.aws.region}.amazonaws.com/{cfg.repository}:latest"
