"""README, --help and the OpenAPI document agree with the code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mailcow_smtp_api.config import FLAGS, OPTION_DEFAULTS, env_name
from mailcow_smtp_api.errors import CODES
from mailcow_smtp_api.openapi import document

README = (Path(__file__).parents[2] / "README.md").read_text()


def test_every_option_is_in_the_readme_and_help() -> None:
    """Each option and its environment variable are documented in README and in twistd's --help."""
    help_text = subprocess.run(
        [str(Path(sys.executable).parent / "twistd"), "smtpapi", "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    for name in (*OPTION_DEFAULTS, *FLAGS):
        assert f"--{name}" in README, name
        assert env_name(name) in README, name
        assert f"--{name}" in help_text, name
        assert env_name(name) in help_text.replace("\n", "").replace(" ", ""), name


def test_every_error_code_is_in_the_readme_and_openapi() -> None:
    """Each error code of the code table is explained in the README and named in the OpenAPI document."""
    openapi_text = str(document())
    for code in CODES:
        assert f"`{code}`" in README, code
        assert code in openapi_text, code


def test_readme_starts_with_the_two_command_quick_start() -> None:
    """The README's quick start is exactly two commands: run, and test."""
    block = README.split("## Quick start", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["bash scripts/run.sh", "bash scripts/test.sh"]
    assert (Path(__file__).parents[2] / ".ci" / "run").read_text().strip().endswith("exec bash scripts/test.sh")
