"""The laptop side of the launcher Lambda: its deployment zip and a dry run.

`invoke launch --dry-run` runs the Lambda's own code (lambda/launcher.py)
with EC2's DryRun=True, so what it prints is what the schedule would do.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import sys
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

from nightshift.errors import NightshiftError
from nightshift.runconfig import RunConfig

_PACKAGE = Path(__file__).resolve().parent
LAUNCHER = _PACKAGE.parent / "lambda" / "launcher.py"
# What the Lambda needs of ours; all stdlib-only, boto3 is in the runtime.
SHIPPED_MODULES = ("__init__.py", "runconfig.py", "selection.py")
# A fixed timestamp makes the zip byte-identical for identical sources, so the
# deploy sees a change only when the code changed.
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def load_launcher() -> ModuleType:
    """Import lambda/launcher.py (not a package: `lambda` is a keyword)."""
    name = "nightshift_launcher"
    if name in sys.modules:
        return sys.modules[name]
    if not LAUNCHER.is_file():
        raise NightshiftError(
            f"{LAUNCHER} is missing; run from a nightshift source checkout"
        )
    spec = importlib.util.spec_from_file_location(name, LAUNCHER)
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class is made.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


class _ReadableFormatter(logging.Formatter):
    """The launcher's decisions as lines for a person at a terminal.

    In Lambda they are JSON with the traceback, for CloudWatch; here the
    error is told once more by the task itself, so the traceback stays out.
    """

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        details = ", ".join(f"{key}={value}" for key, value in fields.items())
        return f"launcher: {record.getMessage()}" + (f" ({details})" if details else "")


@contextlib.contextmanager
def readable_log(launcher: ModuleType) -> Iterator[None]:
    """Within this block, the launcher logs plain lines instead of JSON."""
    saved = [(handler, handler.formatter) for handler in launcher.log.handlers]
    for handler, _ in saved:
        handler.setFormatter(_ReadableFormatter())
    try:
        yield
    finally:
        for handler, formatter in saved:
            handler.setFormatter(formatter)


def lambda_zip(path: str | Path) -> Path:
    """Write the deployment zip: launcher.py at the top, our modules below."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    files = [("launcher.py", LAUNCHER)] + [
        (f"nightshift/{name}", _PACKAGE / name) for name in SHIPPED_MODULES
    ]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for arcname, source in files:
            info = zipfile.ZipInfo(arcname, date_time=_ZIP_TIME)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, source.read_bytes())
    return path


def launch(
    *,
    project: str,
    job: str,
    launch_template_id: str,
    run_config: RunConfig,
    region: str,
    endpoint_url: str | None = None,
    image_parameter: str = "",
    subnet_ids: tuple[str, ...] = (),
    instance_types: tuple[str, ...] = (),
    spot: bool = False,
    overlap_policy: str = "skip",
    sns_topic_arn: str = "",
    scheduled_time: datetime | None = None,
    event_id: str = "",
    dry_run: bool = True,
) -> Any:
    """Run the launcher's logic from here; returns the launcher's Outcome.

    With dry_run (the default) EC2 only checks that the launch would be
    permitted; nothing is started, terminated or published.
    """
    import boto3
    from botocore.exceptions import BotoCoreError

    from nightshift.selection import NoImageError

    launcher = load_launcher()
    settings = launcher.Settings(
        project=project,
        job=job,
        launch_template_id=launch_template_id,
        run_config=run_config,
        image_parameter=image_parameter,
        subnet_ids=tuple(subnet_ids),
        instance_types=tuple(instance_types),
        spot=spot,
        overlap_policy=overlap_policy,
        sns_topic_arn=sns_topic_arn,
    )
    scheduled = scheduled_time or datetime.now(UTC).replace(microsecond=0)
    event = {
        "action": "launch",
        "id": event_id or f"laptop-{scheduled.isoformat()}",
        "time": scheduled.isoformat(),
    }
    session = boto3.session.Session(region_name=region)
    ec2, ssm, sns = (
        session.client(name, endpoint_url=endpoint_url or None)
        for name in ("ec2", "ssm", "sns")
    )
    try:
        with readable_log(launcher):
            return launcher.handle(
                event, settings=settings, ec2=ec2, ssm=ssm, sns=sns, dry_run=dry_run
            )
    except (launcher.LaunchError, NoImageError) as err:
        raise NightshiftError(f"launch: {err}") from err
    except BotoCoreError as err:
        raise NightshiftError(
            f"launch: cannot reach AWS ({err}); check credentials, region and "
            "endpoint_url"
        ) from err


def describe(outcome: Any) -> str:
    """Lines for a person: the decision, and what would be or was launched."""
    lines = [f"{outcome.decision}: {outcome.reason}"]
    if outcome.run_id:
        lines.append(f"  run id:        {outcome.run_id}")
    if outcome.image_id:
        lines.append(f"  image:         {outcome.image_id} ({outcome.image_source})")
    if outcome.instance_id:
        lines.append(f"  instance:      {outcome.instance_id}")
    request = outcome.request
    if request:
        template = request["LaunchTemplate"]
        lines += [
            f"  template:      {template['LaunchTemplateId']} {template['Version']}",
            f"  instance type: {request.get('InstanceType', '(template)')}",
            f"  subnet:        {request.get('SubnetId', '(template)')}",
            "  market:        "
            + request.get("InstanceMarketOptions", {}).get("MarketType", "on-demand"),
            f"  on shutdown:   {request['InstanceInitiatedShutdownBehavior']}",
            f"  user data:     {request['UserData']}",
        ]
    for item in outcome.terminated:
        verb = "would terminate" if outcome.dry_run else "terminated"
        lines.append(f"  {verb} {item['instance_id']}: {item['reason']}")
    for attempt in outcome.attempts:
        lines.append(f"  attempt: {attempt.placement} -> {attempt.outcome}")
    return "\n".join(lines)
