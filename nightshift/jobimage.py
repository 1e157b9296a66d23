"""The job's container image: a Python base from Debian, the job on top, pushed.

No public container registry is reachable where nightshift is built, so the
base comes from Debian packages (mmdebstrap) and is imported into Docker;
the job's Dockerfile takes it as BASE_IMAGE.  The image is tagged with the
git revision and `latest` and pushed to the local registry.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nightshift.config import Config
from nightshift.errors import NightshiftError, ToolMissing
from nightshift.runconfig import ConfigError
from nightshift.services import Registry

BASE_REPOSITORY = "nightshift/python-base"
BASE_TAG = "bookworm"
INPUTS_LABEL = "org.nightshift.inputs"

# Everything that decides the base image's content; its hash is the cache key.
# Bump "recipe" when the build steps below change in a way the rest doesn't show.
BASE_INPUTS = {
    "recipe": 1,
    "suite": "bookworm",
    "variant": "minbase",
    "mirror": "http://deb.debian.org/debian",
    "packages": ["python3", "ca-certificates"],
    # Sets up merged /usr with symlinks; without it bookworm's essential set
    # pulls in the usrmerge package and, through it, 55 MB of perl.
    "hook_dirs": ["/usr/share/mmdebstrap/hooks/merged-usr"],
    # Docs, manuals and translations are a third of minbase and unused here.
    "dpkg_options": [
        "path-exclude=/usr/share/doc/*",
        "path-include=/usr/share/doc/*/copyright",
        "path-exclude=/usr/share/man/*",
        "path-exclude=/usr/share/info/*",
        "path-exclude=/usr/share/locale/*",
    ],
    "changes": [
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "ENV LANG=C.UTF-8",
        'CMD ["python3"]',
    ],
}

Log = Callable[[str], None]


def _say(message: str) -> None:
    print(message, flush=True)


@dataclass(frozen=True)
class Pushed:
    """What build_and_push put in the registry."""

    repository: str
    tags: list[str] = field(default_factory=list)
    digest: str = ""

    @property
    def by_digest(self) -> str:
        return f"{self.repository}@{self.digest}"


# --- the Python base image ---------------------------------------------------


def base_inputs_hash(inputs: dict | None = None) -> str:
    text = json.dumps(inputs or BASE_INPUTS, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def base_image_ref() -> str:
    return f"{BASE_REPOSITORY}:{BASE_TAG}"


def base_is_current(client, ref: str, inputs_hash: str) -> bool:
    """Whether the engine holds ref built from these inputs."""
    import docker

    try:
        image = client.images.get(ref)
    except docker.errors.ImageNotFound:
        return False
    return (image.labels or {}).get(INPUTS_LABEL) == inputs_hash


def mmdebstrap_command(rootfs_tar: Path, inputs: dict | None = None) -> list[str]:
    """The command that writes the base's root filesystem as a tarball."""
    inputs = inputs or BASE_INPUTS
    command = [
        "mmdebstrap",
        f"--variant={inputs['variant']}",
        f"--include={','.join(inputs['packages'])}",
    ]
    command += [f"--hook-dir={path}" for path in inputs["hook_dirs"]]
    command += [f"--dpkgopt={option}" for option in inputs["dpkg_options"]]
    # mmdebstrap empties the apt lists itself; the .deb cache goes here.
    command += [
        '--customize-hook=rm -rf "$1"/var/cache/apt/* "$1"/var/log/*',
        inputs["suite"],
        str(rootfs_tar),
        inputs["mirror"],
    ]
    return command


def ensure_python_base(
    cfg: Config, client, *, force: bool = False, log: Log = _say
) -> str:
    """The Python base image's reference, building it only when inputs changed."""
    ref = base_image_ref()
    inputs_hash = base_inputs_hash()
    if not force and base_is_current(client, ref, inputs_hash):
        log(f"python base {ref} is current (inputs {inputs_hash})")
        return ref

    if not shutil.which("mmdebstrap"):
        raise ToolMissing(
            "mmdebstrap is not installed; install it with: apt-get install mmdebstrap"
        )
    workdir = cfg.build_dir / "python-base"
    workdir.mkdir(parents=True, exist_ok=True)
    rootfs = workdir / f"rootfs-{inputs_hash}.tar"
    started = time.monotonic()
    command = mmdebstrap_command(rootfs)
    log(f"building python base: {' '.join(command)}")
    _run_streaming(command, log, what="mmdebstrap")

    changes = [*BASE_INPUTS["changes"], f"LABEL {INPUTS_LABEL}={inputs_hash}"]
    log(f"importing {rootfs} as {ref}")
    result = client.api.import_image(
        src=str(rootfs), repository=BASE_REPOSITORY, tag=BASE_TAG, changes=changes
    )
    if not base_is_current(client, ref, inputs_hash):
        raise NightshiftError(f"docker import of {rootfs} did not give {ref}: {result}")
    rootfs.unlink()
    size_mb = client.images.get(ref).attrs["Size"] / 1e6
    took = time.monotonic() - started
    log(f"python base {ref} built in {took:.0f}s ({size_mb:.0f} MB)")
    return ref


def _run_streaming(command: list[str], log: Log, *, what: str) -> None:
    """Run a command, passing its output on line by line; fail with its last line."""
    last = ""
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
    ) as process:
        for line in process.stdout:
            line = line.rstrip()
            # dpkg's database counter is one line per 5 %: noise in a log.
            if line and not line.startswith("(Reading database ..."):
                last = line
                log(f"  {line}")
    if process.returncode != 0:
        raise NightshiftError(f"{what} failed (exit {process.returncode}): {last}")


# --- the job image -----------------------------------------------------------


def git_revision(root: Path) -> str:
    """Short revision of the tree, `-dirty` when tracked files changed; else nogit."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    try:
        revision = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        # No git, not a repository, or no commit yet.
        return "nogit"
    return f"{revision}-dirty" if dirty else revision


def image_refs(cfg: Config, registry: str, revision: str) -> list[str]:
    """The references to push: the revision first, then latest."""
    repository = f"{registry}/{cfg.repository}"
    return [f"{repository}:{revision}", f"{repository}:latest"]


def _registry_address(cfg: Config, registry: Registry | str | None) -> str:
    if registry is None:
        return cfg.local_registry
    if isinstance(registry, Registry):
        return registry.address
    return registry


def job_context(cfg: Config) -> Path:
    """The job's build folder; checked before any engine or registry starts."""
    context = (cfg.root / cfg.job_settings.context).resolve()
    if not (context / "Dockerfile").is_file():
        raise ConfigError(
            "job.context",
            str(context),
            "it holds no Dockerfile; set job.context to the job's folder, "
            "relative to the project file",
        )
    return context


def build_image(
    cfg: Config, client, *, base: str, tag: str, revision: str, log: Log = _say
) -> str:
    """Build cfg's job context on base, tagged tag; return the image id."""
    context = job_context(cfg)
    log(f"building {tag} from {context} on {base}")
    image_id = ""
    stream = client.api.build(
        path=str(context),
        tag=tag,
        buildargs={"BASE_IMAGE": base},
        labels={
            "org.opencontainers.image.revision": revision,
            "org.opencontainers.image.title": f"{cfg.project}/{cfg.job}",
        },
        # The base is local and no public registry answers: never pull.
        pull=False,
        rm=True,
        forcerm=True,
        decode=True,
    )
    for chunk in stream:
        if "error" in chunk:
            detail = chunk.get("errorDetail", {}).get("message") or chunk["error"]
            raise NightshiftError(f"building {tag} failed: {detail.strip()}")
        if text := chunk.get("stream", "").rstrip():
            log(f"  {text}")
        if aux := chunk.get("aux"):
            image_id = aux.get("ID", image_id)
    if not image_id:
        image_id = client.images.get(tag).id
    return image_id


def push_image(client, ref: str, *, log: Log = _say) -> str:
    """Push ref; return the manifest digest the registry reported."""
    repository, tag = ref.rsplit(":", 1)
    log(f"pushing {ref}")
    digest = ""
    seen: set[tuple[str, str]] = set()
    try:
        stream = client.api.push(repository, tag=tag, stream=True, decode=True)
        for chunk in stream:
            if "error" in chunk:
                detail = chunk.get("errorDetail", {}).get("message") or chunk["error"]
                raise NightshiftError(f"pushing {ref} failed: {detail.strip()}")
            if aux := chunk.get("aux"):
                digest = aux.get("Digest", digest)
            # Progress bars repeat; show each layer's state changes once.
            status = chunk.get("status", "")
            key = (chunk.get("id", ""), status)
            if status and not chunk.get("progressDetail") and key not in seen:
                seen.add(key)
                log(f"  {key[0] + ': ' if key[0] else ''}{status}")
    except OSError as err:
        raise NightshiftError(f"pushing {ref} failed: {err}") from None
    if not digest:
        raise NightshiftError(f"pushing {ref} reported no digest; see the lines above")
    return digest


def build_and_push(
    cfg: Config, client, registry: Registry | str | None = None, *, log: Log = _say
) -> Pushed:
    """Build the job image on the Python base, tag revision and latest, push both."""
    import docker

    address = _registry_address(cfg, registry)
    base = ensure_python_base(cfg, client, log=log)
    revision = git_revision(cfg.root)
    refs = image_refs(cfg, address, revision)
    try:
        image_id = build_image(
            cfg, client, base=base, tag=refs[0], revision=revision, log=log
        )
        image = client.images.get(image_id)
        for ref in refs[1:]:
            repository, tag = ref.rsplit(":", 1)
            image.tag(repository, tag)
        digests = {push_image(client, ref, log=log) for ref in refs}
    except docker.errors.APIError as err:
        raise NightshiftError(f"Docker refused: {err.explanation or err}") from None
    if len(digests) != 1:
        raise NightshiftError(f"the tags of one image got different digests: {digests}")
    pushed = Pushed(
        repository=f"{address}/{cfg.repository}", tags=refs, digest=digests.pop()
    )
    log(f"pushed {', '.join(refs)} as {pushed.digest}")
    return pushed
