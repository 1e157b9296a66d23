"""IAM: no "*" actions, and every Resource "*" is a commented exception.

The comments are read from the template's text; the policies are read back
from IAM after a deploy to the moto server, so what is checked is what was
created.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from deploy_support import Aws, as_list

from nightshift import deploy

pytestmark = [
    pytest.mark.moto,
    pytest.mark.filterwarnings("ignore:Tried to parse AWS::"),
]
TEMPLATE = Path(__file__).resolve().parents[2] / "deploy" / "stack.yaml"
STACK = "nightshift-example"


def commented_exceptions() -> dict[str, str]:
    """Sid -> the comment above its `Resource: "*"`; fails on an uncommented one."""
    lines = TEMPLATE.read_text().splitlines()
    found = {}
    for number, line in enumerate(lines):
        if not re.match(r'^\s*Resource:\s*"\*"\s*$', line):
            continue
        sid = next(
            m.group(1)
            for previous in reversed(lines[:number])
            if (m := re.match(r"^\s*- Sid:\s*(\w+)", previous))
        )
        comment = []
        for previous in reversed(lines[:number]):
            if not previous.strip().startswith("#"):
                break
            comment.insert(0, previous.strip().lstrip("# "))
        why = " ".join(comment)
        assert why.startswith('Resource "*":') and len(why.split()) >= 8, (
            f'line {number + 1}: Resource "*" in {sid} needs a comment above it '
            'starting with: # Resource "*": <why AWS forces it>'
        )
        found[sid] = why
    return found


def test_every_star_resource_in_the_template_is_commented():
    exceptions = commented_exceptions()
    assert set(exceptions) == {"EcrLogin", "PutJobMetrics", "FindImagesAndRuns"}


@pytest.fixture
def policies(cfg, endpoint, lines) -> dict[str, dict[str, dict]]:
    """Both roles' statements by Sid, read back from IAM."""
    deploy.deploy(cfg, yes=True, log=lines, poll_seconds=0)
    aws = Aws(endpoint)
    return {
        logical: aws.role_statements(aws.physical(STACK, logical))
        for logical in ("InstanceRole", "LauncherRole")
    }


def test_no_statement_allows_star_actions(policies):
    for role, statements in policies.items():
        for sid, statement in statements.items():
            assert "NotAction" not in statement, f"{role}/{sid}"
            for action in as_list(statement["Action"]):
                assert "*" not in action, f"{role}/{sid} allows {action}"


def test_star_resources_are_only_the_commented_exceptions(policies):
    exceptions = commented_exceptions()
    for role, statements in policies.items():
        for sid, statement in statements.items():
            assert "NotResource" not in statement, f"{role}/{sid}"
            if "*" in as_list(statement["Resource"]):
                assert sid in exceptions, f'{role}/{sid} has Resource "*" uncommented'


def test_instance_role_is_scoped_to_this_job(policies, cfg):
    statements = policies["InstanceRole"]
    assert statements["PullJobImage"]["Resource"].endswith(
        ":repository/nightshift/example"
    )
    assert statements["WriteJobLogs"]["Resource"].endswith(
        ":log-group:/nightshift/nightshift/example:*"
    )
    assert statements["PublishResult"]["Resource"].endswith(":nightshift-example")
    assert statements["ReadJobParameters"]["Resource"].endswith(
        ":parameter/nightshift/nightshift/example/*"
    )
    assert statements["PutJobMetrics"]["Condition"] == {
        "StringEquals": {"cloudwatch:namespace": "nightshift/nightshift/example"}
    }


def test_launcher_role_is_scoped_to_this_job(policies, endpoint):
    aws = Aws(endpoint)
    statements = policies["LauncherRole"]
    template_id = aws.physical(STACK, "LaunchTemplate")
    run = statements["RunFromJobTemplate"]
    assert run["Condition"]["ArnLike"]["ec2:LaunchTemplate"].endswith(
        f":launch-template/{template_id}"
    )
    assert all(arn.startswith("arn:aws:ec2:eu-west-1:") for arn in run["Resource"])

    role = aws.iam.get_role(RoleName=aws.physical(STACK, "InstanceRole"))["Role"]
    assert statements["PassInstanceRole"]["Resource"] == role["Arn"]
    assert statements["TagAtLaunch"]["Condition"] == {
        "StringEquals": {"ec2:CreateAction": "RunInstances"}
    }
    assert statements["StopOwnRuns"]["Condition"]["StringEquals"] == {
        "aws:ResourceTag/nightshift:project": "nightshift",
        "aws:ResourceTag/nightshift:job": "example",
    }
    assert statements["ReadImagePointer"]["Resource"].endswith(
        ":parameter/nightshift/nightshift/example/image"
    )
    assert statements["TellTopic"]["Resource"] == aws.physical(STACK, "Topic")
