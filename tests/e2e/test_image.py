"""The baked local image, booted in maintenance mode and inspected over SSH.

The key testinfra logs in with is made here and handed to the VM at boot
through fw_cfg, the way EC2 hands over a key pair: none is baked in.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import testinfra

from nightshift import bench, localrun

pytestmark = [pytest.mark.vm, pytest.mark.image]

SSH_OPTIONS = (
    "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
)


def wait_for_ssh(key: Path, port: int, vm: localrun.VM, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if vm.process.poll() is not None:
            pytest.fail("the maintenance VM powered off instead of staying up")
        probe = subprocess.run(
            ["ssh", *SSH_OPTIONS.split(), "-o", "ConnectTimeout=5", "-i", str(key),
             "-p", str(port), "root@127.0.0.1", "true"],
            capture_output=True,
        )  # fmt: skip
        if probe.returncode == 0:
            return
        time.sleep(3)
    pytest.fail(f"no SSH on the maintenance VM after {timeout}s")


@pytest.fixture(scope="module")
def maintenance_vm(e2e_cfg, baked, keypair, tmp_path_factory):
    vm = localrun.VM(
        e2e_cfg,
        baked,
        e2e_cfg.run_config(),
        tmp_path_factory.mktemp("maintenance"),
        maintenance=True,
        ssh_public_key=keypair.with_suffix(".pub"),
    )
    with localrun.booted(vm):
        wait_for_ssh(keypair, vm.ssh_port, vm)
        yield vm
        # Leave as a run would: the guest powers itself off.
        subprocess.run(
            ["ssh", *SSH_OPTIONS.split(), "-i", str(keypair), "-p", str(vm.ssh_port),
             "root@127.0.0.1", "systemctl poweroff"],
            capture_output=True,
        )  # fmt: skip
        assert vm.wait(120), "the VM did not power off after `systemctl poweroff`"


@pytest.fixture(scope="module")
def host(maintenance_vm, keypair):
    return testinfra.get_host(
        f"ssh://root@127.0.0.1:{maintenance_vm.ssh_port}",
        ssh_identity_file=str(keypair),
        ssh_extra_args=SSH_OPTIONS,
    )


@pytest.mark.parametrize(
    "package", ["docker.io", "apparmor", "python3", "openssh-server"]
)
def test_package_installed(host, package):
    """The image carries the engine and what the agent needs."""
    assert host.package(package).is_installed


def test_docker_enabled_and_running(host):
    """Docker starts at boot, so the job unit finds it."""
    docker = host.service("docker")
    assert docker.is_enabled
    assert docker.is_running


def unit_properties(host, unit: str) -> dict[str, str]:
    output = host.check_output(f"systemctl show {unit} --no-pager")
    return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)


def test_job_unit_properties(host):
    """Ordering, power-off on every outcome, and no start timeout on a long pull."""
    props = unit_properties(host, "nightshift-job.service")
    assert props["UnitFileState"] == "enabled"
    for needed in (
        "network-online.target",
        "docker.service",
        "nightshift-config.service",
    ):
        assert needed in props["Wants"].split()
        assert needed in props["After"].split()
    assert props["SuccessAction"] == "poweroff-force"
    assert props["FailureAction"] == "poweroff-force"
    assert props["Type"] == "exec"
    assert (
        props["ExecStartPre"].count("rm") and "nightshift-job" in props["ExecStartPre"]
    )
    assert "nightshift.agent report" in props["ExecStopPost"]
    assert "DOCKER_CONFIG=/root/.docker" in props["Environment"]
    assert "HOME=/root" in props["Environment"]


def test_maintenance_boot_skipped_the_job(host):
    """With nightshift.maintenance the job's conditions fail and nothing runs."""
    props = unit_properties(host, "nightshift-job.service")
    assert props["ConditionResult"] == "no"
    assert props["ActiveState"] == "inactive"
    assert host.file("/run/nightshift/maintenance").exists
    assert host.check_output("docker ps -aq") == ""


def test_run_configuration_came_through_fw_cfg(host, e2e_cfg):
    """The config unit read the user data and stored it checked."""
    stored = json.loads(host.file("/run/nightshift/run.json").content_string)
    assert stored["image"] == e2e_cfg.local_image()
    settings = json.loads(host.file("/etc/nightshift/agent.json").content_string)
    assert settings["user_data_source"] == "fw_cfg"


def test_registry_settings(host, e2e_cfg):
    """The local registry is plain HTTP for that host only; no credentials anywhere."""
    daemon = json.loads(host.file("/etc/docker/daemon.json").content_string)
    assert daemon["insecure-registries"] == [e2e_cfg.guest_registry]
    client = host.file("/root/.docker/config.json")
    assert client.mode == 0o600
    assert "auth" not in json.loads(client.content_string)


def test_only_the_boot_supplied_key_is_authorized(host, keypair):
    authorized = (
        host.file("/root/.ssh/authorized_keys").content_string.strip().splitlines()
    )
    assert authorized == [keypair.with_suffix(".pub").read_text().strip()]
    assert not host.file("/home/admin/.ssh/authorized_keys").exists


def test_machine_id_and_host_keys_are_made_at_boot(host):
    """The bake emptied them; this boot made its own."""
    assert re.fullmatch(
        r"[0-9a-f]{32}", host.file("/etc/machine-id").content_string.strip()
    )
    assert host.file("/etc/ssh/ssh_host_ed25519_key").exists


def test_no_secrets_on_disk(host):
    """No private key but this boot's host keys, no AWS keys, no registry token."""
    pattern = 'PRIVATE KEY-----|aws_secret_access_key|"auth": *"'
    places = "/root /home /etc /usr/lib/nightshift /var/lib/nightshift"
    found = host.run(f"grep -rlsE '{pattern}' {places} | grep -v '^/etc/ssh/ssh_host_'")
    assert found.stdout.strip() == ""


def test_role_is_idempotent(maintenance_vm, keypair, e2e_cfg, tmp_path):
    """Applying the role again to the baked image changes nothing."""
    again = bench.reapply_role(
        e2e_cfg, ssh_port=maintenance_vm.ssh_port, key=keypair, work=tmp_path
    )
    assert again.returncode == 0, again.output[-3000:]
    assert again.changed == 0, again.output[-3000:]
