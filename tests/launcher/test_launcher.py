"""The launcher Lambda's logic against moto's HTTP server on 127.0.0.1."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pytest
from botocore.exceptions import ClientError
from launcher_support import TICK
from moto_support import JOB, PROJECT

from nightshift.runconfig import ConfigError, RunConfig
from nightshift.selection import NoImageError

pytestmark = pytest.mark.moto


def tick(**changes):
    return {**TICK, **changes}


def tags_of(resource) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}


# --- choosing the image ------------------------------------------------------


def test_newest_available_image_wins(aws, launcher, make_settings):
    """Newest available wins; pending, foreign and other jobs' never qualify."""
    older = aws.image("2026-12-01T03:00:00")
    newest = aws.image("2026-12-02T03:00:00")
    aws.image("2026-12-02T05:00:00", state="pending")
    aws.image("2026-12-02T06:00:00", state="failed")
    aws.image("2026-12-02T07:00:00", owner="999999999999")
    aws.image("2026-12-02T08:00:00", job="other-job")
    aws.image("2026-12-02T09:00:00", project="someone-else")

    image = launcher.choose_image(aws.ec2, aws.ssm, make_settings(aws.template()))

    assert image.image_id == newest != older
    assert "newest" in image.source


def test_ssm_pointer_wins_over_newest(aws, launcher, make_settings):
    """The promoted pointer decides, even when a newer image exists."""
    promoted = aws.image("2026-12-01T03:00:00")
    aws.image("2026-12-02T03:00:00")
    aws.ssm.put_parameter(Name="/nightshift/example/ami", Value=promoted, Type="String")
    settings = make_settings(aws.template(), image_parameter="/nightshift/example/ami")

    image = launcher.choose_image(aws.ec2, aws.ssm, settings)

    assert image.image_id == promoted
    assert "/nightshift/example/ami" in image.source


def test_unset_ssm_pointer_falls_back_to_newest(aws, launcher, make_settings):
    """A pointer parameter that does not exist yet means: the newest image."""
    newest = aws.image("2026-12-02T03:00:00")
    settings = make_settings(aws.template(), image_parameter="/nightshift/missing")

    assert launcher.choose_image(aws.ec2, aws.ssm, settings).image_id == newest


@pytest.mark.parametrize(
    "kind", [{"state": "pending"}, {"job": "other-job"}, {"owner": "999999999999"}]
)
def test_ssm_pointer_to_unfit_image_fails(aws, launcher, make_settings, kind):
    """A pointer to a half-built, foreign or other job's image is refused."""
    aws.image("2026-12-01T03:00:00")
    bad = aws.image("2026-12-02T03:00:00", **kind)
    aws.ssm.put_parameter(Name="/ns/ami", Value=bad, Type="String")
    settings = make_settings(aws.template(), image_parameter="/ns/ami")

    with pytest.raises(NoImageError, match=f"/ns/ami points to {bad}"):
        launcher.choose_image(aws.ec2, aws.ssm, settings)


def test_no_image_names_the_filters(aws, launcher, make_settings):
    aws.image("2026-12-02T03:00:00", state="pending")

    with pytest.raises(NoImageError) as caught:
        launcher.choose_image(aws.ec2, aws.ssm, make_settings(aws.template()))

    message = str(caught.value)
    assert f"project={PROJECT}" in message and f"job={JOB}" in message
    assert "owner=self" in message and "available" in message


# --- launching -----------------------------------------------------------------


def test_launch_carries_everything_the_run_needs(aws, launcher, make_settings):
    """Terminate on shutdown, IMDSv2 with hop limit 2, tags, user data, template."""
    image = aws.image("2026-12-02T03:00:00")
    template = aws.template()
    subnet = aws.subnets()[0]
    settings = make_settings(
        template, subnet_ids=(subnet,), instance_types=("m5.large",)
    )

    outcome = launcher.handle(
        tick(), settings=settings, ec2=aws.ec2, ssm=aws.ssm, sns=aws.sns
    )

    assert outcome.decision == "launched"
    [instance] = aws.instances()
    iid = instance["InstanceId"]
    assert iid == outcome.instance_id
    assert instance["ImageId"] == image
    assert instance["InstanceType"] == "m5.large"
    assert instance["SubnetId"] == subnet
    assert instance["MetadataOptions"]["HttpTokens"] == "required"
    assert instance["MetadataOptions"]["HttpPutResponseHopLimit"] == 2
    shutdown = aws.ec2.describe_instance_attribute(
        InstanceId=iid, Attribute="instanceInitiatedShutdownBehavior"
    )
    assert shutdown["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"

    tags = tags_of(instance)
    assert tags["aws:ec2launchtemplate:id"] == template
    expected = {
        "nightshift:project": PROJECT,
        "nightshift:job": JOB,
        "nightshift:run-id": outcome.run_id,
        "nightshift:image-id": image,
        "nightshift:scheduled-time": "2026-12-03T03:00:00+00:00",
    }
    assert expected.items() <= tags.items()
    volumes = aws.ec2.describe_volumes(
        Filters=[{"Name": "attachment.instance-id", "Values": [iid]}]
    )["Volumes"]
    assert volumes and all(expected.items() <= tags_of(v).items() for v in volumes)

    raw = aws.ec2.describe_instance_attribute(InstanceId=iid, Attribute="userData")
    sent = RunConfig.from_user_data(base64.b64decode(raw["UserData"]["Value"]))
    assert sent.run_id == outcome.run_id.strip() != ""
    assert sent.image == settings.run_config.image
    assert sent.environment == {"ROWS": "1000"}


def test_same_event_twice_launches_once(aws, launcher, make_settings):
    """A redelivered tick finds its instance instead of launching a second."""
    aws.image("2026-12-02T03:00:00")
    settings = make_settings(aws.template())

    first = launcher.handle(
        tick(), settings=settings, ec2=aws.ec2, ssm=aws.ssm, sns=None
    )
    again = launcher.handle(
        tick(), settings=settings, ec2=aws.ec2, ssm=aws.ssm, sns=None
    )

    assert first.decision == "launched"
    assert again.decision == "already-launched"
    assert again.instance_id == first.instance_id
    assert len(aws.instances()) == 1

    # A different tick is a new run.
    later = launcher.handle(
        tick(id="another-event", time="2026-12-04T03:00:00Z"),
        settings=make_settings(settings.launch_template_id, overlap_policy="allow"),
        ec2=aws.ec2,
        ssm=aws.ssm,
        sns=None,
    )
    assert later.decision == "launched" and later.run_id != first.run_id


def test_redelivery_after_the_run_ended_launches_nothing(aws, launcher, make_settings):
    """A tick redelivered after its instance terminated still launches once."""
    aws.image("2026-12-02T03:00:00")
    settings = make_settings(aws.template())
    first = launcher.handle(
        tick(), settings=settings, ec2=aws.ec2, ssm=aws.ssm, sns=None
    )
    aws.ec2.terminate_instances(InstanceIds=[first.instance_id])

    again = launcher.handle(
        tick(), settings=settings, ec2=aws.ec2, ssm=aws.ssm, sns=None
    )

    assert again.decision == "already-launched"
    assert aws.instances() == []


def test_client_token_is_per_tick_and_placement(launcher, make_settings):
    settings = make_settings("lt-0123456789abcdef0")
    one = launcher.parse_event(tick())
    other = launcher.parse_event(tick(id="other"))
    a, b = launcher.placements(make_settings("lt-0", subnet_ids=("s-1", "s-2")))

    token = launcher.client_token(settings, one, a)
    assert token == launcher.client_token(settings, one, a)
    assert token != launcher.client_token(settings, other, a)
    assert token != launcher.client_token(settings, one, b)
    assert len(token) <= 64


# --- overlapping runs ----------------------------------------------------------


def earlier_run(aws, image: str) -> str:
    return aws.run_tagged(
        image,
        {
            "nightshift:project": PROJECT,
            "nightshift:job": JOB,
            "nightshift:run-id": "old",
        },
    )


def test_overlap_skip_launches_nothing_and_alerts(aws, launcher, make_settings):
    image = aws.image("2026-12-02T03:00:00")
    old = earlier_run(aws, image)
    topic, inbox = aws.topic_with_inbox()
    settings = make_settings(aws.template(), sns_topic_arn=topic)

    outcome = launcher.handle(
        tick(), settings=settings, ec2=aws.ec2, ssm=aws.ssm, sns=aws.sns
    )

    assert outcome.decision == "skipped"
    assert old in outcome.reason
    assert [i["InstanceId"] for i in aws.instances()] == [old]
    [message] = aws.inbox(inbox)
    assert "skipped" in message["Subject"] and old in message["Message"]


def test_overlap_replace_terminates_the_old_run(aws, launcher, make_settings):
    image = aws.image("2026-12-02T03:00:00")
    old = earlier_run(aws, image)
    topic, inbox = aws.topic_with_inbox()
    settings = make_settings(
        aws.template(), overlap_policy="replace", sns_topic_arn=topic
    )

    outcome = launcher.handle(
        tick(), settings=settings, ec2=aws.ec2, ssm=aws.ssm, sns=aws.sns
    )

    assert outcome.decision == "launched"
    assert [t["instance_id"] for t in outcome.terminated] == [old]
    assert [i["InstanceId"] for i in aws.instances()] == [outcome.instance_id]
    [message] = aws.inbox(inbox)
    assert f"terminated {old}" in message["Message"]


def test_overlap_replace_without_an_image_keeps_the_old_run(
    aws, launcher, make_settings
):
    """The earlier run is stopped only once there is something to replace it."""
    image = aws.image("2026-12-02T03:00:00", state="pending")
    old = earlier_run(aws, image)
    settings = make_settings(aws.template(), overlap_policy="replace")

    with pytest.raises(NoImageError):
        launcher.handle(tick(), settings=settings, ec2=aws.ec2, ssm=aws.ssm, sns=None)

    assert [i["InstanceId"] for i in aws.instances()] == [old]


def test_overlap_allow_runs_both(aws, launcher, make_settings):
    image = aws.image("2026-12-02T03:00:00")
    old = earlier_run(aws, image)
    settings = make_settings(aws.template(), overlap_policy="allow")

    outcome = launcher.handle(
        tick(), settings=settings, ec2=aws.ec2, ssm=aws.ssm, sns=None
    )

    assert outcome.decision == "launched"
    assert {i["InstanceId"] for i in aws.instances()} == {old, outcome.instance_id}


def test_other_jobs_and_bakes_do_not_count_as_overlap(aws, launcher, make_settings):
    image = aws.image("2026-12-02T03:00:00")
    aws.run_tagged(image, {"nightshift:project": PROJECT, "nightshift:job": "other"})
    aws.run_tagged(image, {"nightshift:job": JOB})
    # The bake's builder instance: project and job tags, but no run id.
    aws.run_tagged(image, {"nightshift:project": PROJECT, "nightshift:job": JOB})

    outcome = launcher.handle(
        tick(),
        settings=make_settings(aws.template()),
        ec2=aws.ec2,
        ssm=aws.ssm,
        sns=None,
    )

    assert outcome.decision == "launched"


# --- capacity ---------------------------------------------------------------------


class Refusing:
    """The moto client, except that RunInstances refuses chosen placements."""

    def __init__(self, ec2, refuse: dict[tuple[str, str, str], str]):
        self._ec2, self.refuse, self.calls = ec2, refuse, []

    def __getattr__(self, name):
        return getattr(self._ec2, name)

    def run_instances(self, **request):
        market = request.get("InstanceMarketOptions", {}).get("MarketType", "on-demand")
        key = (market, request.get("InstanceType"), request.get("SubnetId"))
        self.calls.append(key)
        if key in self.refuse or ("*", "*", "*") in self.refuse:
            code = self.refuse.get(key) or self.refuse[("*", "*", "*")]
            raise ClientError(
                {"Error": {"Code": code, "Message": f"no {key[1]} in {key[2]}"}},
                "RunInstances",
            )
        return self._ec2.run_instances(**request)


def test_capacity_walks_subnets_then_types(aws, launcher, make_settings):
    aws.image("2026-12-02T03:00:00")
    s1, s2 = aws.subnets()[:2]
    settings = make_settings(
        aws.template(), subnet_ids=(s1, s2), instance_types=("m6i.large", "m5.large")
    )
    ec2 = Refusing(
        aws.ec2,
        {
            ("on-demand", "m6i.large", s1): "InsufficientInstanceCapacity",
            ("on-demand", "m6i.large", s2): "Unsupported",
            ("on-demand", "m5.large", s1): "InsufficientInstanceCapacity",
        },
    )

    outcome = launcher.handle(tick(), settings=settings, ec2=ec2, ssm=aws.ssm, sns=None)

    assert ec2.calls == [
        ("on-demand", "m6i.large", s1),
        ("on-demand", "m6i.large", s2),
        ("on-demand", "m5.large", s1),
        ("on-demand", "m5.large", s2),
    ]
    [instance] = aws.instances()
    assert (instance["InstanceType"], instance["SubnetId"]) == ("m5.large", s2)
    assert [a.outcome.split(":")[0] for a in outcome.attempts] == [
        "InsufficientInstanceCapacity",
        "Unsupported",
        "InsufficientInstanceCapacity",
        f"launched {instance['InstanceId']}",
    ]


def test_spot_falls_back_to_on_demand(aws, launcher, make_settings):
    aws.image("2026-12-02T03:00:00")
    s1 = aws.subnets()[0]
    settings = make_settings(
        aws.template(), subnet_ids=(s1,), instance_types=("m6i.large",), spot=True
    )
    ec2 = Refusing(aws.ec2, {("spot", "m6i.large", s1): "InsufficientInstanceCapacity"})

    launcher.handle(tick(), settings=settings, ec2=ec2, ssm=aws.ssm, sns=None)

    assert ec2.calls == [("spot", "m6i.large", s1), ("on-demand", "m6i.large", s1)]
    [instance] = aws.instances()
    assert instance.get("InstanceLifecycle") != "spot"


def test_no_capacity_anywhere_lists_every_attempt(aws, launcher, make_settings):
    aws.image("2026-12-02T03:00:00")
    s1, s2 = aws.subnets()[:2]
    topic, inbox = aws.topic_with_inbox()
    settings = make_settings(
        aws.template(),
        subnet_ids=(s1, s2),
        instance_types=("m6i.large", "m5.large"),
        spot=True,
        sns_topic_arn=topic,
    )
    ec2 = Refusing(aws.ec2, {("*", "*", "*"): "InsufficientInstanceCapacity"})

    with pytest.raises(launcher.LaunchError) as caught:
        launcher.handle(tick(), settings=settings, ec2=ec2, ssm=aws.ssm, sns=aws.sns)

    assert len(ec2.calls) == 8
    message = str(caught.value)
    for market, itype, subnet in ec2.calls:
        assert (
            f"{market} {itype} in {subnet} -> InsufficientInstanceCapacity" in message
        )
    [alert] = aws.inbox(inbox)
    assert "failed" in alert["Subject"] and message in alert["Message"]
    assert aws.instances() == []


def test_other_errors_do_not_walk(aws, launcher, make_settings):
    aws.image("2026-12-02T03:00:00")
    settings = make_settings(aws.template(), subnet_ids=tuple(aws.subnets()[:2]))
    ec2 = Refusing(aws.ec2, {("*", "*", "*"): "UnauthorizedOperation"})

    with pytest.raises(launcher.LaunchError, match="UnauthorizedOperation"):
        launcher.handle(tick(), settings=settings, ec2=ec2, ssm=aws.ssm, sns=None)

    assert len(ec2.calls) == 1


def test_idempotent_mismatch_returns_the_earlier_instance(launcher, make_settings):
    """Same token, other parameters (the pointer moved): the first launch stands."""
    import boto3
    from botocore.stub import Stubber

    ec2 = boto3.client("ec2", region_name="eu-west-1")
    settings = make_settings("lt-0123456789abcdef0")
    event = launcher.parse_event(tick())
    image = launcher.Image("ami-0123456789abcdef0", "test")
    token = launcher.client_token(settings, event, launcher.placements(settings)[0])
    with Stubber(ec2) as stub:
        stub.add_client_error("run_instances", "IdempotentParameterMismatch")
        stub.add_response(
            "describe_instances",
            {"Reservations": [{"Instances": [{"InstanceId": "i-0first"}]}]},
            {"Filters": [{"Name": "client-token", "Values": [token]}]},
        )
        instance, request, attempts = launcher.launch_instance(
            ec2, settings, image, event
        )
        stub.assert_no_pending_responses()
    assert instance["InstanceId"] == "i-0first"
    assert request["ClientToken"] == token
    assert attempts[-1].outcome == "launched earlier"


# --- the reaper ------------------------------------------------------------------


def test_reaper_terminates_only_this_jobs_overdue_instances(
    aws, launcher, make_settings
):
    image = aws.image("2026-12-02T03:00:00")
    ours = {"nightshift:project": PROJECT, "nightshift:job": JOB}
    overdue = aws.run_tagged(image, {**ours, "nightshift:run-id": "late"})
    fresh = aws.run_tagged(image, {**ours, "nightshift:run-id": "now"})
    other_job = aws.run_tagged(
        image, {**ours, "nightshift:job": "other", "nightshift:run-id": "o"}
    )
    other_project = aws.run_tagged(
        image, {**ours, "nightshift:project": "theirs", "nightshift:run-id": "p"}
    )
    untagged = aws.run_tagged(image, {"nightshift:job": JOB, "nightshift:run-id": "u"})
    builder = aws.run_tagged(image, ours)  # a bake's builder: no run id
    now = datetime.now(UTC)
    for iid in (overdue, other_job, other_project, untagged, builder):
        instance = aws.backend.get_instance(iid)
        instance.launch_time = (now - timedelta(hours=3)).replace(tzinfo=None)
    topic, inbox = aws.topic_with_inbox()
    settings = make_settings(
        aws.template(),
        max_run_seconds=3600,
        reaper_grace_seconds=600,
        sns_topic_arn=topic,
    )

    outcome = launcher.handle(
        {"action": "reap"}, settings=settings, ec2=aws.ec2, ssm=aws.ssm, sns=aws.sns
    )

    assert outcome.decision == "reaped"
    assert [t["instance_id"] for t in outcome.terminated] == [overdue]
    assert "over 3600s max run + 600s grace" in outcome.terminated[0]["reason"]
    alive = {i["InstanceId"] for i in aws.instances()}
    assert alive == {fresh, other_job, other_project, untagged, builder}
    [alert] = aws.inbox(inbox)
    assert overdue in alert["Message"]


def test_reaper_with_nothing_overdue_says_so(aws, launcher, make_settings):
    image = aws.image("2026-12-02T03:00:00")
    aws.run_tagged(
        image,
        {
            "nightshift:project": PROJECT,
            "nightshift:job": JOB,
            "nightshift:run-id": "r",
        },
    )

    outcome = launcher.handle(
        {"action": "reap"},
        settings=make_settings(aws.template()),
        ec2=aws.ec2,
        ssm=aws.ssm,
        sns=None,
    )

    assert outcome.decision == "nothing-overdue"
    assert len(aws.instances()) == 1


# --- bad input --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "field"),
    [
        ("not an object", "event"),
        ({"action": "explode"}, "event.action"),
        ({**TICK, "time": "yesterday"}, "event.time"),
        ({k: v for k, v in TICK.items() if k != "time"}, "event.time"),
        ({k: v for k, v in TICK.items() if k != "id"}, "event.id"),
    ],
)
def test_malformed_event_names_the_field(launcher, event, field):
    with pytest.raises(ConfigError) as caught:
        launcher.parse_event(event)
    assert caught.value.field == field


def test_malformed_event_is_reported(aws, launcher, make_settings):
    topic, inbox = aws.topic_with_inbox()
    settings = make_settings(aws.template(), sns_topic_arn=topic)

    with pytest.raises(ConfigError, match="event.time"):
        launcher.handle(
            {"id": "x", "time": "soon"},
            settings=settings,
            ec2=aws.ec2,
            ssm=aws.ssm,
            sns=aws.sns,
        )

    [alert] = aws.inbox(inbox)
    assert "event.time" in alert["Message"]


def test_scheduler_style_event_keys_on_schedule_and_time(launcher):
    shape = {
        "action": "launch",
        "schedule": "arn:aws:scheduler:::s",
        "time": TICK["time"],
    }
    one, two = launcher.parse_event(shape), launcher.parse_event(dict(shape))
    assert one.run_id == two.run_id
    assert one.run_id.startswith("20261203T030000Z-")
