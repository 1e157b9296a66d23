"""The guest side of a run: read the run configuration, run the job, report.

systemd drives the order (see the units in the Ansible role); this module
does the three steps it calls:

    python3 -m nightshift.agent prepare   # nightshift-config.service
    python3 -m nightshift.agent run       # nightshift-job.service ExecStart
    python3 -m nightshift.agent report    # nightshift-job.service ExecStopPost

It runs inside the image with the standard library only (boto3 is imported
only for AWS reporting), and every path ends in a result record, so the unit
can always report and power off.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nightshift.runconfig import ConfigError, RunConfig

AGENT_SETTINGS = Path("/etc/nightshift/agent.json")
STATE = Path("/run/nightshift")
RESULT_MARK = "NIGHTSHIFT-RESULT"
# Left in the state folder once the record is printed and published.
REPORTED = "reported"
JOB_MARK = "job| "
CONTAINER = "nightshift-job"
DOCKER_SOCKET = "/var/run/docker.sock"
SLICE = "nightshift.slice"
FW_CFG = Path("/sys/firmware/qemu_fw_cfg/by_name/opt/nightshift")
IMDS = "http://169.254.169.254"

OUTCOMES = (
    "success",
    "failure",
    "timeout",
    "pull-failure",
    "docker-failure",
    "config-error",
    "agent-failure",
)


def uptime() -> float:
    """Seconds since boot, from the guest's own clock."""
    with open("/proc/uptime") as handle:
        return round(float(handle.read().split()[0]), 2)


def say(event: str, **fields: Any) -> None:
    """One structured line on stdout, which the unit sends to journal and console."""
    print(json.dumps({"nightshift": event, "uptime": uptime(), **fields}), flush=True)


@dataclass
class Settings:
    """What the bake wrote into the image: where user data comes from."""

    source: str = "fw_cfg"
    imds_endpoint: str = IMDS
    state_dir: Path = STATE
    # The last result stays on the disk for a maintenance boot to look at.
    record_dir: Path = Path("/var/lib/nightshift")

    @classmethod
    def load(cls, path: Path = AGENT_SETTINGS) -> Settings:
        data = json.loads(path.read_text()) if path.exists() else {}
        return cls(
            source=data.get("user_data_source", "fw_cfg"),
            imds_endpoint=data.get("imds_endpoint", IMDS),
            state_dir=Path(data.get("state_dir", STATE)),
        )


# -- user data ---------------------------------------------------------------


class Imds:
    """A small IMDSv2 client: a session token first, then GETs with it."""

    def __init__(self, endpoint: str = IMDS, timeout: float = 2.0):
        self.endpoint = endpoint.rstrip("/")
        self.timeout = timeout
        self._token = ""

    def _token_header(self) -> dict[str, str]:
        import urllib.request  # only on AWS: http.client and ssl cost seconds

        if not self._token:
            request = urllib.request.Request(
                f"{self.endpoint}/latest/api/token",
                method="PUT",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"},
            )
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                self._token = response.read().decode()
        return {"X-aws-ec2-metadata-token": self._token}

    def get(self, path: str) -> bytes | None:
        """The document at path, or None when the service has none (404)."""
        import urllib.error
        import urllib.request

        request = urllib.request.Request(
            f"{self.endpoint}/latest/{path}", headers=self._token_header()
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return None
            raise


def read_user_data(settings: Settings, *, attempts: int = 10) -> bytes:
    """The run configuration as the platform hands it over."""
    if settings.source == "fw_cfg":
        path = FW_CFG / "user-data" / "raw"
        if not path.exists():
            raise ConfigError(
                "user data", str(path), "boot the VM with the run configuration"
            )
        return path.read_bytes()
    imds = Imds(settings.imds_endpoint)
    for attempt in range(1, attempts + 1):
        try:
            data = imds.get("user-data")
        except OSError as err:  # URLError is one
            say("imds-retry", attempt=attempt, error=str(err))
            time.sleep(min(2**attempt / 4, 5))
            continue
        if data is None:
            raise ConfigError(
                "user data", None, "launch the instance with a run configuration"
            )
        return data
    raise ConfigError("user data", None, "the instance metadata service did not answer")


def maintenance_requested(settings: Settings, config: RunConfig | None) -> bool:
    if config is not None and config.mode == "maintenance":
        return True
    if "nightshift.maintenance" in Path("/proc/cmdline").read_text().split():
        return True
    if settings.source == "imds":
        try:
            tag = Imds(settings.imds_endpoint).get(
                "meta-data/tags/instance/nightshift-maintenance"
            )
        except OSError:  # URLError is one
            tag = None
        return tag is not None and tag.strip().lower() in (b"1", b"true", b"yes")
    return False


def prepare(settings: Settings) -> int:
    """Fetch and check the run configuration; mark a maintenance boot."""
    state = settings.state_dir
    state.mkdir(parents=True, exist_ok=True)
    config = None
    try:
        config = RunConfig.from_user_data(read_user_data(settings))
    except ConfigError as err:
        (state / "config-error").write_text(str(err))
        say("config-error", error=str(err))
    if config is not None:
        (state / "run.json").write_text(config.to_user_data())
        say("config", run_id=config.run_id, image=config.image, mode=config.mode)
    if maintenance_requested(settings, config):
        (state / "maintenance").touch()
        say("maintenance", detail="the job is skipped; the machine stays up")
        return 0
    return 0 if config is not None else 1


# -- the run -------------------------------------------------------------------


@dataclass
class Result:
    """One structured record of a run, whatever happened."""

    outcome: str
    exit_code: int | None = None
    reason: str = ""
    run_id: str = ""
    job: str = ""
    image: str = ""
    image_digest: str = ""
    pull_attempts: int = 0
    peak_memory_bytes: int | None = None
    cpu_seconds: float | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def docker(*args: str, timeout: float | None = None, **kwargs: Any):
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, **kwargs
    )


def pull(config: RunConfig, result: Result, started: float) -> bool:
    """Pull with retries and backoff until the pull deadline; True when pulled."""
    deadline = started + config.pull_deadline_seconds
    delay = 1.0
    result.timings["pull_start"] = uptime()
    while True:
        result.pull_attempts += 1
        remaining = deadline - time.monotonic()
        try:
            # Not --quiet: the output names the digest, which spares a
            # `docker image inspect` (a Go start-up, ~1 s under TCG) later.
            done = docker("pull", config.image, timeout=max(remaining, 1))
            error = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
            if done.returncode == 0:
                result.timings["pull_done"] = uptime()
                result.image_digest = pulled_digest(done.stdout)
                return True
        except subprocess.TimeoutExpired:
            error = ["pull did not finish before the pull deadline"]
        say("pull-retry", attempt=result.pull_attempts, error=error[0])
        if time.monotonic() + delay >= deadline:
            result.outcome = "pull-failure"
            result.reason = (
                f"could not pull {config.image} within {config.pull_deadline_seconds}s "
                f"({result.pull_attempts} attempts): {error[0]}"
            )
            return False
        time.sleep(delay)
        delay = min(delay * 2, 10.0)


def pulled_digest(output: str) -> str:
    """The manifest digest `docker pull` reports ("Digest: sha256:...")."""
    for line in output.splitlines():
        if line.startswith("Digest: "):
            return line.split(None, 1)[1].strip()
    return ""


def engine_ping(path: str = DOCKER_SOCKET, timeout: float = 10.0) -> str:
    """Ask the engine's API for /_ping; an empty string when it says OK."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    status = reply.split(b"\r\n", 1)[0]
    body = reply.rsplit(b"\r\n\r\n", 1)[-1]
    if b" 200 " in status and body.strip() == b"OK":
        return ""
    return status.decode(errors="replace") or "empty reply"


def docker_ready(timeout: float = 30.0) -> str:
    """An empty string when the engine answers, else why not.

    A ping on the API socket rather than `docker version`: the same question
    without starting the Go client (a second or more under TCG).
    """
    deadline = time.monotonic() + timeout
    error = "no answer"
    while time.monotonic() < deadline:
        try:
            error = engine_ping()
        except OSError as err:
            error = f"{DOCKER_SOCKET}: {err}"
        if not error:
            return ""
        time.sleep(1)
    return error


def run_arguments(config: RunConfig) -> list[str]:
    """The `docker run` command line for the job container."""
    # --init: Docker's tini is PID 1 and passes SIGTERM on. A job running as
    # PID 1 itself gets no default action for it, so one that has not set a
    # handler (yet) would ignore the stop and wait out the grace for SIGKILL.
    args = ["run", "--name", CONTAINER, "--init", "--cgroup-parent", SLICE]
    if config.log.driver == "awslogs":
        args += [
            "--log-driver=awslogs",
            f"--log-opt=awslogs-group={config.log.group}",
            f"--log-opt=awslogs-region={config.log.region}",
            f"--log-opt=awslogs-stream={config.job}/{config.run_id or 'run'}",
        ]
    else:
        # The agent relays the container's output to the journal and console.
        args.append("--log-driver=none")
    for name in sorted(config.environment):
        args += ["--env", name]
    return [*args, config.image, *config.command]


def relay(stream, prefix: str) -> None:
    for line in stream:
        sys.stdout.write(prefix + line if line.endswith("\n") else prefix + line + "\n")
        sys.stdout.flush()


def run_container(config: RunConfig, result: Result) -> None:
    """Run the job under a stable name; stop it at the maximum run time."""
    env = {**os.environ, **config.environment}
    result.timings["job_start"] = uptime()
    say("job-start", image=config.image, max_run_seconds=config.max_run_seconds)
    process = subprocess.Popen(
        ["docker", *run_arguments(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    relayer = threading.Thread(
        target=relay, args=(process.stdout, JOB_MARK), daemon=True
    )
    relayer.start()
    timed_out = False
    try:
        process.wait(timeout=config.max_run_seconds)
    except subprocess.TimeoutExpired:
        timed_out = True
        say(
            "timeout",
            max_run_seconds=config.max_run_seconds,
            grace=config.stop_grace_seconds,
        )
        stop_container(process, config.stop_grace_seconds)
    relayer.join(timeout=5)
    result.timings["job_end"] = uptime()

    # docker run exits with the container's code; 0 needs no inspection (a
    # Go start-up saved on the way to power-off). Any other code may be
    # docker's own (125-127) or an OOM kill: ask the engine.
    if process.returncode == 0 and not timed_out:
        state: dict[str, Any] = {"ExitCode": 0}
    else:
        state = inspect_state()
    code = state.get("ExitCode", process.returncode) if state else process.returncode
    result.exit_code = code
    if timed_out:
        result.outcome = "timeout"
        result.reason = (
            f"still running after max_run_seconds={config.max_run_seconds}; stopped "
            f"(SIGTERM, SIGKILL after {config.stop_grace_seconds}s); exit code {code}"
        )
    elif not state:
        result.outcome = "docker-failure"
        result.reason = f"docker run exited {process.returncode} without a container"
    elif code == 0:
        result.outcome = "success"
        result.reason = "the job exited 0"
    elif state.get("OOMKilled"):
        result.outcome = "failure"
        result.reason = (
            f"the job was killed for using too much memory (exit code {code})"
        )
    else:
        result.outcome = "failure"
        result.reason = f"the job exited {code}"
    result.image_digest = result.image_digest or image_digest(config.image)
    result.peak_memory_bytes, result.cpu_seconds = cgroup_usage()


def stop_container(process: subprocess.Popen, grace: int) -> None:
    """SIGTERM the job, SIGKILL after grace, until `docker run` has returned.

    One `docker stop` is not enough: a short maximum run time can fire while
    `docker run` is still creating the container, when stop finds no container
    (or a created one it leaves alone) and the client then starts it anyway.
    """
    deadline = time.monotonic() + grace + 30
    while process.poll() is None and time.monotonic() < deadline:
        # docker stop sends SIGTERM, then SIGKILL after the grace period.
        docker("stop", "--time", str(grace), CONTAINER, timeout=grace + 30)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=1)
    if process.poll() is None:
        docker("kill", CONTAINER, timeout=30)
        process.kill()
        process.wait()


def inspect_state() -> dict[str, Any]:
    done = docker("inspect", "--format", "{{json .State}}", CONTAINER, timeout=30)
    if done.returncode != 0:
        return {}
    return json.loads(done.stdout)


def image_digest(image: str) -> str:
    done = docker(
        "image", "inspect", "--format", "{{json .RepoDigests}}", image, timeout=30
    )
    if done.returncode != 0:
        return ""
    digests = json.loads(done.stdout) or []
    repository = image.split("@")[0]
    if ":" in repository.rsplit("/", 1)[-1]:
        repository = repository.rsplit(":", 1)[0]
    for item in digests:
        if item.startswith(repository + "@"):
            return item.split("@", 1)[1]
    return digests[0].split("@", 1)[1] if digests else ""


def cgroup_usage(
    root: Path = Path("/sys/fs/cgroup"),
) -> tuple[int | None, float | None]:
    """Peak memory and CPU time of the job's slice, which outlives the container."""
    unified = root / SLICE
    if (unified / "memory.peak").exists():
        peak = int((unified / "memory.peak").read_text())
        stat = dict(
            line.split() for line in (unified / "cpu.stat").read_text().splitlines()
        )
        return peak, round(int(stat["usage_usec"]) / 1e6, 3)
    memory = root / "memory" / SLICE / "memory.max_usage_in_bytes"
    cpu = root / "cpuacct" / SLICE / "cpuacct.usage"
    if memory.exists() and cpu.exists():
        return int(memory.read_text()), round(int(cpu.read_text()) / 1e9, 3)
    return None, None


def run(settings: Settings) -> int:
    """Pull and run the job; write the result record for the reporter."""
    started = time.monotonic()
    state = settings.state_dir
    state.mkdir(parents=True, exist_ok=True)
    (state / REPORTED).unlink(missing_ok=True)
    result = Result(outcome="agent-failure", timings={"agent_start": uptime()})
    try:
        result = _run(settings, result, started)
    except Exception as err:  # the reporter must still get a record
        result.outcome = "agent-failure"
        result.reason = f"{type(err).__name__}: {err}"
    (state / "result.json").write_text(json.dumps(result.to_dict()))
    # Report from this process: the unit's ExecStopPost then skips a second
    # Python start-up (seconds under TCG) and reports only when this step
    # died before it got here.
    try:
        report(settings)
    except Exception as err:  # ExecStopPost reports instead
        say("report-failed", error=f"{type(err).__name__}: {err}")
    return 0 if result.outcome == "success" else 1


def _run(settings: Settings, result: Result, started: float) -> Result:
    state = settings.state_dir
    if not (state / "run.json").exists():
        error = state / "config-error"
        result.outcome = "config-error"
        result.reason = error.read_text() if error.exists() else "no run configuration"
        return result
    config = RunConfig.from_user_data((state / "run.json").read_text())
    result.run_id, result.job, result.image = config.run_id, config.job, config.image

    problem = docker_ready()
    if problem:
        result.outcome, result.reason = (
            "docker-failure",
            f"the engine did not answer: {problem}",
        )
        return result
    if not pull(config, result, started):
        return result
    run_container(config, result)
    return result


# -- the report ------------------------------------------------------------------


def report(settings: Settings) -> int:
    """Print the result record and publish it; runs after every run, always."""
    path = settings.state_dir / "result.json"
    if path.exists():
        data = json.loads(path.read_text())
    else:
        # The run step died before writing a record: say what systemd saw.
        data = Result(
            outcome="agent-failure",
            reason=(
                f"the run step ended without a record (service result "
                f"{os.environ.get('SERVICE_RESULT', '?')}, exit "
                f"{os.environ.get('EXIT_STATUS', '?')})"
            ),
        ).to_dict()
    data["timings"]["report"] = uptime()
    print(f"{RESULT_MARK} {json.dumps(data, sort_keys=True)}", flush=True)
    settings.record_dir.mkdir(parents=True, exist_ok=True)
    (settings.record_dir / "last-result.json").write_text(json.dumps(data))

    run_json = settings.state_dir / "run.json"
    if run_json.exists():
        config = RunConfig.from_user_data(run_json.read_text())
        if config.report.sns_topic_arn or config.report.log_group:
            try:
                publish(config, data, settings)
            except Exception as err:  # a failed report must not keep the machine up
                say("report-failed", error=f"{type(err).__name__}: {err}")
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    (settings.state_dir / REPORTED).touch()
    return 0


def publish(config: RunConfig, data: dict[str, Any], settings: Settings) -> None:
    """Send the result to SNS, CloudWatch metrics and the job's run log."""
    import boto3  # only on AWS images

    target = config.report
    instance_id = (
        Imds(settings.imds_endpoint).get("meta-data/instance-id") or b""
    ).decode()
    record = {**data, "instance_id": instance_id}
    if target.sns_topic_arn:
        boto3.client("sns", region_name=target.region).publish(
            TopicArn=target.sns_topic_arn,
            Subject=f"nightshift {config.job}: {data['outcome']}"[:100],
            Message=json.dumps(record, indent=2, sort_keys=True),
        )
    if target.metrics_namespace:
        dimensions = [{"Name": "Job", "Value": config.job}]
        metrics = [
            {
                "MetricName": "RunSucceeded",
                "Value": float(data["outcome"] == "success"),
            },
            {"MetricName": "RunFailed", "Value": float(data["outcome"] != "success")},
        ]
        if data.get("peak_memory_bytes") is not None:
            metrics.append(
                {
                    "MetricName": "PeakMemoryBytes",
                    "Value": float(data["peak_memory_bytes"]),
                    "Unit": "Bytes",
                }
            )
        boto3.client("cloudwatch", region_name=target.region).put_metric_data(
            Namespace=target.metrics_namespace,
            MetricData=[{**metric, "Dimensions": dimensions} for metric in metrics],
        )
    if target.log_group:
        logs = boto3.client("logs", region_name=target.region)
        stream = f"runs/{config.run_id or instance_id}"
        with contextlib.suppress(logs.exceptions.ResourceAlreadyExistsException):
            logs.create_log_stream(logGroupName=target.log_group, logStreamName=stream)
        logs.put_log_events(
            logGroupName=target.log_group,
            logStreamName=stream,
            logEvents=[
                {"timestamp": int(time.time() * 1000), "message": json.dumps(record)}
            ],
        )


def _stopped(signum, frame) -> None:
    """systemd stops the unit with SIGTERM: stop the container first, then go."""
    docker("stop", CONTAINER, timeout=60)
    sys.exit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nightshift-agent")
    parser.add_argument("step", choices=("prepare", "run", "report"))
    args = parser.parse_args(argv)
    settings = Settings.load()
    signal.signal(signal.SIGTERM, _stopped)
    return {"prepare": prepare, "run": run, "report": report}[args.step](settings)


if __name__ == "__main__":
    sys.exit(main())
