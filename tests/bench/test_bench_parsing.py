"""The bench's console and registry-log parsing, on recorded lines (no VM)."""

from __future__ import annotations

import json

from nightshift import bench
from nightshift.agent import RESULT_MARK


def test_reference_marks_and_power_down_give_guest_and_host_times():
    """bench-mark lines and the kernel's stamped power-down make every figure."""
    lines = [
        (3.0, "[    1.2] Linux version"),
        (40.0, "[   30.2] bench-reference[417]: bench-mark unit_start 30.10"),
        (50.0, "bench-mark job_start 40.00"),
        (80.0, "bench-mark job_end 70.50"),
        (83.0, "[   72.25] reboot: Power down"),
    ]
    steps, host, _ = bench.guest_steps(lines)
    guest, hosts = bench.timings(steps, host, ended=83.5)
    assert guest == {
        "boot_to_job_start": 40.0,
        "job_run": 30.5,
        "job_end_to_power_off": 1.75,
        "total": 72.25,
        "overhead": 41.75,
    }
    assert hosts["boot_to_job_start"] == 50.0
    assert hosts["job_end_to_power_off"] == 3.5


def test_nightshift_record_places_job_end_on_the_host_clock():
    """The agent prints no job-end line; the record's uptimes place it."""
    record = {"timings": {"job_start": 40.0, "job_end": 70.0, "report": 71.0}}
    lines = [
        (50.0, '{"nightshift": "job-start", "uptime": 40.0}'),
        (81.0, f"[   71.1] python3[587]: {RESULT_MARK} {json.dumps(record)}"),
        (82.0, "[   71.9] reboot: Power down"),
    ]
    steps, host, _ = bench.guest_steps(lines)
    guest, hosts = bench.timings(steps, host, ended=82.5)
    assert guest["job_end_to_power_off"] == 1.9
    assert hosts["job_run"] == 30.0
    assert hosts["job_end_to_power_off"] == 2.5


def test_registry_bytes_count_guest_requests_only():
    """Requests with Host 10.0.2.2:port count; the host's own pushes do not."""
    log = "\n".join(
        [
            'time="x" level=info msg="response completed" '
            'http.request.host="10.0.2.2:5000" http.request.method=GET '
            "http.request.uri=/v2/nightshift/example/manifests/latest "
            "http.response.written=1234",
            'time="x" level=info msg="response completed" '
            'http.request.host="127.0.0.1:5000" http.request.method=GET '
            "http.request.uri=/v2/x/blobs/sha256:aa http.response.written=99999",
            '127.0.0.1 - - [03/Dec/2026] "GET /v2/ HTTP/1.1" 200 2',
        ]
    )
    total, requests = bench.pulled_bytes(log, "10.0.2.2:5000")
    assert total == 1234
    assert requests == ["GET /v2/nightshift/example/manifests/latest 1234"]


def test_spread_and_ratios():
    """Failed runs are left out; the ratio is of the medians."""

    def sample(side, overhead, ok=True):
        guest = {metric: 1.0 for metric in bench.METRICS} | {"overhead": overhead}
        return bench.Sample(side=side, index=0, ok=ok, outcome="x", guest=guest)

    summary = bench.summarise(
        [
            sample("reference", 10.0),
            sample("reference", 12.0),
            sample("nightshift", 11.0),
            sample("nightshift", 13.0),
            sample("nightshift", 99.0, ok=False),
        ]
    )
    assert summary["reference"]["guest"]["overhead"]["median"] == 11.0
    assert summary["nightshift"]["guest"]["overhead"]["max"] == 13.0
    assert summary["nightshift"]["runs_failed"] == 1
    assert summary["ratio_nightshift_to_reference"]["guest"]["overhead"] == 1.091
