"""MailcowDatabase on the real reactor: API keys, database outages, recovery, schema checks, read-only sessions."""

from __future__ import annotations

import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from typing import Any

import pymysql
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.protocol import connectionDone
from twisted.protocols import portforward
from twisted.python.failure import Failure

from mailcow_smtp_api.mailcow import db

from mailcow_smtp_api.core import schema
from mailcow_smtp_api.core.apikeys import ApiKey
from mailcow_smtp_api.core.errors import ApiError
from mailcow_smtp_api.core.senders import Alias, DbState
from tests.db.dbtesting import (
    MARIADB_HOST,
    MARIADB_PORT,
    ScratchMariaDb,
    admin_connection,
    load_sqlite_file,
)
from tests.db.decision_cases import U1, world

RW_KEY = "ABCDEF-012345-6789AB-CDEF01-234567"
RO_KEY = "111111-222222-333333-444444-555555"
OFF_KEY = "999999-888888-777777-666666-555555"
API_ROWS = (
    (RW_KEY, "192.0.2.0/24, 2001:db8::/32;junk\n198.51.100.7", 0, "rw", 1),
    (RO_KEY, "", 1, "ro", 1),
    (OFF_KEY, "", 1, "rw", 0),
)


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


async def _failure_of(d: Deferred[Any]) -> ApiError:
    """The ApiError a Deferred fails with (the test fails if it succeeds or fails otherwise)."""
    try:
        result = await d
    except ApiError as err:
        return err
    raise AssertionError(f"expected an ApiError, got {result!r}")


# --------------------------------------------------------------------------- API keys on both backends


@pytest.fixture(params=["sqlite", "mariadb"])
def keyed_db(request: Any, tmp_path: Any) -> Iterator[db.MailcowDatabase]:
    """A database holding API_ROWS, opened through the service's interface."""
    if request.param == "sqlite":
        path = str(tmp_path / "keys.sqlite")
        db.create_sqlite_schema(path)
        with sqlite3.connect(path) as conn:
            conn.executemany(
                "INSERT INTO api (api_key, allow_from, skip_ip_check, access, active) VALUES (?, ?, ?, ?, ?)", API_ROWS
            )
        url = f"sqlite:{path}"
    else:
        scratch: ScratchMariaDb = request.getfixturevalue("mariadb")
        scratch.execute("DELETE FROM api")
        for row in API_ROWS:
            scratch.execute(
                "INSERT INTO api (api_key, allow_from, skip_ip_check, access, active) VALUES (%s, %s, %s, %s, %s)", row
            )
        url = scratch.url
    database = db.open_database(url, _reactor())
    yield database
    database.close()


@pytest_twisted.ensureDeferred
async def test_key_matches_case_insensitively_and_ignores_junk(keyed_db: db.MailcowDatabase) -> None:
    """A lower-case key wrapped in spaces and quotes authenticates as mailcow's stored key."""
    key = await keyed_db.authenticate_key(f' "{RW_KEY.lower()}"\n', "192.0.2.10", True)
    assert isinstance(key, ApiKey) and key.api_key == RW_KEY and key.writable


@pytest_twisted.ensureDeferred
async def test_unknown_and_inactive_keys_fail_as_mailcow(keyed_db: db.MailcowDatabase) -> None:
    """An unknown, inactive or missing key gets mailcow's bare 401 "authentication failed"."""
    for header in ("000000-000000-000000-000000-000000", OFF_KEY, None, ""):
        err = await _failure_of(keyed_db.authenticate_key(header, "192.0.2.10", True))
        assert (err.status, err.message, err.bare) == (401, "authentication failed", True)


@pytest_twisted.ensureDeferred
async def test_allow_from_networks_and_addresses(keyed_db: db.MailcowDatabase) -> None:
    """allow_from admits its IPv4/IPv6 networks and exact addresses, IPv4-mapped peers included."""
    for ip in ("192.0.2.200", "2001:db8:1::5", "198.51.100.7", "::ffff:192.0.2.1"):
        key = await keyed_db.authenticate_key(RW_KEY, ip, True)
        assert key.api_key == RW_KEY
    err = await _failure_of(keyed_db.authenticate_key(RW_KEY, "203.0.113.9", True))
    assert (err.status, err.message) == (401, "api access denied for ip 203.0.113.9")


@pytest_twisted.ensureDeferred
async def test_read_only_key_cannot_send(keyed_db: db.MailcowDatabase) -> None:
    """A ro key passes a read but gets mailcow's 403 for a write; skip_ip_check admits any address."""
    key = await keyed_db.authenticate_key(RO_KEY, "203.0.113.9", False)
    assert key.access == "ro"
    err = await _failure_of(keyed_db.authenticate_key(RO_KEY, "203.0.113.9", True))
    assert (err.status, err.message) == (403, "API read/write access denied")


@pytest.fixture(params=["sqlite", "mariadb"])
def rule_db(request: Any, tmp_path: Any) -> Iterator[tuple[Callable[[DbState], None], db.MailcowDatabase]]:
    """A database of either kind and a way to load a state into it."""
    if request.param == "sqlite":
        path = str(tmp_path / "rule.sqlite")
        database = db.open_database(f"sqlite:{path}", _reactor())
        yield (lambda state: load_sqlite_file(path, state)), database
    else:
        scratch: ScratchMariaDb = request.getfixturevalue("mariadb")
        database = db.open_database(scratch.url, _reactor())
        yield scratch.load, database
    database.close()


@pytest_twisted.ensureDeferred
async def test_sender_has_owner(rule_db: tuple[Callable[[DbState], None], db.MailcowDatabase]) -> None:
    """A sender with any owner in the map is local; +tags are retried; unknown senders are not."""
    load, database = rule_db
    load(world(aliases=(Alias("team@example.org", U1),)))
    assert await database.sender_has_owner("team@example.org") is True
    assert await database.sender_has_owner("User1+x@example.org") is True
    assert await database.sender_has_owner("nobody@example.org") is False
    assert await database.sender_has_owner("not-an-address") is False


# --------------------------------------------------------------------------- the database goes away


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest_twisted.ensureDeferred
async def test_unreachable_server_answers_503_fast() -> None:
    """With nothing listening, a lookup fails with smtp_db_unavailable within a second or so."""
    database = db.open_database(f"mysql://u:secret@127.0.0.1:{_closed_port()}/mailcow", _reactor(), timeout=3)
    try:
        started = time.monotonic()
        err = await _failure_of(database.authorize_sender(U1, U1))
        elapsed = time.monotonic() - started
    finally:
        database.close()
    assert (err.code, err.status) == ("smtp_db_unavailable", 503)
    assert elapsed < 2.0
    assert "secret" not in repr(err) and "secret" not in database.description


@pytest_twisted.ensureDeferred
async def test_missing_key_is_refused_without_asking_the_database() -> None:
    """A missing or junk-only header gets mailcow's 401 even while the database is down."""
    database = db.open_database(f"mysql://u:p@127.0.0.1:{_closed_port()}/mailcow", _reactor(), timeout=3)
    try:
        for header in (None, "", " ;!? "):
            err = await _failure_of(database.authenticate_key(header, "192.0.2.10", True))
            assert (err.status, err.message) == (401, "authentication failed")
        down = await _failure_of(database.authenticate_key(RW_KEY, "192.0.2.10", True))
    finally:
        database.close()
    assert down.code == "smtp_db_unavailable"


@pytest_twisted.ensureDeferred
async def test_silent_server_answers_503_within_the_timeout() -> None:
    """A server that accepts but never speaks costs at most the timeout, never a hang."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes handshakes; nobody ever answers
        port = silent.getsockname()[1]
        database = db.open_database(f"mysql://u:p@127.0.0.1:{port}/mailcow", _reactor(), timeout=1.0)
        try:
            started = time.monotonic()
            first = await _failure_of(database.authorize_sender(U1, U1))
            second = await _failure_of(database.ping())
            elapsed = time.monotonic() - started
        finally:
            database.close()
    assert first.code == second.code == "smtp_db_unavailable"
    assert elapsed < 3.5


@pytest_twisted.ensureDeferred
async def test_too_many_waiting_calls_fail_at_once() -> None:
    """Beyond max_pending calls in flight, a call fails immediately instead of queueing."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        database = db.open_database(
            f"mysql://u:p@127.0.0.1:{port}/mailcow", _reactor(), timeout=1.0, pool_size=1, max_pending=1
        )
        try:
            waiting = database.ping()
            refused = database.ping()
            assert refused.called  # answered synchronously, without touching the pool
            err = await _failure_of(refused)
            await _failure_of(waiting)
        finally:
            database.close()
    assert err.code == "smtp_db_unavailable"


def _pool_connection_ids(scratch: ScratchMariaDb) -> set[int]:
    rows = scratch.execute(
        "SELECT ID FROM information_schema.PROCESSLIST WHERE DB = %s AND ID <> CONNECTION_ID()", (scratch.name,)
    )
    return {int(row[0]) for row in rows}


@pytest_twisted.ensureDeferred
async def test_pool_recovers_after_its_connection_is_killed(mariadb: ScratchMariaDb) -> None:
    """After KILL of the pooled connection server-side, the next lookup works on a new connection."""
    mariadb.load(world())
    database = db.open_database(mariadb.url, _reactor(), pool_size=1)
    try:
        assert (await database.authorize_sender(U1, U1)).allowed
        killed = _pool_connection_ids(mariadb)
        assert killed
        for connection_id in killed:
            mariadb.execute(f"KILL {connection_id}")
        decision = await database.authorize_sender(U1, U1)
        assert decision.allowed
        assert _pool_connection_ids(mariadb).isdisjoint(killed)
    finally:
        database.close()


class _Relay(portforward.ProxyServer):
    """A forwarding connection its factory can cut."""

    def connectionMade(self) -> None:
        self.factory.live.add(self)  # type: ignore[attr-defined]
        super().connectionMade()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.live.discard(self)  # type: ignore[attr-defined]
        super().connectionLost(reason)


class _Outage(portforward.ProxyFactory):
    """A TCP relay to MariaDB that can be switched off (listener closed, links cut) and on again."""

    protocol = _Relay

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.live: set[_Relay] = set()
        self.listener: Any = None
        self.port_number = 0

    def start(self) -> None:
        self.listener = _reactor().listenTCP(self.port_number, self, interface="127.0.0.1")
        self.port_number = self.listener.getHost().port

    async def stop(self) -> None:
        for relay in list(self.live):
            relay.transport.abortConnection()
        await self.listener.stopListening()


@pytest_twisted.ensureDeferred
async def test_outage_gives_503_and_service_recovers_without_restart(mariadb: ScratchMariaDb) -> None:
    """While the server is away lookups fail with smtp_db_unavailable; afterwards they work again."""
    mariadb.load(world())
    relay = _Outage(MARIADB_HOST, MARIADB_PORT)
    relay.start()
    database = db.open_database(f"mysql://root@127.0.0.1:{relay.port_number}/{mariadb.name}", _reactor(), timeout=2)
    try:
        assert (await database.authorize_sender(U1, U1)).allowed
        await relay.stop()
        err = await _failure_of(database.authorize_sender(U1, U1))
        assert err.code == "smtp_db_unavailable"
        relay.start()
        assert (await database.authorize_sender(U1, U1)).allowed
        assert await database.check_schema() == []
    finally:
        database.close()
        await relay.stop()


# --------------------------------------------------------------------------- schema checks


@pytest_twisted.ensureDeferred
async def test_sqlite_schema_is_created_on_first_use(sqlite_path: str) -> None:
    """A new embedded database has every table the sidecar reads; its pool is query-only."""
    database = db.open_database(f"sqlite:{sqlite_path}", _reactor())
    try:
        assert await database.check_schema() == []
        await database.ping()
        load_sqlite_file(sqlite_path, world())
        assert (await database.authorize_sender(U1, U1)).allowed
    finally:
        database.close()


def _break_sqlite(path: str) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE alias_domain")
        conn.execute("DROP TABLE alias")
        conn.execute(
            "CREATE TABLE alias (id INTEGER PRIMARY KEY, address TEXT, goto TEXT, domain TEXT, active INTEGER)"
        )


@pytest_twisted.ensureDeferred
async def test_check_schema_names_missing_table_and_column_sqlite(sqlite_path: str) -> None:
    """check_schema names the missing table and the missing column; lookups then fail as 503."""
    database = db.open_database(f"sqlite:{sqlite_path}", _reactor())
    _break_sqlite(sqlite_path)  # after the tables were created on first use
    try:
        problems = await database.check_schema()
        err = await _failure_of(database.authorize_sender(U1, U1))
    finally:
        database.close()
    assert problems == [
        "table alias lacks column(s) sender_allowed",
        "missing table alias_domain (needs columns alias_domain, target_domain, active)",
    ]
    assert err.code == "smtp_db_unavailable"


@pytest.fixture
def broken_mariadb(mariadb: ScratchMariaDb) -> Iterator[str]:
    """A second scratch MariaDB database without sender_acl and without mailbox.attributes."""
    name = mariadb.name + "_broken"
    admin = admin_connection()
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci")
        cursor.execute(f"USE `{name}`")
        for statement in schema.MARIADB_TABLES:
            if "`sender_acl`" not in statement:
                cursor.execute(statement)
        cursor.execute("ALTER TABLE mailbox DROP COLUMN attributes")
    try:
        yield mariadb.url.replace(f"/{mariadb.name}", f"/{name}")
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")
        admin.close()


@pytest_twisted.ensureDeferred
async def test_check_schema_names_missing_table_and_column_mariadb(broken_mariadb: str) -> None:
    """On MariaDB too, check_schema names what is missing."""
    database = db.open_database(broken_mariadb, _reactor())
    try:
        problems = await database.check_schema()
    finally:
        database.close()
    assert problems == [
        "table mailbox lacks column(s) attributes",
        "missing table sender_acl (needs columns id, logged_in_as, send_as, external)",
    ]


# --------------------------------------------------------------------------- never a write


def test_mariadb_sessions_are_read_only(mariadb: ScratchMariaDb) -> None:
    """The sidecar's MariaDB sessions refuse writes: it never writes to mailcow's tables."""
    reader = db.connect_blocking(mariadb.url)
    try:
        cursor = reader.conn.cursor()
        with pytest.raises(pymysql.Error, match="READ ONLY"):
            cursor.execute("INSERT INTO domain (domain, active) VALUES ('written.org', 1)")
    finally:
        reader.close()
    assert mariadb.execute("SELECT COUNT(*) FROM domain WHERE domain = 'written.org'") == [(0,)]


@pytest_twisted.ensureDeferred
async def test_sqlite_pool_is_query_only(sqlite_path: str) -> None:
    """The service's SQLite connections refuse writes too (PRAGMA query_only)."""
    database = db.open_database(f"sqlite:{sqlite_path}", _reactor())

    def write(conn: Any) -> None:
        conn.cursor().execute("INSERT INTO domain (domain, active) VALUES ('written.org', 1)")

    try:
        with pytest.raises(sqlite3.OperationalError, match="readonly|read-only|query_only"):
            await database._pool.runWithConnection(write)
    finally:
        database.close()
