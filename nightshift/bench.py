"""`invoke bench`: what a run costs beyond the job, against the physical floor.

The floor is a reference image: the same base disk with Docker and one unit
that pulls and runs the same job image and powers off (bench/reference.yml).
The bench boots it and nightshift's baked image in turn, in the same VM
settings, and times each step from the guest's clock (uptime printed on the
console, the kernel's stamp on "reboot: Power down") and from the host's.
It also counts the bytes the guest pulls from the local registry, and, with
--bake-times, how long a bake takes cold, with the base cached, and as a
second Ansible run on a machine already provisioned.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from nightshift import bake, baseimage, jobimage, localrun, services
from nightshift.agent import RESULT_MARK
from nightshift.config import Config
from nightshift.errors import NightshiftError
from nightshift.runconfig import RunConfig

REFERENCE_PLAYBOOK = "bench/reference.yml"
# The reference image's inputs besides the base: its playbook and templates,
# the cleanup role it shares with nightshift's image, and the Packer template.
REFERENCE_INPUTS = ("bench", "ansible/roles/nightshift_cleanup", "packer")
SIDES = ("reference", "nightshift")
METRICS = (
    "boot_to_job_start",
    "job_run",
    "job_end_to_power_off",
    "overhead",
    "total",
)
TARGETS = {
    "overhead_ratio": 1.15,
    "job_end_to_power_off_seconds": 2.0,
}

_POWER_DOWN = re.compile(r"\[\s*(\d+\.\d+)\]\s+reboot: Power down")
# The console shows a unit's output as journald forwards it, which may put
# "[ uptime] unit[pid]: " in front: markers are searched, not anchored.
_MARK = re.compile(r"\bbench-mark (\w+) (\d+(?:\.\d+)?)\s*$")
_REGISTRY_DONE = re.compile(r'msg="response completed".*http\.request\.host="([^"]+)"')
_WRITTEN = re.compile(r"http\.response\.written=(\d+)")
_URI = re.compile(r'http\.request\.uri="?([^" ]+)')
_METHOD = re.compile(r"http\.request\.method=(\w+)")


def _say(out: TextIO, message: str) -> None:
    out.write(f"bench: {message}\n")
    out.flush()


# --- the reference image ---------------------------------------------------


def bench_dir(cfg: Config) -> Path:
    return cfg.build_dir / "bench"


def _with_build_dir(cfg: Config, path: Path) -> Config:
    """The same project with its build output elsewhere (own manifest, logs)."""
    return dataclasses.replace(
        cfg, local=dataclasses.replace(cfg.local, build_dir=str(path))
    )


def reference_config(cfg: Config) -> Config:
    """Where reference images live: a manifest of their own, so that
    `newest_local_image` never picks one for a real run."""
    return _with_build_dir(cfg, bench_dir(cfg) / "reference")


def reference_vars(cfg: Config, *, warm_cache: bool) -> dict[str, Any]:
    """What the reference playbook runs: the job image and its environment."""
    return {
        "bench_image": cfg.local_image(),
        "bench_environment": dict(cfg.job_settings.environment),
        "bench_warm": warm_cache,
    }


def reference_key(cfg: Config, base: baseimage.BaseImage, *, warm_cache: bool) -> str:
    """A hash of everything the reference bake reads: same key, same image."""
    digest = hashlib.sha256()
    head = {
        "base": base.key,
        "registry_port": cfg.local.registry_port,
        **reference_vars(cfg, warm_cache=warm_cache),
    }
    digest.update(json.dumps(head, sort_keys=True).encode())
    files = sorted(
        path
        for folder in REFERENCE_INPUTS
        for path in (bake.SOURCE / folder).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    )
    for path in files:
        digest.update(str(path.relative_to(bake.SOURCE)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def ensure_reference_image(
    cfg: Config,
    *,
    accelerator: str | None = None,
    warm_cache: bool = True,
    out: TextIO = sys.stdout,
) -> bake.LocalImage:
    """The reference image baked from the current inputs; bake one if none is."""
    base = baseimage.ensure(cfg)
    key = reference_key(cfg, base, warm_cache=warm_cache)
    ref_cfg = reference_config(cfg)
    for image in bake.list_images(ref_cfg):
        if image.inputs_key == key and image.complete:
            _say(out, f"reusing reference {image.name} (inputs {key})")
            return image
    _say(out, f"baking the reference image (inputs {key}; ~5-10 min under TCG)")
    bake_reference(cfg, base, key, accelerator=accelerator, warm_cache=warm_cache)
    image = bake._local_image(ref_cfg, bake._last_build(ref_cfg))
    if not image.complete:
        raise NightshiftError(
            f"{image.directory} lacks its disk, kernel or initrd; see the "
            f"reference bake's output above ({REFERENCE_PLAYBOOK})"
        )
    return image


def bake_reference(
    cfg: Config,
    base: baseimage.BaseImage,
    key: str,
    *,
    accelerator: str | None = None,
    warm_cache: bool = True,
) -> float:
    """Bake the reference with nightshift's own Packer template; return seconds.

    Same template, base, VM settings and cleanup as `bake.bake`; only the
    playbook (var playbook_file) and the output folder differ.
    """
    ref_cfg = reference_config(cfg)
    ref_cfg.build_dir.mkdir(parents=True, exist_ok=True)
    accelerator = accelerator or cfg.local.accelerator
    version = bake.packer_version()
    directory = bake.template_dir(ref_cfg, version, "local")
    vars_file = ref_cfg.build_dir / "reference-vars.json"
    vars_file.write_text(json.dumps(reference_vars(cfg, warm_cache=warm_cache)))

    with contextlib.ExitStack() as stack:
        if warm_cache:
            stack.enter_context(services.registry(cfg))
        key_dir = bake._new_key_dir(ref_cfg)
        stack.callback(shutil.rmtree, key_dir, ignore_errors=True)
        variables = bake.packer_variables(
            ref_cfg,
            target="local",
            accelerator=accelerator,
            base=base,
            key_dir=key_dir,
            git_revision=bake.git_revision(bake.SOURCE),
            warm_image=cfg.local_image() if warm_cache else "",
        )
        variables |= {"inputs_key": key, "playbook_file": REFERENCE_PLAYBOOK}
        (ref_cfg.build_dir / "logs").mkdir(parents=True, exist_ok=True)
        env = bake._packer_env(ref_cfg) | {
            "NIGHTSHIFT_BENCH_VARS": str(vars_file),
            # The playbook borrows the cleanup role from ansible/roles.
            "ANSIBLE_ROLES_PATH": str(bake.SOURCE / "ansible" / "roles"),
        }
        args = [f"-var={name}={value}" for name, value in variables.items()]
        bake._run(
            ["packer", "validate", "-only=qemu.local", *args, str(directory)],
            bake.SOURCE,
            env,
        )
        started = time.monotonic()
        bake._run(
            ["packer", "build", "-color=false", "-only=qemu.local", *args,
             str(directory)],
            bake.SOURCE,
            env,
            failure=(
                "the reference bake failed; the output above says where, and the "
                f"VM console is in {ref_cfg.build_dir / 'logs'}/"
            ),
        )  # fmt: skip
        return round(time.monotonic() - started, 1)


# --- one run -------------------------------------------------------------------


@dataclass
class Sample:
    """One boot of one side: its step times and what it pulled."""

    side: str
    index: int
    ok: bool
    outcome: str
    guest: dict[str, float | None] = field(default_factory=dict)
    host: dict[str, float | None] = field(default_factory=dict)
    steps: dict[str, float] = field(default_factory=dict)
    pulled_bytes: int | None = None
    pulled_requests: list[str] = field(default_factory=list)
    load: dict[str, Any] = field(default_factory=dict)
    console_log: str = ""


def machine_load() -> dict[str, Any]:
    """The host's load when a run starts: noise that hits both sides."""
    qemus = 0
    for comm in Path("/proc").glob("[0-9]*/comm"):
        with contextlib.suppress(OSError):
            if comm.read_text().startswith("qemu-system"):
                qemus += 1
    return {
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "qemu_processes": qemus,
        "cpus": os.cpu_count(),
    }


def _span(later: float | None, earlier: float | None) -> float | None:
    if later is None or earlier is None:
        return None
    return round(later - earlier, 2)


def guest_steps(lines: list[tuple[float, str]]) -> tuple[dict, dict, dict]:
    """Guest uptimes and their host stamps, from either side's console.

    Returns (steps: uptime per step, host: host stamp per step, record).
    nightshift prints its agent's result record; the reference prints
    `bench-mark <step> <uptime>` lines; both end with the kernel's stamped
    "reboot: Power down".
    """
    steps: dict[str, float] = {}
    host: dict[str, float] = {}
    record: dict[str, Any] = {}
    for stamp, line in lines:
        if match := _MARK.search(line):
            steps[match.group(1)] = float(match.group(2))
            host[match.group(1)] = stamp
        elif (at := line.find(RESULT_MARK + " ")) >= 0:
            with contextlib.suppress(json.JSONDecodeError):
                record = json.loads(line[at + len(RESULT_MARK) :])
            host["report"] = stamp
        elif '"nightshift": "job-start"' in line:
            host["job_start"] = stamp
        if match := _POWER_DOWN.search(line):
            steps["power_off"] = float(match.group(1))
            host["power_off_line"] = stamp
    for name, value in record.get("timings", {}).items():
        steps.setdefault(name, value)
    if "job_end" not in host and "report" in host and "report" in steps:
        # The agent prints no line at job end: place it by the guest's clock.
        host["job_end"] = host["report"] - (steps["report"] - steps.get("job_end", 0))
    return steps, host, record


def timings(steps: dict, host: dict, ended: float | None) -> tuple[dict, dict]:
    """The four figures per clock: boot to job start, job, end to off, total."""
    guest = {
        "boot_to_job_start": steps.get("job_start"),
        "job_run": _span(steps.get("job_end"), steps.get("job_start")),
        "job_end_to_power_off": _span(steps.get("power_off"), steps.get("job_end")),
        "total": steps.get("power_off"),
    }
    hosts = {
        "boot_to_job_start": _round(host.get("job_start")),
        "job_run": _span(host.get("job_end"), host.get("job_start")),
        "job_end_to_power_off": _span(ended, host.get("job_end")),
        "total": _round(ended),
    }
    for clock in (guest, hosts):
        start, end = clock["boot_to_job_start"], clock["job_end_to_power_off"]
        clock["overhead"] = (
            None if start is None or end is None else round(start + end, 2)
        )
    return guest, hosts


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def registry_log(cfg: Config) -> Path:
    """Where services.registry logs the registry it starts."""
    return cfg.build_dir / "registry" / f"registry-{cfg.local.registry_port}.log"


def pulled_bytes(text: str, guest_host: str) -> tuple[int, list[str]]:
    """Bytes the registry sent to guests (Host: 10.0.2.2:port) in a log excerpt."""
    total = 0
    requests = []
    for line in text.splitlines():
        match = _REGISTRY_DONE.search(line)
        if not match or match.group(1) != guest_host:
            continue
        written = _WRITTEN.search(line)
        size = int(written.group(1)) if written else 0
        total += size
        method = _METHOD.search(line)
        uri = _URI.search(line)
        requests.append(
            f"{method.group(1) if method else '?'} "
            f"{uri.group(1) if uri else '?'} {size}"
        )
    return total, requests


def run_once(
    cfg: Config,
    side: str,
    image: bake.LocalImage,
    run_config: RunConfig,
    index: int,
    *,
    accelerator: str | None = None,
    out: TextIO = sys.stdout,
) -> Sample:
    """Boot one side once, wait for its power-off, and time it."""
    run_id = f"bench-{side}-{index}-{localrun.new_run_id()}"
    config = RunConfig.parse({**run_config.to_dict(), "run_id": run_id})
    workdir = bench_dir(cfg) / "runs" / run_id
    log = registry_log(cfg)
    offset = log.stat().st_size if log.exists() else None
    load = machine_load()
    vm = localrun.VM(cfg, image, config, workdir, accelerator=accelerator)
    bound = localrun.time_bound(config)
    with localrun.booted(vm):
        powered_off = vm.wait(bound)
    (workdir / "disk.qcow2").unlink(missing_ok=True)

    steps, host, record = guest_steps(vm.lines)
    guest, hosts = timings(steps, host, vm.ended if powered_off else None)
    if side == "nightshift":
        outcome = record.get("outcome", "no-report")
    else:
        outcome = "success" if "job_end" in steps else "no-job-end"
    if not powered_off:
        outcome = "killed"
    sample = Sample(
        side=side,
        index=index,
        ok=outcome == "success" and "power_off" in steps,
        outcome=outcome,
        guest=guest,
        host=hosts,
        steps=steps,
        load=load,
        console_log=str(workdir / "console.log"),
    )
    if offset is not None:
        time.sleep(0.5)  # the registry writes its last line after the response
        with log.open("rb") as handle:
            handle.seek(offset)
            excerpt = handle.read().decode(errors="replace")
        sample.pulled_bytes, sample.pulled_requests = pulled_bytes(
            excerpt, cfg.guest_registry
        )
    _say(
        out,
        f"{side:10} #{index}: {outcome}; guest boot→job "
        f"{_s(guest['boot_to_job_start'])}, job {_s(guest['job_run'])}, job end→off "
        f"{_s(guest['job_end_to_power_off'])}, total {_s(guest['total'])} "
        f"(host {_s(hosts['total'])}); pulled {_bytes(sample.pulled_bytes)}; "
        f"load {load['loadavg_1m']}, {load['qemu_processes']} qemu",
    )
    return sample


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def _bytes(value: int | None) -> str:
    if value is None:
        return "-"
    if value < 10_000:
        return f"{value} B"
    return f"{value / 2**20:.2f} MiB"


# --- what a pull into an empty cache would fetch -----------------------------


def cold_pull_bytes(cfg: Config) -> int | None:
    """Manifest, config and layer blobs of the job image: a pull with no cache."""
    if cfg.job_settings.image:
        return None  # not in the local registry
    url = f"http://{cfg.local_registry}/v2/{cfg.repository}/manifests/latest"
    request = urllib.request.Request(
        url, headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
    except OSError:
        return None
    manifest = json.loads(body)
    blobs = [manifest.get("config", {}), *manifest.get("layers", [])]
    return len(body) + sum(int(blob.get("size", 0)) for blob in blobs)


# --- statistics and the report -----------------------------------------------


def spread(values: list[float]) -> dict[str, float | int] | None:
    if not values:
        return None
    return {
        "min": round(min(values), 2),
        "median": round(statistics.median(values), 2),
        "max": round(max(values), 2),
        "n": len(values),
    }


def summarise(samples: list[Sample]) -> dict[str, Any]:
    """min/median/max per side, clock and metric; ratios of the medians."""
    result: dict[str, Any] = {}
    for side in SIDES:
        good = [s for s in samples if s.side == side and s.ok]
        result[side] = {
            clock: {
                metric: spread(
                    [
                        getattr(s, clock)[metric]
                        for s in good
                        if getattr(s, clock).get(metric) is not None
                    ]
                )
                for metric in METRICS
            }
            for clock in ("guest", "host")
        }
        pulled = [s.pulled_bytes for s in good if s.pulled_bytes is not None]
        result[side]["pulled_bytes"] = spread([float(b) for b in pulled])
        result[side]["runs_ok"] = len(good)
        result[side]["runs_failed"] = sum(
            1 for s in samples if s.side == side and not s.ok
        )
    ratios: dict[str, dict[str, float | None]] = {}
    for clock in ("guest", "host"):
        ratios[clock] = {}
        for metric in METRICS:
            ref = (result["reference"][clock][metric] or {}).get("median")
            ours = (result["nightshift"][clock][metric] or {}).get("median")
            ratios[clock][metric] = round(ours / ref, 3) if ref and ours else None
    result["ratio_nightshift_to_reference"] = ratios
    return result


def print_report(report: dict[str, Any], out: TextIO) -> None:
    stats = report["summary"]
    ratios = stats["ratio_nightshift_to_reference"]
    out.write(
        f"\nbench: {report['runs']} run(s) per side, alternating; "
        f"load at start {report['load_before']['loadavg_1m']} "
        f"({report['load_before']['qemu_processes']} qemu already running, "
        f"{report['load_before']['cpus']} CPUs)\n"
    )
    for clock in ("guest", "host"):
        out.write(f"\n{clock} clock, seconds   reference (min/median/max)"
                  f"     nightshift (min/median/max)    ratio\n")  # fmt: skip
        for metric in METRICS:
            cells = []
            for side in SIDES:
                value = stats[side][clock][metric]
                cells.append(
                    "-".center(27)
                    if not value
                    else f"{value['min']:7.1f} {value['median']:7.1f} "
                    f"{value['max']:7.1f}   "
                )
            ratio = ratios[clock][metric]
            out.write(
                f"  {metric:22} {cells[0]:27} {cells[1]:27} "
                f"{'-' if ratio is None else f'{ratio:.2f}x'}\n"
            )
    out.write("\nbytes pulled at boot (registry log, median per run):\n")
    for side in SIDES:
        value = stats[side]["pulled_bytes"]
        out.write(f"  {side:10} {_bytes(int(value['median'])) if value else '-'}\n")
    out.write(
        f"  cold cache {_bytes(report.get('cold_pull_bytes'))} "
        "(manifest + config + layers: what a pull into an empty cache fetches)\n"
    )
    failed = {side: stats[side]["runs_failed"] for side in SIDES}
    if any(failed.values()):
        out.write(f"\nfailed runs (left out above): {failed}\n")
    if report.get("bake_times"):
        out.write("\nbake times, seconds:\n")
        for name, value in report["bake_times"].items():
            out.write(f"  {name:32} {value}\n")
    out.write(f"\nwritten: {report['file']}\n")
    out.flush()


# --- the whole bench -----------------------------------------------------------


def bench(
    cfg: Config,
    *,
    runs: int = 5,
    bake_times: bool = False,
    accelerator: str | None = None,
    image: str | None = None,
    out: TextIO = sys.stdout,
) -> Path:
    """Bake (or reuse) both images, run them alternately, write the JSON file.

    image: a local image name to measure instead of the one baked from the
    current inputs (e.g. an older bake, to see what a change bought).
    """
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise NightshiftError(f"--runs: {runs!r} is not valid; use 1 or more")
    jobimage.job_context(cfg)
    started = datetime.now(UTC)
    load_before = machine_load()
    run_config = cfg.run_config()
    samples: list[Sample] = []

    with services.registry(cfg):
        with services.docker_engine(cfg) as client:
            pushed = jobimage.build_and_push(cfg, client)
        _say(out, f"job image {pushed.digest}")
        ours = (
            bake.newest_local_image(cfg, name=image)
            if image
            else bake.ensure_local_image(cfg, accelerator=accelerator, warm_cache=True)
        )
        reference = ensure_reference_image(cfg, accelerator=accelerator, out=out)
        images = {"reference": reference, "nightshift": ours}
        cold = cold_pull_bytes(cfg)
        for index in range(runs):
            # ABBA order: drift in the machine's load falls on both sides.
            order = SIDES if index % 2 == 0 else SIDES[::-1]
            for side in order:
                samples.append(
                    run_once(
                        cfg, side, images[side], run_config, index,
                        accelerator=accelerator, out=out,
                    )
                )  # fmt: skip
        bakes = (
            measure_bake_times(cfg, accelerator=accelerator, out=out)
            if (bake_times)
            else {}
        )

    directory = bench_dir(cfg)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"bench-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    report = {
        "file": str(path),
        "started": started.isoformat(),
        "runs": runs,
        "accelerator": accelerator or cfg.local.accelerator,
        "vm": {"memory_mb": cfg.local.memory_mb, "cpus": cfg.local.cpus},
        "images": {side: image.name for side, image in images.items()},
        "job_image_digest": pushed.digest,
        "load_before": load_before,
        "load_after": machine_load(),
        "targets": TARGETS,
        "summary": summarise(samples),
        "cold_pull_bytes": cold,
        "bake_times": bakes,
        "samples": [dataclasses.asdict(sample) for sample in samples],
    }
    path.write_text(json.dumps(report, indent=2) + "\n")
    (directory / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
    print_report(report, out)
    if not any(s.ok for s in samples):
        raise NightshiftError(
            f"no run succeeded; the consoles are under {directory / 'runs'}/"
        )
    return path


# --- bake times (--bake-times) -------------------------------------------------


def measure_bake_times(
    cfg: Config, *, accelerator: str | None = None, out: TextIO = sys.stdout
) -> dict[str, float]:
    """Bake cold (base too), again with the base cached, then re-run Ansible.

    Everything goes under build/bench/bake-times, so the project's own base
    and images are neither rebuilt nor replaced.
    """
    times_cfg = _with_build_dir(cfg, bench_dir(cfg) / "bake-times")
    shutil.rmtree(times_cfg.build_dir / "base", ignore_errors=True)

    _say(out, "bake times 1/3: cold (base image and bake)")
    began = time.monotonic()
    baseimage.ensure(times_cfg)
    base_seconds = time.monotonic() - began
    bake.bake(times_cfg, accelerator=accelerator, warm_cache=True)
    cold = time.monotonic() - began

    _say(out, "bake times 2/3: bake with the base cached")
    began = time.monotonic()
    bake.bake(times_cfg, accelerator=accelerator, warm_cache=True)
    cached = time.monotonic() - began

    _say(out, "bake times 3/3: a second Ansible run on a provisioned machine")
    image = bake.newest_local_image(times_cfg)
    rerun, changed = second_ansible_run(times_cfg, image, accelerator=accelerator)
    return {
        "base_image_seconds": round(base_seconds, 1),
        "cold_bake_seconds": round(cold, 1),
        "cached_base_bake_seconds": round(cached, 1),
        "second_ansible_run_seconds": round(rerun, 1),
        "second_ansible_run_changed": changed,
    }


def second_ansible_run(
    cfg: Config, image: bake.LocalImage, *, accelerator: str | None = None
) -> tuple[float, int]:
    """Boot the image for maintenance and apply the bake's role to it again."""
    work = cfg.build_dir / "rerun"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    key = work / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True
    )
    vm = localrun.VM(
        cfg, image, cfg.run_config(), work / "vm", accelerator=accelerator,
        maintenance=True, ssh_public_key=key.with_suffix(".pub"),
    )  # fmt: skip
    ssh = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
           "-o", "LogLevel=ERROR", "-i", str(key)]  # fmt: skip
    with localrun.booted(vm):
        deadline = time.monotonic() + localrun.BOOT_ALLOWANCE
        while True:
            probe = subprocess.run(
                ["ssh", *ssh, "-o", "ConnectTimeout=5", "-p", str(vm.ssh_port),
                 "root@127.0.0.1", "true"],
                capture_output=True,
            )  # fmt: skip
            if probe.returncode == 0:
                break
            if time.monotonic() > deadline or vm.process.poll() is not None:
                raise NightshiftError(
                    f"no SSH on the maintenance VM; console: {vm.workdir}/console.log"
                )
            time.sleep(3)
        rerun = reapply_role(cfg, ssh_port=vm.ssh_port, key=key, work=work)
    sys.stdout.write(rerun.output[-3000:])
    if rerun.returncode != 0:
        raise NightshiftError(
            f"the second Ansible run failed (exit {rerun.returncode}); "
            "its output is above"
        )
    return rerun.seconds, rerun.changed


@dataclass
class RoleRun:
    returncode: int
    seconds: float
    changed: int  # from the play recap; -1 when there was none
    output: str


def reapply_role(cfg: Config, *, ssh_port: int, key: Path, work: Path) -> RoleRun:
    """Apply the nightshift role once more to a provisioned guest over SSH.

    The role alone, as the bake applied it: the cleanup role after it is
    meant to change a booted machine (machine-id, host keys), the role not.
    """
    work.mkdir(parents=True, exist_ok=True)
    # A host named 127.0.0.1 would also stand for localhost, and the role's
    # delegate_to: localhost checks would then run in the guest.
    inventory = work / "inventory.ini"
    inventory.write_text(
        f"guest ansible_host=127.0.0.1 ansible_port={ssh_port} "
        f"ansible_user=root ansible_ssh_private_key_file={key}\n"
    )
    playbook = work / "reapply.yml"
    playbook.write_text(
        "- name: Apply the nightshift role again\n"
        "  hosts: all\n  gather_facts: true\n  roles:\n    - role: nightshift\n"
    )
    extra = {
        "nightshift_target": "local",
        "nightshift_project": cfg.project,
        "nightshift_job": cfg.job,
        "nightshift_registry": cfg.guest_registry,
        "nightshift_registry_insecure": True,
        "nightshift_agent_source": str(bake.SOURCE / "nightshift"),
    }
    ansible = bake.SOURCE / "ansible"
    env = bake._packer_env(cfg) | {
        "ANSIBLE_CONFIG": str(ansible / "ansible.cfg"),
        "ANSIBLE_ROLES_PATH": str(ansible / "roles"),
    }
    command = ["ansible-playbook", "-i", str(inventory),
               "--extra-vars", json.dumps(extra), str(playbook)]  # fmt: skip
    print("+ " + " ".join(command), flush=True)
    began = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - began
    match = re.search(r"changed=(\d+)", done.stdout.rsplit("PLAY RECAP", 1)[-1])
    return RoleRun(
        returncode=done.returncode,
        seconds=round(seconds, 1),
        changed=int(match.group(1)) if match else -1,
        output=done.stdout + done.stderr,
    )
