"""`invoke bench --runs 1`: both images boot, each run is timed, a file is written.

Real parts only: the reference and nightshift images are baked (or reused
by their inputs) with Packer, the job image is served by a real registry,
and every run is a qemu VM that must power itself off.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from nightshift import bench

pytestmark = [pytest.mark.vm, pytest.mark.image, pytest.mark.docker]


@pytest.fixture(scope="module")
def report(e2e_cfg) -> dict:
    out = io.StringIO()
    path = bench.bench(e2e_cfg, runs=1, out=out)
    print(out.getvalue())
    return json.loads(path.read_text())


def test_writes_its_file_under_the_build_folder(report, e2e_cfg):
    """The JSON file lies under build/bench/ and names itself."""
    path = Path(report["file"])
    assert path.is_file()
    assert path.parent == e2e_cfg.build_dir / "bench"
    assert (path.parent / "latest.json").is_file()


def test_one_run_per_side_powered_off_with_guest_timings(report):
    """Each side ran once, succeeded, and its guest clock saw every step."""
    by_side = {sample["side"]: sample for sample in report["samples"]}
    assert set(by_side) == {"reference", "nightshift"}
    for side, sample in by_side.items():
        assert sample["ok"], f"{side}: {sample['outcome']} ({sample['console_log']})"
        guest = sample["guest"]
        assert 0 < guest["boot_to_job_start"] < guest["total"], side
        assert guest["job_run"] > 0 and guest["job_end_to_power_off"] > 0, side
        assert sample["host"]["total"] >= guest["total"], side


def test_summary_has_spreads_and_ratios(report):
    """min <= median <= max per metric, and a ratio of the medians."""
    for side in bench.SIDES:
        for metric in bench.METRICS:
            spread = report["summary"][side]["guest"][metric]
            assert spread["min"] <= spread["median"] <= spread["max"], metric
    ratios = report["summary"]["ratio_nightshift_to_reference"]["guest"]
    assert ratios["overhead"] and ratios["overhead"] > 0


def test_bytes_pulled_at_boot_are_counted(report):
    """The registry log gives each boot's bytes: at least the manifest."""
    for sample in report["samples"]:
        assert sample["pulled_bytes"], f"{sample['side']}: nothing counted"
    # Other VMs on this machine may pull in the same window, so the warm
    # figures are not compared with the cold one here; the report shows both.
    assert report["cold_pull_bytes"] > 0
