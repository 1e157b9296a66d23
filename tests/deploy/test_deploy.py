"""deploy and destroy against a moto server: what the stack makes, checked via APIs.

moto 5.2 gaps, checked from the stack's template (GetTemplate) plus its
parameters instead: CloudWatch alarms, the Logs metric filter and the
Lambda EventInvokeConfig (no CloudFormation support: moto skips them), the
ECR lifecycle policy and scan-on-push (moto's CloudFormation ignores the
first and stores the second under a key its API does not read).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from deploy_support import Aws, make_config, names
from moto.ecr.models import ecr_backends

from nightshift import deploy

pytestmark = [
    pytest.mark.moto,
    pytest.mark.filterwarnings("ignore:Tried to parse AWS::"),
]
ROOT = Path(__file__).resolve().parents[2]
STACK = "nightshift-example"


@pytest.fixture
def aws(endpoint) -> Aws:
    return Aws(endpoint)


@pytest.fixture
def deployed(cfg, lines):
    return deploy.deploy(cfg, yes=True, log=lines, poll_seconds=0)


def _template(aws: Aws) -> dict:
    """The deployed template as CloudFormation returns it, tags kept as text."""

    class Loader(yaml.SafeLoader):
        pass

    def tagged(loader, tag, node):
        if isinstance(node, yaml.ScalarNode):
            return {tag: loader.construct_scalar(node)}
        if isinstance(node, yaml.SequenceNode):
            return {tag: loader.construct_sequence(node, deep=True)}
        return {tag: loader.construct_mapping(node, deep=True)}

    Loader.add_multi_constructor("!", tagged)
    body = aws.cloudformation.get_template(StackName=STACK)["TemplateBody"]
    return body if isinstance(body, dict) else yaml.load(body, Loader=Loader)


def _fn(value: dict, name: str):
    """An intrinsic function's argument, in short (!Sub) or long (Fn::Sub) form."""
    for key in (f"!{name}", f"Fn::{name}", name):
        if key in value:
            return value[key]
    raise KeyError(f"{name} in {value}")


def _parameters(aws: Aws) -> dict[str, str]:
    stack = aws.cloudformation.describe_stacks(StackName=STACK)["Stacks"][0]
    return {p["ParameterKey"]: p["ParameterValue"] for p in stack["Parameters"]}


def test_deploy_says_where_and_what_changes(deployed, lines):
    """The account, region and stack come first, then the change set."""
    assert lines[0].startswith("account 123456789012, region eu-west-1, stack " + STACK)
    assert deployed.result == "created"
    listed = {c["logical_id"] for c in deployed.changes}
    assert {"LaunchTemplate", "Launcher", "InstanceRole", "NoSuccessAlarm"} <= listed
    assert any(line.strip().startswith("Add     LaunchTemplate") for line in lines)


def test_repository(deployed, aws, cfg):
    """ECR repository named project/job, tags, scan on push, newest N kept."""
    repo = aws.ecr.describe_repositories(repositoryNames=[cfg.repository])
    assert repo["repositories"][0]["imageTagMutability"] == "MUTABLE"
    stored = ecr_backends["123456789012"]["eu-west-1"].repositories[cfg.repository]
    assert stored.image_scanning_configuration == {"ScanOnPush": True}

    properties = _template(aws)["Resources"]["Repository"]["Properties"]
    policy = _fn(properties["LifecyclePolicy"]["LifecyclePolicyText"], "Sub")
    keep = _parameters(aws)["KeepImages"]
    rendered = json.loads(policy.replace("${KeepImages}", keep))
    rule = rendered["rules"][0]
    assert rule["selection"]["countType"] == "imageCountMoreThan"
    assert rule["selection"]["countNumber"] == cfg.aws.keep_images == 7
    assert rule["action"] == {"type": "expire"}


def test_launch_template(deployed, aws, cfg):
    """Instance type, encrypted gp3 root, IMDSv2 with hop limit 2, terminate."""
    resources = aws.resources(STACK)
    template_id = resources["LaunchTemplate"]["PhysicalResourceId"]
    version = aws.ec2.describe_launch_template_versions(LaunchTemplateId=template_id)
    data = version["LaunchTemplateVersions"][0]["LaunchTemplateData"]
    assert data["InstanceType"] == "m6i.large"
    assert data["InstanceInitiatedShutdownBehavior"] == "terminate"
    assert data["BlockDeviceMappings"] == [
        {
            "DeviceName": "/dev/xvda",
            "Ebs": {
                "Encrypted": True,
                "DeleteOnTermination": True,
                "VolumeSize": 40,
                "VolumeType": "gp3",
            },
        }
    ]
    metadata = data["MetadataOptions"]
    assert metadata["HttpTokens"] == "required"
    assert metadata["HttpPutResponseHopLimit"] == 2
    profile = resources["InstanceProfile"]["PhysicalResourceId"]
    arn = aws.iam.get_instance_profile(InstanceProfileName=profile)
    assert data["IamInstanceProfile"]["Arn"] == arn["InstanceProfile"]["Arn"]
    assert data["SecurityGroupIds"] == [
        resources["SecurityGroup"]["PhysicalResourceId"]
    ]
    # The launcher owns these; the template must not set them.
    assert "NetworkInterfaces" not in data and "TagSpecifications" not in data


def test_security_group_has_no_ingress(deployed, aws):
    group_id = aws.physical(STACK, "SecurityGroup")
    group = aws.ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0]
    assert group["IpPermissions"] == []
    default_vpc = aws.ec2.describe_vpcs(
        Filters=[{"Name": "isDefault", "Values": ["true"]}]
    )["Vpcs"][0]["VpcId"]
    assert group["VpcId"] == default_vpc


def test_topic_logs_and_pointer(deployed, aws, cfg):
    """Topic with the e-mail subscription, log groups with retention, pointer."""
    topic = aws.physical(STACK, "Topic")
    subscriptions = aws.sns.list_subscriptions_by_topic(TopicArn=topic)
    assert [(s["Protocol"], s["Endpoint"]) for s in subscriptions["Subscriptions"]] == [
        ("email", "ops@example.com")
    ]
    groups = {
        g["logGroupName"]: g.get("retentionInDays")
        for g in aws.logs.describe_log_groups()["logGroups"]
    }
    assert groups == {
        names(cfg).log_group: 14,
        "/aws/lambda/nightshift-example-launcher": 14,
    }
    pointer = aws.ssm.get_parameter(Name=names(cfg).image_parameter)["Parameter"]
    # The launcher strips it to empty: "the newest tagged image".
    assert pointer["Value"].strip() == ""


def test_schedule_and_reaper_rules(deployed, aws):
    function_arn = aws.awslambda.get_function(
        FunctionName=aws.physical(STACK, "Launcher")
    )["Configuration"]["FunctionArn"]
    schedule = aws.events.describe_rule(Name="nightshift-example-schedule")
    assert schedule["ScheduleExpression"] == "cron(0 3 * * ? *)"
    assert schedule["State"] == "ENABLED"
    [target] = aws.events.list_targets_by_rule(Rule=schedule["Name"])["Targets"]
    assert target["Arn"] == function_arn and "Input" not in target

    reaper = aws.events.describe_rule(Name="nightshift-example-reaper")
    assert reaper["State"] == "ENABLED"
    [target] = aws.events.list_targets_by_rule(Rule=reaper["Name"])["Targets"]
    assert json.loads(target["Input"]) == {"action": "reap"}

    policy = json.loads(aws.awslambda.get_policy(FunctionName=function_arn)["Policy"])
    sources = {
        s["Condition"]["ArnLike"]["AWS:SourceArn"]
        for s in policy["Statement"]
        if s["Principal"] == {"Service": "events.amazonaws.com"}
    }
    assert sources == {schedule["Arn"], reaper["Arn"]}


def test_launcher_function_settings(deployed, aws, cfg):
    """The Lambda's environment is what the launcher reads, and it parses."""
    from nightshift.launch import load_launcher

    config = aws.awslambda.get_function_configuration(
        FunctionName="nightshift-example-launcher"
    )
    assert config["Runtime"] == "python3.12"
    assert config["Handler"] == "launcher.handler"
    settings = load_launcher().Settings.from_env(config["Environment"]["Variables"])
    assert settings.launch_template_id == aws.physical(STACK, "LaunchTemplate")
    assert settings.instance_types == ("m6i.large", "m5.large")
    assert settings.image_parameter == names(cfg).image_parameter
    assert settings.sns_topic_arn == aws.physical(STACK, "Topic")
    run = settings.run_config
    assert run.image == (
        "123456789012.dkr.ecr.eu-west-1.amazonaws.com/nightshift/example:latest"
    )
    assert (run.log.driver, run.log.group) == ("awslogs", names(cfg).log_group)
    assert run.report.metrics_namespace == names(cfg).metrics_namespace
    assert run.report.sns_topic_arn == settings.sns_topic_arn


def test_what_moto_skips_is_in_the_template(deployed, aws):
    """Alarms, the reaped metric filter and zero async retries, as deployed."""
    resources = _template(aws)["Resources"]
    parameters = _parameters(aws)
    assert resources["LauncherInvokeConfig"]["Properties"]["MaximumRetryAttempts"] == 0

    alarms = {
        name: r["Properties"]
        for name, r in resources.items()
        if r["Type"] == "AWS::CloudWatch::Alarm"
    }
    assert set(alarms) == {
        "RunFailedAlarm", "NoSuccessAlarm", "OverTimeAlarm", "PeakMemoryAlarm",
    }  # fmt: skip
    assert alarms["RunFailedAlarm"]["MetricName"] == "RunFailed"
    silent = alarms["NoSuccessAlarm"]
    assert (silent["MetricName"], silent["TreatMissingData"]) == (
        "RunSucceeded",
        "breaching",
    )
    assert silent["ComparisonOperator"] == "LessThanThreshold"
    # Daily at 03:00 plus a 1 h 5 min 30 s budget and an hour of slack.
    assert parameters["SuccessWindowHours"] == "27"
    assert alarms["PeakMemoryAlarm"]["MetricName"] == "PeakMemoryBytes"
    # 85 % of 8 GiB, the smaller of m6i.large and m5.large.
    assert parameters["PeakMemoryThresholdBytes"] == str(int(8192 * 2**20 * 0.85))
    over_time = alarms["OverTimeAlarm"]
    assert over_time["MetricName"] == "InstancesReaped"
    transform = resources["ReapedMetric"]["Properties"]["MetricTransformations"][0]
    assert transform["MetricName"] == "InstancesReaped"
    assert '"reaped"' in resources["ReapedMetric"]["Properties"]["FilterPattern"]
    for alarm in alarms.values():
        assert [_fn(a, "Ref") for a in alarm["AlarmActions"]] == ["Topic"]


def test_second_deploy_changes_nothing(deployed, aws, cfg, lines):
    before = aws.cloudformation.describe_stack_events(StackName=STACK)["StackEvents"]
    again = deploy.deploy(cfg, yes=True, log=lines, poll_seconds=0)
    assert again.result == "no changes"
    assert "no changes: stack nightshift-example is up to date" in lines
    # The empty change set was deleted, not left behind.
    summaries = aws.cloudformation.list_change_sets(StackName=STACK)["Summaries"]
    assert [s for s in summaries if s["ExecutionStatus"] != "EXECUTE_COMPLETE"] == []
    after = aws.cloudformation.describe_stack_events(StackName=STACK)["StackEvents"]
    assert len(after) == len(before)


def test_changed_setting_updates_the_stack(deployed, aws, endpoint, tmp_path, lines):
    """Pausing the schedule is an update: the rule is disabled, nothing else goes."""
    paused = make_config(endpoint, tmp_path, schedule={"enabled": False})
    result = deploy.deploy(paused, yes=True, log=lines, poll_seconds=0)
    assert result.result == "updated"
    rule = aws.events.describe_rule(Name="nightshift-example-schedule")
    assert rule["State"] == "DISABLED"


def test_declining_changes_nothing(cfg, aws, lines):
    result = deploy.deploy(cfg, confirm=lambda question: False, log=lines)
    assert result.result == "declined"
    assert "nothing changed" in lines
    assert aws.ecr.describe_repositories()["repositories"] == []
    stacks = aws.cloudformation.list_stacks()["StackSummaries"]
    assert all(s["StackStatus"] == "DELETE_COMPLETE" for s in stacks)


def test_a_failed_deploy_says_why(cfg, aws, lines):
    """A resource that cannot be made stops the deploy with its reason."""
    aws.ssm.put_parameter(Name=names(cfg).image_parameter, Value="x", Type="String")
    with pytest.raises(deploy.NightshiftError) as failed:
        deploy.deploy(cfg, yes=True, log=lines, poll_seconds=0)
    assert "ParameterAlreadyExists" in str(failed.value) or "exists" in str(
        failed.value
    )
    assert "\n" not in str(failed.value)


def test_destroy_keeps_images_unless_purged(deployed, aws, cfg, lines, endpoint):
    image_id = aws.register_image()
    assert deploy.destroy(cfg, yes=True, log=lines, poll_seconds=0)
    assert any(line.startswith("keep: 1 AMI(s)") for line in lines)
    assert aws.cloudformation.list_stack_resources  # the client still works
    stacks = aws.cloudformation.list_stacks()["StackSummaries"]
    assert {s["StackStatus"] for s in stacks} == {"DELETE_COMPLETE"}
    assert aws.events.list_rules()["Rules"] == []
    assert aws.sns.list_topics()["Topics"] == []
    assert aws.ec2.describe_launch_templates()["LaunchTemplates"] == []
    assert aws.awslambda.list_functions()["Functions"] == []
    assert aws.logs.describe_log_groups()["logGroups"] == []
    assert not any(
        r["RoleName"].startswith(STACK) for r in aws.iam.list_roles()["Roles"]
    )
    assert aws.ssm.describe_parameters()["Parameters"] == []
    # Kept: the job images' repository and the AMI.
    assert [
        r["repositoryName"] for r in aws.ecr.describe_repositories()["repositories"]
    ] == [cfg.repository]
    assert aws.ec2.describe_images(ImageIds=[image_id])["Images"]

    # A new deploy reuses the kept repository instead of failing on it.
    again = deploy.deploy(cfg, yes=True, log=lines, poll_seconds=0)
    assert again.result == "created"
    assert "reusing the repository nightshift/example" in lines.text

    assert deploy.destroy(cfg, yes=True, purge=True, log=lines, poll_seconds=0)
    assert aws.ecr.describe_repositories()["repositories"] == []
    assert aws.ec2.describe_images(Owners=["self"])["Images"] == []


def test_destroy_asks_first(deployed, aws, cfg, lines):
    assert not deploy.destroy(cfg, confirm=lambda question: False, log=lines)
    assert aws.cloudformation.describe_stacks(StackName=STACK)["Stacks"]


@pytest.mark.parametrize(
    ("section", "values", "field"),
    [
        ("schedule", {"cron": "cron(0 3 * * * *)"}, "schedule.cron"),
        ("schedule", {"cron": "cron(0 25 * * ? *)"}, "schedule.cron"),
        ("schedule", {"cron": "rate(1 days)"}, "schedule.cron"),
        ("aws", {"instance_types": ["m6i.huge"]}, "aws.instance_types"),
        ("aws", {"log_retention_days": 10}, "aws.log_retention_days"),
        ("job", {"image": "127.0.0.1:5000/nightshift/example:v1"}, "job.image"),
        ("job", {"context": "/nonexistent"}, "job.context"),
    ],
)
def test_config_errors_stop_before_any_aws_call(
    section, values, field, tmp_path, monkeypatch
):
    """One line naming the field; boto3 is never even asked for a session.

    A bad schedule or instance type stops when the file is read, the others in
    deploy's checks.
    """
    import boto3.session

    def no_aws(*args, **kwargs):
        raise AssertionError("an AWS session was opened despite a bad config")

    monkeypatch.setattr(boto3.session, "Session", no_aws)
    with pytest.raises(deploy.ConfigError) as bad:
        cfg = make_config("http://127.0.0.1:9", tmp_path, **{section: values})
        deploy.deploy(cfg, yes=True)
    assert bad.value.field == field
    assert "\n" not in str(bad.value)


def test_template_passes_cfn_lint():
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "cfn-lint"),
            str(ROOT / "deploy/stack.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
