"""The job image for real: Debian-built base, build, push, pull by digest, run."""

from __future__ import annotations

import io
import subprocess
import time

import docker
import pytest
from jobhelpers import free_port, job_cfg, run_job, summary_of

from nightshift import demo, jobimage, services
from nightshift.errors import NightshiftError
from nightshift.runconfig import ConfigError

SMALL = {"ROWS": "20000", "GROUPS": "40"}


@pytest.fixture(scope="session")
def base(cfg, docker_client) -> str:
    """The Python base; a cold build takes one to three minutes (mmdebstrap)."""
    return jobimage.ensure_python_base(cfg, docker_client, log=print)


@pytest.fixture(scope="session")
def pushed(cfg, docker_client, registry, base) -> jobimage.Pushed:
    return jobimage.build_and_push(cfg, docker_client, registry, log=print)


def _logs(container) -> str:
    return container.logs(stdout=True, stderr=True).decode(errors="replace")


@pytest.mark.docker
def test_python_base_is_labelled_and_runs_python(docker_client, base):
    """The base carries its inputs hash and runs Debian's python3."""
    image = docker_client.images.get(base)
    assert image.labels[jobimage.INPUTS_LABEL] == jobimage.base_inputs_hash()

    out = docker_client.containers.run(
        base, ["python3", "-c", "import sys; print(sys.version_info[:2])"], remove=True
    )
    assert out.decode().strip() == "(3, 11)"


@pytest.mark.docker
def test_python_base_is_not_rebuilt_when_current(cfg, docker_client, base):
    """A second call finds the labelled image and returns at once."""
    lines: list[str] = []

    started = time.monotonic()
    ref = jobimage.ensure_python_base(cfg, docker_client, log=lines.append)

    assert ref == base
    assert time.monotonic() - started < 5
    assert any("is current" in line for line in lines)


@pytest.mark.docker
def test_push_gives_both_tags_one_registry_digest(pushed, registry):
    """Both tags are in the registry under the digest build_and_push returned."""
    repository = f"{pushed.repository.split('/', 1)[1]}"
    assert pushed.digest.startswith("sha256:")
    assert pushed.tags[1].endswith(":latest")
    for ref in pushed.tags:
        tag = ref.rsplit(":", 1)[1]
        digest = services.manifest_digest(registry.address, repository, tag)
        assert digest == pushed.digest


@pytest.mark.docker
def test_pull_by_digest_and_run_gives_the_native_result(
    docker_client, pushed, tmp_path
):
    """The image pulled back by digest computes what the job computes natively."""
    for ref in pushed.tags:
        docker_client.images.remove(ref, force=True)

    image = docker_client.images.pull(pushed.by_digest)
    out = docker_client.containers.run(image.id, environment=SMALL, remove=True)

    in_container = summary_of(out.decode())
    native = summary_of(run_job({**SMALL, "OUTPUT_DIR": str(tmp_path)}).stdout)
    assert in_container["sha256"] == native["sha256"]
    assert in_container["output"] == "/tmp/nightshift-out/result.json"


@pytest.mark.docker
def test_container_runs_as_non_root(docker_client, pushed):
    """The job does not run as root inside its container."""
    out = docker_client.containers.run(
        pushed.by_digest, entrypoint=["id", "-u"], remove=True
    )
    assert out.decode().strip() == "65532"


@pytest.mark.docker
def test_docker_stop_ends_the_job_with_143(docker_client, pushed):
    """`docker stop` (SIGTERM to PID 1) ends the job cleanly within 2 s."""
    container = docker_client.containers.run(
        pushed.by_digest, environment={"ROWS": "50000000"}, detach=True
    )
    try:
        deadline = time.monotonic() + 30
        while "start:" not in _logs(container) and time.monotonic() < deadline:
            time.sleep(0.2)
        sent = time.monotonic()
        container.stop(timeout=10)
        took = time.monotonic() - sent
        status = container.wait(timeout=10)
        logs = _logs(container)
    finally:
        container.remove(force=True)

    assert status["StatusCode"] == 143, logs
    assert took < 2.5, f"took {took:.2f}s"
    assert "stopped by SIGTERM" in logs


@pytest.mark.docker
def test_failing_exit_code_reaches_docker(docker_client, pushed):
    """FAIL_EXIT's code is the container's exit code."""
    with pytest.raises(docker.errors.ContainerError) as failed:
        docker_client.containers.run(
            pushed.by_digest, environment={"ROWS": "100", "FAIL_EXIT": "3"}, remove=True
        )
    assert failed.value.exit_status == 3


@pytest.mark.docker
def test_build_failure_is_one_clear_error(docker_client, base, tmp_path):
    """A failing build step surfaces Docker's own message in one line."""
    (tmp_path / "Dockerfile").write_text(
        "ARG BASE_IMAGE\nFROM ${BASE_IMAGE}\nRUN exit 7\n"
    )
    cfg = job_cfg(free_port(), context=str(tmp_path))

    with pytest.raises(NightshiftError, match="returned a non-zero code: 7"):
        jobimage.build_image(
            cfg, docker_client, base=base, tag="nightshift-test/broken:1", revision="x"
        )


def test_missing_dockerfile_names_job_context(tmp_path):
    """A context without a Dockerfile points at the setting."""
    cfg = job_cfg(free_port(), context=str(tmp_path))

    with pytest.raises(ConfigError, match="job.context") as caught:
        jobimage.job_context(cfg)
    assert caught.value.value == str(tmp_path)
    with pytest.raises(ConfigError, match="job.context"):
        jobimage.build_image(cfg, None, base="b", tag="t:1", revision="x")


def test_demo_refuses_a_missing_dockerfile_before_starting_anything(tmp_path):
    """The check comes first: no base image, engine or registry is touched."""
    cfg = job_cfg(free_port(), context=str(tmp_path / "nowhere"))
    out = io.StringIO()

    with pytest.raises(ConfigError, match="job.context"):
        demo.demo(cfg, out=out)
    assert out.getvalue() == ""


@pytest.mark.docker
def test_push_to_a_dead_registry_is_a_clear_error(docker_client, pushed):
    """Pushing where no registry answers fails with one line naming the ref."""
    ref = f"127.0.0.1:{free_port()}/nightshift-test/job:1"
    docker_client.images.get(pushed.by_digest).tag(ref)
    try:
        with pytest.raises(NightshiftError, match=f"pushing {ref} failed"):
            jobimage.push_image(docker_client, ref, log=print)
    finally:
        docker_client.images.remove(ref)


def _git(root, *args):
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)


def test_git_revision_nogit_clean_and_dirty(tmp_path):
    """Tags say nogit outside git, the short revision, and -dirty on changes."""
    assert jobimage.git_revision(tmp_path) == "nogit"

    _git(tmp_path, "init", "-q")
    (tmp_path / "f").write_text("1")
    _git(tmp_path, "add", "f")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "1")
    clean = jobimage.git_revision(tmp_path)
    (tmp_path / "f").write_text("2")

    assert len(clean) == 12 and clean != "nogit"
    assert jobimage.git_revision(tmp_path) == f"{clean}-dirty"


def test_image_refs_name_the_registry_project_and_job():
    """The revision tag comes first, latest second, both in one repository."""
    cfg = job_cfg(5000)
    assert jobimage.image_refs(cfg, "127.0.0.1:5000", "abc") == [
        "127.0.0.1:5000/nightshift/example:abc",
        "127.0.0.1:5000/nightshift/example:latest",
    ]


def test_mmdebstrap_command_follows_the_inputs(tmp_path):
    """The base's recipe is the hashed inputs: changing one changes the key."""
    command = jobimage.mmdebstrap_command(tmp_path / "r.tar")
    assert "--variant=minbase" in command
    assert "--include=python3,ca-certificates" in command
    changed = {**jobimage.BASE_INPUTS, "packages": ["python3"]}
    assert jobimage.base_inputs_hash(changed) != jobimage.base_inputs_hash()
