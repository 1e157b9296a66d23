"""Clients and small helpers the deploy tests share."""

from __future__ import annotations

import ast
import json
import urllib.parse

import boto3
from conftest import REGION

from nightshift.deploy import Names


class Aws:
    """boto3 clients against the moto server, one attribute per service."""

    SERVICES = (
        "cloudformation", "ec2", "ecr", "iam", "lambda", "logs", "sns", "ssm",
        "events", "s3", "cloudwatch",
    )  # fmt: skip

    def __init__(self, endpoint: str):
        for service in self.SERVICES:
            client = boto3.client(service, region_name=REGION, endpoint_url=endpoint)
            setattr(self, service.replace("lambda", "awslambda"), client)

    def resources(self, stack: str) -> dict[str, dict]:
        """The stack's resources by logical id, as CloudFormation lists them."""
        found = self.cloudformation.list_stack_resources(StackName=stack)
        return {r["LogicalResourceId"]: r for r in found["StackResourceSummaries"]}

    def physical(self, stack: str, logical_id: str) -> str:
        return self.resources(stack)[logical_id]["PhysicalResourceId"]

    def role_statements(self, role_name: str) -> dict[str, dict]:
        """Every inline policy statement of a role, by Sid, as IAM returns it."""
        statements = {}
        for policy in self.iam.list_role_policies(RoleName=role_name)["PolicyNames"]:
            document = self.iam.get_role_policy(RoleName=role_name, PolicyName=policy)
            policy_document = document["PolicyDocument"]
            if isinstance(policy_document, str):
                policy_document = _policy(policy_document)
            for statement in policy_document["Statement"]:
                statements[statement["Sid"]] = statement
        return statements

    def register_image(self, project: str = "nightshift", job: str = "example") -> str:
        """A baked image as the bake tags it (available, owned by us)."""
        image_id = self.ec2.register_image(
            Name=f"{project}-{job}-test",
            RootDeviceName="/dev/xvda",
            BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {"VolumeSize": 8}}],
        )["ImageId"]
        self.ec2.create_tags(
            Resources=[image_id],
            Tags=[
                {"Key": "nightshift:project", "Value": project},
                {"Key": "nightshift:job", "Value": job},
            ],
        )
        return image_id


def _policy(text: str) -> dict:
    """A policy document IAM sent as text.

    AWS sends URL-encoded JSON (boto3 decodes it); moto 5.2 stores inline
    policies from CloudFormation as a Python dict's repr and sends that.
    """
    text = urllib.parse.unquote(text)
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return ast.literal_eval(text)


def names(cfg) -> Names:
    return Names.of(cfg)


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]
