"""run-now, status and logs against a deployed stack on the moto server.

The instance side is played by the test: it writes the run record and the
job's output the way nightshift.agent and Docker's awslogs driver do.
"""

from __future__ import annotations

import json
import time

import pytest
from deploy_support import Aws, names

from nightshift import deploy
from nightshift.errors import NightshiftError

pytestmark = [
    pytest.mark.moto,
    pytest.mark.filterwarnings("ignore:Tried to parse AWS::"),
]
STACK = "nightshift-example"
ECR = "123456789012.dkr.ecr.eu-west-1.amazonaws.com"


@pytest.fixture
def aws(endpoint) -> Aws:
    return Aws(endpoint)


@pytest.fixture
def stack(cfg, lines):
    return deploy.deploy(cfg, yes=True, log=lines, poll_seconds=0)


def write_run(aws: Aws, cfg, run_id: str, instance_id: str, outcome: str) -> None:
    """What an instance leaves behind: job output and its run record."""
    group = names(cfg).log_group
    now = int(time.time() * 1000)
    job_stream = f"{cfg.job}/{run_id}"
    aws.logs.create_log_stream(logGroupName=group, logStreamName=job_stream)
    aws.logs.put_log_events(
        logGroupName=group,
        logStreamName=job_stream,
        logEvents=[
            {"timestamp": now - 2000, "message": "sorting 1000 rows"},
            {"timestamp": now - 1000, "message": "done: 1000 rows in 1000 groups"},
        ],
    )
    record = {
        "outcome": outcome,
        "exit_code": 0 if outcome == "success" else 1,
        "reason": "the job exited 0",
        "run_id": run_id,
        "job": cfg.job,
        "image": f"{ECR}/nightshift/example:latest",
        "peak_memory_bytes": 512 * 2**20,
        "timings": {
            "agent_start": 20.0,
            "job_start": 30.5,
            "job_end": 95.5,
            "report": 96.0,
        },
        "instance_id": instance_id,
    }
    aws.logs.create_log_stream(logGroupName=group, logStreamName=f"runs/{run_id}")
    aws.logs.put_log_events(
        logGroupName=group,
        logStreamName=f"runs/{run_id}",
        logEvents=[{"timestamp": now, "message": json.dumps(record)}],
    )


def test_run_now_launches_from_the_stacks_template(stack, aws, cfg, lines):
    image_id = aws.register_image()
    outcome = deploy.run_now(cfg, log=lines)
    assert outcome.decision == "launched"
    assert lines[0].startswith("account 123456789012, region eu-west-1, stack")

    [instance] = aws.ec2.describe_instances(InstanceIds=[outcome.instance_id])[
        "Reservations"
    ][0]["Instances"]
    tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
    assert tags["aws:ec2launchtemplate:id"] == aws.physical(STACK, "LaunchTemplate")
    assert tags["nightshift:run-id"] == outcome.run_id
    assert instance["ImageId"] == image_id
    assert instance["InstanceType"] == "m6i.large"
    group_id = aws.physical(STACK, "SecurityGroup")
    assert [g["GroupId"] for g in instance["SecurityGroups"]] == [group_id]


def test_run_now_needs_a_deployed_stack(cfg, lines):
    with pytest.raises(NightshiftError, match="not deployed.*invoke deploy"):
        deploy.run_now(cfg, log=lines)


def test_status_joins_records_with_instances(stack, aws, cfg, lines):
    image_id = aws.register_image()
    first = deploy.run_now(cfg, log=lines)
    write_run(aws, cfg, first.run_id, first.instance_id, "success")
    aws.ec2.terminate_instances(InstanceIds=[first.instance_id])

    lines.clear()
    found = deploy.status(cfg, log=lines)
    [run] = found
    assert run.run_id == first.run_id
    assert (run.instance_id, run.image_id) == (first.instance_id, image_id)
    assert (run.state, run.outcome) == ("terminated", "success")
    assert run.duration_seconds == 65.0
    assert run.peak_memory_bytes == 512 * 2**20
    assert run.started is not None
    row = next(line for line in lines if line.startswith(first.run_id))
    assert "terminated" in row and "success" in row and "512MiB" in row


def test_status_keeps_runs_whose_instance_is_gone(stack, aws, cfg, lines):
    """The record outlives the instance: a run with no instance still shows."""
    write_run(aws, cfg, "20261201T030000Z-0badc0de", "i-0123456789abcdef0", "failure")
    [run] = deploy.status(cfg, log=lines)
    assert (run.state, run.outcome) == ("gone", "failure")
    assert run.instance_id == "i-0123456789abcdef0"


def test_logs_shows_a_runs_job_output(stack, aws, cfg, lines):
    aws.register_image()
    launched = deploy.run_now(cfg, log=lines)
    write_run(aws, cfg, launched.run_id, launched.instance_id, "success")

    lines.clear()
    shown = deploy.logs(cfg, launched.run_id, log=lines)
    assert shown == ["sorting 1000 rows", "done: 1000 rows in 1000 groups"]
    # Without a run id: the newest run.
    assert deploy.logs(cfg, log=lines) == shown


def test_logs_of_an_unknown_run_names_the_recent_ones(stack, aws, cfg, lines):
    write_run(aws, cfg, "20261201T030000Z-0badc0de", "i-0123456789abcdef0", "success")
    with pytest.raises(NightshiftError, match="no job output for run nope.*0badc0de"):
        deploy.logs(cfg, "nope", log=lines)
