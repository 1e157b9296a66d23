"""The run configuration: one schema for the local runner, the Lambda and the unit."""

import json

import pytest

from nightshift.runconfig import ConfigError, RunConfig, parse_duration

IMAGE = "10.0.2.2:5000/nightshift/example:latest"


def test_round_trip_through_user_data():
    """What the launcher writes is exactly what the unit reads back."""
    config = RunConfig.parse(
        {
            "image": IMAGE,
            "job": "example",
            "run_id": "r1",
            "environment": {"ROWS": 10, "NAME": "x"},
            "command": ["python3", "-c", "print(1)"],
            "max_run_seconds": "2h",
            "log": {
                "driver": "awslogs",
                "group": "/nightshift/example",
                "region": "eu-west-1",
            },
        }
    )
    again = RunConfig.from_user_data(config.to_user_data())
    assert again == config
    assert again.environment == {"ROWS": "10", "NAME": "x"}
    assert again.max_run_seconds == 7200


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({}, "image"),
        ({"image": "Not An Image"}, "image"),
        ({"image": IMAGE, "mode": "party"}, "mode"),
        ({"image": IMAGE, "max_run_seconds": "soon"}, "max_run_seconds"),
        ({"image": IMAGE, "max_run_seconds": 0}, "max_run_seconds"),
        ({"image": IMAGE, "environment": {"1BAD": "x"}}, "environment.1BAD"),
        ({"image": IMAGE, "environment": {"OK": ["list"]}}, "environment.OK"),
        ({"image": IMAGE, "colour": "blue"}, "colour"),
        ({"image": IMAGE, "log": {"driver": "awslogs"}}, "log.group"),
        (
            {"image": IMAGE, "report": {"sns_topic_arn": "topic"}},
            "report.sns_topic_arn",
        ),
        ({"image": IMAGE, "version": 2}, "version"),
        ({"image": IMAGE, "command": "echo hi"}, "command"),
    ],
)
def test_bad_field_is_named(data, field):
    """Every bad value is reported with the field it came from."""
    with pytest.raises(ConfigError) as caught:
        RunConfig.parse(data)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")


def test_user_data_that_is_not_json_names_the_problem():
    with pytest.raises(ConfigError, match="user data.*JSON object"):
        RunConfig.from_user_data(b"#cloud-config\n")


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(90, 90), ("90", 90), ("90s", 90), ("30m", 1800), ("2h", 7200)],
)
def test_durations(value, seconds):
    assert parse_duration("x", value) == seconds


def test_user_data_is_compact_json():
    text = RunConfig(image=IMAGE).to_user_data()
    assert json.loads(text)["version"] == 1
    assert "\n" not in text
