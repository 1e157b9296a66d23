"""The launcher Lambda: one fresh EC2 instance per schedule tick, and its reaper.

A schedule tick launches one instance from the newest baked image with the run
configuration in its user data; the instance runs the job and terminates
itself.  The same function, invoked with {"action": "reap"}, terminates this
job's instances that outlived their time.  Every decision is logged as one JSON
line; every failure is published to the job's SNS topic, then raised.

Only boto3 and the standard library at run time, plus two stdlib-only modules
of ours shipped in the same zip: nightshift.runconfig and nightshift.selection.
The logic lives in plain functions taking clients and Settings, so tests and
`invoke launch --dry-run` run exactly what the Lambda runs.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import json
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from nightshift.runconfig import ConfigError, RunConfig, check_choice, parse_duration
from nightshift.selection import Candidate, NoImageError, newest_image

# Tag keys: the bake writes the first two on every image; the launcher writes
# all of them on the instance and its volumes, and the reaper and the overlap
# guard find instances by them.
TAG_PROJECT = "nightshift:project"
TAG_JOB = "nightshift:job"
TAG_RUN_ID = "nightshift:run-id"
TAG_IMAGE_ID = "nightshift:image-id"
TAG_SCHEDULED = "nightshift:scheduled-time"

OVERLAP_POLICIES = ("skip", "replace", "allow")
ACTIONS = ("launch", "reap")
# Errors that say "not here, not now": the next subnet, type or market may work.
CAPACITY_ERRORS = frozenset({"InsufficientInstanceCapacity", "Unsupported"})
# Spot refusals that on-demand does not share.
SPOT_ERRORS = frozenset(
    {"SpotMaxPriceTooLow", "MaxSpotInstanceCountExceeded", "InsufficientCapacity"}
)
ALIVE_STATES = ("pending", "running")
# The reaper also looks at stopping and stopped instances: they still hold
# volumes, and an instance should never stop (it terminates on shutdown).
REAPABLE_STATES = ("pending", "running", "stopping", "stopped")
USER_DATA_LIMIT = 16 * 1024  # EC2 rejects more, before base64

_ENV = "NIGHTSHIFT_"
_request_id: contextvars.ContextVar[str] = contextvars.ContextVar(
    "request_id", default="-"
)


class LaunchError(Exception):
    """A launch or reap that failed; the message says what was tried and why."""


# --- logging ---------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, message, request id, fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "message": record.getMessage(),
            "request_id": _request_id.get(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


log = logging.getLogger("nightshift.launcher")
if not log.handlers:
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(JsonFormatter())
    log.addHandler(_handler)
    # The Lambda runtime puts its own plain-text handler on the root logger.
    log.propagate = False
    log.setLevel(os.environ.get(f"{_ENV}LOG_LEVEL", "INFO"))


def _say(message: str, level: int = logging.INFO, **fields: Any) -> None:
    log.log(level, message, extra={"fields": fields})


# --- settings ----------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What the deploy tells the function, read once from the environment."""

    project: str
    job: str
    launch_template_id: str
    run_config: RunConfig
    launch_template_version: str = "$Default"
    image_parameter: str = ""
    subnet_ids: tuple[str, ...] = ()
    instance_types: tuple[str, ...] = ()
    spot: bool = False
    overlap_policy: str = "skip"
    sns_topic_arn: str = ""
    max_run_seconds: int = 0
    reaper_grace_seconds: int = 600

    def __post_init__(self) -> None:
        if self.run_config.job != self.job:
            raise ConfigError(
                f"{_ENV}RUN_CONFIG.job",
                self.run_config.job,
                f"must equal {_ENV}JOB ({self.job!r})",
            )
        check_choice(f"{_ENV}OVERLAP_POLICY", self.overlap_policy, OVERLAP_POLICIES)
        if not self.max_run_seconds:
            # The instance's whole budget: pull, run, stop; boot and reporting
            # are what the reaper's grace is for.
            config = self.run_config
            budget = (
                config.pull_deadline_seconds
                + config.max_run_seconds
                + config.stop_grace_seconds
            )
            object.__setattr__(self, "max_run_seconds", budget)

    @property
    def reap_after_seconds(self) -> int:
        return self.max_run_seconds + self.reaper_grace_seconds

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Settings from NIGHTSHIFT_* variables; a bad one raises ConfigError."""

        def get(name: str, default: str = "") -> str:
            return env.get(_ENV + name, "").strip() or default

        def required(name: str, fix: str) -> str:
            if not get(name):
                raise ConfigError(_ENV + name, None, fix)
            return get(name)

        raw_config = required("RUN_CONFIG", "set the base run configuration as JSON")
        try:
            run_config = RunConfig.parse(json.loads(raw_config))
        except json.JSONDecodeError as err:
            raise ConfigError(
                f"{_ENV}RUN_CONFIG", raw_config[:60], f"use a JSON object ({err.msg})"
            ) from err
        except ConfigError as err:
            raise ConfigError(
                f"{_ENV}RUN_CONFIG.{err.field}", err.value, err.allowed
            ) from err

        template = required("LAUNCH_TEMPLATE_ID", "set the launch template id (lt-...)")
        if not template.startswith("lt-"):
            raise ConfigError(
                _ENV + "LAUNCH_TEMPLATE_ID", template, "use an id like lt-0abc..."
            )
        spot = get("SPOT", "false").lower()
        if spot not in ("true", "false"):
            raise ConfigError(_ENV + "SPOT", spot, "use true or false")
        topic = get("SNS_TOPIC_ARN")
        if topic and not topic.startswith("arn:"):
            raise ConfigError(
                _ENV + "SNS_TOPIC_ARN", topic, "use a topic ARN or leave it empty"
            )
        max_run = get("MAX_RUN_SECONDS")

        return cls(
            project=required("PROJECT", "set the project name"),
            job=required("JOB", "set the job name"),
            launch_template_id=template,
            launch_template_version=get("LAUNCH_TEMPLATE_VERSION", "$Default"),
            run_config=run_config,
            image_parameter=get("IMAGE_PARAMETER"),
            subnet_ids=_words(get("SUBNET_IDS")),
            instance_types=_words(get("INSTANCE_TYPES")),
            spot=spot == "true",
            overlap_policy=get("OVERLAP_POLICY", "skip"),
            sns_topic_arn=topic,
            # 0 lets __post_init__ derive it from the run configuration.
            max_run_seconds=(
                parse_duration(_ENV + "MAX_RUN_SECONDS", max_run) if max_run else 0
            ),
            reaper_grace_seconds=parse_duration(
                _ENV + "REAPER_GRACE_SECONDS",
                get("REAPER_GRACE_SECONDS", "600"),
                minimum=0,
            ),
        )


def _words(text: str) -> tuple[str, ...]:
    """A comma-separated list, as CloudFormation joins one into a variable."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


# --- events --------------------------------------------------------------------


@dataclass(frozen=True)
class Tick:
    """One schedule tick: the key that makes its launch happen once."""

    key: str
    scheduled: datetime

    @property
    def run_id(self) -> str:
        digest = hashlib.sha256(self.key.encode()).hexdigest()[:8]
        return f"{self.scheduled:%Y%m%dT%H%M%SZ}-{digest}"


@dataclass(frozen=True)
class Reap:
    """The reaper's own schedule: {"action": "reap"}."""


def parse_event(event: Any) -> Tick | Reap:
    """Read an invocation event; a malformed one raises ConfigError naming the field.

    Shapes: an EventBridge rule's "Scheduled Event" (its "id" is kept across
    redeliveries, so it keys the tick); {"action": "launch", "schedule": ARN,
    "time": ISO} from a Scheduler target (key: schedule + time, because
    Scheduler's execution id changes on every attempt); {"action": "reap"}.
    """
    if not isinstance(event, dict):
        raise ConfigError(
            "event",
            event,
            'send a JSON object: a scheduled event or {"action": "reap"}',
        )
    action = check_choice("event.action", event.get("action", "launch"), ACTIONS)
    if action == "reap":
        return Reap()

    raw_time = event.get("time")
    try:
        scheduled = datetime.fromisoformat(raw_time).astimezone(UTC)
    except (TypeError, ValueError) as err:
        raise ConfigError(
            "event.time", raw_time, "send the scheduled time, e.g. 2026-12-03T03:00:00Z"
        ) from err
    event_id, schedule = event.get("id"), event.get("schedule")
    if isinstance(event_id, str) and event_id.strip():
        key = event_id
    elif isinstance(schedule, str) and schedule.strip():
        key = f"{schedule}@{scheduled.isoformat()}"
    else:
        raise ConfigError(
            "event.id",
            event_id,
            "send the EventBridge event id, or 'schedule' (its ARN) with 'time'",
        )
    return Tick(key=key, scheduled=scheduled)


# --- images --------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    image_id: str
    source: str  # why this one: the SSM pointer or the newest tagged image


def _candidate(image: dict[str, Any]) -> Candidate:
    tags = _tags(image)
    return Candidate(
        image_id=image["ImageId"],
        created=datetime.fromisoformat(image["CreationDate"]),
        project=tags.get(TAG_PROJECT, ""),
        job=tags.get(TAG_JOB, ""),
        complete=image.get("State") == "available",
        # Every describe here asks for Owners=["self"]: EC2 drops foreign images.
        owner="self",
    )


def choose_image(ec2: Any, ssm: Any, settings: Settings) -> Image:
    """The SSM pointer's image when set, else the newest of ours; both checked."""
    pointer = ""
    if settings.image_parameter:
        try:
            value = ssm.get_parameter(Name=settings.image_parameter)["Parameter"][
                "Value"
            ]
            pointer = value.strip()
        except ClientError as err:
            if _code(err) != "ParameterNotFound":
                raise
            _say("image pointer not set", parameter=settings.image_parameter)

    if pointer:
        # A filter, not ImageIds: an unknown id then finds nothing instead of
        # raising, and Owners=["self"] applies either way.
        found = ec2.describe_images(
            Owners=["self"], Filters=[{"Name": "image-id", "Values": [pointer]}]
        )["Images"]
        try:
            chosen = newest_image(
                [_candidate(i) for i in found],
                project=settings.project,
                job=settings.job,
            )
        except NoImageError as err:
            # A promoted pointer to a foreign, unfinished or untagged image is
            # a broken promotion: fail loudly instead of booting something else.
            raise NoImageError(
                f"SSM parameter {settings.image_parameter} points to {pointer}, which "
                f"does not qualify ({err})"
            ) from err
        return Image(chosen.image_id, f"SSM parameter {settings.image_parameter}")

    filters = [
        {"Name": f"tag:{TAG_PROJECT}", "Values": [settings.project]},
        {"Name": f"tag:{TAG_JOB}", "Values": [settings.job]},
    ]
    found = ec2.describe_images(Owners=["self"], Filters=filters)["Images"]
    chosen = newest_image(
        [_candidate(i) for i in found], project=settings.project, job=settings.job
    )
    return Image(chosen.image_id, f"newest available of {len(found)} tagged image(s)")


# --- instances -----------------------------------------------------------------


def _code(err: ClientError) -> str:
    return err.response.get("Error", {}).get("Code", "")


def _tags(resource: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}


def _instances(ec2: Any, filters: list[dict[str, Any]]) -> list[dict[str, Any]]:
    pages = ec2.get_paginator("describe_instances").paginate(Filters=filters)
    return [i for page in pages for r in page["Reservations"] for i in r["Instances"]]


def job_instances(ec2: Any, settings: Settings, states: tuple[str, ...]) -> list[dict]:
    """Runs of this project's job (launched here: they carry a run id) in states.

    The run-id tag matters: the bake's builder instance carries the project
    and job tags too, and is neither an overlapping run nor ours to reap.
    """
    found = _instances(
        ec2,
        [
            {"Name": f"tag:{TAG_PROJECT}", "Values": [settings.project]},
            {"Name": f"tag:{TAG_JOB}", "Values": [settings.job]},
            {"Name": "tag-key", "Values": [TAG_RUN_ID]},
            {"Name": "instance-state-name", "Values": list(states)},
        ],
    )
    # Never act on an instance on the strength of a filter alone.
    return [
        i
        for i in found
        if _tags(i).get(TAG_PROJECT) == settings.project
        and _tags(i).get(TAG_JOB) == settings.job
        and _tags(i).get(TAG_RUN_ID)
        and i["State"]["Name"] in states
    ]


@dataclass(frozen=True)
class Placement:
    market: str  # "spot" or "on-demand"
    instance_type: str | None  # None: the launch template's
    subnet_id: str | None  # None: the launch template's or the default VPC's

    def describe(self) -> str:
        return (
            f"{self.market} {self.instance_type or 'template type'} in "
            f"{self.subnet_id or 'template subnet'}"
        )


def placements(settings: Settings) -> list[Placement]:
    """The order capacity errors walk: subnets, then types, then on-demand."""
    markets = ("spot", "on-demand") if settings.spot else ("on-demand",)
    return [
        Placement(market, instance_type, subnet)
        for market in markets
        for instance_type in settings.instance_types or (None,)
        for subnet in settings.subnet_ids or (None,)
    ]


def client_token(settings: Settings, tick: Tick, placement: Placement) -> str:
    """Same tick and placement, same token: EC2 returns the first instance.

    Each placement gets its own token so a capacity retry with other
    parameters is a new request, not an IdempotentParameterMismatch.
    """
    parts = (settings.project, settings.job, tick.key, placement.describe())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:64]


def run_request(
    settings: Settings, image: Image, tick: Tick, placement: Placement
) -> dict[str, Any]:
    """The RunInstances parameters for one placement."""
    run_config = replace(settings.run_config, run_id=tick.run_id)
    user_data = run_config.to_user_data()
    if len(user_data.encode()) > USER_DATA_LIMIT:
        raise ConfigError(
            f"{_ENV}RUN_CONFIG",
            f"<{len(user_data.encode())} bytes>",
            f"keep the run configuration under {USER_DATA_LIMIT} bytes",
        )
    tags = [
        {"Key": "Name", "Value": f"{settings.project}-{settings.job}-{tick.run_id}"},
        {"Key": TAG_PROJECT, "Value": settings.project},
        {"Key": TAG_JOB, "Value": settings.job},
        {"Key": TAG_RUN_ID, "Value": tick.run_id},
        {"Key": TAG_IMAGE_ID, "Value": image.image_id},
        {"Key": TAG_SCHEDULED, "Value": tick.scheduled.isoformat()},
    ]
    request: dict[str, Any] = {
        "LaunchTemplate": {
            "LaunchTemplateId": settings.launch_template_id,
            "Version": settings.launch_template_version,
        },
        "ImageId": image.image_id,
        "MinCount": 1,
        "MaxCount": 1,
        "ClientToken": client_token(settings, tick, placement),
        # The job powers the machine off when done; off must mean gone.
        "InstanceInitiatedShutdownBehavior": "terminate",
        # Hop limit 2: the job's container is one hop further than the host.
        "MetadataOptions": {
            "HttpTokens": "required",
            "HttpPutResponseHopLimit": 2,
            "HttpEndpoint": "enabled",
        },
        "TagSpecifications": [
            {"ResourceType": "instance", "Tags": tags},
            {"ResourceType": "volume", "Tags": tags},
        ],
        "UserData": user_data,
    }
    if placement.instance_type:
        request["InstanceType"] = placement.instance_type
    if placement.subnet_id:
        request["SubnetId"] = placement.subnet_id
    if placement.market == "spot":
        request["InstanceMarketOptions"] = {
            "MarketType": "spot",
            "SpotOptions": {
                "SpotInstanceType": "one-time",
                "InstanceInterruptionBehavior": "terminate",
            },
        }
    return request


@dataclass
class Attempt:
    placement: str
    outcome: str


def launch_instance(
    ec2: Any, settings: Settings, image: Image, tick: Tick, *, dry_run: bool = False
) -> tuple[dict[str, Any] | None, dict[str, Any], list[Attempt]]:
    """Walk the placements until one launches: (instance, request, attempts).

    In a dry run EC2 checks permissions and parameters but not capacity, so
    the first placement answers and the instance is None.
    """
    attempts: list[Attempt] = []
    request: dict[str, Any] = {}
    for placement in placements(settings):
        request = run_request(settings, image, tick, placement)
        try:
            reservation = ec2.run_instances(**request, DryRun=dry_run)
        except ClientError as err:
            code, message = _code(err), err.response.get("Error", {}).get("Message", "")
            if dry_run and code == "DryRunOperation":
                attempts.append(Attempt(placement.describe(), "would launch"))
                _say("dry run: launch permitted", placement=placement.describe())
                return None, request, attempts
            if code == "IdempotentParameterMismatch":
                # This token already launched, with other parameters (say the
                # image pointer moved since): that launch is this tick's.
                earlier = _instances(
                    ec2, [{"Name": "client-token", "Values": [request["ClientToken"]]}]
                )
                if earlier:
                    attempts.append(Attempt(placement.describe(), "launched earlier"))
                    return earlier[0], request, attempts
            attempts.append(Attempt(placement.describe(), f"{code}: {message}"))
            _say(
                "launch attempt failed",
                logging.WARNING,
                placement=placement.describe(),
                error=code,
                detail=message,
            )
            retryable = code in CAPACITY_ERRORS or (
                placement.market == "spot" and code in SPOT_ERRORS
            )
            if retryable:
                continue
            raise LaunchError(
                f"RunInstances failed ({code}: {message}); attempts: "
                + _attempt_list(attempts)
            ) from err
        instance = reservation["Instances"][0]
        attempts.append(
            Attempt(placement.describe(), f"launched {instance['InstanceId']}")
        )
        return instance, request, attempts
    raise LaunchError("no capacity anywhere; attempts: " + _attempt_list(attempts))


def _attempt_list(attempts: list[Attempt]) -> str:
    return "; ".join(f"{a.placement} -> {a.outcome}" for a in attempts)


def terminate(ec2: Any, instance_ids: list[str], *, dry_run: bool) -> None:
    try:
        ec2.terminate_instances(InstanceIds=instance_ids, DryRun=dry_run)
    except ClientError as err:
        if not (dry_run and _code(err) == "DryRunOperation"):
            raise


# --- the two actions -----------------------------------------------------------


@dataclass
class Outcome:
    """What the function decided and why; returned and logged."""

    action: str
    decision: str
    reason: str
    run_id: str = ""
    instance_id: str = ""
    image_id: str = ""
    image_source: str = ""
    dry_run: bool = False
    attempts: list[Attempt] = field(default_factory=list)
    terminated: list[dict[str, str]] = field(default_factory=list)
    request: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        doc = {k: v for k, v in vars(self).items() if k != "attempts"}
        doc["attempts"] = [vars(a) for a in self.attempts]
        return doc


def do_launch(
    ec2: Any, ssm: Any, settings: Settings, tick: Tick, *, dry_run: bool = False
) -> Outcome:
    """Launch this tick's instance once, guarding against overlapping runs."""
    outcome = Outcome("launch", "", "", run_id=tick.run_id, dry_run=dry_run)

    # Any state: a redelivery may come after this tick's run already ended
    # (terminated instances stay visible for about an hour).
    mine = _instances(
        ec2,
        [
            {"Name": f"tag:{TAG_PROJECT}", "Values": [settings.project]},
            {"Name": f"tag:{TAG_JOB}", "Values": [settings.job]},
            {"Name": f"tag:{TAG_RUN_ID}", "Values": [tick.run_id]},
        ],
    )
    if mine:
        outcome.decision = "already-launched"
        outcome.instance_id = mine[0]["InstanceId"]
        outcome.image_id = _tags(mine[0]).get(TAG_IMAGE_ID, "")
        outcome.reason = (
            "an instance tagged with this run id exists (redelivered event)"
        )
        return outcome

    earlier = job_instances(ec2, settings, ALIVE_STATES)
    if earlier:
        listed = ", ".join(
            f"{i['InstanceId']} (run {_tags(i).get(TAG_RUN_ID, '?')}, "
            f"{i['State']['Name']})"
            for i in earlier
        )
        policy = settings.overlap_policy
        _say("earlier run still going", policy=policy, instances=listed)
        if policy == "skip":
            outcome.decision = "skipped"
            outcome.reason = (
                f"overlap policy skip: earlier run still going: {listed}; "
                "launched nothing"
            )
            return outcome

    image = choose_image(ec2, ssm, settings)
    outcome.image_id, outcome.image_source = image.image_id, image.source
    _say("image chosen", image_id=image.image_id, source=image.source)

    # Only now, with an image in hand, is it safe to stop the earlier run.
    if earlier and settings.overlap_policy == "replace":
        ids = [i["InstanceId"] for i in earlier]
        terminate(ec2, ids, dry_run=dry_run)
        outcome.terminated = [
            {"instance_id": i, "reason": "overlap policy replace"} for i in ids
        ]

    instance, request, attempts = launch_instance(
        ec2, settings, image, tick, dry_run=dry_run
    )
    outcome.attempts, outcome.request = attempts, request
    if instance is None:
        outcome.decision = "would-launch"
        outcome.reason = f"dry run: EC2 permits {attempts[-1].placement}"
    else:
        outcome.decision = "launched"
        outcome.instance_id = instance["InstanceId"]
        outcome.reason = f"{attempts[-1].placement}; image from {image.source}"
    if outcome.terminated:
        verb = "would replace" if dry_run else "replaced"
        outcome.reason += f"; {verb} {len(outcome.terminated)} earlier instance(s)"
    return outcome


def do_reap(
    ec2: Any, settings: Settings, *, now: datetime, dry_run: bool = False
) -> Outcome:
    """Terminate this job's instances older than max run time plus grace."""
    limit = settings.reap_after_seconds
    overdue = []
    for instance in job_instances(ec2, settings, REAPABLE_STATES):
        age = int((now - instance["LaunchTime"]).total_seconds())
        if age > limit:
            reason = (
                f"up {age}s, over {settings.max_run_seconds}s max run + "
                f"{settings.reaper_grace_seconds}s grace "
                f"(run {_tags(instance).get(TAG_RUN_ID, '?')}, "
                f"{instance['State']['Name']})"
            )
            overdue.append({"instance_id": instance["InstanceId"], "reason": reason})
            _say("overdue instance", instance_id=instance["InstanceId"], reason=reason)
    if overdue:
        terminate(ec2, [o["instance_id"] for o in overdue], dry_run=dry_run)
    return Outcome(
        "reap",
        decision="reaped" if overdue else "nothing-overdue",
        reason=f"{len(overdue)} instance(s) older than {limit}s",
        dry_run=dry_run,
        terminated=overdue,
    )


def publish(sns: Any, topic_arn: str, subject: str, lines: list[str]) -> None:
    """Tell the job's topic; a failure to tell must not hide the original news."""
    if not topic_arn:
        return
    try:
        sns.publish(TopicArn=topic_arn, Subject=subject[:100], Message="\n".join(lines))
    except (ClientError, BotoCoreError):
        log.error(
            "could not publish", exc_info=True, extra={"fields": {"topic": topic_arn}}
        )


def handle(
    event: Any,
    *,
    settings: Settings,
    ec2: Any,
    ssm: Any,
    sns: Any,
    now: datetime | None = None,
    dry_run: bool = False,
) -> Outcome:
    """Decide, act, report: the whole function, with clients passed in."""
    now = now or datetime.now(UTC)
    subject = f"nightshift {settings.project}/{settings.job}"
    try:
        request = parse_event(event)
        if isinstance(request, Reap):
            outcome = do_reap(ec2, settings, now=now, dry_run=dry_run)
        else:
            outcome = do_launch(ec2, ssm, settings, request, dry_run=dry_run)
    except Exception as err:
        # Every failure is told, expected or not; then the invocation fails.
        message = _failure_message(err)
        log.error(
            "failed",
            exc_info=True,
            extra={"fields": {"decision": "failed", "error": message}},
        )
        if not dry_run:
            publish(
                sns,
                settings.sns_topic_arn,
                f"{subject}: launcher failed",
                [f"The launcher failed at {now.isoformat()}:", message],
            )
        if isinstance(err, ClientError):
            raise LaunchError(message) from err
        raise

    _say(
        outcome.reason, **{k: v for k, v in outcome.as_dict().items() if k != "request"}
    )
    report = outcome.decision in ("skipped", "reaped") or outcome.terminated
    if report and not dry_run:
        lines = [f"{outcome.action}: {outcome.decision}: {outcome.reason}"]
        lines += [
            f"terminated {t['instance_id']}: {t['reason']}" for t in outcome.terminated
        ]
        publish(sns, settings.sns_topic_arn, f"{subject}: {outcome.decision}", lines)
    return outcome


def _failure_message(err: Exception) -> str:
    if isinstance(err, ClientError):
        detail = err.response.get("Error", {}).get("Message", "")
        return f"{err.operation_name} failed: {_code(err)}: {detail}"
    if isinstance(err, ConfigError | NoImageError | LaunchError):
        return str(err)
    return f"{type(err).__name__}: {err}"


# --- the Lambda entry point -----------------------------------------------------


@functools.cache
def _settings() -> Settings:
    return Settings.from_env(os.environ)


@functools.cache
def _client(service: str) -> Any:
    return boto3.client(service)


def reset() -> None:
    """Forget cached settings and clients (tests change the environment)."""
    _settings.cache_clear()
    _client.cache_clear()


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Lambda entry: a scheduled event launches, {"action": "reap"} reaps."""
    _request_id.set(getattr(context, "aws_request_id", "-"))
    try:
        settings = _settings()
    except ConfigError as err:
        # Settings are broken, but the topic may still be readable: say so.
        log.error(
            "bad settings", extra={"fields": {"decision": "failed", "error": str(err)}}
        )
        publish(
            _client("sns"),
            os.environ.get(f"{_ENV}SNS_TOPIC_ARN", ""),
            "nightshift launcher: bad settings",
            [str(err)],
        )
        raise
    outcome = handle(
        event,
        settings=settings,
        ec2=_client("ec2"),
        ssm=_client("ssm"),
        sns=_client("sns"),
    )
    return outcome.as_dict()
