"""README, --help and the OpenAPI document agree with the code."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

from mailcow_smtp_api.core.config import FLAGS, OPTION_DEFAULTS, Config, env_name
from mailcow_smtp_api.core.errors import CODES
from mailcow_smtp_api.core.model import Security
from mailcow_smtp_api.core.openapi import document
from mailcow_smtp_api.tap import _HELP

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


def configuration_rows() -> list[str]:
    """The rows of the README's configuration table."""
    section = README.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| `--")]


def test_each_option_has_exactly_one_row_in_the_configuration_table() -> None:
    """No option is listed twice (with different words) or left out."""
    names = [line.split("`")[1][2:] for line in configuration_rows()]
    assert sorted({name for name in names if names.count(name) > 1}) == []
    assert sorted(names) == sorted([*OPTION_DEFAULTS, *FLAGS])


# Every form of value an option's parser accepts, as written in the help and the README.
SYNTAX = {
    "smtp-allow": [f"/{mode.value}" for mode in Security],
    "db": ["sqlite:", "mysql://", "unix_socket="],
    "state-db": ["sqlite:", "mysql://"],
    "listen": ["tcp:", "ssl:"],
    "log-format": ["text", "json"],
    "smtp-helo": ["MAILCOW_HOSTNAME", "IP address"],
}


def test_every_syntax_an_option_accepts_is_documented() -> None:
    """Each value form of SYNTAX (the modes of --smtp-allow among them) is in twistd's --help and in
    the option's README row."""
    help_text = " ".join(
        subprocess.run(
            [str(Path(sys.executable).parent / "twistd"), "smtpapi", "--help"], capture_output=True, text=True, timeout=60
        ).stdout.split()
    )
    rows = {line.split("`")[1][2:]: line for line in configuration_rows()}
    for option, forms in SYNTAX.items():
        entry = help_text.split(f"--{option}=", 1)[1].split(" --", 1)[0]
        for form in forms:
            assert form in entry, (option, form, entry)
            assert form in rows[option], (option, form)


def test_the_largest_attachment_at_the_default_limit_is_stated() -> None:
    """README and --help say how large a file fits in a request at the default --max-request-bytes:
    the largest whole number of MiB whose base64, in the README's example request, fits."""
    limit = Config().max_request_bytes
    example = {
        "from": "sender@example.com",
        "to": ["recipient@example.com"],
        "subject": "Email with Attachment",
        "body": "Please find the attached document.",
        "password": "your-mailbox-password",
        "attachments": [{"filename": "document.pdf", "content": "", "content_type": "application/pdf"}],
    }
    around = len(json.dumps(example))

    def request_size(file_bytes: int) -> int:
        return around + 4 * math.ceil(file_bytes / 3)

    mib = 1024 * 1024
    largest = max(n for n in range(1, limit // mib + 1) if request_size(n * mib) <= limit)
    assert request_size((largest + 1) * mib) > limit
    assert f"about {largest} MiB" in README
    assert f"**about {largest} MiB**" in README.split("### The largest attachment", 1)[1].split("\n## ", 1)[0]
    assert f"about {largest} MiB" in " ".join(_HELP["max-request-bytes"].split())


def test_run_instructions_start_from_the_repository_root() -> None:
    """The README's and the benchmark's commands run from a clone's root: no cd to a folder of one machine."""
    for path in (Path(__file__).parents[2] / "README.md", Path(__file__).parents[2] / "bench" / "README.md"):
        blocks = re.findall(r"```(?:sh|bash)\n(.*?)```", path.read_text(), re.DOTALL)
        assert blocks, path
        for block in blocks:
            for line in block.splitlines():
                assert not re.match(r"\s*cd\s+/", line), f"{path.name}: {line}"
