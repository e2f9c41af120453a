"""scripts/run.sh and smtpapi-admin, as a newcomer uses them: the admin command fills the database
the service then reads, by default and with SMTPAPI_DB alike.

The scripts run for real (bash, twistd, smtpapi-admin) with this checkout's installed virtual
environment standing in for theirs, so nothing is installed here.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_deploy import VENV_BIN

REPO = Path(__file__).resolve().parents[2]
START_DEADLINE = 20.0


@pytest.fixture
def venv(tmp_path: Path) -> Path:
    """A virtual environment folder whose commands are this checkout's, marked as installed, so
    scripts/bootstrap.sh finds nothing to do."""
    root = tmp_path / "venv"
    (root / "bin").mkdir(parents=True)
    for name in ("python", "twistd", "smtpapi-admin"):
        (root / "bin" / name).symlink_to(VENV_BIN / name)
    (root / ".installed").touch()
    return root


def environment(venv: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMTPAPI_") and not k.startswith("DB")}
    env.update(SMTPAPI_VENV=str(venv), **extra)
    return env


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def post(port: int, key: str) -> int:
    """POST an empty JSON object with ``key``: 401 when the service does not know the key."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request(
            "POST", "/api/v1/send/email", body=b"{}", headers={"Content-Type": "application/json", "X-API-Key": key}
        )
        response = connection.getresponse()
        json.loads(response.read())
        return response.status
    finally:
        connection.close()


def serve(folder: Path, env: dict[str, str]) -> Iterator[int]:
    """``bash scripts/run.sh`` started in ``folder``; yields its port once /healthz answers."""
    port = free_port()
    with open(folder / "run.log", "wb") as log:
        process = subprocess.Popen(
            ["bash", str(REPO / "scripts" / "run.sh"), "--listen", f"tcp:{port}:interface=127.0.0.1"],
            cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + START_DEADLINE
        while True:
            assert process.poll() is None, (folder / "run.log").read_text()
            assert time.monotonic() < deadline, (folder / "run.log").read_text()
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                connection.request("GET", "/healthz")
                if connection.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        yield port
    finally:
        process.terminate()
        process.wait(10)


def add_key(venv: Path, folder: Path, env: dict[str, str]) -> str:
    result = subprocess.run(
        [str(venv / "bin" / "smtpapi-admin"), "apikey", "add", "--allow-from", "127.0.0.1"],
        cwd=folder, env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return result.stdout.strip().splitlines()[-1]


def test_by_default_run_sh_serves_the_database_smtpapi_admin_fills(venv: Path, tmp_path: Path) -> None:
    """Without SMTPAPI_DB, a key added with smtpapi-admin from the same folder is one the service
    started by scripts/run.sh knows: both use smtpapi.sqlite there, and no other database appears."""
    folder = tmp_path / "clone"
    folder.mkdir()
    env = environment(venv)
    key = add_key(venv, folder, env)
    for port in serve(folder, env):
        assert post(port, key) == 400  # past the key check: the body is what is wrong
        assert post(port, "AAAAAA-BBBBBB-CCCCCC-DDDDDD-EEEEEE") == 401
    made = {path.name for path in folder.glob("*.sqlite")}
    assert "smtpapi.sqlite" in made and made <= {"smtpapi.sqlite", "smtpapi-state.sqlite"}, made


def test_both_honour_smtpapi_db(venv: Path, tmp_path: Path) -> None:
    """With SMTPAPI_DB set, the admin command and run.sh use that database, and nothing else."""
    folder = tmp_path / "clone"
    folder.mkdir()
    chosen = tmp_path / "elsewhere" / "mine.sqlite"
    chosen.parent.mkdir()
    env = environment(venv, SMTPAPI_DB=f"sqlite:{chosen}", SMTPAPI_STATE_DB=f"sqlite:{tmp_path / 'state.sqlite'}")
    key = add_key(venv, folder, env)
    for port in serve(folder, env):
        assert post(port, key) == 400
    assert chosen.exists()
    assert list(folder.glob("*.sqlite")) == []
