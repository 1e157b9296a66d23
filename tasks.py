"""nightshift's command line: `invoke --list` shows the tasks.

Each task parses its options and calls the nightshift package; the logic
lives there so that tests, CI and people run the same code.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

from invoke import Exit, task

from nightshift import config as nsconfig
from nightshift.runconfig import ConfigError, check_environment

ROOT = Path(__file__).resolve().parent
CONFIG_HELP = "project file to read (default: nightshift.toml)"
ENDPOINT_HELP = "AWS endpoint, e.g. a moto server (default: aws.endpoint_url)"


def _clean_errors(func):
    """Turn the package's expected errors into one readable line and exit 2."""

    @functools.wraps(func)
    def wrapper(c, *args, **kwargs):
        from nightshift.errors import NightshiftError
        from nightshift.output import reader_safe

        # A task outlives its reader (`invoke run | head`): the VM still
        # powers off, the result is kept and the services stop.
        stdout, sys.stdout = sys.stdout, reader_safe(sys.stdout)
        try:
            return func(c, *args, **kwargs)
        except ConfigError as err:
            raise Exit(f"nightshift: configuration error: {err}", code=2) from None
        except NightshiftError as err:
            raise Exit(f"nightshift: {err}", code=err.exit_code) from None
        except BrokenPipeError:
            # The reader went away (`invoke config | head`): nothing to say.
            sys.stderr.close()
            raise Exit(code=0) from None
        except KeyboardInterrupt:
            raise Exit(
                "nightshift: interrupted; everything this task started is stopped",
                code=130,
            ) from None
        finally:
            sys.stdout = stdout

    return wrapper


def _load(path):
    """The project file: --config if given, else nightshift.toml beside tasks.py."""
    if path is None:
        return nsconfig.load(ROOT / nsconfig.DEFAULT_FILE)
    if not Path(path).is_file():
        raise ConfigError("--config", path, "name an existing nightshift.toml")
    return nsconfig.load(path)


def _count(option: str, value, default: int | None, *, low: int = 0) -> int | None:
    """A whole-number option; invoke would pass on int()'s traceback instead."""
    if value is None:
        return default
    text = str(value).strip()
    if not text.isdigit() or int(text) < low:
        raise ConfigError(option, value, f"use a whole number, {low} or more")
    return int(text)


def _endpoint(cfg, option_value):
    """--endpoint-url if given, else aws.endpoint_url; None means AWS itself."""
    if option_value is None:
        return cfg.aws.endpoint_url or None
    return nsconfig.check_endpoint_url("--endpoint-url", option_value) or None


def _env_pairs(items) -> dict[str, str]:
    """NAME=VALUE options as a mapping, checked under the option's own name."""
    for item in items or ():
        name, equals, _value = item.partition("=")
        if not (name and equals):
            raise ConfigError("--env", item, "use NAME=VALUE")
    return check_environment("--env", dict(item.split("=", 1) for item in items or ()))


@task(
    help={"config": CONFIG_HELP, "json_output": "print JSON instead of TOML-like lines"}
)
@_clean_errors
def config(c, config=None, json_output=False):
    """Show the resolved settings and the run configuration they make."""
    cfg = _load(config)
    path = Path(config).resolve() if config else ROOT / nsconfig.DEFAULT_FILE
    if json_output:
        resolved = {
            "file": str(path),
            "settings": cfg.as_file(),
            "run_configuration": cfg.run_config().to_dict(),
        }
        print(json.dumps(resolved, indent=2, sort_keys=True))
        return
    from nightshift.report import show_config

    print(f"# {path}, with the defaults filled in")
    show_config(cfg.as_file(), out=sys.stdout)
    print("\n# the run configuration a VM gets (fw_cfg locally, user data on EC2)")
    show_config({"run": cfg.run_config().to_dict()}, out=sys.stdout)


@task(
    help={"config": CONFIG_HELP, "force": "rebuild even when the cached one is current"}
)
@_clean_errors
def base_image(c, config=None, force=False):
    """Build the local Debian 12 base disk (mmdebstrap), cached by its inputs."""
    from nightshift import baseimage

    base = baseimage.ensure(_load(config), force=force)
    print(f"base image: {base.disk}")


@task(
    help={
        "config": CONFIG_HELP,
        "target": "local (default: a qemu disk image) or aws (an AMI, Packer 1.10+)",
        "accelerator": "tcg or kvm for the local target (default: nightshift.toml)",
        "warm_cache": "pull the job image into the image at bake time",
    }
)
@_clean_errors
def bake_ami(c, config=None, target="local", accelerator=None, warm_cache=False):
    """Bake the job-runner image with Packer and Ansible; print what it made."""
    from nightshift import bake

    product = bake.bake(
        _load(config), target=target, accelerator=accelerator, warm_cache=warm_cache
    )
    print(f"baked: {product}")


@task(help={"config": CONFIG_HELP})
@_clean_errors
def images(c, config=None):
    """List the local images, newest first (name, path, created, source)."""
    from nightshift import bake

    bake.print_images(_load(config), out=sys.stdout)


@task(help={"config": CONFIG_HELP})
@_clean_errors
def job_image(c, config=None):
    """Build the job image, tag it with the git revision and latest, push it."""
    from nightshift import jobimage, services

    cfg = _load(config)
    jobimage.job_context(cfg)
    with services.docker_engine(cfg) as client, services.registry(cfg):
        pushed = jobimage.build_and_push(cfg, client)
    print(f"pushed: {', '.join(pushed.tags)} ({pushed.digest})")


@task(
    help={
        "config": CONFIG_HELP,
        "target": "local (default); aws runs go through `invoke run-now`",
        "image": "local image name to boot (default: the newest complete one)",
        "env": "extra job environment, NAME=VALUE (repeatable)",
        "max_run_time": "override job.max_run_time, e.g. 90s or 30m",
        "accelerator": "tcg or kvm (default: nightshift.toml)",
        "quiet": "show only the job's lines and the summary, not the whole console",
    },
    iterable=["env"],
)
@_clean_errors
def run(
    c, config=None, target="local", image=None, env=None, max_run_time=None,
    accelerator=None, quiet=False,
):  # fmt: skip
    """Boot the newest local image, run the job once, print the summary."""
    from nightshift import bake, localrun, services
    from nightshift.runconfig import check_choice, parse_duration

    if target == "aws":
        raise ConfigError("--target", target, "runs on AWS start with `invoke run-now`")
    check_choice("--target", target, ("local",))
    if accelerator:
        check_choice("--accelerator", accelerator, ("tcg", "kvm"))
    cfg = _load(config)
    overrides = {}
    if env:
        overrides["environment"] = {**cfg.job_settings.environment, **_env_pairs(env)}
    if max_run_time:
        overrides["max_run_seconds"] = parse_duration("--max-run-time", max_run_time)
    run_config = cfg.run_config(**overrides)
    chosen = bake.newest_local_image(cfg, name=image)
    with services.registry(cfg):
        summary = localrun.run(
            cfg, chosen, run_config,
            accelerator=accelerator, verbose=not quiet, out=sys.stdout,
        )  # fmt: skip
    localrun.print_summary(summary, sys.stdout)
    if not summary.ok:
        raise localrun.RunFailed(f"the run ended {summary.outcome}")


@task(
    help={
        "config": CONFIG_HELP,
        "accelerator": "tcg or kvm (default: nightshift.toml)",
    }
)
@_clean_errors
def demo(c, config=None, accelerator=None):
    """The whole local pipeline: base image, job image, bake, run, summary."""
    from nightshift.demo import demo as run_demo

    run_demo(_load(config), accelerator=accelerator, out=sys.stdout)


@task(
    help={
        "fast": "skip the tests that boot VMs (marker `vm`)",
        "pytest_args": "extra arguments for pytest, e.g. '-k config'",
    }
)
def test(c, fast=False, pytest_args=""):
    """Run the linters and the test suite (what CI runs)."""
    marker = "-m 'not vm'" if fast else ""
    c.run(f"{sys.executable} -m pytest {marker} {pytest_args}", pty=False)


@task(
    help={
        "config": CONFIG_HELP,
        "launch_template": "launch template id (lt-...); the deploy will provide it",
        "image_parameter": "SSM parameter with the promoted AMI id (default: newest)",
        "endpoint_url": ENDPOINT_HELP,
        "image": "job image reference for the run (default: [job] image)",
        "dry_run": "ask EC2 with DryRun=True and launch nothing (default: on)",
    }
)
@_clean_errors
def launch(
    c, config=None, launch_template=None, image_parameter="", endpoint_url=None,
    image=None, dry_run=True,
):  # fmt: skip
    """Run the launcher's logic from here: show what it would launch now."""
    from nightshift import launch as nslaunch

    cfg = _load(config)
    if not launch_template:
        raise Exit(
            "nightshift: --launch-template: pass the launch template id (lt-...)", 2
        )
    outcome = nslaunch.launch(
        project=cfg.project,
        job=cfg.job,
        launch_template_id=launch_template,
        run_config=cfg.run_config(image=image),
        region=cfg.aws.region,
        endpoint_url=_endpoint(cfg, endpoint_url),
        image_parameter=image_parameter,
        subnet_ids=cfg.aws.subnets,
        instance_types=cfg.aws.instance_types,
        spot=cfg.aws.spot,
        overlap_policy=cfg.aws.overlap_policy,
        dry_run=dry_run,
    )
    print(nslaunch.describe(outcome))


@task(
    help={
        "config": CONFIG_HELP,
        "image_parameter": "SSM parameter the launcher reads (the deploy's output)",
        "launch_template": "launch template id (lt-...) the smoke run launches from",
        "log_group": "the job's log group, where the run record appears",
        "image": "AMI to promote (default: the newest tagged, i.e. the last bake)",
        "job_image": "job image for the smoke run (default: [job] image, else ECR)",
        "command": "smoke command instead of the image's own entrypoint (repeatable)",
        "env": "smoke run environment, NAME=VALUE (repeatable), e.g. ROWS=1000",
        "timeout": "how long to wait for the smoke run (default: 30m)",
        "endpoint_url": ENDPOINT_HELP,
    },
    iterable=["command", "env"],
)
@_clean_errors
def promote(
    c, config=None, endpoint_url=None, image_parameter="", launch_template="",
    log_group="", image="", job_image=None, command=None, env=None, timeout="30m",
):  # fmt: skip
    """Smoke-test the new AMI; point the launcher at it only if it passed."""
    from nightshift import promote as nspromote
    from nightshift.runconfig import parse_duration

    cfg = _load(config)
    endpoint = _endpoint(cfg, endpoint_url)
    if not launch_template:
        raise Exit("nightshift: --launch-template: pass the launch template id", 2)
    base = cfg.run_config(
        image=job_image or nspromote.aws_job_image(cfg, endpoint_url=endpoint)
    )
    nspromote.promote(
        project=cfg.project,
        job=cfg.job,
        image_parameter=image_parameter,
        launch_template_id=launch_template,
        run_config=base,
        log_group=log_group,
        region=cfg.aws.region,
        image_id=image,
        endpoint_url=endpoint,
        subnet_ids=cfg.aws.subnets,
        instance_types=cfg.aws.instance_types,
        smoke_command=command or (),
        smoke_environment=_env_pairs(env),
        timeout_seconds=parse_duration("--timeout", timeout),
        out=sys.stdout,
    )


@task(
    help={
        "config": CONFIG_HELP,
        "image_parameter": "SSM parameter the launcher reads (the deploy's output)",
        "to_version": "parameter version to restore (default: the one before)",
        "endpoint_url": ENDPOINT_HELP,
    }
)
@_clean_errors
def rollback(c, config=None, image_parameter="", to_version=None, endpoint_url=None):
    """Point the launcher back at the image it used before the last promotion."""
    from nightshift import promote as nspromote

    cfg = _load(config)
    nspromote.rollback(
        project=cfg.project,
        job=cfg.job,
        image_parameter=image_parameter,
        region=cfg.aws.region,
        endpoint_url=_endpoint(cfg, endpoint_url),
        to_version=_count("--to-version", to_version, None, low=1),
        out=sys.stdout,
    )


@task(
    help={
        "config": CONFIG_HELP,
        "image_parameter": "SSM image pointer; its recent values are kept",
        "keep": "keep this many newest images (default: aws.keep_images)",
        "keep_days": "keep images younger than this many days (default: 14)",
        "pointer_versions": "keep what the pointer named in its last N versions (5)",
        "dry_run": "print the plan with reasons; change nothing",
        "endpoint_url": ENDPOINT_HELP,
    }
)
@_clean_errors
def prune_amis(
    c, config=None, endpoint_url=None, image_parameter="", keep=None,
    keep_days=None, pointer_versions=None, dry_run=False,
):  # fmt: skip
    """Deregister old AMIs of this job and delete their snapshots."""
    from nightshift import prune

    cfg = _load(config)
    prune.prune_amis(
        project=cfg.project,
        job=cfg.job,
        region=cfg.aws.region,
        keep=_count("--keep", keep, cfg.aws.keep_images, low=1),
        keep_days=_count("--keep-days", keep_days, 14),
        image_parameter=image_parameter,
        pointer_versions=_count("--pointer-versions", pointer_versions, 5),
        endpoint_url=_endpoint(cfg, endpoint_url),
        dry_run=dry_run,
        out=sys.stdout,
    )


@task(
    help={
        "config": CONFIG_HELP,
        "keep": "keep this many newest complete images (default: 3)",
        "keep_days": "keep images younger than this many days (default: 14)",
        "dry_run": "print the plan with reasons; change nothing",
    }
)
@_clean_errors
def prune_images(c, config=None, keep=None, keep_days=None, dry_run=False):
    """Remove old local images from build/images; the newest is always kept."""
    from nightshift import prune

    prune.prune_images(
        _load(config),
        keep=_count("--keep", keep, 3, low=1),
        keep_days=_count("--keep-days", keep_days, 14),
        dry_run=dry_run,
        out=sys.stdout,
    )


@task(
    help={
        "config": CONFIG_HELP,
        "endpoint_url": ENDPOINT_HELP,
        "yes": "apply the change set without asking",
        "image": "build and push the job image to ECR afterwards (default: on)",
    }
)
@_clean_errors
def deploy(c, config=None, endpoint_url=None, yes=False, image=True):
    """Deploy the job's stack: show the change set, ask, apply, push the image."""
    from nightshift import deploy as nsdeploy
    from nightshift import services

    cfg = _load(config)
    endpoint = _endpoint(cfg, endpoint_url)
    done = nsdeploy.deploy(cfg, yes=yes, endpoint_url=endpoint)
    if image and done.result != "declined":
        with services.docker_engine(cfg) as client:
            pushed = nsdeploy.push_job_image(cfg, client, endpoint_url=endpoint)
        print(f"pushed: {', '.join(pushed.tags)} ({pushed.digest})")


@task(
    help={
        "config": CONFIG_HELP,
        "endpoint_url": ENDPOINT_HELP,
        "dry_run": "ask EC2 with DryRun=True and launch nothing",
    }
)
@_clean_errors
def run_now(c, config=None, endpoint_url=None, dry_run=False):
    """Launch a run now, with the deployed launcher's logic and settings."""
    from nightshift import deploy as nsdeploy

    cfg = _load(config)
    nsdeploy.run_now(cfg, endpoint_url=_endpoint(cfg, endpoint_url), dry_run=dry_run)


@task(
    help={
        "config": CONFIG_HELP,
        "endpoint_url": ENDPOINT_HELP,
        "limit": "how many recent runs (default: 10)",
    }
)
@_clean_errors
def status(c, config=None, endpoint_url=None, limit=None):
    """List recent runs: instance, image, started, state, outcome, duration, memory."""
    from nightshift import deploy as nsdeploy

    limit = _count("--limit", limit, 10, low=1)
    cfg = _load(config)
    nsdeploy.status(cfg, endpoint_url=_endpoint(cfg, endpoint_url), limit=limit)


@task(
    help={
        "config": CONFIG_HELP,
        "endpoint_url": ENDPOINT_HELP,
        "run_id": "the run to show (default: the newest)",
    }
)
@_clean_errors
def logs(c, config=None, endpoint_url=None, run_id=None):
    """Show one run's job output from CloudWatch Logs."""
    from nightshift import deploy as nsdeploy

    cfg = _load(config)
    nsdeploy.logs(cfg, run_id, endpoint_url=_endpoint(cfg, endpoint_url))


@task(
    help={
        "config": CONFIG_HELP,
        "endpoint_url": ENDPOINT_HELP,
        "yes": "delete without asking",
        "purge": "also deregister the AMIs and delete the ECR repository",
    }
)
@_clean_errors
def destroy(c, config=None, endpoint_url=None, yes=False, purge=False):
    """Delete the job's stack; keep the AMIs and job images unless --purge."""
    from nightshift import deploy as nsdeploy

    cfg = _load(config)
    nsdeploy.destroy(
        cfg, yes=yes, purge=purge, endpoint_url=_endpoint(cfg, endpoint_url)
    )


@task(
    help={
        "config": CONFIG_HELP,
        "runs": "boots of each image, reference and nightshift in turn (default: 5)",
        "bake_times": "also time a cold bake, a cached-base bake and a second Ansible "
        "run (about 25 min more under TCG; default: off)",
        "accelerator": "tcg or kvm (default: nightshift.toml)",
        "image": "local image to measure (default: baked from the current inputs)",
    }
)
@_clean_errors
def bench(c, config=None, runs=None, bake_times=False, accelerator=None, image=None):
    """Measure a run's overhead against a bare reference image; write build/bench/."""
    from nightshift import bench as nsbench

    nsbench.bench(
        _load(config), runs=_count("--runs", runs, 5, low=1), bake_times=bake_times,
        accelerator=accelerator, image=image, out=sys.stdout,
    )  # fmt: skip
