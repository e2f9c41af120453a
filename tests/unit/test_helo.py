"""The EHLO name reaches postfix: twistd smtpapi, started as operators start it, greets a scripted
loopback SMTP server (its /readyz check opens a session) with --smtp-helo or MAILCOW_HOSTNAME."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

START_DEADLINE = 20.0


class EhloRecorder:
    """A one-connection-at-a-time SMTP server that greets, records EHLO and says goodbye."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.ehlo: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                conn.sendall(b"220 fake.test ESMTP\r\n")
                reader = conn.makefile("rb")
                for line in reader:
                    if line.upper().startswith(b"EHLO "):
                        self.ehlo.append(line[5:].strip().decode("ascii", "replace"))
                        conn.sendall(b"250-fake.test\r\n250 PIPELINING\r\n")
                    elif line.upper().startswith(b"QUIT"):
                        conn.sendall(b"221 bye\r\n")
                        break
                    else:
                        conn.sendall(b"502 no\r\n")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def recorder() -> Iterator[EhloRecorder]:
    server = EhloRecorder()
    yield server
    server.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def ehlo_of(recorder: EhloRecorder, tmp_path: Path, *options: str, env: dict[str, str] | None = None) -> str:
    """Start the service against ``recorder``, ask /readyz once, and return the EHLO name it gave."""
    port = free_port()
    argv = [
        str(Path(sys.executable).parent / "twistd"), "-n", "--pidfile=", "smtpapi",
        "--listen", f"tcp:{port}:interface=127.0.0.1", "--db", f"sqlite:{tmp_path / 'db.sqlite'}",
        "--state-db", f"sqlite:{tmp_path / 'state.sqlite'}", "--smtp-host", "127.0.0.1",
        "--smtp-port", str(recorder.port), "--smtp-allow", f"127.0.0.1:{recorder.port}/plain", *options,
    ]  # fmt: skip
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("SMTPAPI_") and k != "MAILCOW_HOSTNAME"}
    child_env.update(env or {})
    with open(tmp_path / "service.log", "wb") as log:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=child_env)
    try:
        deadline = time.monotonic() + START_DEADLINE
        while not recorder.ehlo:
            assert process.poll() is None, (tmp_path / "service.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "service.log").read_text()
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                connection.request("GET", "/readyz")
                connection.getresponse().read()
                connection.close()
            except OSError:
                pass
            time.sleep(0.2)
    finally:
        process.terminate()
        process.wait(10)
    return recorder.ehlo[0]


def test_the_service_says_ehlo_with_smtp_helo(recorder: EhloRecorder, tmp_path: Path) -> None:
    """--smtp-helo is the name postfix hears."""
    assert ehlo_of(recorder, tmp_path, "--smtp-helo", "api.example.org", env={"MAILCOW_HOSTNAME": "mail.example.org"}) == "api.example.org"


def test_the_service_says_ehlo_with_mailcow_hostname_by_default(recorder: EhloRecorder, tmp_path: Path) -> None:
    """Without --smtp-helo, mailcow.conf's MAILCOW_HOSTNAME is the name, not the machine's host name."""
    assert ehlo_of(recorder, tmp_path, env={"MAILCOW_HOSTNAME": "mail.example.org"}) == "mail.example.org"
