"""Run the job locally: boot the baked image in qemu, as EC2 would boot an AMI.

The VM gets its run configuration through qemu's fw_cfg (where EC2 has user
data), boots from a throwaway overlay of the image (so every run is a first
boot of a pristine disk), runs the job and powers itself off.  The host only
watches the console, and kills the VM only past the run's time bound.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from nightshift.agent import JOB_MARK, RESULT_MARK
from nightshift.config import Config
from nightshift.errors import NightshiftError, ToolMissing
from nightshift.runconfig import RunConfig

# What a boot under TCG may take before the job starts, on top of the run's
# own limits (pull deadline, maximum run time, stop grace).
BOOT_ALLOWANCE = 240
REPORT_ALLOWANCE = 60


class RunFailed(NightshiftError):
    """The job did not succeed; the summary has been printed."""


@dataclass
class BootImage:
    """What a VM boots: a disk plus the kernel and initrd for direct boot."""

    name: str
    disk: Path
    kernel: Path
    initrd: Path
    # The one plain-HTTP registry its Docker trusts; empty when not known.
    registry: str = ""


@dataclass
class Summary:
    """The outcome of one local run, from the guest's record and the host's clock."""

    run_id: str
    image: str
    outcome: str
    exit_code: int | None
    reason: str
    image_digest: str = ""
    killed: bool = False
    powered_off: bool = False
    record: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float | None] = field(default_factory=dict)
    job_lines: list[str] = field(default_factory=list)
    console_log: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome == "success" and not self.killed

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "job_lines"}


# journald writes a service's console lines as "[  12.345678] name[pid]: text".
_CONSOLE_PREFIX = re.compile(r"^\[\s*\d+\.\d+\] [^\s\[]+\[\d+\]: ")


def console_text(line: str) -> str:
    """A console line without the prefix journald puts on a service's output."""
    return _CONSOLE_PREFIX.sub("", line, count=1)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def qemu_command(
    cfg: Config,
    image: BootImage,
    disk: Path,
    fw_cfg: dict[str, Path],
    *,
    accelerator: str | None = None,
    maintenance: bool = False,
    ssh_port: int | None = None,
) -> list[str]:
    """The qemu command line: direct kernel boot, console on the serial port."""
    binary = shutil.which("qemu-system-x86_64")
    if not binary:
        raise ToolMissing(
            "qemu-system-x86_64 is missing: apt-get install qemu-system-x86"
        )
    append = "root=/dev/vda rw console=ttyS0 quiet"
    if maintenance:
        append += " nightshift.maintenance"
    netdev = "user,id=net0"
    if ssh_port:
        netdev += f",hostfwd=tcp:127.0.0.1:{ssh_port}-:22"
    accel = accelerator or cfg.local.accelerator
    command = [
        binary,
        "-accel", "tcg,thread=multi" if accel == "tcg" else accel,
        "-m", str(cfg.local.memory_mb),
        "-smp", str(cfg.local.cpus),
        "-display", "none",
        "-monitor", "none",
        "-serial", "stdio",
        # A reboot request ends the process, as power-off ends an instance.
        "-no-reboot",
        "-kernel", str(image.kernel),
        "-initrd", str(image.initrd),
        "-append", append,
        "-drive", f"file={disk},if=virtio,format=qcow2",
        "-netdev", netdev,
        "-device", "virtio-net-pci,netdev=net0",
        "-device", "virtio-rng-pci",
    ]  # fmt: skip
    for name, path in fw_cfg.items():
        command += ["-fw_cfg", f"name=opt/nightshift/{name},file={path}"]
    return command


class VM:
    """One qemu process booting an overlay of a baked image."""

    def __init__(
        self,
        cfg: Config,
        image: BootImage,
        run_config: RunConfig,
        workdir: Path,
        *,
        accelerator: str | None = None,
        maintenance: bool = False,
        ssh_public_key: Path | None = None,
    ):
        self.cfg = cfg
        self.image = image
        self.run_config = run_config
        self.workdir = workdir
        self.accelerator = accelerator
        self.maintenance = maintenance
        self.ssh_public_key = ssh_public_key
        self.ssh_port: int | None = None
        self.process: subprocess.Popen[str] | None = None
        self.started = 0.0
        self.ended: float | None = None
        self.lines: list[tuple[float, str]] = []
        self._reader: threading.Thread | None = None
        self._listeners: list[Any] = []

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        overlay = self.workdir / "disk.qcow2"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2",
             "-b", str(self.image.disk.resolve()), str(overlay)],
            check=True,
        )  # fmt: skip
        user_data = self.workdir / "user-data.json"
        user_data.write_text(self.run_config.to_user_data())
        fw_cfg = {"user-data": user_data}
        if self.ssh_public_key:
            fw_cfg["ssh-key"] = self.ssh_public_key
            self.ssh_port = free_port()
        command = qemu_command(
            self.cfg, self.image, overlay, fw_cfg,
            accelerator=self.accelerator, maintenance=self.maintenance,
            ssh_port=self.ssh_port,
        )  # fmt: skip
        (self.workdir / "qemu-command.txt").write_text(" ".join(command) + "\n")
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            # Its own process group: a Ctrl-C in the terminal reaches us, and
            # we stop qemu deliberately, after saying so.
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def on_line(self, callback) -> None:
        self._listeners.append(callback)

    def _read(self) -> None:
        assert self.process and self.process.stdout
        with open(self.workdir / "console.log", "w") as log:
            for raw in self.process.stdout:
                line = raw.rstrip("\r\n")
                stamp = time.monotonic() - self.started
                self.lines.append((stamp, line))
                log.write(line + "\n")
                log.flush()
                for callback in list(self._listeners):
                    try:
                        callback(stamp, line)
                    except Exception:
                        # The console is still read and kept; only this
                        # listener (a terminal that went away) stops.
                        self._listeners.remove(callback)

    def wait(self, timeout: float) -> bool:
        """True when the VM powered itself off within timeout."""
        assert self.process
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        self.ended = self.elapsed
        if self._reader:
            self._reader.join(timeout=5)
        return True

    def kill(self) -> None:
        """Stop qemu: a polite quit first, then SIGKILL."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.ended = self.elapsed
        if self._reader:
            self._reader.join(timeout=5)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


@contextlib.contextmanager
def booted(vm: VM) -> Iterator[VM]:
    """Start the VM; whatever happens inside, no qemu is left behind."""
    try:
        vm.start()
        yield vm
    finally:
        vm.kill()


def time_bound(run_config: RunConfig) -> int:
    """How long the host lets a VM run before killing it."""
    return (
        BOOT_ALLOWANCE
        + run_config.pull_deadline_seconds
        + run_config.max_run_seconds
        + run_config.stop_grace_seconds
        + REPORT_ALLOWANCE
    )


class ConsolePrinter:
    """Shows the console as it comes, the job's own lines marked."""

    def __init__(self, out: TextIO, *, verbose: bool = True):
        self.out = out
        self.verbose = verbose
        self.colour = (
            hasattr(out, "isatty") and out.isatty() and not os.environ.get("NO_COLOR")
        )

    def __call__(self, stamp: float, line: str) -> None:
        line = console_text(line)
        if line.startswith(JOB_MARK):
            text = line[len(JOB_MARK) :]
            mark = "\x1b[1;36mjob ▌\x1b[0m" if self.colour else "job ▌"
            self.out.write(f"{stamp:7.1f}s {mark} {text}\n")
        elif line.startswith(RESULT_MARK):
            self.out.write(f"{stamp:7.1f}s vm  │ result recorded\n")
        elif self.verbose and line.strip():
            self.out.write(f"{stamp:7.1f}s vm  │ {line}\n")
        self.out.flush()


def summarise(vm: VM, *, killed: bool) -> Summary:
    """Build the summary from the guest's result record and the host's clock."""
    record: dict[str, Any] = {}
    record_seen = None
    job_lines = []
    for stamp, raw in vm.lines:
        line = console_text(raw)
        if line.startswith(RESULT_MARK):
            record_seen = stamp
            with contextlib.suppress(json.JSONDecodeError):
                record = json.loads(line[len(RESULT_MARK) :])
        elif line.startswith(JOB_MARK):
            job_lines.append(line[len(JOB_MARK) :])
    end = vm.ended if vm.ended is not None else vm.elapsed
    guest = record.get("timings", {})
    job_start, job_end = guest.get("job_start"), guest.get("job_end")
    timings = {
        "boot_to_job_start": job_start,
        "job_run": round(job_end - job_start, 2) if job_start and job_end else None,
        "job_end_to_power_off": (
            round(end - record_seen + guest["report"] - job_end, 2)
            if record_seen is not None and job_end and "report" in guest
            else None
        ),
        "total": round(end, 2),
    }
    if not record:
        outcome = "killed" if killed else "no-report"
        reason = (
            "the VM did not power off in time and was killed"
            if killed
            else "the VM powered off without a result record"
        )
        return Summary(
            run_id=vm.run_config.run_id, image=vm.image.name, outcome=outcome,
            exit_code=None, reason=reason, killed=killed, powered_off=not killed,
            timings=timings, job_lines=job_lines,
        )  # fmt: skip
    return Summary(
        run_id=vm.run_config.run_id,
        image=vm.image.name,
        outcome="killed" if killed else record["outcome"],
        exit_code=record.get("exit_code"),
        reason=record.get("reason", "")
        + (" (and the VM did not power off in time: killed)" if killed else ""),
        image_digest=record.get("image_digest", ""),
        killed=killed,
        powered_off=not killed,
        record=record,
        timings=timings,
        job_lines=job_lines,
    )


def print_summary(summary: Summary, out: TextIO) -> None:
    def seconds(value):
        return "-" if value is None else f"{value:.1f}s"

    t = summary.timings
    lines = [
        "",
        f"run {summary.run_id} on {summary.image}",
        f"  outcome    {summary.outcome}",
        f"  exit code  {'-' if summary.exit_code is None else summary.exit_code}",
        f"  reason     {summary.reason}",
        f"  image      {summary.record.get('image', '-')}",
        f"  digest     {summary.image_digest or '-'}",
        f"  timings    boot to job start {seconds(t.get('boot_to_job_start'))}, "
        f"job run {seconds(t.get('job_run'))}, "
        f"job end to power-off {seconds(t.get('job_end_to_power_off'))}, "
        f"total {seconds(t.get('total'))}",
        f"  peak mem   {_mebibytes(summary.record.get('peak_memory_bytes'))}, "
        f"cpu {seconds(summary.record.get('cpu_seconds'))}",
        f"  console    {summary.console_log}",
    ]
    out.write("\n".join(lines) + "\n")
    out.flush()


def _mebibytes(value) -> str:
    return "-" if value is None else f"{value / 2**20:.1f} MiB"


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]


def check_registry(image: BootImage, run_config: RunConfig) -> None:
    """Refuse a run whose job image sits on a host registry the image won't trust.

    A local image trusts one plain-HTTP registry, the one it was baked for;
    after local.registry_port changes, its Docker would try HTTPS on the new
    port and the run would end in a pull failure minutes later.
    """
    trusted = image.registry
    host = run_config.image.split("/", 1)[0]
    if trusted and host.startswith("10.0.2.2:") and host != trusted:
        raise NightshiftError(
            f"{image.name} pulls over plain HTTP only from {trusted}, "
            f"but the job image is {run_config.image}; set "
            f"local.registry_port back to {trusted.rsplit(':', 1)[1]}, or bake "
            "an image for the new port: `invoke bake-ami` (or `invoke demo`) "
            "with the same --config"
        )


def run(
    cfg: Config,
    image: BootImage,
    run_config: RunConfig | None = None,
    *,
    accelerator: str | None = None,
    out: TextIO = sys.stdout,
    verbose: bool = True,
    bound: float | None = None,
) -> Summary:
    """Boot the image once with a run configuration and wait for power-off."""
    run_id = new_run_id()
    base = run_config or cfg.run_config()
    run_config = RunConfig.parse({**base.to_dict(), "run_id": base.run_id or run_id})
    check_registry(image, run_config)
    workdir = cfg.build_dir / "runs" / run_config.run_id
    vm = VM(cfg, image, run_config, workdir, accelerator=accelerator)
    vm.on_line(ConsolePrinter(out, verbose=verbose))
    bound = bound if bound is not None else time_bound(run_config)
    out.write(
        f"booting {image.name} (run {run_config.run_id}, "
        f"{accelerator or cfg.local.accelerator}, "
        f"power-off expected within {bound:.0f}s)\n"
    )
    try:
        with booted(vm):
            powered_off = vm.wait(bound)
            if not powered_off:
                out.write(f"the VM is still up after {bound:.0f}s: killing it\n")
    except KeyboardInterrupt:
        # The run's folder still tells what happened before the Ctrl-C.
        summary = summarise(vm, killed=True)
        summary.reason = "interrupted (Ctrl-C): the host stopped the VM"
        _keep(summary, workdir)
        raise
    summary = summarise(vm, killed=not powered_off)
    _keep(summary, workdir)
    return summary


def _keep(summary: Summary, workdir: Path) -> None:
    """Write the run's result.json beside its console; drop the spent overlay."""
    summary.console_log = str(workdir / "console.log")
    (workdir / "result.json").write_text(json.dumps(summary.to_dict(), indent=2))
    (workdir / "disk.qcow2").unlink(missing_ok=True)
