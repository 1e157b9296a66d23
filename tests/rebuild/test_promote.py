"""The promotion gate and rollback, against a moto server on 127.0.0.1."""

from __future__ import annotations

import io

import pytest
from moto_support import JOB, PROJECT, REGION
from rebuild_support import LOG_GROUP, PARAMETER, RUN_CONFIG, FakeInstance

from nightshift import promote as nspromote
from nightshift.errors import NightshiftError

pytestmark = pytest.mark.moto


@pytest.fixture
def world(aws):
    """What the deploy and yesterday's rebuild left: a promoted image and a new one."""
    aws.logs.create_log_group(logGroupName=LOG_GROUP)
    old = aws.image("2026-12-01T01:30:00")
    new = aws.image("2026-12-02T01:30:00")
    aws.point(old)
    return {"old": old, "new": new, "template": aws.template()}


def run_promote(aws, world, **overrides):
    out = io.StringIO()
    arguments = {
        "project": PROJECT,
        "job": JOB,
        "image_parameter": PARAMETER,
        "launch_template_id": world["template"],
        "run_config": RUN_CONFIG,
        "log_group": LOG_GROUP,
        "region": REGION,
        "endpoint_url": aws.endpoint,
        "timeout_seconds": 20,
        "poll_seconds": 0.1,
        "record_grace_seconds": 1,
        "out": out,
        **overrides,
    }
    try:
        return nspromote.promote(**arguments), out.getvalue()
    finally:
        print(out.getvalue())


def test_passing_smoke_run_promotes_only_after_its_report(aws, world, imds):
    """The pointer moves to the new image, and only once the instance reported."""
    instance = FakeInstance(aws, imds)
    instance.start()
    result, printed = run_promote(aws, world)
    instance.join(10)

    assert instance.error is None
    assert instance.instance["ImageId"] == world["new"]
    assert instance.config.mode == "smoke"
    assert instance.config.run_id.startswith("smoke-")
    assert instance.config.report.log_group == LOG_GROUP
    assert not instance.config.report.sns_topic_arn  # subscribers hear nothing
    assert instance.pointer_when_reported == world["old"]
    assert result.promoted and result.outcome == "success"
    assert result.previous == world["old"]
    assert aws.pointer() == (world["new"], 2)
    assert aws.state(instance.instance["InstanceId"]) == "terminated"
    assert f"promoted {world['new']}" in printed


def test_first_promotion_replaces_the_deploys_placeholder(aws, world, imds):
    """The deploy creates the pointer as " "; the first promotion fills it in."""
    aws.ssm.delete_parameter(Name=PARAMETER)
    aws.ssm.put_parameter(Name=PARAMETER, Value=" ", Type="String")
    instance = FakeInstance(aws, imds)
    instance.start()
    result, printed = run_promote(aws, world)
    instance.join(10)

    assert result.promoted and result.previous == ""
    assert aws.pointer() == (world["new"], 2)
    assert "(was unset)" in printed


def test_smoke_run_uses_the_launchers_request(aws, world, imds):
    """The smoke instance is launched as the schedule launches: tags, off means gone."""
    instance = FakeInstance(aws, imds)
    instance.start()
    run_promote(aws, world)
    instance.join(10)

    launched = aws.ec2.describe_instances(
        InstanceIds=[instance.instance["InstanceId"]]
    )["Reservations"][0]["Instances"][0]
    tags = {t["Key"]: t["Value"] for t in launched["Tags"]}
    assert tags["nightshift:project"] == PROJECT
    assert tags["nightshift:job"] == JOB
    assert tags["nightshift:purpose"] == "smoke"
    assert tags["nightshift:candidate-image"] == world["new"]
    behaviour = aws.ec2.describe_instance_attribute(
        InstanceId=launched["InstanceId"],
        Attribute="instanceInitiatedShutdownBehavior",
    )["InstanceInitiatedShutdownBehavior"]["Value"]
    assert behaviour == "terminate"


def test_failing_smoke_run_leaves_the_pointer_and_says_why(aws, world, imds):
    """A smoke run that ends in failure keeps yesterday's image, with the reason."""
    instance = FakeInstance(
        aws,
        imds,
        outcome="failure",
        reason="the job exited 3",
        output=("job| reading input", "job| Traceback: ValueError: bad row"),
    )
    instance.start()
    out = io.StringIO()
    with pytest.raises(nspromote.PromotionFailed) as failed:
        run_promote(aws, world, out=out)
    instance.join(10)

    message = str(failed.value)
    assert "ended failure: the job exited 3" in message
    assert f"{PARAMETER} still names {world['old']}" in message
    assert aws.pointer() == (world["old"], 1)
    assert "ValueError: bad row" in out.getvalue()


def test_silent_instance_is_terminated_and_nothing_promoted(aws, world, imds):
    """No record within the timeout: the gate terminates the instance itself."""
    instance = FakeInstance(aws, imds, report=False, terminate=False)
    instance.start()
    with pytest.raises(nspromote.PromotionFailed, match="no run record"):
        run_promote(aws, world, timeout_seconds=2)
    instance.join(10)

    assert aws.state(instance.instance["InstanceId"]) == "terminated"
    assert aws.pointer() == (world["old"], 1)


def test_instance_gone_without_a_record_fails(aws, world, imds):
    """An instance that powers off without reporting proves nothing."""
    instance = FakeInstance(aws, imds, report=False)
    instance.start()
    with pytest.raises(nspromote.PromotionFailed, match="without writing a run record"):
        run_promote(aws, world)
    instance.join(10)
    assert aws.pointer() == (world["old"], 1)


def test_passing_run_whose_instance_stays_up_is_not_promoted(aws, world, imds):
    """An image that does not power itself off would bill all day: refuse it."""
    instance = FakeInstance(aws, imds, terminate=False)
    instance.start()
    with pytest.raises(nspromote.PromotionFailed, match="must power itself off"):
        run_promote(aws, world, timeout_seconds=2)
    instance.join(10)
    assert aws.state(instance.instance["InstanceId"]) == "terminated"
    assert aws.pointer() == (world["old"], 1)


def test_untagged_image_is_refused_before_any_launch(aws, world):
    """An image the launcher would refuse is never smoke-tested or promoted."""
    foreign = aws.image("2026-12-02T02:00:00", job="other")
    with pytest.raises(NightshiftError, match="not tagged"):
        run_promote(aws, world, image_id=foreign)
    assert not aws.ec2.describe_instances()["Reservations"]
    assert aws.pointer() == (world["old"], 1)


def test_rollback_restores_the_previous_image_and_then_the_one_before(aws, world):
    """Each rollback goes one promotion further back, via the history."""
    third = aws.image("2026-12-03T01:30:00")
    aws.point(world["new"])
    aws.point(third)
    common = {
        "project": PROJECT,
        "job": JOB,
        "image_parameter": PARAMETER,
        "region": REGION,
        "endpoint_url": aws.endpoint,
        "out": io.StringIO(),
    }

    first = nspromote.rollback(**common)
    assert (first.from_image, first.to_image) == (third, world["new"])
    assert aws.pointer() == (world["new"], 4)

    second = nspromote.rollback(**common)
    assert (second.from_image, second.to_image) == (world["new"], world["old"])
    assert aws.pointer() == (world["old"], 5)


def test_rollback_refuses_a_deregistered_image(aws, world):
    """Rolling back to an image that is gone would break the next launch."""
    aws.point(world["new"])
    aws.ec2.deregister_image(ImageId=world["old"])
    with pytest.raises(NightshiftError, match="cannot roll back to version 1"):
        nspromote.rollback(
            project=PROJECT,
            job=JOB,
            image_parameter=PARAMETER,
            region=REGION,
            endpoint_url=aws.endpoint,
            out=io.StringIO(),
        )
    assert aws.pointer() == (world["new"], 2)


def test_rollback_target_skips_repeats_and_placeholders():
    history = [
        {"Version": 1, "Value": "none"},
        {"Version": 2, "Value": "ami-0000000000000000a"},
        {"Version": 3, "Value": "ami-0000000000000000b"},
        {"Version": 4, "Value": "ami-0000000000000000b"},
    ]
    assert nspromote.rollback_target(history)["Version"] == 2
    with pytest.raises(NightshiftError, match="nothing to roll back to"):
        nspromote.rollback_target(history[:2])
