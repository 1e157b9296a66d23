"""Data and clients the launcher tests share (conftest holds the fixtures)."""

from __future__ import annotations

import json
from typing import Any

from moto.core import DEFAULT_ACCOUNT_ID
from moto_support import REGION, MotoAws

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


class Aws(MotoAws):
    """The launcher's services on moto, and what its tests read back."""

    SERVICES = ("ec2", "ssm", "sns", "sqs")

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
