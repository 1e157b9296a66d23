"""nightshift's example job: generate, sort and aggregate records, write a report.

Real CPU and memory work whose size comes from the environment, so the same
image is a quick smoke test in a TCG-emulated VM and a heavy batch on EC2.
Standard library only: it runs on any Python 3.11+ base image.

Environment (all optional):
  ROWS          records to generate (default 20000000)
  GROUPS        groups the records fall into (default 1000)
  SEED          seed of the random generator (default 42)
  OUTPUT_DIR    where result.json goes (default /tmp/nightshift-out)
  FAIL_EXIT     after the work, exit with this code (test hook; 0 = off)
  HOLD_SECONDS  after the work, keep running this long (test hook)

Exit codes: 0 done, 1 the work failed, 2 a bad environment value,
143 stopped by SIGTERM, 130 by SIGINT, FAIL_EXIT when set.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import random
import signal
import sys
import threading
import time
from array import array
from dataclasses import dataclass
from pathlib import Path

PERCENTILES = (50, 90, 99)
# Work between two looks at the stop flag: small enough that SIGTERM is
# answered well within a second even under TCG emulation.
CHUNK = 20_000
# If the main thread is stuck in one long C call (a huge sort), the watchdog
# ends the process itself this long after the signal.
FORCED_STOP_SECONDS = 1.5
EXIT_BAD_ENV = 2


class BadEnvironment(Exception):
    """An environment variable with a value the job cannot use."""


class Stopped(Exception):
    """SIGTERM or SIGINT arrived; the work ends without writing a result."""


@dataclass(frozen=True)
class Settings:
    rows: int
    groups: int
    seed: int
    output_dir: Path
    fail_exit: int
    hold_seconds: float


def _int_env(env, name, default, low, high):
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise BadEnvironment(
            f"{name}={raw!r} is not valid; use a whole number from {low} to {high}"
        )
    return value


def settings_from(env) -> Settings:
    """Read and check every setting up front, so a typo fails in milliseconds."""
    hold_raw = env.get("HOLD_SECONDS", "").strip()
    try:
        hold = float(hold_raw) if hold_raw else 0.0
    except ValueError:
        hold = -1.0
    if not 0 <= hold <= 7 * 86400:
        raise BadEnvironment(
            f"HOLD_SECONDS={hold_raw!r} is not valid; use seconds from 0 to 604800"
        )
    output_dir = env.get("OUTPUT_DIR", "").strip() or "/tmp/nightshift-out"
    return Settings(
        rows=_int_env(env, "ROWS", 20_000_000, 1, 2_000_000_000),
        groups=_int_env(env, "GROUPS", 1000, 1, 1_000_000),
        seed=_int_env(env, "SEED", 42, 0, 2**63 - 1),
        output_dir=Path(output_dir),
        fail_exit=_int_env(env, "FAIL_EXIT", 0, 0, 255),
        hold_seconds=hold,
    )


class StopFlag:
    """SIGTERM/SIGINT raise Stopped wherever the main thread is.

    The work also checks the flag between chunks, so a stop that arrives
    while a handler is already unwinding is not lost.
    """

    def __init__(self):
        self.signal_name = ""
        self.exit_code = 0
        self._event = threading.Event()

    def install(self):
        for signum, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
            signal.signal(signum, lambda s, _f, code=code: self._on_signal(s, code))

    def _on_signal(self, signum, code):
        if self._event.is_set():
            return
        self.signal_name = signal.Signals(signum).name
        self.exit_code = code
        self._event.set()
        log(f"received {self.signal_name}; stopping")
        raise Stopped()

    def check(self):
        if self._event.is_set():
            raise Stopped()

    def sleep(self, seconds):
        """Sleep that ends at once when a stop signal arrives."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.2))
            self.check()


class Watchdog:
    """Ends the process shortly after a signal if the main thread cannot.

    Python runs signal handlers between bytecodes only, so a long sort would
    delay them; a wakeup fd is written by the C-level handler at once, and
    this thread reads it.
    """

    def __init__(self):
        self._read, write = os.pipe()
        os.set_blocking(write, False)
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, daemon=True, name="watchdog").start()

    def _watch(self):
        data = os.read(self._read, 1)
        code = 130 if data and data[0] == signal.SIGINT else 143
        time.sleep(FORCED_STOP_SECONDS)
        log(f"stopped by signal (forced after {FORCED_STOP_SECONDS}s); no result")
        os._exit(code)


_START = time.monotonic()


def log(message):
    print(f"[{time.monotonic() - _START:8.2f}s] {message}", flush=True)


class Progress:
    """Logs `done/total what` at most every two seconds: a sign of life."""

    def __init__(self, what, total):
        self.what, self.total = what, total
        self.next = time.monotonic() + 2

    def __call__(self, done):
        if time.monotonic() >= self.next:
            log(f"{self.what}: {done}/{self.total}")
            self.next = time.monotonic() + 2


def generate(settings, stop):
    """Records as per-group arrays of values (lognormal, like sizes or latencies)."""
    rng = random.Random(settings.seed)
    pick, value = rng.random, rng.lognormvariate
    groups = settings.groups
    buckets = [array("d") for _ in range(groups)]
    done, progress = 0, Progress("generated records", settings.rows)
    while done < settings.rows:
        stop.check()
        for _ in range(min(CHUNK, settings.rows - done)):
            buckets[int(pick() * groups)].append(value(3.0, 1.0))
        done = min(done + CHUNK, settings.rows)
        progress(done)
    return buckets


def percentile(ordered, pct):
    """Nearest-rank percentile of an ordered sequence."""
    if not ordered:
        return None
    rank = max(1, -(-pct * len(ordered) // 100))
    return ordered[rank - 1]


def aggregate(buckets, stop):
    """Sort each group and describe it: count, sum, min, max, percentiles."""
    rows, sorted_groups = [], []
    progress = Progress("sorted groups", len(buckets))
    for index, bucket in enumerate(buckets):
        if index % 64 == 0:
            stop.check()
            progress(index)
        ordered = sorted(bucket)
        sorted_groups.append(ordered)
        stats = {"group": index, "count": len(ordered)}
        if ordered:
            stats.update(
                sum=round(sum(ordered), 6),
                min=round(ordered[0], 6),
                max=round(ordered[-1], 6),
                **{f"p{p}": round(percentile(ordered, p), 6) for p in PERCENTILES},
            )
        rows.append(stats)
    return rows, sorted_groups


def overall(sorted_groups, total, stop):
    """Merge the sorted groups into one global order and take its percentiles."""
    ranks = {max(1, -(-p * total // 100)): p for p in PERCENTILES}
    found, progress = {}, Progress("merged records", total)
    for position, value in enumerate(heapq.merge(*sorted_groups), start=1):
        if position % CHUNK == 0:
            stop.check()
            progress(position)
        if position in ranks:
            found[f"p{ranks[position]}"] = round(value, 6)
    return found


def write_result(settings, groups, totals):
    """Write result.json atomically: a stopped run never leaves half a file."""
    document = {
        "rows": settings.rows,
        "groups": settings.groups,
        "seed": settings.seed,
        "overall": totals,
        "per_group": groups,
    }
    text = json.dumps(document, sort_keys=True, separators=(",", ":")) + "\n"
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    path = settings.output_dir / "result.json"
    partial = path.with_suffix(".json.partial")
    partial.write_text(text)
    partial.replace(path)
    return path, hashlib.sha256(text.encode()).hexdigest()


def run(settings, stop):
    log(
        f"start: rows={settings.rows} groups={settings.groups} seed={settings.seed} "
        f"python={sys.version.split()[0]}"
    )
    started = time.monotonic()
    buckets = generate(settings, stop)
    generated = time.monotonic()
    log(f"generated {settings.rows} records in {generated - started:.2f}s")

    groups, sorted_groups = aggregate(buckets, stop)
    del buckets
    totals = overall(sorted_groups, settings.rows, stop)
    del sorted_groups
    aggregated = time.monotonic()
    took = aggregated - generated
    log(f"sorted and aggregated {settings.groups} groups in {took:.2f}s")

    path, digest = write_result(settings, groups, totals)
    elapsed = time.monotonic() - started
    log(f"wrote {path}")
    percentiles = " ".join(f"{name}={value}" for name, value in sorted(totals.items()))
    print(
        f"SUMMARY rows={settings.rows} groups={settings.groups} seed={settings.seed} "
        f"{percentiles} sha256={digest} output={path} seconds={elapsed:.2f}",
        flush=True,
    )

    if settings.hold_seconds:
        log(f"holding for {settings.hold_seconds:g}s (HOLD_SECONDS)")
        stop.sleep(settings.hold_seconds)
    if settings.fail_exit:
        log(f"failing on purpose with exit code {settings.fail_exit} (FAIL_EXIT)")
        return settings.fail_exit
    return 0


def main():
    stop = StopFlag()
    stop.install()
    Watchdog()
    try:
        settings = settings_from(os.environ)
    except BadEnvironment as err:
        print(f"job: bad environment: {err}", file=sys.stderr, flush=True)
        return EXIT_BAD_ENV
    try:
        return run(settings, stop)
    except Stopped:
        log(f"stopped by {stop.signal_name or 'signal'}; no result written")
        return stop.exit_code or 143
    except (OSError, MemoryError) as err:
        print(f"job: failed: {err}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
