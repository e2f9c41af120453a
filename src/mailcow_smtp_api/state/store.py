"""The sidecar's own state database: idempotency records, on SQLite or a shared MariaDB database.

``--state-db`` takes the same URL forms as ``--db`` (``sqlite:PATH``, ``mysql://...``) and reuses
mailcow/db.py's URL parsing, connection arguments, ping and query runner. It must not name mailcow's
database: the sidecar never writes there. The table ``smtpapi_idempotency`` is created on first use.

The claim is one INSERT on the primary key (scope, idempotency key): the database, not this
process, decides which of several concurrent requests (in one or many sidecars) sends. Every
later step is an UPDATE or DELETE guarded by the claim's random token, so a slow request whose
claim was meanwhile declared interrupted cannot overwrite what was stored in its place.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..mailcow.db import (
    MARIADB,
    SQLITE,
    Conflict,
    Dialect,
    MailcowDatabase,
    MysqlUrl,
    SqliteUrl,
    driver_errors,
    mysql_connect_args,
    parse_db_url,
    query_rows,
)
from ..core.errors import ApiError
from ..core.idempotency import Answer, Claim, Record, State

log = Logger(namespace="smtpapi.state")
T = TypeVar("T")

TABLE = "smtpapi_idempotency"
DEFAULT_STATE_DB = "sqlite:smtpapi-state.sqlite"
PURGE_INTERVAL_SECONDS = 300.0
_CLAIM_ATTEMPTS = 3

# Keys and hashes compare byte for byte: "abc" and "ABC" are two idempotency keys, whatever the
# server's default collation (mailcow's is case-insensitive utf8mb4_general_ci). The key is
# VARBINARY because even ascii_bin ignores trailing spaces when comparing (PAD SPACE).
_MARIADB_TABLE = f"""CREATE TABLE IF NOT EXISTS {TABLE} (
  scope CHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
  idem_key VARBINARY(255) NOT NULL,
  fingerprint CHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
  claim_token CHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
  record_state VARCHAR(16) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
  created_at DOUBLE NOT NULL,
  lease_until DOUBLE NOT NULL,
  expires_at DOUBLE NOT NULL,
  http_status SMALLINT NULL,
  msg_code VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NULL,
  body MEDIUMBLOB NULL,
  PRIMARY KEY (scope, idem_key),
  KEY smtpapi_idempotency_expires (expires_at)
) ENGINE=InnoDB"""
_SQLITE_TABLE = (
    f"""CREATE TABLE IF NOT EXISTS {TABLE} (
  scope TEXT NOT NULL,
  idem_key TEXT NOT NULL,
  fingerprint TEXT NOT NULL,
  claim_token TEXT NOT NULL,
  record_state TEXT NOT NULL,
  created_at REAL NOT NULL,
  lease_until REAL NOT NULL,
  expires_at REAL NOT NULL,
  http_status INTEGER,
  msg_code TEXT,
  body BLOB,
  PRIMARY KEY (scope, idem_key)
)""",
    f"CREATE INDEX IF NOT EXISTS smtpapi_idempotency_expires ON {TABLE} (expires_at)",
)

_COLUMNS = (
    "scope, idem_key, fingerprint, claim_token, record_state, created_at, lease_until, expires_at, "
    "http_status, msg_code, body"
)
_INSERT = (
    f"INSERT INTO {TABLE} (scope, idem_key, fingerprint, claim_token, record_state, created_at, lease_until, "
    "expires_at) VALUES (:scope, :key, :fingerprint, :token, 'in_flight', :created_at, :lease_until, :expires_at)"
)
_SELECT = f"SELECT {_COLUMNS} FROM {TABLE} WHERE scope = :scope AND idem_key = :key"
_DELETE_EXPIRED_KEY = f"DELETE FROM {TABLE} WHERE scope = :scope AND idem_key = :key AND expires_at <= :now"
_SETTLE = (
    f"UPDATE {TABLE} SET record_state = :state, http_status = :status, msg_code = :code, body = :body "
    "WHERE scope = :scope AND idem_key = :key AND claim_token = :token AND record_state = 'in_flight'"
)
_RELEASE = (
    f"DELETE FROM {TABLE} WHERE scope = :scope AND idem_key = :key AND claim_token = :token "
    "AND record_state = 'in_flight'"
)
_PURGE = f"DELETE FROM {TABLE} WHERE expires_at <= :now"


# --------------------------------------------------------------------------- blocking SQL


def create_table(conn: Any, dialect: Dialect) -> None:
    """Create the idempotency table (and its index) unless it exists."""
    statements = (_MARIADB_TABLE,) if dialect is MARIADB else _SQLITE_TABLE
    for statement in statements:
        execute(conn, dialect, statement)


def execute(conn: Any, dialect: Dialect, sql: str, params: dict[str, Any] | None = None) -> int:
    """Run one statement; the number of rows it changed. Driver errors become mailcow/db.py's exceptions."""
    with driver_errors():
        cursor = conn.cursor()
        try:
            cursor.execute(dialect.params(sql), params or {})
            return int(cursor.rowcount)
        finally:
            cursor.close()


@contextmanager
def transaction(conn: Any, dialect: Dialect) -> Iterator[None]:
    """One transaction on a pooled connection, which runs in autocommit mode: begun and ended in SQL.

    MariaDB at READ COMMITTED: a locking read takes no gap locks, so claims never hold up inserts
    of other rows meanwhile. SQLite: BEGIN IMMEDIATE takes the write lock at once.
    """
    if dialect is MARIADB:
        execute(conn, dialect, "SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
        execute(conn, dialect, "START TRANSACTION")
    else:
        execute(conn, dialect, "BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        try:
            execute(conn, dialect, "ROLLBACK")
        except Exception:
            pass  # a dropped link rolls back by itself; the first error is the one to report
        raise
    execute(conn, dialect, "COMMIT")


class TablesOnFirstUse:
    """Runs work through the state database's pooled runner, creating its tables (``create``) on
    the first call that reaches the database, so that a database down at start-up stops nothing."""

    def __init__(self, runner: MailcowDatabase, create: Callable[[Any, Dialect], None]) -> None:
        self._runner = runner
        self._create = create
        self._ready = False

    @property
    def ready(self) -> bool:
        """True once the tables were made (or found) by a call that reached the database."""
        return self._ready

    def __call__(self, func: Callable[[Any], T]) -> Deferred[T]:
        """``func(conn)`` in the pool: with the ping before use, the timeout and the queue bound."""

        def work(conn: Any) -> T:
            if not self._ready:
                self._create(conn, self._runner.dialect)
                self._ready = True
            return func(conn)

        return self._runner._run(work)


def _record(row: tuple[Any, ...]) -> Record:
    scope, key, print_, token, state, created, lease, expires, status, code, body = row
    return Record(
        scope=str(scope),
        key=key.decode("ascii") if isinstance(key, (bytes, bytearray)) else str(key),
        fingerprint=str(print_),
        token=str(token),
        state=State(str(state)),
        created_at=float(created),
        lease_until=float(lease),
        expires_at=float(expires),
        status=None if status is None else int(status),
        code=None if code is None else str(code),
        body=None if body is None else bytes(body),
    )


def fetch_record(conn: Any, dialect: Dialect, scope: str, key: str) -> Record | None:
    """The row of (scope, key), or None."""
    with driver_errors():
        rows = query_rows(conn, dialect.params(_SELECT), {"scope": scope, "key": key})
    return _record(rows[0]) if rows else None


def claim_key(conn: Any, dialect: Dialect, claim: Claim) -> Record | None:
    """INSERT the claim; None when it is ours, else the live record that holds the key.

    An expired record is deleted and the INSERT tried again (the lazy purge). A record that
    vanishes between the failed INSERT and the SELECT was released meanwhile: try again.
    """
    params = {
        "scope": claim.scope,
        "key": claim.key,
        "fingerprint": claim.fingerprint,
        "token": claim.token,
        "created_at": claim.created_at,
        "lease_until": claim.lease_until,
        "expires_at": claim.expires_at,
    }
    for _ in range(_CLAIM_ATTEMPTS):
        try:
            execute(conn, dialect, _INSERT, params)
            return None
        except Conflict:
            pass
        record = fetch_record(conn, dialect, claim.scope, claim.key)
        if record is None:
            continue
        if not record.expired(claim.created_at):
            return record
        execute(conn, dialect, _DELETE_EXPIRED_KEY, {"scope": claim.scope, "key": claim.key, "now": claim.created_at})
    # Claimed and released again on every attempt: others are busy with this key right now.
    raise ApiError.of("smtp_idempotency_in_flight", field="Idempotency-Key", retry_after=2)


def settle_key(conn: Any, dialect: Dialect, scope: str, key: str, token: str, state: State, answer: Answer) -> bool:
    """Store ``answer`` on the in-flight row claimed with ``token``; False when that row is gone."""
    params = {
        "scope": scope,
        "key": key,
        "token": token,
        "state": state.value,
        "status": answer.status,
        "code": answer.code,
        "body": answer.body_bytes(),
    }
    return execute(conn, dialect, _SETTLE, params) == 1


def release_key(conn: Any, dialect: Dialect, claim: Claim) -> bool:
    """Delete the in-flight row claimed with the claim's token; False when it is gone."""
    params = {"scope": claim.scope, "key": claim.key, "token": claim.token}
    return execute(conn, dialect, _RELEASE, params) == 1


def purge_expired(conn: Any, dialect: Dialect, now: float) -> int:
    """Delete every expired row; how many."""
    return execute(conn, dialect, _PURGE, {"now": now})


# --------------------------------------------------------------------------- the store


class IdempotencyStore:
    """Deferred-returning operations on the idempotency table, through an adbapi pool.

    Failures (database down, slow, or the table cannot be created) arrive as
    ``ApiError.of("smtp_idempotency_unavailable")``; the table is created on the first use that
    succeeds.
    """

    def __init__(self, runner: MailcowDatabase, dialect: Dialect, description: str = "") -> None:
        self._runner = runner
        self.dialect = dialect
        self.description = description
        self._tables = TablesOnFirstUse(runner, create_table)

    def claim(self, claim: Claim) -> Deferred[Record | None]:
        """Fire None when the key is now ours, or with the live record holding it."""
        return self._run(lambda conn: claim_key(conn, self.dialect, claim))

    def settle(self, scope: str, key: str, token: str, state: State, answer: Answer) -> Deferred[bool]:
        """Store the answer of the in-flight claim ``token``; fire False when that claim is gone."""
        return self._run(lambda conn: settle_key(conn, self.dialect, scope, key, token, state, answer))

    def release(self, claim: Claim) -> Deferred[bool]:
        """Free the key claimed by ``claim`` (nothing was sent); fire False when it was gone."""
        return self._run(lambda conn: release_key(conn, self.dialect, claim))

    def purge(self, now: float) -> Deferred[int]:
        """Delete expired records; fire with how many."""
        return self._run(lambda conn: purge_expired(conn, self.dialect, now))

    def ping(self) -> Deferred[None]:
        """Fire when the state database answers and holds the table (for /readyz)."""
        return self._run(lambda conn: None)

    def close(self) -> None:
        """Close the pool."""
        self._runner.close()

    def _run(self, func: Callable[[Any], T]) -> Deferred[T]:
        return self._tables(func).addErrback(_unavailable)


def _unavailable(failure: Failure) -> Failure:
    if isinstance(failure.value, ApiError) and failure.value.code == "smtp_db_unavailable":
        err = ApiError.of("smtp_idempotency_unavailable", retry_after=5)
        err.__cause__ = failure.value.__cause__  # why, for /readyz
        return Failure(err)
    return failure


def same_database(first: SqliteUrl | MysqlUrl, second: SqliteUrl | MysqlUrl) -> bool:
    """True when two database URLs name the same database (best effort: one host name per server)."""
    if isinstance(first, SqliteUrl) and isinstance(second, SqliteUrl):
        return os.path.realpath(first.path) == os.path.realpath(second.path)
    if isinstance(first, MysqlUrl) and isinstance(second, MysqlUrl):
        where = (first.unix_socket, None if first.unix_socket else (first.host.lower(), first.port))
        other = (second.unix_socket, None if second.unix_socket else (second.host.lower(), second.port))
        return where == other and first.database.lower() == second.database.lower()
    return False


def open_state_store(
    url: str, reactor: Any, *, mailcow_db: str | None = None, timeout: float = 5.0, pool_size: int = 3
) -> IdempotencyStore:
    """An ``IdempotencyStore`` for a ``--state-db`` URL; ``ValueError`` for a bad or forbidden URL.

    Nothing is opened here: the pool connects when the reactor runs, and the table is created by
    the first operation, so a state database that is down at start-up does not stop the service.
    """
    runner = open_state_runner(url, reactor, mailcow_db=mailcow_db, timeout=timeout, pool_size=pool_size)
    return IdempotencyStore(runner, runner.dialect, description=runner.description)


def in_wal_mode(conn: Any) -> bool:
    """True when the file of SQLite connection ``conn`` is in write-ahead-log mode."""
    return str(query_rows(conn, "PRAGMA journal_mode")[0][0]).lower() == "wal"


def write_ahead_log(conn: Any) -> None:
    """SQLite in write-ahead-log mode, every commit synced to disk (``synchronous = FULL``) unless
    a transaction says otherwise (only the outbox's status records without webhook events do, see
    ``state.outbox``).

    In its default mode SQLite writes a rollback journal for every transaction, syncs it, writes
    the database, syncs that and deletes the journal: with a status record per synchronous send
    that was the largest CPU cost of a send. With the log, a commit appends to it and syncs once;
    a committed, synced change survives a crash or power loss as before. Readers do not block the
    writer. The mode stays with the file; the log lives beside it (``PATH-wal``, ``PATH-shm``).
    Only a connection that finds the file in another mode switches it; should that switch be
    refused (another connection holds a lock), this connection goes on in the file's mode, which
    is just as correct, and the next one tries again.
    """
    import sqlite3

    conn.execute("PRAGMA synchronous = FULL")
    if not in_wal_mode(conn):
        try:
            conn.execute("PRAGMA journal_mode = WAL")
        except sqlite3.OperationalError:
            pass


def open_state_runner(
    url: str, reactor: Any, *, mailcow_db: str | None = None, timeout: float = 5.0, pool_size: int = 3
) -> MailcowDatabase:
    """A pooled runner for the ``--state-db`` database (ping before use, timeout, queue bound)."""
    parsed = parse_db_url(url)
    if mailcow_db is not None and same_database(parsed, parse_db_url(mailcow_db)):
        raise ValueError("it names mailcow's database (--db); the sidecar never writes there: use a database of its own")
    common = {"cp_min": 1, "cp_max": max(1, pool_size), "cp_noisy": False, "cp_reactor": reactor}
    if isinstance(parsed, SqliteUrl):
        pool = adbapi.ConnectionPool(
            "sqlite3",
            parsed.path,
            timeout=timeout,
            check_same_thread=False,
            isolation_level=None,
            cp_openfun=write_ahead_log,
            **common,
        )
        dialect = SQLITE
    else:
        args = mysql_connect_args(parsed, max(1.0, timeout * 0.6))
        # mailcow/db.py opens mailcow's database read-only; this database is the sidecar's own.
        args.pop("init_command", None)
        pool = adbapi.ConnectionPool("pymysql", cp_reconnect=True, **args, **common)
        dialect = MARIADB
    return MailcowDatabase(pool, dialect, reactor, timeout=timeout, description=parsed.redacted())


def connect_state_blocking(url: str, *, mailcow_db: str | None = None, timeout: float = 5.0) -> tuple[Any, Dialect]:
    """A plain DB-API connection to the ``--state-db`` database for the admin command (autocommit)."""
    import sqlite3

    import pymysql

    parsed = parse_db_url(url)
    if mailcow_db is not None and same_database(parsed, parse_db_url(mailcow_db)):
        raise ValueError("it names mailcow's database (--db); the sidecar never writes there: use a database of its own")
    with driver_errors():
        if isinstance(parsed, SqliteUrl):
            return sqlite3.connect(parsed.path, timeout=timeout, isolation_level=None), SQLITE
        args = mysql_connect_args(parsed, timeout)
        args.pop("init_command", None)
        return pymysql.connect(**args), MARIADB


class StatePurger(Service):
    """Deletes expired idempotency records every ``interval`` seconds; closes the store on stop."""

    def __init__(self, store: IdempotencyStore, clock: Any, interval: float = PURGE_INTERVAL_SECONDS) -> None:
        self.store = store
        self.clock = clock
        self.interval = interval
        self._loop = LoopingCall(self._purge)
        self._loop.clock = clock

    def startService(self) -> None:
        """Start the periodic purge (first run after one interval)."""
        super().startService()
        self._loop.start(self.interval, now=False)

    def stopService(self) -> Any:
        """Stop purging and close the pool."""
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        self.store.close()

    def _purge(self) -> Deferred[None]:
        d = self.store.purge(self.clock.seconds()).addCallback(self._purged)
        # A failed purge is retried at the next interval; it must not stop the loop.
        return d.addErrback(self._failed)

    def _purged(self, count: int) -> None:
        if count:
            log.info("state database: purged {count} expired idempotency record(s)", count=count)

    def _failed(self, failure: Failure) -> None:
        error = failure.value
        code = error.code if isinstance(error, ApiError) else type(error).__name__
        log.warn("state database: purge failed ({code})", code=code)
