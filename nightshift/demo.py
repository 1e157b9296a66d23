"""The whole local pipeline in one go: base image, job image, bake, run.

Each step says what it does and how long it took; what is cached is reused,
so a second demo only rebuilds what changed and runs the job again.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import TextIO

from nightshift import bake, baseimage, jobimage, localrun, services
from nightshift.config import Config
from nightshift.localrun import RunFailed, Summary


class Steps:
    """Prints a line as each step starts and ends, with its time."""

    def __init__(self, out: TextIO):
        self.out = out
        self.started = time.monotonic()
        self.times: list[tuple[str, float]] = []

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[None]:
        number = len(self.times) + 1
        self.out.write(f"\n==> [{number}/4] {title}\n")
        self.out.flush()
        began = time.monotonic()
        yield
        took = time.monotonic() - began
        self.times.append((title, took))
        self.out.write(f"==> [{number}/4] done in {took:.1f}s\n")
        self.out.flush()

    def total(self) -> float:
        return time.monotonic() - self.started


def demo(
    cfg: Config, *, accelerator: str | None = None, out: TextIO = sys.stdout
) -> Summary:
    """Run every step; raise RunFailed when the job did not succeed."""
    jobimage.job_context(cfg)
    steps = Steps(out)
    with steps.step("base image (mmdebstrap, cached by its inputs)"):
        base = baseimage.ensure(cfg)
        out.write(f"    {base.disk}\n")
    with services.registry(cfg):
        with steps.step("job image (build and push to the local registry)"):
            with services.docker_engine(cfg) as client:
                pushed = jobimage.build_and_push(cfg, client)
            out.write(f"    {', '.join(pushed.tags)}\n    {pushed.digest}\n")
        with steps.step("bake the image (Packer + Ansible, cached by its inputs)"):
            # Warm cache: the job's layers go into the image, so a run pulls
            # only what changed since the bake.
            image = bake.ensure_local_image(
                cfg, accelerator=accelerator, warm_cache=True
            )
            out.write(f"    {image.name}: {image.disk}\n")
        with steps.step("run the job in a VM that powers itself off"):
            summary = localrun.run(cfg, image, accelerator=accelerator, out=out)
    localrun.print_summary(summary, out)
    out.write("\nsteps:\n")
    for title, took in steps.times:
        out.write(f"  {took:7.1f}s  {title}\n")
    out.write(f"  {steps.total():7.1f}s  total\n")
    if not summary.ok:
        raise RunFailed(f"the run ended {summary.outcome}: {summary.reason}")
    return summary
