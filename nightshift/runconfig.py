"""The run configuration: what one run of the job needs, in one schema.

The same document travels three ways: the local runner hands it to its VM,
the launcher Lambda puts it in EC2 user data, and the unit inside the image
reads it at boot.  All three parse it here, so this module uses the standard
library only: it runs on the host, in the Lambda runtime and in the guest.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA_VERSION = 1
MODES = ("run", "maintenance", "smoke")
LOG_DRIVERS = ("journald", "awslogs")

# A container image reference: [registry[:port]/]path[:tag][@digest].
_IMAGE = re.compile(
    r"^(?:[a-zA-Z0-9.-]+(?::[0-9]+)?/)?"
    r"[a-z0-9]+(?:[._/-][a-z0-9]+)*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"
    r"(?:@sha256:[a-f0-9]{64})?$"
)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d)?\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class ConfigError(ValueError):
    """A value that cannot be used, with the field it came from and the fix."""

    def __init__(self, field_name: str, value: Any, allowed: str, *, message: str = ""):
        self.field = field_name
        self.value = value
        self.allowed = allowed
        super().__init__(message or f"{field_name}: {value!r} is not valid; {allowed}")


def parse_duration(field_name: str, value: Any, *, minimum: int = 1) -> int:
    """Seconds from an int or a string such as "90", "90s", "30m", "2h", "1d"."""
    if isinstance(value, bool):
        raise ConfigError(field_name, value, "use seconds or a string like '30m'")
    if isinstance(value, int):
        seconds = value
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2) or "s"]
    else:
        raise ConfigError(
            field_name, value, "use seconds or a number with s, m, h or d (e.g. '30m')"
        )
    if seconds < minimum:
        unit = "second" if minimum == 1 else "seconds"
        raise ConfigError(field_name, value, f"use at least {minimum} {unit}")
    return seconds


def check_image(field_name: str, value: Any) -> str:
    if not isinstance(value, str) or not _IMAGE.match(value):
        raise ConfigError(
            field_name,
            value,
            "use an image reference like 'registry:5000/team/job:tag'",
        )
    return value


def check_environment(field_name: str, value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ConfigError(field_name, value, "use a table of NAME = value pairs")
    env = {}
    for name, item in value.items():
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            raise ConfigError(
                f"{field_name}.{name}",
                name,
                "use letters, digits and _, not starting with a digit",
            )
        if isinstance(item, bool) or not isinstance(item, str | int | float):
            raise ConfigError(
                f"{field_name}.{name}", item, "use a string or a number as the value"
            )
        env[name] = str(item)
    return env


def check_choice(field_name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(field_name, value, f"use one of: {', '.join(choices)}")
    return value


def _optional_str(field_name: str, value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError(field_name, value, "use a string")
    return value


@dataclass(frozen=True)
class LogConfig:
    """Where the container's stdout and stderr go besides the console."""

    driver: str = "journald"
    group: str = ""
    region: str = ""

    @classmethod
    def parse(cls, data: Any, prefix: str = "log") -> LogConfig:
        data = _table(prefix, data)
        _no_unknown(prefix, data, {"driver", "group", "region"})
        driver = check_choice(
            f"{prefix}.driver", data.get("driver", "journald"), LOG_DRIVERS
        )
        group = _optional_str(f"{prefix}.group", data.get("group"))
        region = _optional_str(f"{prefix}.region", data.get("region"))
        if driver == "awslogs" and not (group and region):
            raise ConfigError(
                f"{prefix}.group", group, "awslogs needs both log.group and log.region"
            )
        return cls(driver=driver, group=group, region=region)


@dataclass(frozen=True)
class ReportConfig:
    """Where the result of a run is published; empty fields publish nothing."""

    sns_topic_arn: str = ""
    region: str = ""
    metrics_namespace: str = ""
    log_group: str = ""

    @classmethod
    def parse(cls, data: Any, prefix: str = "report") -> ReportConfig:
        data = _table(prefix, data)
        names = {"sns_topic_arn", "region", "metrics_namespace", "log_group"}
        _no_unknown(prefix, data, names)
        values = {
            name: _optional_str(f"{prefix}.{name}", data.get(name)) for name in names
        }
        if values["sns_topic_arn"] and not values["sns_topic_arn"].startswith("arn:"):
            raise ConfigError(
                f"{prefix}.sns_topic_arn", values["sns_topic_arn"], "use a topic ARN"
            )
        return cls(**values)


@dataclass(frozen=True)
class RunConfig:
    """One run: which image, with what environment, within which limits."""

    image: str
    job: str = "job"
    run_id: str = ""
    environment: dict[str, str] = field(default_factory=dict)
    command: tuple[str, ...] = ()
    mode: str = "run"
    max_run_seconds: int = 3600
    pull_deadline_seconds: int = 300
    stop_grace_seconds: int = 30
    log: LogConfig = field(default_factory=LogConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    @classmethod
    def parse(cls, data: Any) -> RunConfig:
        """Check a mapping; raise ConfigError naming the first bad field."""
        data = _table("run configuration", data)
        known = {f for f in cls.__dataclass_fields__} | {"version"}
        _no_unknown("", data, known)
        version = data.get("version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise ConfigError(
                "version", version, f"this image reads version {SCHEMA_VERSION}"
            )
        if "image" not in data:
            raise ConfigError("image", None, "set the job's image reference")
        command = data.get("command") or ()
        if not isinstance(command, list | tuple) or not all(
            isinstance(part, str) for part in command
        ):
            raise ConfigError("command", command, "use a list of strings")
        job = data.get("job", "job")
        if not isinstance(job, str) or not re.match(r"^[a-z0-9][a-z0-9-]{0,62}$", job):
            raise ConfigError("job", job, "use lowercase letters, digits and '-'")
        return cls(
            image=check_image("image", data["image"]),
            job=job,
            run_id=_optional_str("run_id", data.get("run_id")),
            environment=check_environment("environment", data.get("environment", {})),
            command=tuple(command),
            mode=check_choice("mode", data.get("mode", "run"), MODES),
            max_run_seconds=parse_duration(
                "max_run_seconds", data.get("max_run_seconds", 3600)
            ),
            pull_deadline_seconds=parse_duration(
                "pull_deadline_seconds", data.get("pull_deadline_seconds", 300)
            ),
            stop_grace_seconds=parse_duration(
                "stop_grace_seconds", data.get("stop_grace_seconds", 30)
            ),
            log=LogConfig.parse(data.get("log", {})),
            report=ReportConfig.parse(data.get("report", {})),
        )

    @classmethod
    def from_user_data(cls, raw: bytes | str) -> RunConfig:
        """Parse user data as the instance receives it (JSON text)."""
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ConfigError("user data", "<bytes>", "send UTF-8 JSON") from err
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ConfigError(
                "user data",
                raw[:60],
                f"send a JSON object ({err.msg} at line {err.lineno})",
            ) from err
        return cls.parse(data)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["command"] = list(self.command)
        return {"version": SCHEMA_VERSION, **data}

    def to_user_data(self) -> str:
        """The JSON text handed to the instance; parse(to_user_data()) == self."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))


def _table(field_name: str, data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(field_name, data, "use a table (a JSON object)")
    return data


def _no_unknown(prefix: str, data: dict[str, Any], known: set[str]) -> None:
    for name in data:
        if name not in known:
            where = f"{prefix}.{name}" if prefix else name
            raise ConfigError(
                where, data[name], f"unknown field; known: {', '.join(sorted(known))}"
            )
