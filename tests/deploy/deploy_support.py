"""Clients and small helpers the deploy tests share."""

from __future__ import annotations

import ast
import json
import urllib.parse
from pathlib import Path

import boto3
from moto_support import tagged_image

from nightshift import config as nsconfig
from nightshift.deploy import Names

ROOT = Path(__file__).resolve().parents[2]
REGION = "eu-west-1"
ACCOUNT = "123456789012"  # moto's default account


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
        return tagged_image(self.ec2, f"{project}-{job}-test", project=project, job=job)


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


def make_config(endpoint: str, tmp_path: Path, **sections) -> nsconfig.Config:
    """A project file like nightshift.toml, aimed at the moto server."""
    data = {
        "project": {"name": "nightshift", "job": "example"},
        "job": {
            "context": str(ROOT / "job"),
            "max_run_time": "1h",
            "environment": {"ROWS": "1000"},
        },
        "schedule": {"cron": "cron(0 3 * * ? *)", "enabled": True},
        "aws": {
            "region": REGION,
            "instance_types": ["m6i.large", "m5.large"],
            "root_volume_gb": 40,
            "notification_email": "ops@example.com",
            "log_retention_days": 14,
            "keep_images": 7,
            "endpoint_url": endpoint,
        },
        "local": {"build_dir": str(tmp_path / "build")},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return nsconfig.parse(data, root=ROOT)
