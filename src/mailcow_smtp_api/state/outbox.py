"""The outbox and the status records in the ``--state-db`` database, shared by every replica.

One table, ``smtpapi_outbox``, one row per message: asynchronous ones from acceptance until their
record expires, synchronous ones from their submission on (so that their status can be read too).
A row holds the built message and its envelope while it waits (never a password), the attempts
with postfix's replies, postfix's queue id and each recipient's fate.

Replicas drain one outbox without sending anything twice: a row is claimed with a lease (on
MariaDB ``SELECT ... FOR UPDATE SKIP LOCKED``; on SQLite one guarded UPDATE, SQLite allowing one
writer at a time), every later change is guarded by the claim's token, and a lease is longer than
a whole SMTP transaction. A row left in ``sending`` when its lease ends was cut off mid-handover:
the next claimer resolves it from postfix's log instead of sending it again.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..core.outbox import NewMessage, Outcome, RecipientFate, Row, Status, row_from_values
from ..mailcow.db import MARIADB, SQLITE, Dialect, MailcowDatabase, SqliteUrl, driver_errors, parse_db_url, query_rows
from .store import TablesOnFirstUse, execute, in_wal_mode, transaction

T = TypeVar("T")
log = Logger(namespace="smtpapi.state")
TABLE = "smtpapi_outbox"
# Status records of synchronous sends written in one transaction at most (see OutboxStore.record).
RECORD_BATCH = 100
WAITING = (Status.SCHEDULED.value, Status.QUEUED.value, Status.SENDING.value)

_MARIADB = (
    f"""CREATE TABLE IF NOT EXISTS {TABLE} (
  id CHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
  scope CHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
  status VARCHAR(16) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
  message_id VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
  sender VARCHAR(255) NOT NULL,
  recipients MEDIUMTEXT NOT NULL,
  login VARCHAR(255) NOT NULL,
  target VARCHAR(300) NOT NULL,
  body LONGBLOB NULL,
  size BIGINT NOT NULL,
  created_at DOUBLE NOT NULL,
  send_at DOUBLE NULL,
  not_before DOUBLE NOT NULL,
  expires_at DOUBLE NOT NULL,
  lease_token CHAR(32) CHARACTER SET ascii COLLATE ascii_bin NULL,
  lease_until DOUBLE NULL,
  handover_at DOUBLE NULL,
  attempts MEDIUMTEXT NOT NULL,
  queue_id VARCHAR(32) CHARACTER SET ascii COLLATE ascii_bin NULL,
  fates MEDIUMTEXT NOT NULL,
  updated_at DOUBLE NOT NULL,
  keep_until DOUBLE NOT NULL,
  request_id VARCHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
  KEY smtpapi_outbox_due (status, not_before),
  KEY smtpapi_outbox_message (message_id),
  KEY smtpapi_outbox_keep (keep_until)
) ENGINE=InnoDB""",
)
_SQLITE = (
    f"""CREATE TABLE IF NOT EXISTS {TABLE} (
  id TEXT NOT NULL PRIMARY KEY,
  scope TEXT NOT NULL,
  status TEXT NOT NULL,
  message_id TEXT NOT NULL,
  sender TEXT NOT NULL,
  recipients TEXT NOT NULL,
  login TEXT NOT NULL,
  target TEXT NOT NULL,
  body BLOB,
  size INTEGER NOT NULL,
  created_at REAL NOT NULL,
  send_at REAL,
  not_before REAL NOT NULL,
  expires_at REAL NOT NULL,
  lease_token TEXT,
  lease_until REAL,
  handover_at REAL,
  attempts TEXT NOT NULL,
  queue_id TEXT,
  fates TEXT NOT NULL,
  updated_at REAL NOT NULL,
  keep_until REAL NOT NULL,
  request_id TEXT NOT NULL
)""",
    f"CREATE INDEX IF NOT EXISTS smtpapi_outbox_due ON {TABLE} (status, not_before)",
    f"CREATE INDEX IF NOT EXISTS smtpapi_outbox_message ON {TABLE} (message_id)",
    f"CREATE INDEX IF NOT EXISTS smtpapi_outbox_keep ON {TABLE} (keep_until)",
)
_COLUMNS = (
    "id, scope, status, message_id, sender, recipients, login, target, size, created_at, send_at, not_before, "
    "expires_at, lease_token, lease_until, handover_at, attempts, queue_id, fates, updated_at, keep_until, request_id"
)


# --------------------------------------------------------------------------- blocking SQL


def create_tables(conn: Any, dialect: Dialect) -> None:
    """Create the outbox table and its indexes unless they exist."""
    for statement in _MARIADB if dialect is MARIADB else _SQLITE:
        execute(conn, dialect, statement)


def _query(conn: Any, dialect: Dialect, sql: str, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
    with driver_errors():
        return query_rows(conn, dialect.params(sql), dict(params))


def usage(conn: Any, dialect: Dialect) -> tuple[int, int]:
    """(messages, bytes) waiting in the outbox."""
    marks = ", ".join(f"'{s}'" for s in WAITING)
    rows = _query(conn, dialect, f"SELECT COUNT(*), COALESCE(SUM(size), 0) FROM {TABLE} WHERE status IN ({marks})", {})
    return int(rows[0][0]), int(rows[0][1])


@functools.lru_cache(maxsize=4)
def _insert_sql(names: tuple[str, ...]) -> str:
    """The INSERT of these columns (made once: every row names the same ones)."""
    return f"INSERT INTO {TABLE} ({', '.join(names)}) VALUES ({', '.join(f':{name}' for name in names)})"


def insert(conn: Any, dialect: Dialect, message: NewMessage) -> None:
    """Store one message."""
    params = {
        "id": message.id,
        "scope": message.scope,
        "status": message.status.value,
        "message_id": message.message_id,
        "sender": message.sender,
        "recipients": json.dumps(list(message.recipients)),
        "login": message.login,
        "target": message.target,
        "body": message.body,
        "size": message.size,
        "created_at": message.created_at,
        "send_at": message.send_at,
        "not_before": message.not_before,
        "expires_at": message.expires_at,
        "attempts": json.dumps([a.as_json() for a in message.attempts]),
        "queue_id": message.queue_id,
        "fates": json.dumps({k: v.as_json() for k, v in message.fates.items()}),
        "updated_at": message.created_at,
        "keep_until": message.keep_until,
        "request_id": message.request_id,
    }
    execute(conn, dialect, _insert_sql(tuple(params)), params)


def fetch(conn: Any, dialect: Dialect, message: str, scope: str | None = None) -> Row | None:
    """The row of one message (only within ``scope`` when given)."""
    sql = f"SELECT {_COLUMNS} FROM {TABLE} WHERE id = :id" + (" AND scope = :scope" if scope is not None else "")
    rows = _query(conn, dialect, sql, {"id": message, "scope": scope})
    return row_from_values(rows[0]) if rows else None


def fetch_body(conn: Any, dialect: Dialect, message: str, token: str) -> bytes | None:
    """The message bytes of a row this claim holds."""
    rows = _query(conn, dialect, f"SELECT body FROM {TABLE} WHERE id = :id AND lease_token = :token", {"id": message, "token": token})
    return None if not rows or rows[0][0] is None else bytes(rows[0][0])


def claim_due(conn: Any, dialect: Dialect, now: float, lease: float, token: str, limit: int) -> list[Row]:
    """Claim up to ``limit`` messages to work on: due ones that wait, and handovers whose lease ended.

    Each is claimed by one caller only: the lease is set under a row lock (MariaDB) or by one
    guarded UPDATE (SQLite).
    """
    due = (
        f"((status IN ('{Status.SCHEDULED.value}', '{Status.QUEUED.value}') AND not_before <= :now) "
        f"OR status = '{Status.SENDING.value}') AND (lease_until IS NULL OR lease_until <= :now)"
    )
    params = {"now": now, "until": now + lease, "token": token, "limit": int(limit)}
    if dialect is MARIADB:
        with transaction(conn, dialect):
            sql = f"SELECT id FROM {TABLE} WHERE {due} ORDER BY not_before LIMIT {int(limit)} FOR UPDATE SKIP LOCKED"
            ids = [r[0] for r in _query(conn, dialect, sql, params)]
            if ids:
                marks = ", ".join(f":id{n}" for n in range(len(ids)))
                execute(
                    conn,
                    dialect,
                    f"UPDATE {TABLE} SET lease_token = :token, lease_until = :until WHERE id IN ({marks})",
                    {**params, **{f"id{n}": i for n, i in enumerate(ids)}},
                )
    else:
        execute(
            conn,
            dialect,
            f"UPDATE {TABLE} SET lease_token = :token, lease_until = :until WHERE id IN "
            f"(SELECT id FROM {TABLE} WHERE {due} ORDER BY not_before LIMIT :limit) AND {due}",
            params,
        )
    rows = _query(conn, dialect, f"SELECT {_COLUMNS} FROM {TABLE} WHERE lease_token = :token AND lease_until = :until", params)
    return [row_from_values(r) for r in rows]


def begin_handover(conn: Any, dialect: Dialect, message: str, token: str, now: float) -> bool:
    """Mark a claimed message as being handed to postfix, before the first byte goes out."""
    sql = (
        f"UPDATE {TABLE} SET status = '{Status.SENDING.value}', handover_at = :now, updated_at = :now "
        "WHERE id = :id AND lease_token = :token"
    )
    return execute(conn, dialect, sql, {"id": message, "token": token, "now": now}) == 1


def settle(conn: Any, dialect: Dialect, row: Row, token: str, outcome: Outcome) -> bool:
    """Record ``outcome`` on a message this claim holds, and release the claim; False when lost."""
    after = row.settled(outcome)
    params = {
        "id": row.id,
        "token": token,
        "status": after.status.value,
        "attempts": json.dumps([a.as_json() for a in after.attempts]),
        "not_before": after.not_before,
        "queue_id": after.queue_id,
        "fates": json.dumps({k: v.as_json() for k, v in after.fates.items()}),
        "now": after.updated_at,
        "keep": after.keep_until,
    }
    body = ", body = NULL" if outcome.drop_body else ""
    sql = (
        f"UPDATE {TABLE} SET status = :status, attempts = :attempts, not_before = :not_before, queue_id = :queue_id, "
        f"fates = :fates, updated_at = :now, keep_until = :keep, lease_token = NULL, lease_until = NULL{body} "
        "WHERE id = :id AND lease_token = :token"
    )
    return execute(conn, dialect, sql, params) == 1


def release(conn: Any, dialect: Dialect, message: str, token: str, retry_at: float) -> None:
    """Give a claim back without a change, to be looked at again from ``retry_at``."""
    execute(
        conn,
        dialect,
        f"UPDATE {TABLE} SET lease_token = NULL, lease_until = :at WHERE id = :id AND lease_token = :token",
        {"id": message, "token": token, "at": retry_at},
    )


def cancel(conn: Any, dialect: Dialect, message: str, scope: str, now: float, keep_until: float) -> Row | None:
    """Cancel a message that still waits and is not being worked on; the row after, or None."""
    sql = (
        f"UPDATE {TABLE} SET status = '{Status.CANCELED.value}', body = NULL, updated_at = :now, keep_until = :keep "
        f"WHERE id = :id AND scope = :scope AND status IN ('{Status.SCHEDULED.value}', '{Status.QUEUED.value}') "
        "AND (lease_until IS NULL OR lease_until <= :now)"
    )
    if execute(conn, dialect, sql, {"id": message, "scope": scope, "now": now, "keep": keep_until}) != 1:
        return None
    return fetch(conn, dialect, message, scope)


def with_postfix(conn: Any, dialect: Dialect, message_id: str) -> list[Row]:
    """The messages postfix holds under this Message-ID (for its log's delivery lines)."""
    sql = (
        f"SELECT {_COLUMNS} FROM {TABLE} WHERE message_id = :mid AND status IN "
        f"('{Status.SUBMITTED.value}', '{Status.DEFERRED.value}', '{Status.DELIVERED.value}', '{Status.BOUNCED.value}')"
    )
    return [row_from_values(r) for r in _query(conn, dialect, sql, {"mid": message_id})]


def update_fates(
    conn: Any, dialect: Dialect, row: Row, fates: Mapping[str, RecipientFate], status: Status, now: float, keep: float
) -> bool:
    """Record recipients' fates from postfix's log; False when the row changed meanwhile."""
    sql = (
        f"UPDATE {TABLE} SET fates = :fates, status = :status, updated_at = :now, keep_until = :keep "
        "WHERE id = :id AND updated_at = :seen"
    )
    params = {
        "id": row.id,
        "fates": json.dumps({k: v.as_json() for k, v in fates.items()}),
        "status": status.value,
        "now": now,
        "keep": keep,
        "seen": row.updated_at,
    }
    return execute(conn, dialect, sql, params) == 1


def watched(conn: Any, dialect: Dialect, limit: int = 100_000) -> list[str]:
    """Message-IDs of messages postfix holds and has not finished with (submitted or deferred)."""
    sql = (
        f"SELECT DISTINCT message_id FROM {TABLE} WHERE status IN ('{Status.SUBMITTED.value}', "
        f"'{Status.DEFERRED.value}') LIMIT {int(limit)}"
    )
    return [str(r[0]) for r in _query(conn, dialect, sql, {})]


def purge(conn: Any, dialect: Dialect, now: float) -> int:
    """Delete records past their ``keep_until`` that no longer wait."""
    marks = ", ".join(f"'{s}'" for s in WAITING)
    return execute(conn, dialect, f"DELETE FROM {TABLE} WHERE keep_until <= :now AND status NOT IN ({marks})", {"now": now})


# --------------------------------------------------------------------------- the store


Enqueue = Callable[[Any, Dialect, Any], None]


# Inline records between two checkpoints the pool runs (the inline connection runs none itself).
INLINE_CHECKPOINT_EVERY = 200


class InlineRecords:
    """Status records of synchronous sends written on the reactor's thread, on a SQLite file.

    A record that has no webhook event goes into the outbox table on a connection of its own,
    in the calling thread, without the pool's thread hop, which cost more than the write itself.
    The connection never waits and never blocks for long: it takes the write lock only if it is
    free (no busy timeout), commits without syncing (``synchronous = NORMAL``, write-ahead log
    only; see ``OutboxStore._record_now`` for what that keeps), and never checkpoints: every
    ``checkpoint_every`` records the store asks the pool for a passive checkpoint instead. When a
    record cannot be written here (the lock is taken, the file is not in WAL mode, any error),
    ``write`` says so and the store writes it through the pool as before. MariaDB state
    databases have no inline records.
    """

    def __init__(self, path: str, checkpoint_every: int = INLINE_CHECKPOINT_EVERY) -> None:
        self._path = path
        self._conn: Any = None
        self._usable = True
        self._checkpoint_every = checkpoint_every
        self._since_checkpoint = 0

    def _connection(self) -> Any:
        if self._conn is None and self._usable:
            import sqlite3

            conn = None
            try:
                conn = sqlite3.connect(self._path, timeout=0, isolation_level=None)
                if not in_wal_mode(conn):
                    self._usable = False
                else:
                    conn.execute("PRAGMA synchronous = NORMAL")
                    conn.execute("PRAGMA wal_autocheckpoint = 0")
                    self._conn, conn = conn, None
            except sqlite3.Error:
                pass  # tried again at the next record
            finally:
                if conn is not None:
                    conn.close()
        return self._conn

    def write(self, messages: Sequence[NewMessage]) -> bool:
        """Store ``messages`` in one transaction here; False (nothing stored) when they must go through the pool."""
        conn = self._connection()
        if conn is None:
            return False
        try:
            if len(messages) == 1:
                insert(conn, SQLITE, messages[0])  # one statement in autocommit: its own transaction
            else:
                with transaction(conn, SQLITE):
                    for message in messages:
                        insert(conn, SQLITE, message)
        except Exception:
            return False
        self._since_checkpoint += 1
        return True

    def checkpoint_due(self) -> bool:
        """True once every ``checkpoint_every`` writes (and then counting again)."""
        if self._since_checkpoint < self._checkpoint_every:
            return False
        self._since_checkpoint = 0
        return True

    def close(self) -> None:
        """Close the connection (a later write opens a new one)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


def _without_events(batch: Sequence[tuple[NewMessage, Sequence[Any], Any]]) -> bool:
    """True when no record of ``batch`` carries a webhook event (such records need not be synced)."""
    return not any(events for _, events, _ in batch)


def inline_records(state_db: str) -> InlineRecords | None:
    """The inline records of a ``--state-db`` URL: for a SQLite file; None for MariaDB."""
    parsed = parse_db_url(state_db)
    return InlineRecords(parsed.path) if isinstance(parsed, SqliteUrl) else None


class OutboxStore:
    """Deferred-returning operations on the outbox, through the state database's pooled runner.

    ``enqueue(conn, dialect, event)`` (the webhook queue) runs in the same call as the change it
    reports, on the same connection; failures arrive as ``ApiError`` from the runner.
    """

    def __init__(
        self,
        runner: MailcowDatabase,
        enqueue: Enqueue | None = None,
        more_tables: Callable[[Any, Dialect], None] | None = None,
        inline: InlineRecords | None = None,
    ) -> None:
        self._runner = runner
        self.dialect = runner.dialect
        self._enqueue = enqueue
        self._inline = inline
        self._records: list[tuple[NewMessage, Sequence[Any], Deferred[None]]] = []
        self._recording = False

        def create(conn: Any, dialect: Dialect) -> None:
            create_tables(conn, dialect)
            if more_tables is not None:
                more_tables(conn, dialect)

        self._tables = TablesOnFirstUse(runner, create)

    def _run(self, func: Callable[[Any, Dialect], T]) -> Deferred[T]:
        return self._tables(lambda conn: func(conn, self.dialect))

    def _events(self, conn: Any, dialect: Dialect, events: Sequence[Any]) -> None:
        if self._enqueue is not None:
            for event in events:
                self._enqueue(conn, dialect, event)

    def accept(self, message: NewMessage, max_messages: int, max_bytes: int) -> Deferred[bool]:
        """Store a message unless the outbox is full; fire False when it is (nothing stored)."""

        def work(conn: Any, dialect: Dialect) -> bool:
            count, size = usage(conn, dialect)
            if count + 1 > max_messages or size + message.size > max_bytes:
                return False
            insert(conn, dialect, message)
            return True

        return self._run(work)

    def record(self, message: NewMessage, events: Sequence[Any] = ()) -> Deferred[None]:
        """Store the record of a message already handed to postfix (a synchronous send).

        Fires once the record is committed, so its status can be read as soon as the caller has
        its answer (on SQLite without syncing the commit when there are no ``events``: see
        ``_record_now``). Records that arrive while an earlier write is running wait for it and are then
        written together, up to ``RECORD_BATCH`` in one transaction (a group commit): under load,
        one thread hop, ping and commit serve many sends instead of one each. When such a shared
        write fails, each of its records is tried again on its own, so that one record's problem
        is never another's.
        """
        waiter: Deferred[None] = Deferred()
        self._records.append((message, tuple(events), waiter))
        if not self._recording:
            self._write_records()
        return waiter

    def _record_now(self, batch: Sequence[tuple[NewMessage, Sequence[Any], Any]]) -> Deferred[None]:
        # A record of a message postfix already holds, with no webhook event to deliver, is not a
        # promise of ours to keep: on SQLite its commit is not synced to disk (``synchronous =
        # NORMAL`` for that transaction). It survives a crash of the process, and a power loss once
        # the log is next synced (by any other commit, all synced, or a checkpoint); the database
        # stays consistent either way. Everything else, records with events included, is synced.
        # Only in write-ahead-log mode: with a rollback journal, NORMAL could corrupt the file.
        relaxed = self.dialect is not MARIADB and _without_events(batch)

        def work(conn: Any, dialect: Dialect) -> None:
            unsynced = relaxed and in_wal_mode(conn)
            if unsynced:
                execute(conn, dialect, "PRAGMA synchronous = NORMAL")
            try:
                with transaction(conn, dialect):
                    for message, events, _ in batch:
                        insert(conn, dialect, message)
                        self._events(conn, dialect, events)
            finally:
                if unsynced:
                    execute(conn, dialect, "PRAGMA synchronous = FULL")

        return self._run(work)

    def _write_records(self) -> None:
        batch, self._records = self._records[:RECORD_BATCH], self._records[RECORD_BATCH:]
        inline = self._inline
        if inline is not None and self._tables.ready and _without_events(batch):
            if inline.write([message for message, _, _ in batch]):
                for _, _, waiter in batch:
                    waiter.callback(None)
                if inline.checkpoint_due():
                    self._checkpoint()
                return
        self._recording = True
        self._record_now(batch).addBoth(self._records_written, batch)

    def _checkpoint(self) -> None:
        """Copy what the inline records added to the log into the database file, in the pool."""

        def work(conn: Any, dialect: Dialect) -> None:
            query_rows(conn, "PRAGMA wal_checkpoint(PASSIVE)")

        self._run(work).addErrback(
            lambda failure: log.warn("outbox: a checkpoint of the state database failed ({e})", e=type(failure.value).__name__)
        )

    def _records_written(self, result: Any, batch: list[tuple[NewMessage, Sequence[Any], Deferred[None]]]) -> None:
        self._recording = False
        if isinstance(result, Failure) and len(batch) > 1:
            for entry in batch:
                self._record_now([entry]).chainDeferred(entry[2])
        else:
            for _, _, waiter in batch:
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(None)
        if self._records:
            self._write_records()

    def get(self, message: str, scope: str) -> Deferred[Row | None]:
        """One message's record, within the key's scope."""
        return self._run(lambda conn, dialect: fetch(conn, dialect, message, scope))

    def cancel(self, message: str, scope: str, now: float, keep_until: float) -> Deferred[Row | None]:
        """Cancel a waiting message; the row after (None when it is not there or not cancelable)."""
        return self._run(lambda conn, dialect: cancel(conn, dialect, message, scope, now, keep_until))

    def claim(self, now: float, lease: float, token: str, limit: int) -> Deferred[list[Row]]:
        """Claim due messages and cut-off handovers for this worker."""
        return self._run(lambda conn, dialect: claim_due(conn, dialect, now, lease, token, limit))

    def body(self, message: str, token: str) -> Deferred[bytes | None]:
        """The bytes of a claimed message."""
        return self._run(lambda conn, dialect: fetch_body(conn, dialect, message, token))

    def begin_handover(self, message: str, token: str, now: float) -> Deferred[bool]:
        """Durably mark the handover before it starts."""
        return self._run(lambda conn, dialect: begin_handover(conn, dialect, message, token, now))

    def settle(self, row: Row, token: str, outcome: Outcome, events: Sequence[Any] = ()) -> Deferred[bool]:
        """Record an outcome and release the claim, with its webhook events; False when the claim was lost."""

        def work(conn: Any, dialect: Dialect) -> bool:
            with transaction(conn, dialect):
                done = settle(conn, dialect, row, token, outcome)
                if done:
                    self._events(conn, dialect, events)
            return done

        return self._run(work)

    def release(self, message: str, token: str, retry_at: float) -> Deferred[None]:
        """Give a claim back unchanged."""
        return self._run(lambda conn, dialect: release(conn, dialect, message, token, retry_at))

    def with_postfix(self, message_id: str) -> Deferred[list[Row]]:
        """Messages postfix holds under a Message-ID."""
        return self._run(lambda conn, dialect: with_postfix(conn, dialect, message_id))

    def update_fates(
        self, row: Row, fates: Mapping[str, RecipientFate], status: Status, now: float, keep: float, events: Sequence[Any] = ()
    ) -> Deferred[bool]:
        """Record fates read from postfix's log, with the webhook events of a changed status."""

        def work(conn: Any, dialect: Dialect) -> bool:
            with transaction(conn, dialect):
                done = update_fates(conn, dialect, row, fates, status, now, keep)
                if done:
                    self._events(conn, dialect, events)
            return done

        return self._run(work)

    def watched(self) -> Deferred[list[str]]:
        """Message-IDs whose postfix log lines matter to the outbox."""
        return self._run(lambda conn, dialect: watched(conn, dialect))

    def purge(self, now: float) -> Deferred[int]:
        """Delete expired records."""
        return self._run(lambda conn, dialect: purge(conn, dialect, now))

    def ping(self) -> Deferred[None]:
        """Fire when the state database answers and holds the table."""
        return self._run(lambda conn, dialect: None)

    def close(self) -> None:
        """Close the pool."""
        self._runner.close()
