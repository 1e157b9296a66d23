"""The project file, nightshift.toml: every setting a user changes.

Values are checked here, once, with the same field checks the run
configuration uses, so a wrong value stops with one line naming the field.
"""

from __future__ import annotations

import functools
import re
import tomllib
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nightshift.runconfig import (
    ConfigError,
    LogConfig,
    ReportConfig,
    RunConfig,
    check_choice,
    check_environment,
    check_image,
    parse_duration,
)

DEFAULT_FILE = "nightshift.toml"
ACCELERATORS = ("tcg", "kvm")
ARCHITECTURES = ("amd64", "arm64")
OVERLAP_POLICIES = ("skip", "replace", "allow")
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
# EventBridge: cron(min hour day-of-month month day-of-week year) or rate(n unit).
_CRON = re.compile(r"^cron\((?P<fields>[^()]*)\)$")
_RATE = re.compile(r"^rate\((?P<n>\d+) (?P<unit>minute|hour|day)(?P<plural>s?)\)$")
_MONTHS = "JAN|FEB|MAR|APR|MAY|JUN|JUL|AUG|SEP|OCT|NOV|DEC"
_DAYS = "SUN|MON|TUE|WED|THU|FRI|SAT"
# Each cron field: its name, the values a number may take, and the extra
# words and marks EventBridge accepts there (its "Cron expressions" table).
_CRON_FIELDS = (
    ("minutes", 0, 59, ""),
    ("hours", 0, 23, ""),
    ("day-of-month", 1, 31, r"\?|L|LW|\d{1,2}W"),
    ("month", 1, 12, _MONTHS),
    ("day-of-week", 1, 7, rf"\?|L|\d#[1-5]|{_DAYS}|\dL"),
    ("year", 1970, 2199, ""),
)


@dataclass(frozen=True)
class JobSettings:
    context: str = "job"
    image: str = ""
    environment: dict[str, str] = field(default_factory=dict)
    max_run_seconds: int = 3600
    pull_deadline_seconds: int = 300
    stop_grace_seconds: int = 30


@dataclass(frozen=True)
class ScheduleSettings:
    cron: str = "cron(0 3 * * ? *)"
    enabled: bool = True


@dataclass(frozen=True)
class AwsSettings:
    region: str = "eu-west-1"
    architecture: str = "amd64"
    instance_types: tuple[str, ...] = ("m6i.large",)
    root_volume_gb: int = 30
    spot: bool = False
    overlap_policy: str = "skip"
    subnets: tuple[str, ...] = ()
    notification_email: str = ""
    log_retention_days: int = 30
    keep_images: int = 10
    endpoint_url: str = ""


@dataclass(frozen=True)
class LocalSettings:
    accelerator: str = "tcg"
    memory_mb: int = 2048
    cpus: int = 2
    registry_port: int = 5000
    build_dir: str = "build"


@dataclass(frozen=True)
class Config:
    project: str = "nightshift"
    job: str = "example"
    job_settings: JobSettings = field(default_factory=JobSettings)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    aws: AwsSettings = field(default_factory=AwsSettings)
    local: LocalSettings = field(default_factory=LocalSettings)
    root: Path = Path(".")

    @property
    def build_dir(self) -> Path:
        return (self.root / self.local.build_dir).resolve()

    @property
    def local_registry(self) -> str:
        """The registry as the host pushes to it."""
        return f"127.0.0.1:{self.local.registry_port}"

    @property
    def guest_registry(self) -> str:
        """The same registry as a local VM reaches it (qemu's user network)."""
        return f"10.0.2.2:{self.local.registry_port}"

    @property
    def repository(self) -> str:
        return f"{self.project}/{self.job}"

    def local_image(self) -> str:
        """The job image reference a local VM pulls."""
        return (
            self.job_settings.image or f"{self.guest_registry}/{self.repository}:latest"
        )

    def run_config(self, *, image: str | None = None, **overrides: Any) -> RunConfig:
        """The run configuration for one local run (the unit's input)."""
        settings = self.job_settings
        data = {
            "image": image or self.local_image(),
            "job": self.job,
            "environment": dict(settings.environment),
            "max_run_seconds": settings.max_run_seconds,
            "pull_deadline_seconds": settings.pull_deadline_seconds,
            "stop_grace_seconds": settings.stop_grace_seconds,
            "log": asdict(LogConfig()),
            "report": asdict(ReportConfig()),
        }
        data.update(overrides)
        return RunConfig.parse(data)

    def as_file(self) -> dict[str, Any]:
        """The resolved settings under the names nightshift.toml uses."""
        job = self.job_settings
        aws = asdict(self.aws)
        aws["instance_types"] = list(aws["instance_types"])
        aws["subnets"] = list(aws["subnets"])
        return {
            "project": {"name": self.project, "job": self.job},
            "job": {
                "context": job.context,
                "image": job.image,
                "environment": dict(job.environment),
                "max_run_time": format_duration(job.max_run_seconds),
                "pull_deadline": format_duration(job.pull_deadline_seconds),
                "stop_grace": format_duration(job.stop_grace_seconds),
            },
            "schedule": asdict(self.schedule),
            "aws": aws,
            "local": asdict(self.local),
        }


def load(path: str | Path | None = None) -> Config:
    """Read and check the project file; a missing file gives the defaults."""
    path = Path(path or DEFAULT_FILE)
    if path.exists():
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(
                str(path),
                None,
                "fix the TOML syntax",
                message=f"{path}: not valid TOML: {err}; fix the syntax there",
            ) from None
    else:
        data = {}
    return parse(data, root=path.resolve().parent)


def parse(data: dict[str, Any], *, root: Path = Path(".")) -> Config:
    sections = {"project", "job", "schedule", "aws", "local"}
    for name in data:
        if name not in sections:
            raise ConfigError(
                name,
                data[name],
                f"unknown section; known: {', '.join(sorted(sections))}",
            )
    project = _section(data, "project", {"name", "job"})
    job = _section(
        data,
        "job",
        {
            "context",
            "image",
            "environment",
            "max_run_time",
            "pull_deadline",
            "stop_grace",
        },
    )
    schedule = _section(data, "schedule", {"cron", "enabled"})
    aws = _section(data, "aws", {f for f in AwsSettings.__dataclass_fields__})
    local = _section(data, "local", {f for f in LocalSettings.__dataclass_fields__})

    defaults = JobSettings()
    job_settings = JobSettings(
        context=_string("job.context", job.get("context", defaults.context)),
        image=check_image("job.image", job["image"]) if job.get("image") else "",
        environment=check_environment("job.environment", job.get("environment", {})),
        max_run_seconds=parse_duration(
            "job.max_run_time", job.get("max_run_time", defaults.max_run_seconds)
        ),
        pull_deadline_seconds=parse_duration(
            "job.pull_deadline",
            job.get("pull_deadline", defaults.pull_deadline_seconds),
        ),
        stop_grace_seconds=parse_duration(
            "job.stop_grace", job.get("stop_grace", defaults.stop_grace_seconds)
        ),
    )

    cron = check_schedule("schedule.cron", schedule.get("cron", ScheduleSettings.cron))

    aws_defaults = AwsSettings()
    instance_types = aws.get("instance_types", aws_defaults.instance_types)
    if not isinstance(instance_types, list | tuple):
        raise ConfigError(
            "aws.instance_types", instance_types, "use a list, e.g. ['m6i.large']"
        )
    instance_types = tuple(instance_types)
    if not instance_types:
        raise ConfigError("aws.instance_types", [], "list at least one instance type")
    for name in instance_types:
        check_instance_type("aws.instance_types", name)

    local_defaults = LocalSettings()
    return Config(
        project=_name("project.name", project.get("name", "nightshift")),
        job=_name("project.job", project.get("job", "example")),
        job_settings=job_settings,
        schedule=ScheduleSettings(
            cron=cron, enabled=_bool("schedule.enabled", schedule.get("enabled", True))
        ),
        aws=AwsSettings(
            region=_region("aws.region", aws.get("region", aws_defaults.region)),
            architecture=check_choice(
                "aws.architecture",
                aws.get("architecture", aws_defaults.architecture),
                ARCHITECTURES,
            ),
            instance_types=instance_types,
            root_volume_gb=_int(
                "aws.root_volume_gb", aws.get("root_volume_gb", 30), 8, 16384
            ),
            spot=_bool("aws.spot", aws.get("spot", False)),
            overlap_policy=check_choice(
                "aws.overlap_policy",
                aws.get("overlap_policy", "skip"),
                OVERLAP_POLICIES,
            ),
            subnets=tuple(_subnet("aws.subnets", s) for s in aws.get("subnets", ())),
            notification_email=_email(
                "aws.notification_email", aws.get("notification_email", "")
            ),
            log_retention_days=_retention(
                "aws.log_retention_days", aws.get("log_retention_days", 30)
            ),
            keep_images=_int("aws.keep_images", aws.get("keep_images", 10), 1, 1000),
            endpoint_url=check_endpoint_url(
                "aws.endpoint_url", aws.get("endpoint_url", "")
            ),
        ),
        local=LocalSettings(
            accelerator=check_choice(
                "local.accelerator", local.get("accelerator", "tcg"), ACCELERATORS
            ),
            memory_mb=_int("local.memory_mb", local.get("memory_mb", 2048), 512, 65536),
            cpus=_int("local.cpus", local.get("cpus", 2), 1, 64),
            registry_port=_int(
                "local.registry_port", local.get("registry_port", 5000), 1024, 65535
            ),
            build_dir=_string(
                "local.build_dir", local.get("build_dir", local_defaults.build_dir)
            ),
        ),
        root=root,
    )


def _section(data: dict[str, Any], name: str, known: set[str]) -> dict[str, Any]:
    section = data.get(name, {})
    if not isinstance(section, dict):
        raise ConfigError(name, section, "use a [section] table")
    for key in section:
        if key not in known:
            raise ConfigError(
                f"{name}.{key}",
                section[key],
                f"unknown setting; known: {', '.join(sorted(known))}",
            )
    return section


def _string(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(name, value, "use a string")
    return value


def _name(name: str, value: Any) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ConfigError(
            name, value, "use lowercase letters, digits and '-' (at most 63)"
        )
    return value


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(name, value, "use true or false")
    return value


def _subnet(name: str, value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"subnet-[0-9a-f]+", value):
        raise ConfigError(name, value, "use subnet IDs like 'subnet-0abc1234'")
    return value


def _email(name: str, value: Any) -> str:
    text = _string(name, value)
    if text and not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", text):
        raise ConfigError(name, value, "use an address like 'ops@example.com', or ''")
    return text


# The periods CloudWatch Logs accepts for a log group's retention; anything
# else the API refuses only after the stack has started changing.
LOG_RETENTION_DAYS = (
    1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827,
    2192, 2557, 2922, 3288, 3653,
)  # fmt: skip


def _retention(name: str, value: Any) -> int:
    if isinstance(value, bool) or value not in LOG_RETENTION_DAYS:
        allowed = ", ".join(map(str, LOG_RETENTION_DAYS))
        raise ConfigError(name, value, f"use one of CloudWatch's periods: {allowed}")
    return value


def _int(name: str, value: Any, low: int, high: int) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not low <= value <= high
    ):
        raise ConfigError(name, value, f"use a whole number from {low} to {high}")
    return value


def _region(name: str, value: Any) -> str:
    if not isinstance(value, str) or not re.match(r"^[a-z]{2}(-[a-z]+)+-\d$", value):
        raise ConfigError(name, value, "use an AWS region name like 'eu-west-1'")
    return value


def format_duration(seconds: int) -> str:
    """Seconds in the largest unit that holds them exactly: 3600 -> '1h'."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def check_schedule(name: str, value: Any) -> str:
    """An EventBridge schedule expression, checked field by field.

    EventBridge would refuse a bad one only at deploy time, halfway through a
    stack update; here it stops before any AWS call.
    """
    expression = _string(name, value).strip()
    usage = "use EventBridge's form: 'cron(0 3 * * ? *)' (six fields) or 'rate(1 day)'"
    rate = _RATE.match(expression)
    if rate:
        count = int(rate["n"])
        if count < 1 or (count == 1) == bool(rate["plural"]):
            raise ConfigError(
                name, expression, "use 'rate(1 day)' or 'rate(2 days)': n >= 1, "
                "singular unit for 1 and plural otherwise",
            )  # fmt: skip
        return expression
    cron = _CRON.match(expression)
    fields = cron["fields"].split() if cron else []
    if len(fields) != len(_CRON_FIELDS):
        raise ConfigError(name, expression, usage)
    for text, (label, low, high, words) in zip(fields, _CRON_FIELDS, strict=True):
        if not _cron_field_ok(text.upper(), low, high, words):
            raise ConfigError(
                name, expression,
                f"its {label} field {text!r} is out of range; use {low}-{high}, "
                "'*', ',', '-' or '/' (EventBridge's cron fields)",
            )  # fmt: skip
    if (fields[2] == "?") == (fields[4] == "?"):
        raise ConfigError(
            name, expression,
            "put '?' in exactly one of day-of-month and day-of-week, "
            "e.g. 'cron(0 3 * * ? *)'",
        )  # fmt: skip
    return expression


def _cron_field_ok(text: str, low: int, high: int, words: str) -> bool:
    if words and re.fullmatch(words, text):
        return True
    for part in text.split(","):
        base, _, step = part.partition("/")
        if step and not (step.isdigit() and int(step) >= 1):
            return False
        if base == "*":
            continue
        for end in base.split("-", 1):
            if end.isdigit():
                if not low <= int(end) <= high:
                    return False
            elif not (words and re.fullmatch(words, end)):
                return False
    return True


def check_endpoint_url(name: str, value: Any) -> str:
    """Empty (AWS itself) or an http(s) URL such as a moto server's."""
    url = _string(name, value)
    if not url:
        return url
    parts = urllib.parse.urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        parts = parts._replace(netloc="")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            name, url, "use an http(s) URL like 'http://127.0.0.1:5001', or leave empty"
        )
    return url


@functools.cache
def instance_type_names() -> frozenset[str]:
    """Every EC2 instance type name the installed botocore knows; no AWS call."""
    import botocore.session  # 0.2 s with the model: paid once, when a file is read

    model = botocore.session.get_session().get_service_model("ec2")
    return frozenset(model.shape_for("InstanceType").enum)


def check_instance_type(field_name: str, name: Any) -> None:
    """Refuse a name EC2 does not have, listing its family's sizes when known."""
    known = instance_type_names()
    if isinstance(name, str) and name in known:
        return
    family = str(name).split(".")[0]
    close = sorted(t for t in known if t.split(".")[0] == family)
    hint = f"; {family} has: {', '.join(close)}" if close else ", like 'm6i.large'"
    raise ConfigError(field_name, name, f"use an EC2 instance type name{hint}")
