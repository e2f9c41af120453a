"""A private rspamd (Debian's package) on a loopback port, to score messages as mailcow's filter does.

The configuration is Debian's own rules and scores (``$CONFDIR/common.conf``) with everything that
needs the network or Redis switched off: no DNS (the resolver is a closed loopback port), no RBL,
SPF, DKIM, DMARC, fuzzy or reputation checks, no controller or proxy worker; one normal worker
answers ``/checkv2``. Hyperscan is off too, so the start needs no compilation cache. All state
lives in one folder under /tmp, owned by rspamd's own user, which the daemon drops to.
"""

from __future__ import annotations

import http.client
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
START_TIMEOUT = 120.0  # a cold start on a busy 2-core machine takes 10-20 s
CHECK_TIMEOUT = 30.0
USER = "_rspamd"  # the Debian package's system user

# Modules that ask DNS, Redis, a remote service or the network; with them off, nothing leaves
# the machine and no check waits for a timeout.
NETWORK_MODULES = (
    "antivirus", "arc", "asn", "aws_s3", "bimi", "clickhouse", "dcc", "dkim", "dkim_signing", "dmarc",
    "elastic", "emails", "external_relay", "external_services", "force_actions", "fuzzy_check", "greylist",
    "hfilter", "history_redis", "maillist", "metadata_exporter", "metric_exporter", "milter_headers",
    "multimap", "mx_check", "neural", "once_received", "p0f", "phishing", "ratelimit", "rbl", "replies",
    "reputation", "rspamd_update", "spamtrap", "spf", "surbl", "trie", "url_redirector", "whitelist",
)  # fmt: skip

CONFIG = """\
.include "$CONFDIR/common.conf"
options {{
    pidfile = "$RUNDIR/rspamd.pid";
    .include "$CONFDIR/options.inc"
    filters = "chartable,regexp";
    disable_hyperscan = true;
    # Nothing listens on port 1: a lookup fails at once instead of waiting for an answer.
    dns {{ nameserver = ["127.0.0.1:1"]; timeout = 0.2s; retransmits = 1; }}
    control_socket = "$RUNDIR/rspamd.sock mode=0600";
}}
logging {{ type = "file"; filename = "$LOGDIR/rspamd.log"; level = "notice"; }}
worker "normal" {{
    bind_socket = "{host}:{port}";
    count = 1;
    .include "$CONFDIR/worker-normal.inc"
}}
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


@dataclass
class Rspamd:
    """A running rspamd: score a message with ``check``."""

    port: int
    directory: Path

    def log_tail(self, lines: int = 30) -> str:
        """The end of rspamd's log, for failure messages."""
        try:
            return "\n".join((self.directory / "log" / "rspamd.log").read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def check(self, message: bytes, envelope: Mapping[str, str] | None = None) -> dict[str, Any]:
        """rspamd's verdict on ``message`` (``/checkv2``): ``score`` and ``symbols`` by name."""
        connection = http.client.HTTPConnection(HOST, self.port, timeout=CHECK_TIMEOUT)
        try:
            connection.request("POST", "/checkv2", body=message, headers=dict(envelope or {}))
            response = connection.getresponse()
            body = response.read()
        finally:
            connection.close()
        if response.status != 200:
            raise RuntimeError(f"rspamd answered {response.status}: {body[:200]!r}\n{self.log_tail()}")
        verdict = json.loads(body)
        assert isinstance(verdict, dict)
        return verdict

    def ping(self) -> bool:
        """True when the worker answers."""
        try:
            connection = http.client.HTTPConnection(HOST, self.port, timeout=2)
            connection.request("GET", "/ping")
            return connection.getresponse().read().strip() == b"pong"
        except OSError:
            return False


def write_config(directory: Path, port: int) -> Path:
    """The configuration folder (top file and local.d) and the state folders, owned by rspamd's user."""
    conf = directory / "conf"
    (conf / "local.d").mkdir(parents=True)
    for name in ("db", "run", "log"):
        (directory / name).mkdir()
    (conf / "rspamd.conf").write_text(CONFIG.format(host=HOST, port=port))
    for module in NETWORK_MODULES:
        (conf / "local.d" / f"{module}.conf").write_text("enabled = false;\n")
    account = pwd.getpwnam(USER)
    for path in (directory, *directory.rglob("*")):
        os.chown(path, account.pw_uid, account.pw_gid)
    return conf / "rspamd.conf"


@dataclass
class Starting:
    """An rspamd process that was started and may not answer yet."""

    process: subprocess.Popen[bytes]
    daemon: Rspamd
    started: float  # time.monotonic() at the start

    def wait(self) -> Rspamd:
        """The daemon once it answers (at most START_TIMEOUT s after it was started)."""
        deadline = self.started + START_TIMEOUT
        while not self.daemon.ping():
            if self.process.poll() is not None:
                raise RuntimeError(f"rspamd exited with status {self.process.returncode}:\n{self.daemon.log_tail()}")
            if time.monotonic() >= deadline:
                raise RuntimeError(f"rspamd did not answer within {START_TIMEOUT} s:\n{self.daemon.log_tail()}")
            time.sleep(0.2)
        return self.daemon

    def stop(self) -> None:
        """SIGTERM (SIGKILL after 15 s) and remove its folder."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(15)
        shutil.rmtree(self.daemon.directory, ignore_errors=True)


def start_rspamd() -> Starting:
    """Start rspamd in the foreground on a free loopback port, without waiting for it."""
    binary = shutil.which("rspamd")
    if binary is None:
        raise RuntimeError("rspamd is not installed (scripts/test.sh installs Debian's rspamd package)")
    directory = Path(tempfile.mkdtemp(prefix="smtpapi-rspamd-"))
    port = _free_port()
    config = write_config(directory, port)
    argv = [binary, "-f", "-c", str(config), "-u", USER, "-g", USER]
    for name, folder in (("LOCAL_CONFDIR", "conf"), ("DBDIR", "db"), ("RUNDIR", "run"), ("LOGDIR", "log")):
        argv.append(f"--var={name}={directory / folder}")
    with open(directory / "stdout.log", "wb") as output:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)
    return Starting(process=process, daemon=Rspamd(port=port, directory=directory), started=time.monotonic())


# A cold start is 15-20 s of one core (hyperscan compiling rspamd's URL patterns), so a test
# session that will need rspamd starts it once its tests are collected (tests/integration/
# conftest.py), and the start runs beside the tests before them.
_early: Starting | None = None


def start_early() -> None:
    """Start the rspamd that the next ``running_rspamd`` will use."""
    global _early
    if _early is None:
        _early = start_rspamd()


def stop_early() -> None:
    """Stop an rspamd started early that no ``running_rspamd`` took (a session cut short)."""
    global _early
    starting, _early = _early, None
    if starting is not None:
        starting.stop()


@contextmanager
def running_rspamd() -> Iterator[Rspamd]:
    """An answering rspamd (the one started early, else a new one), stopped afterwards."""
    global _early
    starting, _early = _early, None
    if starting is None:
        starting = start_rspamd()
    try:
        yield starting.wait()
    finally:
        starting.stop()
