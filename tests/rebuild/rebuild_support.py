"""Data, clients and the stand-in instance the rebuild tests share."""

from __future__ import annotations

import base64
import threading
import time
from typing import Any

from moto.core import DEFAULT_ACCOUNT_ID
from moto_support import JOB, REGION, MotoAws

from nightshift import agent
from nightshift.runconfig import RunConfig

PARAMETER = "/nightshift/example/image"
LOG_GROUP = "/nightshift/example"
ECR = f"{DEFAULT_ACCOUNT_ID}.dkr.ecr.{REGION}.amazonaws.com"
RUN_CONFIG = RunConfig.parse(
    {"image": f"{ECR}/nightshift/example:latest", "job": JOB, "max_run_seconds": 600}
)


class Aws(MotoAws):
    """The rebuild's services on moto, and what its tests read back."""

    SERVICES = ("ec2", "ssm", "logs")

    def snapshots(self) -> set[str]:
        found = self.ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]
        return {snapshot["SnapshotId"] for snapshot in found}

    def images(self) -> set[str]:
        return {
            i["ImageId"] for i in self.ec2.describe_images(Owners=["self"])["Images"]
        }

    def point(self, image_id: str) -> int:
        return self.ssm.put_parameter(
            Name=PARAMETER, Value=image_id, Type="String", Overwrite=True
        )["Version"]

    def pointer(self) -> tuple[str, int]:
        """The pointer's value and version; ("", 0) while it does not exist."""
        try:
            found = self.ssm.get_parameter(Name=PARAMETER)["Parameter"]
        except self.ssm.exceptions.ParameterNotFound:
            return "", 0
        return found["Value"], found["Version"]

    def state(self, instance_id: str) -> str:
        found = self.ec2.describe_instances(InstanceIds=[instance_id])
        return found["Reservations"][0]["Instances"][0]["State"]["Name"]


class FakeInstance(threading.Thread):
    """Plays the smoke instance: reads its user data, reports, terminates.

    The report goes through nightshift.agent.publish, the image's own code,
    so the gate is tested against what a real instance writes.
    """

    def __init__(
        self,
        aws: Aws,
        imds: tuple[str, dict[str, bytes]],
        *,
        outcome: str = "success",
        reason: str = "the job exited 0",
        report: bool = True,
        terminate: bool = True,
        output: tuple[str, ...] = (),
    ):
        super().__init__(daemon=True)
        self.aws, (self.imds_url, self.documents) = aws, imds
        self.outcome, self.reason = outcome, reason
        self.report, self.terminate, self.output = report, terminate, output
        self.instance: dict[str, Any] = {}
        self.config: RunConfig | None = None
        self.pointer_when_reported: str = ""
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as err:  # the test asserts on it
            self.error = err

    def _booted(self) -> dict[str, Any]:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            found = self.aws.ec2.describe_instances(
                Filters=[
                    {"Name": "tag-key", "Values": ["nightshift:run-id"]},
                    {"Name": "instance-state-name", "Values": ["pending", "running"]},
                ]
            )["Reservations"]
            if found:
                return found[0]["Instances"][0]
            time.sleep(0.1)
        raise TimeoutError("no instance was launched within 30 s")

    def _run(self) -> None:
        self.instance = self._booted()
        instance_id = self.instance["InstanceId"]
        raw = self.aws.ec2.describe_instance_attribute(
            InstanceId=instance_id, Attribute="userData"
        )["UserData"]["Value"]
        self.config = config = RunConfig.from_user_data(base64.b64decode(raw))
        time.sleep(0.5)  # the gate polls meanwhile: it must not write yet

        if self.output:
            stream = f"{config.job}/{config.run_id}"
            self.aws.logs.create_log_stream(
                logGroupName=config.log.group, logStreamName=stream
            )
            self.aws.logs.put_log_events(
                logGroupName=config.log.group,
                logStreamName=stream,
                logEvents=[
                    {"timestamp": int(time.time() * 1000), "message": line}
                    for line in self.output
                ],
            )
        self.pointer_when_reported = self.aws.pointer()[0]
        if self.report:
            self.documents["/latest/meta-data/instance-id"] = instance_id.encode()
            result = agent.Result(
                outcome=self.outcome,
                exit_code=0 if self.outcome == "success" else 1,
                reason=self.reason,
                run_id=config.run_id,
                job=config.job,
                image=config.image,
            )
            agent.publish(
                config, result.to_dict(), agent.Settings(imds_endpoint=self.imds_url)
            )
        if self.terminate:
            self.aws.ec2.terminate_instances(InstanceIds=[instance_id])
