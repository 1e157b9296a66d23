"""Baking the job-runner image with Packer and Ansible, and finding it again.

The template in packer/ holds one build over two sources: a qemu disk image
(local) and an AMI (aws).  Debian's Packer 1.6.6 cannot load the plugin
block or the AMI source, so for it we stage a copy under build/ holding only
what it understands; modern Packer gets the directory as it is.  Local images
are listed from the manifest Packer writes, and picked by the same rule the
launcher uses for AMIs (nightshift.selection).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TextIO

from nightshift import baseimage, selection, services
from nightshift.config import ACCELERATORS, ARCHITECTURES, Config
from nightshift.errors import NightshiftError, ToolMissing
from nightshift.runconfig import ConfigError, check_choice

TARGETS = ("local", "aws")
# nightshift's own files (packer/, ansible/, the agent) sit beside this
# package, wherever the project file that --config names may be.
SOURCE = Path(__file__).resolve().parent.parent
TEMPLATE_DIR = "packer"
PLAYBOOK = "ansible/playbook.yml"
ROLES = ("nightshift", "nightshift_cleanup")
# The agent's modules that the role copies into the image.
AGENT_FILES = ("__init__.py", "runconfig.py", "agent.py")
# Packer 1.7 brought `packer init` and required_plugins; below it, the
# template must be staged without them.
MODERN_PACKER = (1, 7, 0)
# The AMI source needs the amazon plugin's imds_support, which only
# plugin-era Packer (1.10+, nothing bundled) reliably gets from `packer init`.
AWS_PACKER = (1, 10, 0)
# Files the staged legacy directory keeps; the rest need modern Packer.
LEGACY_FILES = (
    "variables.pkr.hcl",
    "locals.pkr.hcl",
    "source-local.pkr.hcl",
    "build.pkr.hcl",
)
_AWS_SOURCE_LINE = re.compile(r'^\s*"source\.amazon-ebs\.[\w-]+",?\s*\n', re.M)
_VERSION = re.compile(r"(\d+)\.(\d+)\.(\d+)")


@dataclass(frozen=True)
class LocalImage:
    """A baked local image: its disk and the kernel and initrd it boots with."""

    name: str
    directory: Path
    created: datetime
    source: str
    project: str
    job: str
    git_revision: str = ""
    inputs_key: str = ""
    # The registry the image's Docker trusts over plain HTTP, as the guest
    # reaches it ("10.0.2.2:5000"); empty for images baked before it was kept.
    registry: str = ""

    @property
    def disk(self) -> Path:
        return self.directory / "disk.qcow2"

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"

    @property
    def complete(self) -> bool:
        return all(path.is_file() for path in (self.disk, self.kernel, self.initrd))

    def to_candidate(self) -> selection.Candidate:
        return selection.Candidate(
            image_id=self.name,
            created=self.created,
            project=self.project,
            job=self.job,
            complete=self.complete,
        )


# --- Packer version and the directory it can load ---


def packer_version(packer: str = "packer") -> tuple[int, int, int]:
    """The installed Packer's version, from `packer version`."""
    if not shutil.which(packer):
        raise ToolMissing(
            "packer is not installed; `apt-get install packer` (1.6.6, local "
            "target only) or HashiCorp's Packer 1.10+ (both targets)"
        )
    output = subprocess.run(
        [packer, "version"], capture_output=True, text=True, check=False
    ).stdout
    return parse_version(output)


def parse_version(text: str) -> tuple[int, int, int]:
    match = _VERSION.search(text)
    if not match:
        raise NightshiftError(f"cannot read a Packer version from {text.strip()!r}")
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


def stage_legacy(template: Path, dest: Path) -> Path:
    """Copy the parts of the template Packer < 1.7 loads; return the folder.

    Left out: plugins.pkr.hcl (required_plugins is unknown there) and the AMI
    source (its metadata_options and imds_support are rejected); the build's
    source list loses the AMI entry to match.
    """
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for name in LEGACY_FILES:
        text = (template / name).read_text()
        if name == "build.pkr.hcl":
            text, removed = _AWS_SOURCE_LINE.subn("", text)
            if removed != 1:
                raise NightshiftError(
                    f"{template / name}: expected one source.amazon-ebs entry in the "
                    f"build's sources list, found {removed}; keep one per line"
                )
        (dest / name).write_text(text)
    (dest / "STAGED").write_text(
        f"Staged from {template} for Packer < 1.7 by nightshift.bake; "
        "edit the originals, not these copies.\n"
    )
    return dest


def template_dir(cfg: Config, version: tuple[int, int, int], target: str) -> Path:
    """The directory Packer builds from, staged for old Packer when needed."""
    check_choice("target", target, TARGETS)
    template = SOURCE / TEMPLATE_DIR
    if target == "aws" and version < AWS_PACKER:
        raise NightshiftError(
            f"--target aws needs Packer >= 1.10 with `packer init` (the amazon "
            f"plugin's imds_support); this is Packer {_dotted(version)}. Install "
            "HashiCorp's Packer, or bake --target local"
        )
    if version >= MODERN_PACKER:
        return template
    return stage_legacy(template, cfg.build_dir / "packer-legacy")


# --- variables: checked here so a wrong value never reaches a VM ---


def check_variables(variables: dict[str, str]) -> dict[str, str]:
    """Fail with the variable's name and allowed values before Packer runs."""
    check_choice("accelerator", variables.get("accelerator"), ACCELERATORS)
    check_choice("architecture", variables.get("architecture"), ARCHITECTURES)
    for name in ("base_disk", "base_kernel", "base_initrd", "ssh_public_key_file"):
        if name in variables and not Path(variables[name]).is_file():
            raise ConfigError(name, variables[name], "run `invoke base-image` first")
    return variables


def packer_variables(
    cfg: Config,
    *,
    target: str,
    accelerator: str,
    base: baseimage.BaseImage | None,
    key_dir: Path | None,
    git_revision: str,
    warm_image: str = "",
) -> dict[str, str]:
    variables = {
        "project": cfg.project,
        "job": cfg.job,
        "git_revision": git_revision,
        "inputs_key": inputs_key(cfg, base, warm_image) if base else "",
        "warm_image": warm_image,
        "build_dir": str(cfg.build_dir),
        "architecture": cfg.aws.architecture if target == "aws" else "amd64",
        "accelerator": accelerator,
    }
    if target == "local":
        assert base is not None and key_dir is not None
        variables |= {
            "base_disk": str(base.disk),
            "base_kernel": str(base.kernel),
            "base_initrd": str(base.initrd),
            "base_key": base.key,
            "ssh_private_key_file": str(key_dir / "id_ed25519"),
            "ssh_public_key_file": str(key_dir / "id_ed25519.pub"),
            "registry_port": str(cfg.local.registry_port),
            "memory_mb": str(cfg.local.memory_mb),
            "cpus": str(cfg.local.cpus),
        }
    else:
        variables |= {
            "aws_region": cfg.aws.region,
            "aws_registry": _ecr_registry(cfg),
            "root_volume_gb": str(cfg.aws.root_volume_gb),
        }
    return check_variables(variables)


# --- the bake ---


def bake(
    cfg: Config,
    *,
    target: str = "local",
    accelerator: str | None = None,
    warm_cache: bool = False,
) -> str:
    """Bake one image; return its name and path (local) or AMI id (aws)."""
    check_choice("target", target, TARGETS)
    accelerator = check_choice(
        "accelerator", accelerator or cfg.local.accelerator, ACCELERATORS
    )
    if warm_cache and target == "aws":
        raise NightshiftError(
            "--warm-cache works for the local target only so far; bake the AMI "
            "without it (the job image is pulled at boot)"
        )
    if (
        target == "local"
        and accelerator == "kvm"
        and not os.access("/dev/kvm", os.W_OK)
    ):
        raise ConfigError("accelerator", "kvm", "/dev/kvm is not usable here; use tcg")

    version = packer_version()
    directory = template_dir(cfg, version, target)
    _check_inputs(cfg, target)

    with contextlib.ExitStack() as stack:
        if warm_cache:
            # The bake VM pulls from the local registry, as a run would; the
            # job image must be there before any VM starts.
            stack.enter_context(services.registry(cfg))
            if not cfg.job_settings.image:
                services.manifest_digest(cfg.local_registry, cfg.repository, "latest")
        base = baseimage.ensure(cfg) if target == "local" else None
        key_dir = _new_key_dir(cfg) if target == "local" else None
        stack.callback(lambda: key_dir and shutil.rmtree(key_dir, ignore_errors=True))
        variables = packer_variables(
            cfg,
            target=target,
            accelerator=accelerator,
            base=base,
            key_dir=key_dir,
            git_revision=git_revision(SOURCE),
            warm_image=cfg.local_image() if warm_cache else "",
        )
        (cfg.build_dir / "logs").mkdir(parents=True, exist_ok=True)
        env = _packer_env(cfg)
        if version >= MODERN_PACKER:
            _run(["packer", "init", str(directory)], SOURCE, env)
        args = [f"-var={name}={value}" for name, value in variables.items()]
        only = "qemu.local" if target == "local" else "amazon-ebs.aws"
        # -only: the other source's checks (AWS region lookups) stay out of
        # a local bake, and the local source's files out of an AMI bake.
        _run(
            ["packer", "validate", f"-only={only}", *args, str(directory)],
            SOURCE,
            env,
        )

        started = time.monotonic()
        _run(
            ["packer", "build", "-color=false", f"-only={only}", *args, str(directory)],
            SOURCE,
            env,
            failure=(
                "packer build failed; the output above says where, and the VM "
                f"console is in {cfg.build_dir / 'logs'}/"
            ),
        )
        seconds = round(time.monotonic() - started, 1)

    entry = _last_build(cfg)
    if target == "aws":
        return f"{entry['custom_data']['name']} {entry['artifact_id']} ({seconds} s)"
    image = _local_image(cfg, entry)
    if not image.complete:
        raise NightshiftError(
            f"{image.directory} lacks its disk, kernel or initrd; the playbook's "
            "fetch of /vmlinuz and /initrd.img did not run"
        )
    return f"{image.name} at {image.directory} ({seconds} s)"


def inputs_key(cfg: Config, base: baseimage.BaseImage, warm_image: str = "") -> str:
    """A hash of everything a local bake reads: same key, same image.

    A warm image counts by its reference only: a newer job image makes a run
    pull a few more layers, not a new bake.
    """
    digest = hashlib.sha256()
    names = (cfg.project, cfg.job, cfg.local.registry_port, base.key, warm_image)
    digest.update("/".join(map(str, names)).encode())
    files = sorted(
        [
            *(SOURCE / TEMPLATE_DIR).glob("*.pkr.hcl"),
            *(SOURCE / "ansible").rglob("*"),
        ]
        + [SOURCE / "nightshift" / name for name in AGENT_FILES]
    )
    for path in files:
        if path.is_file():
            digest.update(str(path.relative_to(SOURCE)).encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def ensure_local_image(
    cfg: Config, *, accelerator: str | None = None, warm_cache: bool = False
) -> LocalImage:
    """The newest local image baked from the current inputs; bake one if none is."""
    base = baseimage.ensure(cfg)
    key = inputs_key(cfg, base, cfg.local_image() if warm_cache else "")
    for image in list_images(cfg):
        if image.inputs_key == key and image.complete:
            print(
                f"reusing {image.name}: baked from the same inputs ({key})", flush=True
            )
            return image
    bake(cfg, target="local", accelerator=accelerator, warm_cache=warm_cache)
    return newest_local_image(cfg)


def git_revision(root: Path) -> str:
    """The short revision of the tree, with -dirty when it has changes."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "uncommitted"
    return f"{rev}-dirty" if dirty else rev


def _check_inputs(cfg: Config, target: str) -> None:
    missing = [
        path
        for path in [SOURCE / PLAYBOOK]
        + [SOURCE / "ansible" / "roles" / role / "tasks" / "main.yml" for role in ROLES]
        if not path.is_file()
    ]
    if missing:
        raise NightshiftError(
            f"missing {', '.join(map(str, missing))}; the bake needs them"
        )
    tools = ["ansible-playbook"] + (
        ["qemu-system-x86_64", "qemu-img"] if target == "local" else []
    )
    path = _packer_env(cfg)["PATH"]
    absent = [tool for tool in tools if not shutil.which(tool, path=path)]
    if absent:
        raise ToolMissing(
            f"missing {', '.join(absent)}; install ansible-core in the venv "
            "(pip install -e '.[test]') and the Debian packages qemu-system-x86 "
            "and qemu-utils"
        )


def _new_key_dir(cfg: Config) -> Path:
    """A fresh key pair for one build; removed when the build ends."""
    key_dir = cfg.build_dir / "keys" / f"bake-{os.getpid()}-{int(time.time())}"
    key_dir.mkdir(parents=True, mode=0o700)
    _run(
        [
            "ssh-keygen",
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "nightshift-bake",
            "-f",
            str(key_dir / "id_ed25519"),
        ],
        SOURCE,
        None,
    )
    return key_dir


def _packer_env(cfg: Config) -> dict[str, str]:
    env = dict(os.environ)
    # Packer and its ansible provisioner find ansible-playbook on PATH: the
    # venv's, next to this interpreter.
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"
    # Packer copies images into ./packer_cache by default: keep it in build/.
    env["PACKER_CACHE_DIR"] = str(cfg.build_dir / "packer_cache")
    env.setdefault("PACKER_NO_COLOR", "1")
    env.setdefault("ANSIBLE_FORCE_COLOR", "0")
    return env


def _ecr_registry(cfg: Config) -> str:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        sts = boto3.client(
            "sts", region_name=cfg.aws.region, endpoint_url=cfg.aws.endpoint_url or None
        )
        account = sts.get_caller_identity()["Account"]
    except (BotoCoreError, ClientError) as err:
        raise NightshiftError(
            f"cannot find the AWS account for the ECR registry ({err}); "
            "configure AWS credentials"
        ) from err
    return f"{account}.dkr.ecr.{cfg.aws.region}.amazonaws.com"


def _run(
    command: Sequence[str],
    cwd: Path,
    env: dict[str, str] | None,
    failure: str | None = None,
) -> None:
    """Echo a command, run it with its output streaming, fail in a few lines.

    The error carries the lines that said what went wrong (Packer's
    "errored", Ansible's "fatal:" and the message under it), so a failure is
    readable from the exception alone, even where the streamed output was cut.
    """
    # Once our reader has left (`| head`), keep draining without echoing:
    # Packer must still finish and stop its VM, not die of a full pipe.
    echo = _write("+ " + " ".join(command) + "\n")
    evidence: list[str] = []
    following = 0
    with subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            echo = echo and _write(line)
            text = line.rstrip()
            if _FAILURE_LINE.search(text):
                following = _LINES_AFTER_FAILURE
                evidence.append(text)
            elif following and text:
                following -= 1
                evidence.append(text)
    if process.returncode != 0:
        status = process.returncode
        message = failure or f"{command[0]} {command[1]} failed (exit {status})"
        if evidence:
            shown = [line[:300] for line in evidence[-_MAX_EVIDENCE:]]
            message += "\n  " + "\n  ".join(shown)
        raise NightshiftError(message)


def _write(text: str) -> bool:
    """Write to stdout; False when its reader has gone."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        return False
    return True


# Packer's and Ansible's ways of saying what failed, and how much of what
# follows such a line (Ansible's YAML message) to keep with it.
_FAILURE_LINE = re.compile(r"errored|fatal:|\bTimeout\b|Error executing|FAILED!")
_LINES_AFTER_FAILURE = 6
_MAX_EVIDENCE = 20


def _dotted(version: tuple[int, int, int]) -> str:
    return ".".join(map(str, version))


# --- the local images, from Packer's manifest ---


def manifest_path(cfg: Config) -> Path:
    return cfg.build_dir / "images" / "manifest.json"


def _manifest_builds(cfg: Config) -> list[dict]:
    path = manifest_path(cfg)
    if not path.exists():
        return []
    try:
        return json.loads(path.read_text()).get("builds", [])
    except (json.JSONDecodeError, AttributeError) as err:
        raise NightshiftError(
            f"{path} is not a Packer manifest ({err}); remove it"
        ) from err


def _last_build(cfg: Config) -> dict:
    builds = _manifest_builds(cfg)
    if not builds:
        raise NightshiftError(f"packer wrote no build to {manifest_path(cfg)}")
    return builds[-1]


def _local_image(cfg: Config, entry: dict) -> LocalImage:
    data = entry.get("custom_data", {})
    created = data.get("created", "")
    try:
        when = datetime.fromisoformat(created.replace("Z", "+00:00"))
    except ValueError as err:
        raise NightshiftError(
            f"manifest entry {data.get('name')!r}: bad created date"
        ) from err
    return LocalImage(
        name=data["name"],
        directory=cfg.build_dir / "images" / data["name"],
        created=when,
        source=data.get("source", ""),
        project=data.get("project", ""),
        job=data.get("job", ""),
        git_revision=data.get("git_revision", ""),
        inputs_key=data.get("inputs_key", ""),
        registry=data.get("registry", ""),
    )


def list_images(cfg: Config) -> list[LocalImage]:
    """The local images the manifest records, newest first."""
    images = [
        _local_image(cfg, entry)
        for entry in _manifest_builds(cfg)
        if entry.get("custom_data", {}).get("target") == "local"
    ]
    return sorted(images, key=lambda image: (image.created, image.name), reverse=True)


def print_images(cfg: Config, out: TextIO) -> None:
    images = list_images(cfg)
    if not images:
        out.write(f"no local images in {manifest_path(cfg)}; run `invoke bake-ami`\n")
        return
    for image in images:
        state = "" if image.complete else "  (incomplete: files missing)"
        out.write(
            f"{image.name}  {image.directory}  {image.created.isoformat()}  "
            f"{image.source}{state}\n"
        )


def newest_local_image(cfg: Config, name: str | None = None) -> LocalImage:
    """The image a local run boots: by name, or the newest complete one."""
    images = list_images(cfg)
    if name:
        for image in images:
            if image.name == name:
                if not image.complete:
                    raise NightshiftError(
                        f"image {name} is incomplete (disk, kernel or initrd missing "
                        f"in {image.directory}); bake again"
                    )
                return image
        raise NightshiftError(
            f"no local image named {name} in {manifest_path(cfg)}; "
            "`invoke images` lists them"
        )
    try:
        chosen = selection.newest_image(
            [image.to_candidate() for image in images], project=cfg.project, job=cfg.job
        )
    except selection.NoImageError as err:
        # build_dir is relative to the project file, so name the folder read.
        raise NightshiftError(
            f"{err} in {manifest_path(cfg)}; run `invoke bake-ami`"
        ) from err
    return next(image for image in images if image.name == chosen.image_id)
