"""The job on AWS: deploy its stack, run it now, show its runs and logs, destroy it.

One CloudFormation stack per job, from deploy/stack.yaml, with parameters
from nightshift.toml.  Every command says which account, region and stack it
acts on first, and takes an endpoint so the tests can aim it at moto.
Configuration errors stop in `check()`, before any AWS call.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nightshift import jobimage
from nightshift.config import Config
from nightshift.errors import NightshiftError
from nightshift.runconfig import ConfigError, RunConfig

TEMPLATE = Path(__file__).resolve().parent.parent / "deploy" / "stack.yaml"
# The memory alarm fires when a run peaks above this share of the smallest
# configured instance type's memory: the next run may not fit.
MEMORY_ALARM_SHARE = 0.85
# CloudWatch evaluates at most 7 days of hourly periods.
MAX_SUCCESS_WINDOW_HOURS = 168
ARCHITECTURES = {"amd64": "x86_64", "arm64": "arm64"}
_ECR_IMAGE = re.compile(r"^\d{12}\.dkr\.ecr\.[a-z0-9-]+\.amazonaws\.com(\.cn)?/")
_RATE = re.compile(r"^rate\((\d+) (minute|minutes|hour|hours|day|days)\)$")
_RATE_SECONDS = {"minute": 60, "hour": 3600, "day": 86400}
_TERMINAL = re.compile(r"_(COMPLETE|FAILED)$")
_NO_CHANGES = ("didn't contain changes", "No updates are to be performed")
POLL_SECONDS = 5.0
WAIT_SECONDS = 3600.0

Log = Callable[[str], None]
Confirm = Callable[[str], bool]


def _say(message: str) -> None:
    print(message, flush=True)


def ask(question: str) -> bool:
    """A yes/no question on the terminal; anything but y/yes is no."""
    try:
        return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")
    except EOFError:
        return False


# --- names and checks --------------------------------------------------------


@dataclass(frozen=True)
class Names:
    """The names the stack gives this job's resources, in one place."""

    stack: str
    repository: str
    topic: str
    log_group: str
    image_parameter: str
    metrics_namespace: str
    function: str

    @classmethod
    def of(cls, cfg: Config) -> Names:
        base = f"{cfg.project}-{cfg.job}"
        return cls(
            stack=base,
            repository=cfg.repository,
            topic=base,
            log_group=f"/nightshift/{cfg.project}/{cfg.job}",
            # Under the job's parameter path, which the instance may read.
            image_parameter=f"/nightshift/{cfg.project}/{cfg.job}/image",
            # One namespace per job: the instance role may write only here.
            metrics_namespace=f"nightshift/{cfg.project}/{cfg.job}",
            function=f"{base}-launcher",
        )


def check(cfg: Config) -> None:
    """Refuse settings AWS would refuse halfway through; raise ConfigError.

    The schedule, the instance type names, the log retention, the subnet IDs
    and the e-mail address are checked when the file is read
    (nightshift.config), so they never get this far.
    """
    image = cfg.job_settings.image
    if image and not _ECR_IMAGE.match(image):
        raise ConfigError(
            "job.image",
            image,
            "on AWS the instances may pull only from the job's ECR repository; "
            "leave job.image unset (the stack's repository is used)",
        )
    jobimage.job_context(cfg)


def success_window_hours(cfg: Config) -> int:
    """Hours after which no successful run means something is wrong.

    The expected gap between runs, plus the run's own budget and an hour of
    slack; capped at the 7 days a CloudWatch alarm can look back.
    """
    expression = cfg.schedule.cron
    if match := _RATE.match(expression):
        gap = int(match.group(1)) * _RATE_SECONDS[match.group(2).rstrip("s")]
    else:
        _minutes, hours, day, _month, weekday, _year = expression[5:-1].split()
        if weekday not in ("?", "*"):
            gap = 7 * 86400
        elif day not in ("?", "*"):
            # Monthly and rarer: longer than an alarm can look back.
            gap = MAX_SUCCESS_WINDOW_HOURS * 3600
        elif hours == "*" or "/" in hours or "," in hours:
            gap = 3600
        else:
            gap = 86400
    budget = (
        cfg.job_settings.pull_deadline_seconds
        + cfg.job_settings.max_run_seconds
        + cfg.job_settings.stop_grace_seconds
    )
    hours = -(-(gap + budget) // 3600) + 1
    return min(hours, MAX_SUCCESS_WINDOW_HOURS)


# --- the connection ----------------------------------------------------------


@dataclass
class Target:
    """An account, region and endpoint, and the stack of this job in it."""

    cfg: Config
    session: Any
    endpoint_url: str | None
    account: str
    names: Names

    @property
    def region(self) -> str:
        return self.session.region_name

    def client(self, service: str) -> Any:
        return self.session.client(service, endpoint_url=self.endpoint_url)

    def registry(self) -> str:
        suffix = ".cn" if self.region.startswith("cn-") else ""
        return f"{self.account}.dkr.ecr.{self.region}.amazonaws.com{suffix}"

    def topic_arn(self) -> str:
        return (
            f"arn:{self.partition}:sns:{self.region}:{self.account}:{self.names.topic}"
        )

    @property
    def partition(self) -> str:
        return self.session.get_partition_for_region(self.region)


def connect(cfg: Config, endpoint_url: str | None = None, *, log: Log = _say) -> Target:
    """Open a session for cfg's region, learn the account, and say where we are."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    endpoint = endpoint_url or cfg.aws.endpoint_url or None
    session = boto3.session.Session(region_name=cfg.aws.region)
    try:
        identity = session.client("sts", endpoint_url=endpoint).get_caller_identity()
    except (BotoCoreError, ClientError) as err:
        raise NightshiftError(
            f"cannot reach AWS in {cfg.aws.region}"
            f"{f' at {endpoint}' if endpoint else ''} ({err}); "
            "check credentials, aws.region and aws.endpoint_url"
        ) from None
    target = Target(cfg, session, endpoint, identity["Account"], Names.of(cfg))
    where = f" via {endpoint}" if endpoint else ""
    log(
        f"account {target.account}, region {target.region}, "
        f"stack {target.names.stack}{where}"
    )
    return target


def _aws_errors(what: str):
    """Turn AWS client errors into one line naming what we were doing."""
    import contextlib

    from botocore.exceptions import BotoCoreError, ClientError

    @contextlib.contextmanager
    def guard():
        try:
            yield
        except ClientError as err:
            error = err.response.get("Error", {})
            raise NightshiftError(
                f"{what}: {err.operation_name} failed: "
                f"{error.get('Code', '?')}: {error.get('Message', '')}"
            ) from None
        except BotoCoreError as err:
            raise NightshiftError(f"{what}: {err}") from None

    return guard()


def _code(err: Any) -> str:
    return err.response.get("Error", {}).get("Code", "")


# --- what the stack is given -------------------------------------------------


def aws_run_config(cfg: Config, target: Target) -> RunConfig:
    """The base run configuration of every AWS run; the launcher adds run_id."""
    names = target.names
    image = cfg.job_settings.image or f"{target.registry()}/{names.repository}:latest"
    return cfg.run_config(
        image=image,
        log={"driver": "awslogs", "group": names.log_group, "region": target.region},
        report={
            "sns_topic_arn": target.topic_arn(),
            "region": target.region,
            "metrics_namespace": names.metrics_namespace,
            "log_group": names.log_group,
        },
    )


def artifact_bucket(target: Target) -> str:
    return f"nightshift-artifacts-{target.account}-{target.region}"


def upload_launcher(target: Target, *, log: Log = _say) -> tuple[str, str]:
    """Put the launcher's zip where the stack reads it; its key is its hash.

    The zip is byte-identical for identical sources, so an unchanged launcher
    keeps its key and the stack sees no change.
    """
    from botocore.exceptions import ClientError

    from nightshift.launch import lambda_zip

    cfg = target.cfg
    path = lambda_zip(cfg.build_dir / "deploy" / "launcher.zip")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    bucket = artifact_bucket(target)
    key = f"{cfg.project}/{cfg.job}/launcher-{digest}.zip"
    s3 = target.client("s3")
    with _aws_errors(f"uploading the launcher to s3://{bucket}"):
        try:
            s3.head_bucket(Bucket=bucket)
        except ClientError as err:
            if _code(err) not in ("404", "NoSuchBucket", "NotFound"):
                raise
            log(f"creating the artifact bucket s3://{bucket}")
            create = {"Bucket": bucket}
            if target.region != "us-east-1":
                create["CreateBucketConfiguration"] = {
                    "LocationConstraint": target.region
                }
            s3.create_bucket(**create)
            s3.put_public_access_block(
                Bucket=bucket,
                PublicAccessBlockConfiguration={
                    "BlockPublicAcls": True,
                    "IgnorePublicAcls": True,
                    "BlockPublicPolicy": True,
                    "RestrictPublicBuckets": True,
                },
            )
        try:
            s3.head_object(Bucket=bucket, Key=key)
        except ClientError as err:
            if _code(err) not in ("404", "NoSuchKey", "NotFound"):
                raise
            log(f"uploading the launcher to s3://{bucket}/{key}")
            s3.upload_file(str(path), bucket, key)
    return bucket, key


def network(target: Target) -> str:
    """The VPC the runs go in: the subnets' VPC, or the region's default VPC."""
    ec2 = target.client("ec2")
    subnets = target.cfg.aws.subnets
    with _aws_errors("looking up the network"):
        if subnets:
            found = ec2.describe_subnets(SubnetIds=list(subnets))["Subnets"]
            vpcs = sorted({s["VpcId"] for s in found})
            if len(vpcs) != 1:
                raise NightshiftError(
                    f"aws.subnets: {', '.join(subnets)} are in {len(vpcs)} VPCs "
                    f"({', '.join(vpcs)}); list subnets of one VPC"
                )
            return vpcs[0]
        vpcs = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])
    if not vpcs["Vpcs"]:
        raise NightshiftError(
            f"{target.region} has no default VPC; set aws.subnets in nightshift.toml"
        )
    return vpcs["Vpcs"][0]["VpcId"]


def memory_threshold(target: Target) -> int:
    """Bytes: the memory alarm's threshold for the smallest configured type.

    Also checks that EC2 offers every type here for the configured architecture.
    """
    aws = target.cfg.aws
    ec2 = target.client("ec2")
    with _aws_errors("looking up the instance types"):
        found = ec2.describe_instance_types(InstanceTypes=list(aws.instance_types))
    types = {t["InstanceType"]: t for t in found["InstanceTypes"]}
    wanted = ARCHITECTURES[aws.architecture]
    for name in aws.instance_types:
        if name not in types:
            raise NightshiftError(
                f"aws.instance_types: {name} is not offered in {target.region}"
            )
        if wanted not in types[name]["ProcessorInfo"]["SupportedArchitectures"]:
            raise NightshiftError(
                f"aws.instance_types: {name} does not run {aws.architecture} "
                f"(aws.architecture); pick a type for {wanted}"
            )
    smallest = min(types[n]["MemoryInfo"]["SizeInMiB"] for n in aws.instance_types)
    return int(smallest * 1024 * 1024 * MEMORY_ALARM_SHARE)


def repository_managed(target: Target) -> bool:
    """Whether the stack owns the repository (False: reuse one a destroy kept)."""
    from botocore.exceptions import ClientError

    ecr = target.client("ecr")
    try:
        ecr.describe_repositories(repositoryNames=[target.names.repository])
    except ClientError as err:
        if _code(err) == "RepositoryNotFoundException":
            return True
        raise
    current = _stack(target)
    if current is None:
        return False
    return any(
        r.get("LogicalResourceId") == "Repository"
        for r in _stack_resources(target, current["StackId"])
    )


def _stack_resources(target: Target, stack_id: str) -> list[dict]:
    cfn = target.client("cloudformation")
    pages = cfn.get_paginator("list_stack_resources").paginate(StackName=stack_id)
    return [r for page in pages for r in page["StackResourceSummaries"]]


def parameters(target: Target, *, code: tuple[str, str], log: Log = _say) -> dict:
    """The stack's parameters, all derived from nightshift.toml."""
    cfg, names = target.cfg, target.names
    managed = repository_managed(target)
    if not managed:
        log(f"reusing the repository {names.repository} that an earlier destroy kept")
    return {
        "Project": cfg.project,
        "Job": cfg.job,
        "RepositoryName": names.repository,
        "CreateRepository": "true" if managed else "false",
        "KeepImages": str(cfg.aws.keep_images),
        "TopicName": names.topic,
        "NotificationEmail": cfg.aws.notification_email,
        "LogGroupName": names.log_group,
        "LogRetentionDays": str(cfg.aws.log_retention_days),
        "MetricsNamespace": names.metrics_namespace,
        "ImageParameterName": names.image_parameter,
        "InstanceType": cfg.aws.instance_types[0],
        "InstanceTypes": ",".join(cfg.aws.instance_types),
        "RootVolumeGb": str(cfg.aws.root_volume_gb),
        "VpcId": network(target),
        "SubnetIds": ",".join(cfg.aws.subnets),
        "Spot": "true" if cfg.aws.spot else "false",
        "OverlapPolicy": cfg.aws.overlap_policy,
        "RunConfig": aws_run_config(cfg, target).to_user_data(),
        "ScheduleExpression": cfg.schedule.cron,
        "ScheduleState": "ENABLED" if cfg.schedule.enabled else "DISABLED",
        "LauncherCodeBucket": code[0],
        "LauncherCodeKey": code[1],
        "SuccessWindowHours": str(success_window_hours(cfg)),
        "PeakMemoryThresholdBytes": str(memory_threshold(target)),
    }


# --- deploy ------------------------------------------------------------------


@dataclass
class Deployed:
    """What a deploy did: 'created', 'updated', 'no changes' or 'declined'."""

    result: str
    changes: list[dict[str, str]]
    outputs: dict[str, str]


def _stack(target: Target) -> dict | None:
    from botocore.exceptions import ClientError

    cfn = target.client("cloudformation")
    try:
        stacks = cfn.describe_stacks(StackName=target.names.stack)["Stacks"]
    except ClientError as err:
        if "does not exist" in err.response.get("Error", {}).get("Message", ""):
            return None
        raise
    return stacks[0] if stacks else None


# Outputs that are a resource's physical id: the fallback when Outputs are
# missing (moto 5.2 leaves them empty on stacks made through change sets).
_OUTPUT_RESOURCES = {
    "LaunchTemplateId": "LaunchTemplate",
    "LauncherFunctionName": "Launcher",
    "TopicArn": "Topic",
    "LogGroupName": "LogGroup",
    "ImageParameterName": "ImagePointer",
}


def outputs(target: Target) -> dict[str, str]:
    """The deployed stack's outputs; a missing stack says how to make one."""
    with _aws_errors(f"reading stack {target.names.stack}"):
        stack = _stack(target)
        if stack is None or stack["StackStatus"] == "REVIEW_IN_PROGRESS":
            raise NightshiftError(
                f"stack {target.names.stack} is not deployed in account "
                f"{target.account}, {target.region}; run: invoke deploy"
            )
        found = {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}
        if not all(key in found for key in _OUTPUT_RESOURCES):
            physical = {
                r.get("LogicalResourceId"): r.get("PhysicalResourceId")
                for r in _stack_resources(target, stack["StackId"])
            }
            for key, logical_id in _OUTPUT_RESOURCES.items():
                if key not in found and physical.get(logical_id):
                    found[key] = physical[logical_id]
    return found


def deploy(
    cfg: Config,
    *,
    yes: bool = False,
    endpoint_url: str | None = None,
    confirm: Confirm = ask,
    log: Log = _say,
    poll_seconds: float = POLL_SECONDS,
) -> Deployed:
    """Show the change set, ask unless yes, apply it with progress.

    An unchanged configuration makes an empty change set: "no changes".
    """
    check(cfg)
    template = TEMPLATE.read_text()
    target = connect(cfg, endpoint_url, log=log)
    cfn = target.client("cloudformation")

    with _aws_errors("preparing the deploy"):
        current = _stack(target)
        if current and current["StackStatus"] == "ROLLBACK_COMPLETE":
            raise NightshiftError(
                f"stack {target.names.stack} failed to create and was rolled back; "
                "remove it with: invoke destroy, then deploy again"
            )
        code = upload_launcher(target, log=log)
        params = parameters(target, code=code, log=log)

    kind = (
        "UPDATE"
        if current and current["StackStatus"] != "REVIEW_IN_PROGRESS"
        else "CREATE"
    )
    name = f"nightshift-{datetime.now(UTC):%Y%m%d%H%M%S}"
    with _aws_errors("creating the change set"):
        created = cfn.create_change_set(
            StackName=target.names.stack,
            ChangeSetName=name,
            ChangeSetType=kind,
            TemplateBody=template,
            Parameters=[
                {"ParameterKey": k, "ParameterValue": v} for k, v in params.items()
            ],
            Capabilities=["CAPABILITY_IAM"],
            Tags=[
                {"Key": "nightshift:project", "Value": cfg.project},
                {"Key": "nightshift:job", "Value": cfg.job},
            ],
            Description=f"nightshift deploy of {cfg.project}/{cfg.job}",
        )
        change_set = _wait_change_set(cfn, created["Id"], poll_seconds)

    if change_set["Status"] == "FAILED":
        reason = change_set.get("StatusReason", "")
        _drop_change_set(cfn, target, created["Id"], kind)
        if any(text in reason for text in _NO_CHANGES):
            log(f"no changes: stack {target.names.stack} is up to date")
            return Deployed("no changes", [], outputs(target))
        raise NightshiftError(f"the change set failed: {reason}")

    changes = [_change(c) for c in change_set.get("Changes", [])]
    log(f"{'create' if kind == 'CREATE' else 'update'} {target.names.stack}:")
    for change in changes:
        replace = " (replacement)" if change["replacement"] == "True" else ""
        log(
            f"  {change['action']:<7} {change['logical_id']:<22} "
            f"{change['type']}{replace}"
        )
    if not yes and not confirm(f"Apply these {len(changes)} changes?"):
        _drop_change_set(cfn, target, created["Id"], kind)
        log("nothing changed")
        return Deployed("declined", changes, {})

    started = datetime.now(UTC)
    with _aws_errors("applying the change set"):
        cfn.execute_change_set(ChangeSetName=created["Id"])
        status = _follow(cfn, created["StackId"], started, log, poll_seconds)
    if not status.endswith("_COMPLETE") or "ROLLBACK" in status:
        _report_failures(cfn, created["StackId"], started, log)
        raise NightshiftError(
            f"deploy failed: stack {target.names.stack} is {status}; "
            "the failed resources and their reasons are above"
        )
    result = "created" if kind == "CREATE" else "updated"
    found = outputs(target)
    log(f"{result} {target.names.stack} ({status})")
    for key in sorted(found):
        log(f"  {key}: {found[key]}")
    return Deployed(result, changes, found)


def _change(change: dict) -> dict[str, str]:
    resource = change.get("ResourceChange", {})
    return {
        "action": resource.get("Action", "?"),
        "logical_id": resource.get("LogicalResourceId", "?"),
        "type": resource.get("ResourceType", "?"),
        "replacement": str(resource.get("Replacement", "")),
    }


def _wait_change_set(cfn: Any, change_set_id: str, poll_seconds: float) -> dict:
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        found = cfn.describe_change_set(ChangeSetName=change_set_id)
        if found["Status"] in ("CREATE_COMPLETE", "FAILED"):
            return found
        if time.monotonic() > deadline:
            raise NightshiftError(f"change set {change_set_id} is still being made")
        time.sleep(poll_seconds)


def _drop_change_set(cfn: Any, target: Target, change_set_id: str, kind: str) -> None:
    """Delete an unused change set; a CREATE one leaves an empty stack to delete."""
    cfn.delete_change_set(ChangeSetName=change_set_id)
    if kind == "CREATE":
        stack = _stack(target)
        if stack and stack["StackStatus"] == "REVIEW_IN_PROGRESS":
            cfn.delete_stack(StackName=stack["StackId"])


def _events_since(cfn: Any, stack_id: str, since: datetime) -> list[dict]:
    events = []
    for page in cfn.get_paginator("describe_stack_events").paginate(StackName=stack_id):
        for event in page["StackEvents"]:
            if event["Timestamp"] < since.replace(microsecond=0):
                return list(reversed(events))
            events.append(event)
    return list(reversed(events))


def _follow(
    cfn: Any, stack_id: str, since: datetime, log: Log, poll_seconds: float
) -> str:
    """Print stack events as they come; return the final stack status."""
    seen: set[str] = set()
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        for event in _events_since(cfn, stack_id, since):
            if event["EventId"] in seen:
                continue
            seen.add(event["EventId"])
            reason = event.get("ResourceStatusReason") or ""
            log(
                f"  {event['Timestamp']:%H:%M:%S} {event['ResourceStatus']:<20} "
                f"{event['LogicalResourceId']:<22} {reason}".rstrip()
            )
        status = cfn.describe_stacks(StackName=stack_id)["Stacks"][0]["StackStatus"]
        if _TERMINAL.search(status) and not status.endswith("_IN_PROGRESS"):
            return status
        if time.monotonic() > deadline:
            raise NightshiftError(f"stack {stack_id} is still {status}; gave up")
        time.sleep(poll_seconds)


def _report_failures(cfn: Any, stack_id: str, since: datetime, log: Log) -> None:
    failed = [
        e
        for e in _events_since(cfn, stack_id, since)
        if e["ResourceStatus"].endswith("_FAILED")
    ]
    for event in failed:
        log(
            f"failed: {event['LogicalResourceId']} ({event['ResourceType']}): "
            f"{event.get('ResourceStatusReason') or 'no reason given'}"
        )


# --- the job image -----------------------------------------------------------


def push_job_image(
    cfg: Config,
    client: Any,
    *,
    endpoint_url: str | None = None,
    registry: str | None = None,
    log: Log = _say,
) -> Any:
    """Build the job image and push it to the stack's ECR repository.

    The registry login uses a token from ecr.get_authorization_token.
    `registry` overrides the ECR endpoint (the tests push to a local registry,
    because moto's ECR has no registry data plane).
    """
    import docker

    target = connect(cfg, endpoint_url, log=log)
    with _aws_errors("getting an ECR login token"):
        auth = target.client("ecr").get_authorization_token()["authorizationData"][0]
    username, _, password = (
        base64.b64decode(auth["authorizationToken"]).decode().partition(":")
    )
    address = registry or auth["proxyEndpoint"].removeprefix("https://")
    log(f"logging in to {address} as {username}")
    try:
        client.login(username=username, password=password, registry=address)
    except docker.errors.APIError as err:
        raise NightshiftError(
            f"the registry {address} refused the ECR token: {err.explanation or err}"
        ) from None
    return jobimage.build_and_push(cfg, client, registry=address, log=log)


# --- run now -----------------------------------------------------------------


def launcher_settings(target: Target) -> Any:
    """The deployed launcher's Settings, read from its Lambda environment."""
    launcher = _launcher()
    function = outputs(target)["LauncherFunctionName"]
    with _aws_errors(f"reading the launcher {function}"):
        found = target.client("lambda").get_function_configuration(
            FunctionName=function
        )
    env = found.get("Environment", {}).get("Variables", {})
    return launcher.Settings.from_env(env)


def run_now(
    cfg: Config,
    *,
    endpoint_url: str | None = None,
    dry_run: bool = False,
    log: Log = _say,
) -> Any:
    """Launch a run now, with the deployed launcher's logic and settings.

    The launcher's handle() runs here, in-process, with the settings the
    deploy gave the Lambda; so this launches exactly what a tick would.
    """
    from nightshift.launch import describe, readable_log

    launcher = _launcher()
    target = connect(cfg, endpoint_url, log=log)
    settings = launcher_settings(target)
    now = datetime.now(UTC).replace(microsecond=0)
    event = {
        "action": "launch",
        "id": f"run-now-{uuid.uuid4()}",
        "time": now.isoformat(),
    }
    clients = {name: target.client(name) for name in ("ec2", "ssm", "sns")}
    with _aws_errors("launching"):
        try:
            with readable_log(launcher):
                outcome = launcher.handle(
                    event, settings=settings, dry_run=dry_run, **clients
                )
        except launcher.LaunchError as err:
            raise NightshiftError(f"launch: {err}") from None
        except Exception as err:
            from nightshift.selection import NoImageError

            if isinstance(err, NoImageError):
                raise NightshiftError(f"launch: {err}") from None
            raise
    log(describe(outcome))
    return outcome


def _launcher() -> Any:
    from nightshift.launch import load_launcher

    return load_launcher()


# --- status and logs ---------------------------------------------------------


@dataclass
class RunStatus:
    """One run, from its record (which outlives the instance) and its instance."""

    run_id: str
    instance_id: str = ""
    image_id: str = ""
    started: datetime | None = None
    state: str = "gone"
    outcome: str = ""
    duration_seconds: float | None = None
    peak_memory_bytes: int | None = None
    reason: str = ""


def runs(target: Target, *, limit: int = 10) -> list[RunStatus]:
    """This job's recent runs, newest first."""
    names = target.names
    logs, ec2 = target.client("logs"), target.client("ec2")
    found: dict[str, RunStatus] = {}
    with _aws_errors("reading the run records"):
        streams = []
        paginator = logs.get_paginator("describe_log_streams")
        for page in paginator.paginate(
            logGroupName=names.log_group, logStreamNamePrefix="runs/"
        ):
            streams += page["logStreams"]
        for stream in streams:
            events = logs.get_log_events(
                logGroupName=names.log_group,
                logStreamName=stream["logStreamName"],
                startFromHead=False,
                limit=1,
            )["events"]
            if not events:
                continue
            try:
                record = json.loads(events[-1]["message"])
            except json.JSONDecodeError:
                continue
            run_id = record.get("run_id") or stream["logStreamName"][5:]
            found[run_id] = _from_record(run_id, record, events[-1]["timestamp"])

        reservations = ec2.describe_instances(
            Filters=[
                {"Name": "tag:nightshift:project", "Values": [target.cfg.project]},
                {"Name": "tag:nightshift:job", "Values": [target.cfg.job]},
            ]
        )["Reservations"]
    for instance in (i for r in reservations for i in r["Instances"]):
        tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
        run_id = tags.get("nightshift:run-id")
        if not run_id:
            continue
        run = found.setdefault(run_id, RunStatus(run_id, outcome="running"))
        run.instance_id = instance["InstanceId"]
        run.image_id = tags.get("nightshift:image-id", run.image_id)
        run.started = instance["LaunchTime"]
        run.state = instance["State"]["Name"]
        if run.duration_seconds is None and run.state in ("pending", "running"):
            run.duration_seconds = (datetime.now(UTC) - run.started).total_seconds()
    newest = sorted(
        found.values(),
        key=lambda r: r.started or datetime.min.replace(tzinfo=UTC),
        reverse=True,
    )
    return newest[:limit]


def _from_record(run_id: str, record: dict, timestamp_ms: int) -> RunStatus:
    timings = record.get("timings") or {}
    reported = datetime.fromtimestamp(timestamp_ms / 1000, UTC)
    # timings are the guest's uptime: reported minus uptime is about boot.
    started = None
    if isinstance(timings.get("report"), int | float):
        started = datetime.fromtimestamp(
            timestamp_ms / 1000 - timings["report"], UTC
        ).replace(microsecond=0)
    duration = None
    if "job_start" in timings and "job_end" in timings:
        duration = round(timings["job_end"] - timings["job_start"], 1)
    elif started:
        duration = (reported - started).total_seconds()
    return RunStatus(
        run_id=run_id,
        instance_id=record.get("instance_id", ""),
        image_id=record.get("image", ""),
        started=started,
        outcome=record.get("outcome", "?"),
        duration_seconds=duration,
        peak_memory_bytes=record.get("peak_memory_bytes"),
        reason=record.get("reason", ""),
    )


def status(
    cfg: Config, *, endpoint_url: str | None = None, limit: int = 10, log: Log = _say
) -> list[RunStatus]:
    """Print the job's recent runs: instance, image, started, state, outcome, …"""
    target = connect(cfg, endpoint_url, log=log)
    outputs(target)
    found = runs(target, limit=limit)
    if not found:
        log("no runs yet; start one with: invoke run-now")
        return found
    header = (
        f"{'run':<28} {'instance':<20} {'image':<22} {'started (UTC)':<20} "
        f"{'state':<11} {'outcome':<14} {'duration':>9} {'peak mem':>9}"
    )
    log(header)
    for run in found:
        started = f"{run.started:%Y-%m-%d %H:%M:%S}" if run.started else "-"
        duration = (
            f"{run.duration_seconds:.0f}s" if run.duration_seconds is not None else "-"
        )
        memory = (
            f"{run.peak_memory_bytes / 2**20:.0f}MiB"
            if run.peak_memory_bytes is not None
            else "-"
        )
        log(
            f"{run.run_id:<28} {run.instance_id or '-':<20} {run.image_id or '-':<22} "
            f"{started:<20} {run.state:<11} {run.outcome or '-':<14} "
            f"{duration:>9} {memory:>9}"
        )
    return found


def logs(
    cfg: Config,
    run_id: str | None = None,
    *,
    endpoint_url: str | None = None,
    log: Log = _say,
) -> list[str]:
    """Print one run's job output (default: the newest run) from CloudWatch Logs."""
    from botocore.exceptions import ClientError

    target = connect(cfg, endpoint_url, log=log)
    outputs(target)
    if not run_id:
        recent = runs(target, limit=1)
        if not recent:
            raise NightshiftError("no runs yet; start one with: invoke run-now")
        run_id = recent[0].run_id
    group, stream = target.names.log_group, f"{cfg.job}/{run_id}"
    log(f"run {run_id}: {group} {stream}")
    client = target.client("logs")
    lines: list[str] = []
    request = {"logGroupName": group, "logStreamName": stream, "startFromHead": True}
    try:
        while True:
            page = client.get_log_events(**request)
            for event in page["events"]:
                stamp = datetime.fromtimestamp(event["timestamp"] / 1000, UTC)
                lines.append(event["message"])
                log(f"{stamp:%H:%M:%S} {event['message']}")
            # The forward token repeats once the stream's end is reached.
            if page.get("nextForwardToken") in (None, request.get("nextToken")):
                break
            request["nextToken"] = page["nextForwardToken"]
    except ClientError as err:
        if _code(err) != "ResourceNotFoundException":
            raise NightshiftError(f"reading {group} {stream}: {err}") from None
        recent = ", ".join(r.run_id for r in runs(target, limit=5)) or "none"
        raise NightshiftError(
            f"no job output for run {run_id} in {group}; recent runs: {recent}"
        ) from None
    return lines


# --- destroy -----------------------------------------------------------------


def destroy(
    cfg: Config,
    *,
    yes: bool = False,
    purge: bool = False,
    endpoint_url: str | None = None,
    confirm: Confirm = ask,
    log: Log = _say,
    poll_seconds: float = POLL_SECONDS,
) -> bool:
    """Delete the stack; keep the AMIs and job images unless purge.  True if done."""
    target = connect(cfg, endpoint_url, log=log)
    cfn = target.client("cloudformation")
    with _aws_errors(f"reading stack {target.names.stack}"):
        stack = _stack(target)
        resources = _stack_resources(target, stack["StackId"]) if stack else []
        images = _images(target)
        repository = _repository_images(target)

    if stack is None and not purge:
        log(f"stack {target.names.stack} does not exist; nothing to destroy")
        return False
    if stack:
        log(f"delete stack {target.names.stack} ({stack['StackStatus']}):")
        for resource in resources:
            kept = " (kept)" if resource["LogicalResourceId"] == "Repository" else ""
            log(
                f"  {resource['LogicalResourceId']:<22} {resource['ResourceType']}"
                f"{'' if purge else kept}"
            )
    if purge:
        log(
            f"purge: deregister {len(images)} AMI(s) with their snapshots, delete "
            f"repository {target.names.repository} ({_count(repository)} image(s))"
        )
    else:
        log(
            f"keep: {len(images)} AMI(s) and {_count(repository)} job image(s) "
            "(remove them with --purge)"
        )
    if not yes and not confirm("Destroy?"):
        log("nothing changed")
        return False

    if stack:
        started = datetime.now(UTC)
        with _aws_errors(f"deleting stack {target.names.stack}"):
            cfn.delete_stack(StackName=stack["StackId"])
            final = _follow(cfn, stack["StackId"], started, log, poll_seconds)
        if final != "DELETE_COMPLETE":
            _report_failures(cfn, stack["StackId"], started, log)
            raise NightshiftError(
                f"destroy failed: stack {target.names.stack} is {final}; "
                "the failed resources and their reasons are above"
            )
        log(f"deleted stack {target.names.stack}")
    if purge:
        _purge(target, images, repository is not None, log)
    return True


def _count(repository: list | None) -> int:
    return len(repository) if repository is not None else 0


def _images(target: Target) -> list[dict]:
    cfg = target.cfg
    return target.client("ec2").describe_images(
        Owners=["self"],
        Filters=[
            {"Name": "tag:nightshift:project", "Values": [cfg.project]},
            {"Name": "tag:nightshift:job", "Values": [cfg.job]},
        ],
    )["Images"]


def _repository_images(target: Target) -> list | None:
    """The repository's images, or None when there is no repository."""
    from botocore.exceptions import ClientError

    try:
        return target.client("ecr").list_images(repositoryName=target.names.repository)[
            "imageIds"
        ]
    except ClientError as err:
        if _code(err) == "RepositoryNotFoundException":
            return None
        raise


def _purge(target: Target, images: list[dict], repository: bool, log: Log) -> None:
    ec2 = target.client("ec2")
    with _aws_errors("purging images"):
        for image in images:
            snapshots = [
                m["Ebs"]["SnapshotId"]
                for m in image.get("BlockDeviceMappings", [])
                if m.get("Ebs", {}).get("SnapshotId")
            ]
            ec2.deregister_image(ImageId=image["ImageId"])
            for snapshot in snapshots:
                ec2.delete_snapshot(SnapshotId=snapshot)
            log(f"deregistered {image['ImageId']} and {len(snapshots)} snapshot(s)")
        if repository:
            target.client("ecr").delete_repository(
                repositoryName=target.names.repository, force=True
            )
            log(f"deleted repository {target.names.repository} and its images")
