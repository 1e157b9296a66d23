"""Data and clients the launcher tests share (conftest holds the fixtures)."""

from __future__ import annotations

import json
from typing import Any

import boto3
from moto.core import DEFAULT_ACCOUNT_ID
from moto_support import ec2_backend, tagged_image

REGION = "eu-west-1"
PROJECT = "nightshift"
JOB = "example"
ECR = f"{DEFAULT_ACCOUNT_ID}.dkr.ecr.{REGION}.amazonaws.com"
# A scheduled event as an EventBridge rule delivers it.
TICK = {
    "version": "0",
    "id": "5f8a7c2e-0000-4000-8000-000000000001",
    "detail-type": "Scheduled Event",
    "source": "aws.events",
    "account": DEFAULT_ACCOUNT_ID,
    "time": "2026-12-03T03:00:00Z",
    "region": REGION,
    "resources": ["arn:aws:events:eu-west-1:123456789012:rule/nightshift-example"],
    "detail": {},
}


class Aws:
    """Clients against the moto server, and a hand into its EC2 backend."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=endpoint)
        self.ssm = boto3.client("ssm", region_name=REGION, endpoint_url=endpoint)
        self.sns = boto3.client("sns", region_name=REGION, endpoint_url=endpoint)
        self.sqs = boto3.client("sqs", region_name=REGION, endpoint_url=endpoint)

    @property
    def backend(self):
        return ec2_backend(REGION)

    def image(
        self,
        created: str,
        *,
        project: str = PROJECT,
        job: str = JOB,
        state: str = "available",
        owner: str | None = None,
    ) -> str:
        """An image as the bake tags it, with its date, state and owner."""
        return tagged_image(
            self.ec2, f"{project}-{job}-{created}", project=project, job=job,
            created=created, state=state, owner=owner,
        )  # fmt: skip

    def template(self) -> str:
        return self.ec2.create_launch_template(
            LaunchTemplateName=f"{PROJECT}-{JOB}",
            LaunchTemplateData={"InstanceType": "t3.micro"},
        )["LaunchTemplate"]["LaunchTemplateId"]

    def subnets(self) -> list[str]:
        subnets = self.ec2.describe_subnets()["Subnets"]
        return sorted(s["SubnetId"] for s in subnets)

    def topic_with_inbox(self) -> tuple[str, str]:
        """An SNS topic with an SQS queue subscribed, to read what was published."""
        topic = self.sns.create_topic(Name="nightshift-example")["TopicArn"]
        queue = self.sqs.create_queue(QueueName="inbox")["QueueUrl"]
        arn = self.sqs.get_queue_attributes(
            QueueUrl=queue, AttributeNames=["QueueArn"]
        )["Attributes"]["QueueArn"]
        self.sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=arn)
        return topic, queue

    def inbox(self, queue: str) -> list[dict[str, Any]]:
        messages = self.sqs.receive_message(
            QueueUrl=queue, MaxNumberOfMessages=10, WaitTimeSeconds=0
        ).get("Messages", [])
        return [json.loads(m["Body"]) for m in messages]

    def instances(self, states=("pending", "running")) -> list[dict[str, Any]]:
        pages = self.ec2.describe_instances(
            Filters=[{"Name": "instance-state-name", "Values": list(states)}]
        )["Reservations"]
        return [i for r in pages for i in r["Instances"]]

    def run_tagged(self, image_id: str, tags: dict[str, str]) -> str:
        """An instance someone launched earlier, tagged as given."""
        return self.ec2.run_instances(
            ImageId=image_id,
            MinCount=1,
            MaxCount=1,
            TagSpecifications=[
                {
                    "ResourceType": "instance",
                    "Tags": [{"Key": k, "Value": v} for k, v in tags.items()],
                }
            ],
        )["Instances"][0]["InstanceId"]
