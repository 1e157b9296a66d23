"""Local services the tasks and tests need: a Docker engine and a registry.

Each is a context manager that reuses a service already answering and
otherwise starts Debian's own binary, waits until it answers, and stops it
again on the way out (also on Ctrl-C, SIGTERM and exceptions).  What was
found running is left running.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from nightshift.config import Config
from nightshift.errors import NightshiftError, ToolMissing

DEFAULT_DOCKER_SOCKET = "unix:///var/run/docker.sock"
DOCKERD_START_SECONDS = 60
# dockerd waits up to 15 s (its --shutdown-timeout) for containers to stop.
DOCKERD_STOP_SECONDS = 25
REGISTRY_START_SECONDS = 20
REGISTRY_STOP_SECONDS = 10
# The header every Docker distribution registry sends on /v2/.
_API_HEADER = "Docker-Distribution-Api-Version"
_MANIFEST_TYPES = (
    "application/vnd.docker.distribution.manifest.v2+json, "
    "application/vnd.docker.distribution.manifest.list.v2+json, "
    "application/vnd.oci.image.manifest.v1+json, "
    "application/vnd.oci.image.index.v1+json"
)

Log = Callable[[str], None]


def _say(message: str) -> None:
    print(f"nightshift: {message}", flush=True)


# --- the Docker engine -------------------------------------------------------


def _docker_client(base_url: str, timeout: int = 600):
    import docker  # imported here: the Lambda and guest code never need it

    # "auto": the SDK is newer than Debian's engine (API 1.41); negotiate.
    return docker.DockerClient(base_url=base_url, version="auto", timeout=timeout)


def engine_answers(base_url: str = DEFAULT_DOCKER_SOCKET) -> bool:
    """Whether a Docker engine answers a ping at base_url."""
    import docker

    if base_url.startswith("unix://") and not Path(base_url[7:]).exists():
        return False
    try:
        client = _docker_client(base_url, timeout=5)
    except docker.errors.DockerException:
        return False
    try:
        return bool(client.ping())
    except (docker.errors.DockerException, OSError):
        return False
    finally:
        client.close()


@contextlib.contextmanager
def docker_engine(cfg: Config, *, log: Log = _say) -> Iterator:
    """Yield a docker.DockerClient; start dockerd for the block if none answers.

    DOCKER_HOST, when set, names the engine to use and is never started.
    """
    if host := os.environ.get("DOCKER_HOST"):
        if not engine_answers(host):
            raise NightshiftError(
                f"no Docker engine answers at DOCKER_HOST={host}; "
                "start that engine or unset DOCKER_HOST to use the local one"
            )
        with contextlib.closing(_docker_client(host)) as client:
            yield client
        return

    with _startup_lock(cfg, "dockerd"):
        if engine_answers():
            log(f"using the Docker engine already running at {DEFAULT_DOCKER_SOCKET}")
            process = None
        else:
            process = _start_dockerd(cfg, log)
    try:
        with (
            _sigterm_as_exit(),
            contextlib.closing(_docker_client(DEFAULT_DOCKER_SOCKET)) as client,
        ):
            yield client
    finally:
        if process is not None:
            # Stopped even when saying so fails (a reader that went away).
            try:
                log("stopping the Docker engine this task started")
            finally:
                stop_process(process, DOCKERD_STOP_SECONDS)


def _start_dockerd(cfg: Config, log: Log) -> subprocess.Popen:
    dockerd = shutil.which("dockerd")
    if not dockerd:
        raise ToolMissing(
            "dockerd is not installed; install it with: apt-get install docker.io"
        )
    if os.geteuid() != 0:
        raise NightshiftError(
            "no Docker engine is running and starting dockerd needs root; "
            "start it with: sudo systemctl start docker"
        )
    logfile = cfg.build_dir / "dockerd.log"
    logfile.parent.mkdir(parents=True, exist_ok=True)
    # The defaults are right on Debian 12 hosts and CI: overlay2 on ext4,
    # cgroupfs on cgroup v1, iptables (nft) for the bridge; so no flags
    # beyond the socket, which is named so the docker CLI finds it too.
    command = [dockerd, "--host", DEFAULT_DOCKER_SOCKET]
    log(f"starting the Docker engine: {' '.join(command)} (log: {logfile})")
    process = _spawn(command, logfile)
    try:
        _wait_until(
            lambda: engine_answers(),
            process,
            DOCKERD_START_SECONDS,
            what="dockerd",
            logfile=logfile,
        )
    except BaseException:
        stop_process(process, DOCKERD_STOP_SECONDS)
        raise
    log(f"Docker engine answers (pid {process.pid})")
    return process


# --- the registry ------------------------------------------------------------


@dataclass(frozen=True)
class Registry:
    """A registry on the host's loopback, as pushes and pulls address it."""

    port: int
    started: bool
    pid: int | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"


def registry_answers(port: int, host: str = "127.0.0.1", timeout: float = 2.0) -> bool:
    """Whether a Docker distribution registry serves its API on host:port."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/v2/", timeout=timeout) as r:
            return r.headers.get(_API_HEADER, "").startswith("registry/2")
    except urllib.error.HTTPError as err:
        # 401 is a registry that wants credentials: still a registry.
        return err.headers.get(_API_HEADER, "").startswith("registry/2")
    except (OSError, ValueError):
        return False


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, port)) == 0


def manifest_digest(registry: str, repository: str, reference: str) -> str:
    """The registry's digest of repository:reference (sha256:...)."""
    request = urllib.request.Request(
        f"http://{registry}/v2/{repository}/manifests/{reference}",
        method="HEAD",
        headers={"Accept": _MANIFEST_TYPES},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.headers["Docker-Content-Digest"]
    except urllib.error.HTTPError as err:
        raise NightshiftError(
            f"registry {registry} has no {repository}:{reference} "
            f"(HTTP {err.code}); push it with: invoke job-image"
        ) from None
    except OSError as err:
        raise NightshiftError(f"registry {registry} does not answer: {err}") from None


def registry_config(cfg: Config, port: int) -> Path:
    """Write the registry's config: loopback only, storage under build/."""
    base = cfg.build_dir / "registry"
    storage = base / "data"
    storage.mkdir(parents=True, exist_ok=True)
    path = base / f"config-{port}.yml"
    # No auth and plain HTTP: it listens on loopback only, and Docker treats
    # 127.0.0.0/8 (and qemu guests their 10.0.2.2, set as insecure) so.
    path.write_text(
        "# Written by nightshift.services; rewritten on every start.\n"
        "version: 0.1\n"
        "log:\n"
        "  level: info\n"
        "storage:\n"
        "  filesystem:\n"
        f"    rootdirectory: {storage}\n"
        "  delete:\n"
        "    enabled: true\n"
        "http:\n"
        f"  addr: 127.0.0.1:{port}\n"
        "  headers:\n"
        "    X-Content-Type-Options: [nosniff]\n"
    )
    return path


@contextlib.contextmanager
def registry(
    cfg: Config, port: int | None = None, *, log: Log = _say
) -> Iterator[Registry]:
    """Yield a Registry on 127.0.0.1:port, starting docker-registry if needed."""
    port = port or cfg.local.registry_port
    with _startup_lock(cfg, f"registry-{port}"):
        if registry_answers(port):
            log(f"using the registry already serving 127.0.0.1:{port}")
            process = None
        else:
            process = _start_registry(cfg, port, log)
    try:
        with _sigterm_as_exit():
            yield Registry(
                port=port, started=process is not None, pid=process and process.pid
            )
    finally:
        if process is not None:
            try:
                log(f"stopping the registry this task started on 127.0.0.1:{port}")
            finally:
                stop_process(process, REGISTRY_STOP_SECONDS)


def _start_registry(cfg: Config, port: int, log: Log) -> subprocess.Popen:
    binary = shutil.which("docker-registry")
    if not binary:
        raise ToolMissing(
            "docker-registry is not installed; install it with: "
            "apt-get install docker-registry"
        )
    if port_in_use(port):
        raise NightshiftError(
            f"127.0.0.1:{port} is in use by something that is not a registry; "
            "stop it or set local.registry_port in nightshift.toml"
        )
    config_file = registry_config(cfg, port)
    logfile = config_file.parent / f"registry-{port}.log"
    command = [binary, "serve", str(config_file)]
    log(f"starting the registry: {' '.join(command)} (log: {logfile})")
    process = _spawn(command, logfile)
    try:
        _wait_until(
            lambda: registry_answers(port),
            process,
            REGISTRY_START_SECONDS,
            what="docker-registry",
            logfile=logfile,
        )
    except BaseException:
        stop_process(process, REGISTRY_STOP_SECONDS)
        raise
    log(f"registry answers on 127.0.0.1:{port} (pid {process.pid})")
    return process


# --- processes ---------------------------------------------------------------


def _spawn(command: list[str], logfile: Path) -> subprocess.Popen:
    with open(logfile, "ab") as out:
        # Its own session: a Ctrl-C in the terminal reaches only us, and we
        # stop the service in order instead of it dying under its clients.
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait_until(
    ready: Callable[[], bool],
    process: subprocess.Popen,
    seconds: float,
    *,
    what: str,
    logfile: Path,
) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if ready():
            return
        if process.poll() is not None:
            raise NightshiftError(
                f"{what} exited with code {process.returncode} while starting: "
                f"{_last_line(logfile)} (full log: {logfile})"
            )
        time.sleep(0.25)
    raise NightshiftError(
        f"{what} did not answer within {seconds:.0f}s: {_last_line(logfile)} "
        f"(full log: {logfile})"
    )


def _last_line(logfile: Path) -> str:
    try:
        lines = logfile.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return lines[-1][-300:] if lines else "empty log"


def stop_process(process: subprocess.Popen, grace: float) -> None:
    """SIGTERM, wait up to grace seconds, then SIGKILL its whole process group."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        # Its helpers (containerd under dockerd) share its process group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@contextlib.contextmanager
def _startup_lock(cfg: Config, name: str) -> Iterator[None]:
    """Serialise check-then-start so two tasks don't both start a service."""
    path = cfg.build_dir / "locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """Let SIGTERM unwind like Ctrl-C, so `finally` stops what we started.

    Only where SIGTERM still has its default action and only in the main
    thread; an outer block that already set this leaves it to that block.
    """
    import threading

    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def _raise(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
