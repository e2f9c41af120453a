"""Integration fixtures: a real postfix + dovecot + MariaDB test bed, and the service as a subprocess.

``testbed`` (session scope) recreates the MariaDB database ``smtpapi_testbed`` from mailcow's schema,
starts tests/testbed/testbed.sh (postfix on 127.0.0.1:10587/10465/10025, dovecot SASL, smtp-sink on
10026) and stops it after the session. postfix's sender login map and dovecot's passdbs read that
database, so rows added through the ``Testbed`` helpers change what the real postfix accepts.
``clean_testbed`` gives each test an empty database and an empty sink. ``sidecar`` starts
``twistd -n smtpapi`` against the bed and waits until it answers ``GET /healthz``.

Nothing here skips: when the bed cannot start, the test fails with the tail of the bed's logs, so a
broken install step cannot hide behind a skip. The Twisted reactor is never imported here.
"""

from __future__ import annotations

import base64
import email.policy
import errno
import contextlib
import fcntl
import hashlib
import http.client
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any, NoReturn

import argon2
import bcrypt
import pymysql  # type: ignore[import-untyped]
import pytest
from passlib import hash as passlib_hash  # type: ignore[import-untyped]

from mailcow_smtp_api.core.schema import MARIADB_TABLES

HOST = "127.0.0.1"
SUBMISSION_PORT = 10587  # like mailcow's 587: STARTTLS, then AUTH
SMTPS_PORT = 10465  # like mailcow's 465: implicit TLS
PLAIN_PORT = 10025  # like mailcow's 25 for internal clients: no AUTH
SINK_PORT = 10026  # smtp-sink, the final hop

DB_HOST = "127.0.0.1"
DB_PORT = 3306
DB_NAME = "smtpapi_testbed"
# postfix and dovecot read the database as this SELECT-only user, as mailcow's do (testbed.sh
# writes the same defaults into their configuration).
DB_READER = "smtpapi_testbed_ro"
DB_READER_PASSWORD = "testbed-readonly"
DB_SCHEMA_VERSION = "19022026_1220"  # mailcow.md: the schema these tables come from

SCRIPT = Path(__file__).resolve().parent.parent / "testbed" / "testbed.sh"
START_TIMEOUT = 300.0  # a first run may install packages with apt-get
COMMAND_TIMEOUT = 60.0
LOCK_TIMEOUT = 600.0  # another session using the bed on this machine
SIDECAR_START_TIMEOUT = 30.0
SIDECAR_STOP_TIMEOUT = 10.0

# Every table the helpers fill; `versions` keeps its row across resets.
DATA_TABLES = ("sender_acl", "alias", "alias_domain", "app_passwd", "mailbox", "domain", "api")


def testbed_dir() -> Path:
    """The bed's folder: $SMTPAPI_TESTBED_DIR, by default /tmp/smtpapi-testbed."""
    return Path(os.environ.get("SMTPAPI_TESTBED_DIR", "/tmp/smtpapi-testbed"))


# ------------------------------------------------------------------------------ password hashes


def hash_password(password: str, scheme: str = "BLF-CRYPT", *, bcrypt_cost: int = 6) -> str:
    """``{SCHEME}hash`` of ``password`` in the form mailcow stores and dovecot verifies.

    Supported: BLF-CRYPT (bcrypt with PHP's ``$2y$`` prefix, as mailcow writes), SHA512-CRYPT,
    SHA256-CRYPT, MD5-CRYPT, SSHA256, SSHA512, SSHA, PLAIN-MD5, PLAIN, CLEAR, ARGON2I and ARGON2ID.
    The bcrypt cost is low by default to keep tests fast; it does not change the format.
    """
    scheme = scheme.upper()
    secret = password.encode("utf-8")
    if scheme in ("PLAIN", "CLEAR"):
        return f"{{{scheme}}}{password}"
    if scheme == "BLF-CRYPT":
        hashed = bcrypt.hashpw(secret, bcrypt.gensalt(bcrypt_cost)).decode("ascii")
        return "{BLF-CRYPT}$2y$" + hashed[4:]
    if scheme in ("SHA512-CRYPT", "SHA256-CRYPT", "MD5-CRYPT"):
        if scheme == "MD5-CRYPT":
            return "{MD5-CRYPT}" + str(passlib_hash.md5_crypt.hash(password))
        crypt = passlib_hash.sha512_crypt if scheme == "SHA512-CRYPT" else passlib_hash.sha256_crypt
        # 5000 rounds is crypt(3)'s implicit default: the string carries no "rounds=" field.
        return f"{{{scheme}}}" + str(crypt.using(rounds=5000).hash(password))
    if scheme in ("SSHA256", "SSHA512", "SSHA"):
        salt = secrets.token_bytes(8)
        algorithm = {"SSHA256": "sha256", "SSHA512": "sha512", "SSHA": "sha1"}[scheme]
        digest = hashlib.new(algorithm, secret + salt).digest()
        return f"{{{scheme}}}" + base64.b64encode(digest + salt).decode("ascii")
    if scheme == "PLAIN-MD5":
        return "{PLAIN-MD5}" + hashlib.md5(secret).hexdigest()
    if scheme in ("ARGON2I", "ARGON2ID"):
        kind = argon2.Type.I if scheme == "ARGON2I" else argon2.Type.ID
        # dovecot verifies argon2 with libsodium, which supports one lane only (p=1).
        hasher = argon2.PasswordHasher(time_cost=3, memory_cost=8192, parallelism=1, type=kind)
        return f"{{{scheme}}}" + hasher.hash(password)
    raise ValueError(f"unsupported password scheme {scheme!r}")


def new_api_key() -> str:
    """A random key shaped like mailcow's: five groups of six upper-case hex digits."""
    return "-".join(secrets.token_hex(3).upper() for _ in range(5))


# ------------------------------------------------------------------------------ sink messages


@dataclass(frozen=True)
class SinkMessage:
    """One message as postfix delivered it to smtp-sink.

    ``raw`` is the message exactly as received (smtp-sink stores lines with LF endings, dot-unstuffed);
    ``message`` is ``raw`` parsed with ``email.policy.default``; ``mail_from`` and ``rcpt_to`` are the
    envelope postfix used towards the sink (from smtp-sink's X-Mail-Args / X-Rcpt-Args records).
    """

    path: Path
    raw: bytes
    message: EmailMessage
    mail_from: str
    rcpt_to: tuple[str, ...]
    helo: str | None


def _envelope_address(args: str) -> str:
    # "<a@example.org> SIZE=123 BODY=8BITMIME" -> "a@example.org"
    first = args.strip().split(" ", 1)[0]
    return first[1:-1] if first.startswith("<") and first.endswith(">") else first


def parse_sink_file(path: Path, data: bytes) -> SinkMessage:
    """Split one smtp-sink capture into its envelope records and the message.

    The capture (smtp-sink(1), DUMP FILE FORMAT) is: X-Client-Addr, X-Client-Proto, X-Helo-Args,
    X-Mail-Args, one X-Rcpt-Args per recipient, smtp-sink's own three-line Received header, the
    message, and one extra empty line.
    """
    records: dict[str, list[str]] = {}
    position = 0
    while data.startswith(b"X-", position):
        end = data.index(b"\n", position)
        name, _, value = data[position:end].decode("utf-8", "replace").partition(": ")
        records.setdefault(name, []).append(value)
        position = end + 1
    if data.startswith(b"Received: ", position):
        position = data.index(b"\n", position) + 1
        while data.startswith(b"\t", position):
            position = data.index(b"\n", position) + 1
    raw = data[position:]
    # smtp-sink also writes the LF that ended the final "." line.
    if raw.endswith(b"\n"):
        raw = raw[:-1]
    message = BytesParser(policy=email.policy.default).parsebytes(raw)
    assert isinstance(message, EmailMessage)
    return SinkMessage(
        path=path,
        raw=raw,
        message=message,
        mail_from=_envelope_address(records.get("X-Mail-Args", [""])[0]),
        rcpt_to=tuple(_envelope_address(value) for value in records.get("X-Rcpt-Args", [])),
        helo=records["X-Helo-Args"][0] if "X-Helo-Args" in records else None,
    )


# ------------------------------------------------------------------------------ the test bed


def _fail(message: str, log_tail: str = "") -> NoReturn:
    pytest.fail(f"{message}\n{log_tail}".rstrip(), pytrace=False)


@dataclass
class Testbed:
    """The running bed: where it listens, its database, row helpers, and the sink's messages."""

    __test__ = False  # a helper, not a test class

    directory: Path
    host: str = HOST
    submission_port: int = SUBMISSION_PORT
    smtps_port: int = SMTPS_PORT
    plain_port: int = PLAIN_PORT
    sink_port: int = SINK_PORT
    database: str = DB_NAME
    _connection: Any = field(default=None, repr=False)

    # -- where things are

    @property
    def cert_path(self) -> Path:
        """postfix's self-signed certificate (CN=localhost, SAN localhost and 127.0.0.1); the CA to trust."""
        return self.directory / "tls" / "cert.pem"

    @property
    def db_url(self) -> str:
        """The service's ``--db`` value for this bed's database."""
        return f"mysql://root@{DB_HOST}:{DB_PORT}/{self.database}"

    @property
    def sink_dir(self) -> Path:
        """Where smtp-sink writes one file per delivered message."""
        return self.directory / "sink" / "mail"

    @property
    def sender_map(self) -> Path:
        """postfix's mysql map file holding mailcow's sender login query."""
        return self.directory / "postfix" / "sender_acl.cf"

    def log_path(self, name: str = "postfix") -> Path:
        """A log of the bed: ``postfix``, ``dovecot``, ``smtp-sink``..."""
        return self.directory / "log" / f"{name}.log"

    def log_text(self, name: str = "postfix") -> str:
        """The whole text of one of the bed's logs ('' when it does not exist yet)."""
        try:
            return self.log_path(name).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 25) -> str:
        """The last lines of postfix's and dovecot's logs, for failure messages."""
        parts = []
        for name in ("postfix", "dovecot", "smtp-sink"):
            text = self.log_text(name).splitlines()[-lines:]
            if text:
                parts.append(f"--- {self.log_path(name)} (last {len(text)} lines)\n" + "\n".join(text))
        return "\n".join(parts)

    # -- the script

    def run_script(self, command: str, timeout: float = COMMAND_TIMEOUT) -> str:
        """Run ``testbed.sh COMMAND``; fail the test with its output and the logs when it fails."""
        return run_testbed_script(self.directory, command, timeout)

    def restart_postfix(self) -> None:
        """Stop postfix and start it again (dovecot, the sink and the database stay up)."""
        self.run_script("restart-postfix")

    def stop_postfix(self) -> None:
        """Stop postfix only: its ports refuse connections until ``start_postfix``."""
        self.run_script("stop-postfix")

    def start_postfix(self) -> None:
        """Start postfix again and wait until its three listeners answer."""
        self.run_script("start-postfix")

    # -- database

    def connect(self, database: bool = True) -> pymysql.connections.Connection:
        """A new autocommit connection as root to the bed's database (or to no database)."""
        return pymysql.connect(
            host=DB_HOST,
            port=DB_PORT,
            user="root",
            database=self.database if database else None,
            charset="utf8mb4",
            autocommit=True,
            connect_timeout=5,
            read_timeout=30,
            write_timeout=30,
        )

    def _cursor(self) -> Any:
        if self._connection is not None:
            try:
                self._connection.ping(False)
            except pymysql.MySQLError:  # MariaDB restarted: start over
                self._connection.close()
                self._connection = None
        if self._connection is None:
            self._connection = self.connect()
        return self._connection.cursor()

    def execute(self, sql: str, args: Sequence[Any] | Mapping[str, Any] | None = None) -> list[tuple[Any, ...]]:
        """Run one statement on the bed's database and return its rows."""
        with self._cursor() as cursor:
            cursor.execute(sql, args)
            return list(cursor.fetchall())

    def insert(self, table: str, row: Mapping[str, Any]) -> None:
        """Insert one row given as column -> value (columns not named keep their defaults)."""
        if table not in DATA_TABLES + ("versions",):
            raise ValueError(f"unknown table {table!r}")
        columns = list(row)
        for column in columns:
            if not re.fullmatch(r"[a-z_]+", column):
                raise ValueError(f"bad column name {column!r}")
        sql = "INSERT INTO `{}` ({}) VALUES ({})".format(
            table, ", ".join(f"`{c}`" for c in columns), ", ".join(["%s"] * len(columns))
        )
        self.execute(sql, [row[c] for c in columns])

    def load_rows(self, rows: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
        """Insert rows given per table, e.g. one case of tests/sender_cases.py."""
        for table, table_rows in rows.items():
            for row in table_rows:
                self.insert(table, row)

    def reset_database(self) -> None:
        """Delete every row of mailcow's tables (the schema version row stays)."""
        for table in DATA_TABLES:
            self.execute(f"DELETE FROM `{table}`")

    def add_domain(self, domain: str, *, active: int = 1) -> None:
        """A mailcow domain row."""
        self.insert("domain", {"domain": domain, "active": active})

    def add_mailbox(
        self,
        login: str,
        password: str,
        scheme: str = "BLF-CRYPT",
        *,
        active: int = 1,
        kind: str = "",
        smtp_access: Any = "1",
        authsource: str = "mailcow",
        self_alias: bool = True,
        stored_password: str | None = None,
    ) -> None:
        """A mailbox as mailcow creates it: the mailbox row and its self-alias address = goto = login.

        ``password`` is hashed with ``scheme`` (see ``hash_password``) unless ``stored_password``
        gives the stored ``{SCHEME}hash`` directly. ``smtp_access`` goes into the JSON attributes
        (mailcow stores "1"; 1 and "0" are also meaningful).
        """
        local_part, _, domain = login.rpartition("@")
        self.insert(
            "mailbox",
            {
                "username": login,
                "password": stored_password if stored_password is not None else hash_password(password, scheme),
                "name": local_part,
                "local_part": local_part,
                "domain": domain,
                "kind": kind,
                "attributes": json.dumps({"smtp_access": smtp_access}),
                "authsource": authsource,
                "active": active,
            },
        )
        if self_alias:
            self.add_alias(login, login, domain=domain)

    def add_alias(
        self, address: str, goto: str, *, domain: str | None = None, active: int = 1, sender_allowed: int = 1
    ) -> None:
        """An alias row; ``domain`` defaults to the part after the last '@' (also for '@domain' catch-alls)."""
        self.insert(
            "alias",
            {
                "address": address,
                "goto": goto,
                "domain": domain if domain is not None else address.rpartition("@")[2],
                "active": active,
                "sender_allowed": sender_allowed,
            },
        )

    def add_alias_domain(self, alias_domain: str, target_domain: str, *, active: int = 1) -> None:
        """An alias domain: every user@alias_domain maps to user@target_domain."""
        self.insert("alias_domain", {"alias_domain": alias_domain, "target_domain": target_domain, "active": active})

    def add_sender_acl(self, logged_in_as: str, send_as: str, *, external: int = 0) -> None:
        """A sender_acl grant: ``logged_in_as`` may send as ``send_as`` (address, '@domain' or '*')."""
        self.insert("sender_acl", {"logged_in_as": logged_in_as, "send_as": send_as, "external": external})

    def add_app_password(
        self,
        mailbox: str,
        password: str,
        scheme: str = "BLF-CRYPT",
        *,
        active: int = 1,
        smtp_access: int = 1,
        name: str = "app",
    ) -> None:
        """An app password of ``mailbox``."""
        self.insert(
            "app_passwd",
            {
                "name": name,
                "mailbox": mailbox,
                "domain": mailbox.rpartition("@")[2],
                "password": hash_password(password, scheme),
                "smtp_access": smtp_access,
                "active": active,
            },
        )

    def add_api_key(
        self,
        key: str | None = None,
        *,
        allow_from: str = "127.0.0.1",
        skip_ip_check: int = 0,
        access: str = "rw",
        active: int = 1,
    ) -> str:
        """An API key row (mailcow stores keys in plain text); returns the key."""
        key = key or new_api_key()
        self.insert(
            "api",
            {"api_key": key, "allow_from": allow_from, "skip_ip_check": skip_ip_check, "access": access, "active": active},
        )
        return key

    # -- what postfix decides

    def map_lookup(self, key: str) -> str | None:
        """The raw result of postfix's sender login map for ``key`` (``postmap -q``), or None."""
        result = subprocess.run(
            ["postmap", "-c", str(self.directory / "postfix"), "-q", key, f"mysql:{self.sender_map}"],
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        if result.returncode == 0:
            return result.stdout.strip()
        if result.returncode == 1 and not result.stderr.strip():
            return None
        _fail(f"postmap -q {key!r} failed ({result.returncode}): {result.stderr.strip()}", self.log_tail())

    def sender_owners(self, sender: str) -> list[str]:
        """The logins postfix's map gives as owners of ``sender``, with postfix's +tag retry.

        smtpd looks the sender up as is and, only when that finds nothing, once more without the
        address extension (recipient_delimiter = +; cut at the first '+', never leaving an empty
        local part). ``postmap -q`` does a single lookup, so the retry is repeated here.
        """
        found = self.map_lookup(sender)
        if found is None:
            local, at, domain = sender.rpartition("@")
            base = local.split("+", 1)[0]
            if at and "+" in local and base:
                found = self.map_lookup(f"{base}@{domain}")
        return [token for token in re.split(r"[,\s]+", found or "") if token]

    # -- the sink

    def _sink_open_files(self) -> set[str]:
        # smtp-sink writes a capture while the message arrives and closes it at the final ".":
        # a file it still holds open is not complete yet.
        pid_text = (self.directory / "sink" / "smtp-sink.pid").read_text().strip()
        fd_dir = Path("/proc") / pid_text / "fd"
        paths = set()
        for entry in fd_dir.iterdir():
            try:
                paths.add(os.readlink(entry))
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
        return paths

    def messages(self) -> list[SinkMessage]:
        """Every complete message in the sink, oldest first."""
        # List first, then ask which files smtp-sink still writes: a file created after the
        # question would otherwise be read half-written.
        paths = list(self.sink_dir.iterdir())
        busy = self._sink_open_files()
        found = []
        for path in paths:
            if str(path) in busy:
                continue
            try:
                data = path.read_bytes()
                stamp = path.stat().st_mtime_ns
            except FileNotFoundError:  # cleared meanwhile
                continue
            found.append((stamp, path.name, parse_sink_file(path, data)))
        return [message for _, _, message in sorted(found, key=lambda item: item[:2])]

    def clear_messages(self) -> None:
        """Empty the sink, after letting postfix's queue drain (bounded) and dropping what stays queued."""
        self.run_script("clear-messages")

    def wait_for_messages(self, count: int, timeout: float = 10.0) -> list[SinkMessage]:
        """Poll (every 50 ms, at most ``timeout`` s) until at least ``count`` messages arrived."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.messages()
            if len(found) >= count or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        if len(found) < count:
            _fail(f"expected {count} message(s) in the sink within {timeout} s, got {len(found)}", self.log_tail())
        return found


def run_testbed_script(directory: Path, command: str, timeout: float = COMMAND_TIMEOUT) -> str:
    """Run ``testbed.sh COMMAND`` for the bed in ``directory``; fail with its output on error."""
    env = dict(
        os.environ,
        SMTPAPI_TESTBED_DIR=str(directory),
        SMTPAPI_TESTBED_DB_NAME=DB_NAME,
        SMTPAPI_TESTBED_DB_USER=DB_READER,
        SMTPAPI_TESTBED_DB_PASS=DB_READER_PASSWORD,
    )
    try:
        result = subprocess.run(
            ["bash", str(SCRIPT), command],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        _fail(f"testbed.sh {command} did not finish within {timeout} s", Testbed(directory).log_tail())
    if result.returncode != 0:
        # The script's error output already ends with the tails of the bed's logs.
        _fail(f"testbed.sh {command} failed with status {result.returncode}:\n{result.stdout}{result.stderr}")
    return result.stdout


def _root_connection() -> Any:
    try:
        return pymysql.connect(host=DB_HOST, port=DB_PORT, user="root", autocommit=True, connect_timeout=5)
    except pymysql.MySQLError as exc:
        _fail(
            f"MariaDB does not answer on {DB_HOST}:{DB_PORT} as root without a password ({exc}); "
            "scripts/mariadb.sh ensure starts one"
        )


def _raise_connection_limit(cursor: Any) -> None:
    # mailcow runs MariaDB with max_connections = 500; the default 151 is too few for the bed's
    # postfix (one connection per smtpd) and dovecot under the load tests' bursts.
    cursor.execute("SET GLOBAL max_connections = GREATEST(@@GLOBAL.max_connections, 500)")


def revive_shared_mariadb() -> None:
    """Start the shared MariaDB again if it stopped answering during the session.

    The server itself can crash under the load tests (MariaDB 10.11 was seen to segfault on
    postfix's sender-login query). The test that was running then fails on its own; without this
    every test after it would fail too, hiding which one it was: the bed's dovecot and postfix
    are made to connect again at once (``testbed.sh reconnect``), not after dovecot's back-off. A
    warning names the event in the session's summary.
    """
    try:
        pymysql.connect(host=DB_HOST, port=DB_PORT, user="root", connect_timeout=2).close()
        return
    except pymysql.MySQLError:
        pass
    warnings.warn(f"MariaDB on {DB_HOST}:{DB_PORT} stopped answering during the session; starting it again")
    script = SCRIPT.parent.parent.parent / "scripts" / "mariadb.sh"
    subprocess.run(["bash", str(script), "ensure"], capture_output=True, timeout=120, check=False)
    with _root_connection() as connection, connection.cursor() as cursor:
        _raise_connection_limit(cursor)
    # Every caller holds the running bed (the testbed fixture).
    run_testbed_script(testbed_dir(), "reconnect")


def create_database() -> None:
    """Recreate the bed's database from mailcow's schema, and its SELECT-only reader account."""
    connection = _root_connection()
    with connection, connection.cursor() as cursor:
        _raise_connection_limit(cursor)
        cursor.execute(f"DROP DATABASE IF EXISTS `{DB_NAME}`")
        cursor.execute(f"CREATE DATABASE `{DB_NAME}` CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci")
        cursor.execute(f"USE `{DB_NAME}`")
        for statement in MARIADB_TABLES:
            cursor.execute(statement)
        cursor.execute(
            "INSERT INTO versions (application, version) VALUES ('db_schema', %s)", (DB_SCHEMA_VERSION,)
        )
        # postfix and dovecot connect over TCP from 127.0.0.1, as mailcow's containers connect
        # to mysql-mailcow, and only ever read.
        cursor.execute(f"CREATE USER IF NOT EXISTS '{DB_READER}'@'127.0.0.1' IDENTIFIED BY %s", (DB_READER_PASSWORD,))
        cursor.execute(f"ALTER USER '{DB_READER}'@'127.0.0.1' IDENTIFIED BY %s", (DB_READER_PASSWORD,))
        cursor.execute(f"GRANT SELECT ON `{DB_NAME}`.* TO '{DB_READER}'@'127.0.0.1'")


class LockTimeout(Exception):
    """Another user held the bed's lock for too long."""


@contextlib.contextmanager
def bed_lock(directory: Path, on_wait: Callable[[], None] = lambda: None) -> Iterator[None]:
    """One user of the bed at a time (test sessions, the benchmark): they share its ports, folder and
    database. ``on_wait`` is called once if the lock is busy; LockTimeout after LOCK_TIMEOUT s."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{directory}.lock", "w") as lock:
        deadline = time.monotonic() + LOCK_TIMEOUT
        waited = False
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockTimeout(f"{directory}.lock was held for more than {LOCK_TIMEOUT} s") from None
                if not waited:
                    on_wait()
                    waited = True
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def testbed_lock() -> Iterator[None]:
    """Serialise sessions on this machine: they share the bed's ports, folder and database."""
    try:
        with bed_lock(testbed_dir()):
            yield
    except LockTimeout as exc:
        _fail(f"another test session holds the bed: {exc}")


@pytest.fixture(scope="session")
def testbed(testbed_lock: None) -> Iterator[Testbed]:
    """The running bed for the whole session; stopped at the end (unless SMTPAPI_TESTBED_KEEP=1)."""
    if os.geteuid() != 0:
        _fail("the test bed needs root: postfix's and dovecot's masters start as root and drop privileges")
    directory = testbed_dir()
    create_database()
    run_testbed_script(directory, "start", timeout=START_TIMEOUT)
    bed = Testbed(directory)
    try:
        yield bed
    finally:
        if bed._connection is not None:
            bed._connection.close()
        if os.environ.get("SMTPAPI_TESTBED_KEEP") != "1":
            run_testbed_script(directory, "stop")


# The rows most end-to-end tests start from: the API document's sender, password and (literal) key.
API_KEY = "YOUR-API-KEY"  # the examples' literal key is a valid mailcow key string
SENDER = "sender@example.com"
PASSWORD = "your-mailbox-password"


@pytest.fixture
def clean_testbed(testbed: Testbed) -> Testbed:
    """The bed with an empty database (schema kept) and an empty sink."""
    revive_shared_mariadb()
    testbed.reset_database()
    testbed.clear_messages()
    return testbed


# ------------------------------------------------------------------------------ the service


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


@dataclass
class Sidecar:
    """One ``twistd -n smtpapi`` process; its stdout and stderr go to ``log_path``."""

    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    argv: list[str]

    @property
    def url(self) -> str:
        """Base URL of the service, e.g. http://127.0.0.1:PORT."""
        return f"http://{HOST}:{self.port}"

    def log_text(self) -> str:
        """Everything the process wrote so far (stdout and stderr)."""
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after SIDECAR_STOP_TIMEOUT s; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(SIDECAR_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(SIDECAR_STOP_TIMEOUT)
        return int(self.process.returncode)


def _healthy(port: int) -> bool:
    connection = http.client.HTTPConnection(HOST, port, timeout=2)
    try:
        connection.request("GET", "/healthz")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


def twistd_path() -> Path:
    """The twistd of the interpreter running the tests (the project's virtual environment)."""
    return Path(sys.executable).parent / "twistd"


def start_sidecar(testbed: Testbed, directory: Path, name: str, *extra: str, env: Mapping[str, str] | None = None) -> Sidecar:
    """Start ``twistd -n smtpapi`` against the bed, its log in ``directory/<name>.log``.

    Options are those of ``twistd -n smtpapi``: a free loopback port, the bed's database as root,
    postfix on 127.0.0.1:10587 with the bed's certificate as CA and name ``localhost``, and the bed's
    three ports allowed; ``extra`` is appended. SMTPAPI_* variables of the calling environment are
    dropped so they cannot change the options; ``env`` adds variables. Returns once ``GET /healthz``
    answers 200 (at most SIDECAR_START_TIMEOUT s); the caller stops it.
    """
    port = free_port()
    log_path = directory / f"{name}.log"
    argv = [
        str(twistd_path()),
        "-n",
        "--pidfile=",
        "smtpapi",
        "--listen",
        f"tcp:{port}:interface={HOST}",
        "--db",
        testbed.db_url,
        "--smtp-host",
        HOST,
        "--smtp-port",
        str(SUBMISSION_PORT),
        "--smtp-allow",
        f"{HOST}:{SUBMISSION_PORT},{HOST}:{SMTPS_PORT}/tls,{HOST}:{PLAIN_PORT}/plain",
        "--smtp-ca",
        str(testbed.cert_path),
        "--smtp-tls-name",
        "localhost",
        # Tests change rows between requests and expect the change at once.
        "--db-cache-ttl",
        "0",
        *extra,
    ]
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("SMTPAPI_")}
    child_env.update(env or {})
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, cwd=directory, env=child_env
        )
    running = Sidecar(port=port, process=process, log_path=log_path, argv=argv)
    deadline = time.monotonic() + SIDECAR_START_TIMEOUT
    while not _healthy(port):
        if process.poll() is not None:
            _fail(f"the service exited with status {process.returncode} before answering:\n{running.log_text()}")
        if time.monotonic() >= deadline:
            running.stop()
            _fail(f"the service did not answer GET /healthz within {SIDECAR_START_TIMEOUT} s:\n{running.log_text()}")
        time.sleep(0.02)
    return running


@pytest.fixture
def sidecar(testbed: Testbed, tmp_path: Path) -> Iterator[Callable[..., Sidecar]]:
    """A factory: ``sidecar(*extra_options, env=None)`` starts the service against the bed
    (``start_sidecar``, its log in ``tmp_path``); every process started is terminated after the test."""
    started: list[Sidecar] = []

    def start(*extra: str, env: Mapping[str, str] | None = None) -> Sidecar:
        running = start_sidecar(testbed, tmp_path, f"sidecar-{len(started) + 1}", *extra, env=env)
        started.append(running)
        return running

    try:
        yield start
    finally:
        for running in started:
            running.stop()


@pytest.fixture
def bed(clean_testbed: Testbed) -> Testbed:
    """The bed with one domain, the sender's mailbox and the API key allowed from 127.0.0.1."""
    clean_testbed.add_domain("example.com")
    clean_testbed.add_mailbox(SENDER, PASSWORD)
    clean_testbed.add_api_key(API_KEY, allow_from="127.0.0.1")
    return clean_testbed


# ------------------------------------------------------------------------------ Redis

REDIS_PORT = int(os.environ.get("SMTPAPI_REDIS_PORT", "6379"))  # as scripts/redis.sh
# The tests' own database of that server, emptied before and after each test that uses it. Never
# database 0: the machine's Redis may hold other data there.
REDIS_TEST_DB = 13
REDIS_TIMEOUT = 5.0
# The keys the tests and the service write there: mailcow's (set by the tests as mailcow's UI and
# netfilter would) and the service's own under its prefix.
_REDIS_TEST_KEYS = re.compile(r"RL_VALUE|SMTP_LIMITED_ACCESS|SMTP_ALLOW_NETS_.*|F2B_[A-Z_]+|smtpapi:.*")


class RedisError(Exception):
    """An error reply from Redis."""


class RedisClient:
    """A small RESP2 client over one socket: a command, then its reply; or pub/sub messages.

    Enough for tests to write mailcow's keys, read the service's buckets and subscribe to
    ``F2B_CHANNEL`` without a Redis library. Replies: str for simple strings and bulk strings,
    int, None, list; an error reply raises ``RedisError``.
    """

    def __init__(self, db: int | None = REDIS_TEST_DB, port: int = REDIS_PORT, timeout: float = REDIS_TIMEOUT) -> None:
        self.port = port
        self.db = db
        self.timeout = timeout
        self._buffer = bytearray()
        try:
            self._socket = socket.create_connection((HOST, port), timeout=timeout)
        except OSError as exc:
            _fail(f"Redis does not answer on {HOST}:{port} ({exc}); scripts/redis.sh ensure starts one")
        if db is not None:
            self("SELECT", db)

    @property
    def url(self) -> str:
        """The service's ``--redis`` value for this server and database."""
        return f"redis://{HOST}:{self.port}/{self.db or 0}"

    def __call__(self, *args: Any) -> Any:
        """Run one command and return its reply."""
        self.send(*args)
        return self.reply(time.monotonic() + self.timeout)

    def send(self, *args: Any) -> None:
        """Write one command without waiting for its reply."""
        parts = [str(arg).encode() if not isinstance(arg, bytes) else arg for arg in args]
        data = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(part), part) for part in parts)
        self._socket.sendall(data)

    def _line(self, deadline: float) -> bytes:
        while (end := self._buffer.find(b"\r\n")) < 0:
            self._fill(deadline)
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 2]
        return line

    def _exactly(self, count: int, deadline: float) -> bytes:
        while len(self._buffer) < count + 2:
            self._fill(deadline)
        data = bytes(self._buffer[:count])
        del self._buffer[: count + 2]
        return data

    def _fill(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no reply from Redis in time")
        self._socket.settimeout(left)
        try:
            chunk = self._socket.recv(65536)
        except socket.timeout:
            raise TimeoutError("no reply from Redis in time") from None
        if not chunk:
            raise ConnectionError("Redis closed the connection")
        self._buffer += chunk

    def reply(self, deadline: float) -> Any:
        """The next reply; TimeoutError at ``deadline`` (what was read so far stays buffered)."""
        line = self._line(deadline)
        kind, rest = line[:1], line[1:].decode()
        if kind == b"+":
            return rest
        if kind == b"-":
            raise RedisError(rest)
        if kind == b":":
            return int(rest)
        if kind == b"$":
            return None if int(rest) < 0 else self._exactly(int(rest), deadline).decode("utf-8", "replace")
        if kind == b"*":
            return None if int(rest) < 0 else [self.reply(deadline) for _ in range(int(rest))]
        raise RedisError(f"unexpected reply {line!r}")

    def hset(self, key: str, mapping: Mapping[str, Any]) -> None:
        """Set fields of a hash."""
        args: list[Any] = []
        for name, value in mapping.items():
            args += [name, value]
        self("HSET", key, *args)

    def hgetall(self, key: str) -> dict[str, str]:
        """A hash as a dict."""
        flat = self("HGETALL", key)
        return dict(zip(flat[::2], flat[1::2]))

    def keys(self) -> list[str]:
        """Every key of this database, sorted (the test database is small)."""
        return sorted(self("KEYS", "*"))

    def close(self) -> None:
        """Close the connection."""
        self._socket.close()


def _empty_test_db(client: RedisClient) -> None:
    assert client.db not in (None, 0)
    foreign = [key for key in client.keys() if not _REDIS_TEST_KEYS.fullmatch(key)]
    if foreign:
        _fail(f"Redis database {client.db} on {HOST}:{client.port} holds keys the tests did not write "
              f"({', '.join(foreign[:5])}); not emptying it")
    client("FLUSHDB")


@pytest.fixture
def redis_db() -> Iterator[RedisClient]:
    """A client on the tests' Redis database (``REDIS_TEST_DB``), empty at the start and emptied after.

    Fails (never skips) when Redis does not answer; scripts/redis.sh ensure starts one.
    """
    client = RedisClient()
    _empty_test_db(client)
    try:
        yield client
    finally:
        _empty_test_db(client)
        client.close()


# ------------------------------------------------------------------------------ postfix's log in Redis

# The postfix-log tests' own Redis database (11 to 14 belong to other tests; never 0).
POSTFIX_LOG_DB = 15
POSTFIX_MAILLOG = "POSTFIX_MAILLOG"
LOG_LINES = 9999  # mailcow's default length of that list (LOG_LINES in mailcow.conf)
_LOG_FILE_LINE = re.compile(
    r"(?P<stamp>[A-Z][a-z]{2} [ 0-3]\d \d\d:\d\d:\d\d) \S+ (?P<program>[^\s\[:]+)(?:\[\d+\])?: (?P<message>.*)"
)


def mailcow_log_entry(line: str, year: int) -> str | None:
    """A line of a postfix log file as mailcow's syslog-ng LPUSHes it onto ``POSTFIX_MAILLOG``.

    mailcow's template is ``$(format-json time="$S_UNIXTIME" priority="$PRIORITY"
    program="$PROGRAM" message="$MESSAGE")\\n``: every value a string, the text after
    ``program[pid]: `` as the message, and a newline after the JSON. None for a line of another shape.
    """
    match = _LOG_FILE_LINE.fullmatch(line)
    if match is None:
        return None
    when = datetime.strptime(f"{year} {match['stamp']}", "%Y %b %d %H:%M:%S").replace(tzinfo=timezone.utc)
    entry = {"time": str(int(when.timestamp())), "priority": "info", "program": match["program"], "message": match["message"]}
    return json.dumps(entry) + "\n"


@dataclass
class LogShipper:
    """Ships the bed's real postfix log into Redis as mailcow's syslog-ng does.

    Each new line of ``log_path`` is LPUSHed onto ``POSTFIX_MAILLOG`` (so the list holds the newest
    first), and the list is trimmed to ``LOG_LINES`` as mailcow trims it.
    """

    log_path: Path
    client: RedisClient
    offset: int = 0
    shipped: int = 0
    _partial: bytes = b""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def ship(self) -> int:
        """Ship the whole lines written since the last call; how many were shipped."""
        with self._lock:
            with open(self.log_path, "rb") as log:
                log.seek(self.offset)
                data = log.read()
            self.offset += len(data)
            complete, _, self._partial = (self._partial + data).rpartition(b"\n")
            year = datetime.now(timezone.utc).year
            entries = [mailcow_log_entry(raw.decode("utf-8", "replace"), year) for raw in complete.split(b"\n") if raw]
            for entry in entries:
                if entry is not None:
                    self.client("LPUSH", POSTFIX_MAILLOG, entry)
                    self.shipped += 1
            if entries:
                self.client("LTRIM", POSTFIX_MAILLOG, 0, LOG_LINES - 1)
            return sum(entry is not None for entry in entries)


def _clear_postfix_log_db() -> None:
    client = RedisClient(db=POSTFIX_LOG_DB)
    try:
        foreign = [key for key in client.keys() if key != POSTFIX_MAILLOG]
        if foreign:
            _fail(f"Redis database {POSTFIX_LOG_DB} holds keys the tests did not write ({', '.join(foreign[:5])}); "
                  "not touching it")
        client("DEL", POSTFIX_MAILLOG)
    finally:
        client.close()


@pytest.fixture
def postfix_log_shipper(testbed: Testbed) -> Iterator[LogShipper]:
    """A shipper of the bed's postfix log into Redis database ``POSTFIX_LOG_DB``, shipping every 0.1 s
    in a thread from the log's end at the start of the test. The list is deleted before and after."""
    _clear_postfix_log_db()
    path = testbed.log_path()
    shipper = LogShipper(path, RedisClient(db=POSTFIX_LOG_DB), offset=path.stat().st_size)
    stop = threading.Event()
    failures: list[BaseException] = []

    def run() -> None:
        while not stop.wait(0.1):
            try:
                shipper.ship()
            except BaseException as exc:  # said at the end of the test
                failures.append(exc)
                return

    thread = threading.Thread(target=run, name="postfix-log-shipper", daemon=True)
    thread.start()
    try:
        yield shipper
    finally:
        stop.set()
        thread.join(10)
        shipper.client.close()
        _clear_postfix_log_db()
    if failures:
        _fail(f"the postfix log shipper failed: {failures[0]!r}")


@pytest.fixture
def defer_route(testbed: Testbed) -> Iterator[Callable[[str], None]]:
    """``route("sink")`` sends defer.test's mail to the sink from now on and flushes postfix's queue;
    ``route("closed")`` makes it deferred again. After the test the route is closed again."""

    def route(to: str) -> None:
        env = dict(os.environ, SMTPAPI_TESTBED_DIR=str(testbed.directory))
        result = subprocess.run(
            ["bash", str(SCRIPT), "route-defer", to],
            env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False,
        )
        if result.returncode != 0:
            _fail(f"testbed.sh route-defer {to} failed with status {result.returncode}:\n{result.stderr}")

    try:
        yield route
    finally:
        route("closed")


@dataclass
class F2bSubscriber:
    """A subscriber of ``F2B_CHANNEL``, as netfilter-mailcow listens to it.

    Pub/sub spans every database of a server, so other publishers' lines may arrive too: tests
    pick theirs by content.
    """

    client: RedisClient
    lines: list[str] = field(default_factory=list)

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 5.0) -> str:
        """The first line (seen before or arriving within ``timeout`` s) for which ``predicate`` holds."""
        for line in self.lines:
            if predicate(line):
                return line
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._next(deadline)
            except TimeoutError:
                _fail(f"no matching line on F2B_CHANNEL within {timeout} s; seen: {self.lines[-10:]}")
            if predicate(line):
                return line

    def drain(self, seconds: float) -> list[str]:
        """Every line that arrives within ``seconds`` more, added to ``lines``; all lines so far."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                self._next(deadline)
            except TimeoutError:
                return list(self.lines)

    def _next(self, deadline: float) -> str:
        while True:
            message = self.client.reply(deadline)
            if isinstance(message, list) and len(message) == 3 and message[0] == "message":
                self.lines.append(message[2])
                return str(message[2])


@pytest.fixture
def f2b_lines() -> Iterator[F2bSubscriber]:
    """A subscriber of ``F2B_CHANNEL`` on the tests' Redis, subscribed before the test sends anything."""
    client = RedisClient(db=None)
    client.send("SUBSCRIBE", "F2B_CHANNEL")
    confirmation = client.reply(time.monotonic() + REDIS_TIMEOUT)
    assert confirmation[:2] == ["subscribe", "F2B_CHANNEL"], confirmation
    try:
        yield F2bSubscriber(client)
    finally:
        client.close()


# ------------------------------------------------------------------------------ smtpapi-admin


@dataclass
class StateAdmin:
    """``smtpapi-admin`` against the bed's database (``--db``) and a state database (``--state-db``)."""

    db_url: str
    state_url: str

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run one command; its exit status is the caller's to check."""
        argv = [str(Path(sys.executable).parent / "smtpapi-admin"), "--db", self.db_url, "--state-db", self.state_url, *args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SMTPAPI_")}
        return subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False, env=env, stdin=subprocess.DEVNULL)

    def ok(self, *args: str) -> str:
        """Run one command that must succeed; its standard output."""
        result = self.run(*args)
        if result.returncode != 0:
            _fail(f"smtpapi-admin {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def add_send_key(self, login: str, *options: str) -> tuple[str, str]:
        """A new send key for ``login``: (the key as printed once, its id)."""
        token = self.ok("sendkey", "add", "--login", login, *options).strip()
        match = re.fullmatch(r"smtpapi-([0-9a-f]{12})-[0-9a-f]{64}", token)
        assert match is not None, token
        return token, match.group(1)


@pytest.fixture
def state_admin(testbed: Testbed, tmp_path: Path) -> StateAdmin:
    """``smtpapi-admin`` on the bed's database and a fresh SQLite state database in ``tmp_path``."""
    return StateAdmin(testbed.db_url, f"sqlite:{tmp_path / 'smtpapi-state.sqlite'}")


# ------------------------------------------------------------------------------ the outbox

# The header that asks for an asynchronous send (RFC 7240): 202 once the message is stored.
RESPOND_ASYNC = {"Prefer": "respond-async"}
# Where a status record lives (the 202 answer's Location).
STATUS_PATH = "/api/v1/send/status/"
# States in which postfix has the message (with --postfix-log it moves on from submitted).
HANDED_OVER = ("submitted", "delivered")


def api_call(
    url: str,
    method: str,
    path: str,
    body: Any = None,
    key: str | None = API_KEY,
    headers: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> tuple[int, Any, Any]:
    """One HTTP request to the service: (status, the JSON answer, the headers)."""
    connection = http.client.HTTPConnection(HOST, int(url.rpartition(":")[2]), timeout=timeout)
    sent = {"Content-Type": "application/json", **({"X-API-Key": key} if key is not None else {}), **(headers or {})}
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    try:
        connection.request(method, path, body=data, headers=sent)
        response = connection.getresponse()
        raw = response.read()
        return response.status, json.loads(raw) if raw else None, response.headers
    finally:
        connection.close()


def message_status(service: Sidecar, message: str, key: str | None = API_KEY, method: str = "GET") -> tuple[int, Any]:
    """``GET`` (or ``DELETE``) ``/api/v1/send/status/{message}`` with ``key``: (status, JSON answer)."""
    status, body, _ = api_call(service.url, method, STATUS_PATH + message, key=key)
    return status, body


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something true (returned) or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            _fail(f"{what}: not within {timeout} s (last seen: {last!r})")
        time.sleep(interval)


def wait_for_state(
    service: Sidecar, message: str, states: Sequence[str], timeout: float, key: str | None = API_KEY
) -> dict[str, Any]:
    """The status record of ``message`` once its ``status`` is one of ``states`` (fail after ``timeout`` s)."""
    seen: list[Any] = []

    def reached() -> dict[str, Any] | None:
        code, body = message_status(service, message, key)
        seen[:] = [code, body.get("status") if isinstance(body, dict) else body]
        return body if code == 200 and body.get("status") in states else None

    deadline = time.monotonic() + timeout
    while True:
        found = reached()
        if found is not None:
            return found
        if time.monotonic() >= deadline:
            _fail(f"message {message} did not reach {'/'.join(states)} within {timeout} s; last answer {seen}")
        time.sleep(0.2)


def sink_message_ids(bed: Testbed) -> Counter[str]:
    """How often each Message-ID arrived in the sink (one count per delivered copy of a message)."""
    return Counter(str(m.message["Message-ID"]).strip() for m in bed.messages())


def postfix_queue(bed: Testbed) -> list[dict[str, Any]]:
    """postfix's queue as ``postqueue -j`` lists it (empty when postfix holds nothing)."""
    result = subprocess.run(
        ["postqueue", "-c", str(bed.directory / "postfix"), "-j"], capture_output=True, text=True, timeout=30, check=False
    )
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def postfix_running(bed: Testbed) -> bool:
    """True when postfix's plain port takes connections."""
    try:
        socket.create_connection((HOST, bed.plain_port), timeout=2).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def postfix_stopped(bed: Testbed) -> Iterator[Callable[[], None]]:
    """postfix stopped for the block; it yields ``start()`` to bring it back early, and always
    starts it again at the end (also when the block fails)."""
    started = [False]

    def start() -> None:
        if not started[0]:
            started[0] = True
            bed.start_postfix()

    bed.stop_postfix()
    try:
        yield start
    finally:
        if not started[0] or not postfix_running(bed):
            started[0] = True
            bed.start_postfix()


@dataclass
class StateDatabase:
    """A MariaDB database of its own for the sidecar's state (shared by replicas), dropped after."""

    name: str

    @property
    def url(self) -> str:
        """The ``--state-db`` value."""
        return f"mysql://root@{DB_HOST}:{DB_PORT}/{self.name}"

    def query(self, sql: str, args: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        """Rows of one statement on this database."""
        connection = pymysql.connect(
            host=DB_HOST, port=DB_PORT, user="root", database=self.name, autocommit=True, connect_timeout=5
        )
        with connection, connection.cursor() as cursor:
            cursor.execute(sql, args)
            return list(cursor.fetchall())


def _root_statements(*statements: str) -> None:
    with _root_connection() as connection, connection.cursor() as cursor:
        for statement in statements:
            cursor.execute(statement)


@pytest.fixture
def mariadb_state(testbed: Testbed) -> Iterator[Callable[[str], StateDatabase]]:
    """A factory: ``mariadb_state(name)`` creates the empty MariaDB database ``smtpapi_state_<name>``
    on 127.0.0.1:3306 for ``--state-db``; every database created is dropped after the test."""
    made: list[str] = []

    def create(name: str) -> StateDatabase:
        database = f"smtpapi_state_{name}"
        assert re.fullmatch(r"[a-z0-9_]{1,50}", database), database
        revive_shared_mariadb()
        _root_statements(
            f"DROP DATABASE IF EXISTS `{database}`",
            f"CREATE DATABASE `{database}` CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci",
        )
        made.append(database)
        return StateDatabase(database)

    try:
        yield create
    finally:
        for database in made:
            _root_statements(f"DROP DATABASE IF EXISTS `{database}`")


def route_defer(bed: Testbed, route: str) -> None:
    """``testbed.sh route-defer closed|sink``: where postfix sends defer.test's mail from now on
    (``sink`` also flushes postfix's queue)."""
    env = dict(
        os.environ,
        SMTPAPI_TESTBED_DIR=str(bed.directory),
        SMTPAPI_TESTBED_DB_NAME=DB_NAME,
        SMTPAPI_TESTBED_DB_USER=DB_READER,
        SMTPAPI_TESTBED_DB_PASS=DB_READER_PASSWORD,
    )
    result = subprocess.run(
        ["bash", str(SCRIPT), "route-defer", route],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        _fail(f"testbed.sh route-defer {route} failed with status {result.returncode}:\n{result.stdout}{result.stderr}")


class KeepAliveClient:
    """One keep-alive HTTP connection to a sidecar, for many requests in a row."""

    def __init__(self, port: int, timeout: float = 60.0) -> None:
        self.port = port
        self.timeout = timeout
        self._connection: http.client.HTTPConnection | None = None

    def request(
        self, method: str, path: str, body: Any = None, key: str | None = API_KEY, headers: Mapping[str, str] | None = None
    ) -> tuple[int, Any, Any]:
        """(status, JSON answer, headers) of one request.

        Never repeats a request by itself: on an error (OSError, http.client's exceptions) the
        connection is closed and the error raised; the next request opens a new one.
        """
        sent = {"Content-Type": "application/json", **({"X-API-Key": key} if key is not None else {}), **(headers or {})}
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        if self._connection is None:
            self._connection = http.client.HTTPConnection(HOST, self.port, timeout=self.timeout)
        try:
            self._connection.request(method, path, body=data, headers=sent)
            response = self._connection.getresponse()
            raw = response.read()
        except BaseException:
            self.close()
            raise
        if (response.getheader("Connection") or "").lower() == "close":
            self.close()
        return response.status, json.loads(raw) if raw else None, response.headers

    def close(self) -> None:
        """Close the connection."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None


# ------------------------------------------------------------------------------ rspamd, early


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start rspamd as soon as the session is known to need it (tests/rspamd.py, ``start_early``)."""
    if any(getattr(getattr(item, "module", None), "__name__", "").endswith(".test_rspamd") for item in session.items):
        from ..rspamd import start_early

        try:
            start_early()
        except (OSError, RuntimeError, KeyError):
            pass  # not installed, or no rspamd user: the tests' own start says why


def pytest_sessionfinish(session: pytest.Session) -> None:
    """An rspamd started early and never used is stopped with the session."""
    from ..rspamd import stop_early

    stop_early()
