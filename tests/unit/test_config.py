"""nightshift.toml: defaults, validation, and the run configuration it makes."""

import pytest

from nightshift import config
from nightshift.runconfig import ConfigError


def test_the_shipped_file_is_valid(repo_root):
    cfg = config.load(repo_root / "nightshift.toml")
    assert cfg.job == "example"
    run = cfg.run_config()
    assert run.image == "10.0.2.2:5000/nightshift/example:latest"
    assert run.environment["ROWS"] == "400000"


def test_missing_file_gives_defaults(tmp_path):
    cfg = config.load(tmp_path / "absent.toml")
    assert cfg.local.accelerator == "tcg"
    assert cfg.job_settings.max_run_seconds == 3600


@pytest.mark.parametrize(
    ("toml", "field"),
    [
        ('[local]\naccelerator = "hvf"', "local.accelerator"),
        ("[local]\nmemory_mb = 64", "local.memory_mb"),
        ('[job]\nmax_run_time = "forever"', "job.max_run_time"),
        ('[schedule]\ncron = "0 3 * * *"', "schedule.cron"),
        ('[schedule]\ncron = "cron(0 25 * * ? *)"', "schedule.cron"),
        ('[schedule]\ncron = "cron(0 3 * * * *)"', "schedule.cron"),
        ('[schedule]\ncron = "rate(1 days)"', "schedule.cron"),
        ('[aws]\nendpoint_url = "localhost:5001"', "aws.endpoint_url"),
        ('[aws]\ninstance_types = ["huge"]', "aws.instance_types"),
        ('[aws]\ninstance_types = ["m6i.huge"]', "aws.instance_types"),
        ('[aws]\nregion = "mars"', "aws.region"),
        ('[aws]\noverlap_policy = "queue"', "aws.overlap_policy"),
        ("[aws]\nlog_retention_days = 31", "aws.log_retention_days"),
        ('[aws]\nnotification_email = "nobody"', "aws.notification_email"),
        ('[aws]\nsubnets = ["vpc-123"]', "aws.subnets"),
        ('[project]\njob = "My Job"', "project.job"),
        ("[jobs]\nx = 1", "jobs"),
        ("[local]\nspeed = 1", "local.speed"),
    ],
)
def test_bad_value_names_the_field(tmp_path, toml, field):
    path = tmp_path / "nightshift.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert caught.value.field == field


def test_broken_toml_is_one_clear_error(tmp_path):
    """The message names the file and the line, not a placeholder value."""
    path = tmp_path / "nightshift.toml"
    path.write_text('[job]\nmax_run_time = "2h"\nstop_grace 30\n')
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: not valid TOML")
    assert "line 3" in message and "<file>" not in message


@pytest.mark.parametrize(
    "expression",
    [
        "cron(0 3 * * ? *)",
        "cron(0/15 8-18 ? * MON-FRI *)",
        "cron(0 10 ? * 6L 2027)",
        "cron(15 10 L * ? *)",
        "cron(0 8 1W * ? *)",
        "cron(0 3 ? * 2#1 *)",
        "cron(0 3 1,15 JAN-MAR ? 2026-2030)",
        "rate(1 day)",
        "rate(12 hours)",
    ],
)
def test_eventbridge_schedules_are_accepted(expression):
    assert config.check_schedule("schedule.cron", expression) == expression


@pytest.mark.parametrize(
    ("expression", "says"),
    [
        ("cron(0 3 * * ?)", "six fields"),
        ("cron(61 3 * * ? *)", "minutes field '61'"),
        ("cron(0 3 * FOO ? *)", "month field 'FOO'"),
        ("cron(0 3 ? * ? *)", "exactly one of day-of-month and day-of-week"),
        ("cron(0 3 */0 * ? *)", "day-of-month field"),
        ("rate(0 hours)", "n >= 1"),
    ],
)
def test_a_bad_schedule_says_what_is_wrong(expression, says):
    with pytest.raises(ConfigError, match=r"^schedule\.cron: ") as caught:
        config.check_schedule("schedule.cron", expression)
    assert says in str(caught.value)


def test_resolved_settings_read_back_as_the_same_config(tmp_path):
    """`invoke config` shows the file's own names: its output is a valid file."""
    path = tmp_path / "nightshift.toml"
    path.write_text(
        '[job]\nmax_run_time = "90m"\nstop_grace = 45\n'
        '[aws]\nsubnets = ["subnet-0abc"]\nspot = true\n'
    )
    cfg = config.load(path)
    shown = cfg.as_file()
    assert shown["job"]["max_run_time"] == "90m"
    assert shown["job"]["stop_grace"] == "45s"

    again = config.parse(shown, root=tmp_path)
    assert again == cfg
