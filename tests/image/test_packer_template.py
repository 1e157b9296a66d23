"""The Packer template: formatted, loadable by the installed Packer, and
strict about its variables before any VM starts."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from nightshift import bake
from nightshift.errors import NightshiftError

TEMPLATE = Path(__file__).resolve().parents[2] / "packer"


def _legacy(version: tuple[int, int, int]) -> None:
    if version >= bake.MODERN_PACKER:
        pytest.skip("checks the staging for Packer < 1.7; this Packer is modern")


def test_template_is_packer_fmt_clean(packer, packer_version):
    """`packer fmt -check` finds nothing to reformat."""
    result = packer("fmt", "-check", "-diff", str(TEMPLATE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_variable_is_typed_and_described():
    """Each variable block carries a type and a description."""
    text = (TEMPLATE / "variables.pkr.hcl").read_text()
    blocks = re.split(r'^variable "', text, flags=re.M)[1:]
    assert len(blocks) >= 10
    for block in blocks:
        name = block.split('"', 1)[0]
        assert re.search(r"^\s+type\s+=", block, re.M), f"{name} has no type"
        assert re.search(r"^\s+description\s+=", block, re.M), (
            f"{name} has no description"
        )


def test_staged_legacy_directory_holds_only_what_1_6_understands(tmp_path):
    """No plugin block, no AMI source, the build lists only the local source."""
    staged = bake.stage_legacy(TEMPLATE, tmp_path / "legacy")
    names = sorted(path.name for path in staged.glob("*.pkr.hcl"))

    assert names == sorted(bake.LEGACY_FILES)
    text = "\n".join(path.read_text() for path in staged.glob("*.pkr.hcl"))
    assert "required_plugins" not in text
    assert "source.amazon-ebs" not in text
    assert "source.qemu.local" in text


def test_staging_refuses_a_build_file_it_cannot_reduce(tmp_path):
    """A build block without the one-per-line AMI entry stops with a clear error."""
    template = tmp_path / "packer"
    shutil.copytree(TEMPLATE, template)
    build = template / "build.pkr.hcl"
    build.write_text(build.read_text().replace('"source.amazon-ebs.aws",', ""))

    with pytest.raises(NightshiftError, match="source.amazon-ebs"):
        bake.stage_legacy(template, tmp_path / "legacy")


def test_staged_local_source_validates(packer, packer_version, local_vars, tmp_path):
    """The staged directory passes a full `packer validate` on this Packer."""
    _legacy(packer_version)
    staged = bake.stage_legacy(TEMPLATE, tmp_path / "legacy")

    result = packer("validate", *local_vars, str(staged))

    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("variable", "value", "allowed"),
    [
        ("accelerator", "foo", "tcg, kvm"),
        ("architecture", "sparc", "amd64, arm64"),
        ("registry_port", "80", "1024 to 65535"),
        ("project", "Bad_Name", "lowercase letters"),
        ("aws_region", "mars", "eu-west-1"),
    ],
)
def test_bad_variable_fails_validation_naming_it(
    packer, packer_version, local_vars, tmp_path, variable, value, allowed
):
    """Packer's own check names the variable and what it accepts."""
    _legacy(packer_version)
    staged = bake.stage_legacy(TEMPLATE, tmp_path / "legacy")

    result = packer("validate", *local_vars, f"-var={variable}={value}", str(staged))

    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode != 0
    assert f"The {variable} variable must" in output
    assert allowed in output


def _aws_only_modern_parts_removed(tmp_path: Path) -> Path:
    """Every file but the plugin block, minus the two AMI options 1.6.6 lacks."""
    directory = tmp_path / "aws"
    directory.mkdir()
    for path in TEMPLATE.glob("*.pkr.hcl"):
        if path.name != "plugins.pkr.hcl":
            shutil.copy(path, directory)
    source = directory / "source-aws.pkr.hcl"
    text = source.read_text()
    text, blocks = re.subn(
        r"\n  metadata_options \{.*?\n  \}\n", "\n", text, flags=re.S
    )
    # Region validation would call AWS; nothing may leave this machine.
    text, lines = re.subn(
        r"\n  imds_support\s*=.*\n", "\n  skip_region_validation = true\n", text
    )
    assert (blocks, lines) == (1, 1), "source-aws.pkr.hcl changed shape"
    source.write_text(text)
    return directory


def test_aws_source_validates_apart_from_modern_options(
    packer, packer_version, local_vars, tmp_path, monkeypatch
):
    """1.6.6's amazon-ebs accepts everything else in the AMI source."""
    _legacy(packer_version)
    directory = _aws_only_modern_parts_removed(tmp_path)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")

    result = packer(
        "validate",
        "-only=amazon-ebs.aws",
        *local_vars,
        "-var=aws_registry=123456789012.dkr.ecr.eu-west-1.amazonaws.com",
        str(directory),
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_whole_template_parses(packer, packer_version, tmp_path):
    """The full template, AMI options included, is well-formed HCL."""
    _legacy(packer_version)
    directory = tmp_path / "all"
    directory.mkdir()
    for path in TEMPLATE.glob("*.pkr.hcl"):
        # required_plugins is the one block 1.6.6 cannot even parse.
        if path.name != "plugins.pkr.hcl":
            shutil.copy(path, directory)

    result = packer("validate", "-syntax-only", str(directory))

    assert result.returncode == 0, result.stdout + result.stderr


def test_legacy_packer_rejects_the_unstaged_template(packer, packer_version):
    """Why we stage: 1.6.6 refuses required_plugins in the original folder."""
    _legacy(packer_version)
    result = packer("validate", "-syntax-only", str(TEMPLATE))
    assert result.returncode != 0
    assert "required_plugins" in result.stdout + result.stderr


def test_modern_packer_validates_both_sources(packer, packer_version, local_vars):
    """On Packer 1.10+, `packer init` and a full validate of the folder."""
    if packer_version < bake.AWS_PACKER:
        pytest.skip(
            "needs HashiCorp Packer 1.10+ and access to releases.hashicorp.com "
            f"for `packer init`; this is {'.'.join(map(str, packer_version))}"
        )
    init = packer("init", str(TEMPLATE))
    assert init.returncode == 0, init.stdout + init.stderr
    result = packer(
        "validate",
        *local_vars,
        "-var=aws_registry=123456789012.dkr.ecr.eu-west-1.amazonaws.com",
        str(TEMPLATE),
    )
    assert result.returncode == 0, result.stdout + result.stderr
