"""The webhook queue in the sidecar's own ``--state-db`` database: events waiting to be posted.

One table, ``smtpapi_webhook_events``, one row per event. The row holds the exact body that is
signed and posted on every attempt, when the next attempt is due, and until when to keep trying.

- ``enqueue`` adds an event inside the caller's transaction (the outbox stores a status change and
  its event together, or neither); it never commits, begins or creates anything itself, so the
  caller runs ``create_tables`` once beforehand.
- ``claim_due`` hands due events to one dispatcher for ``lease_seconds``: several sidecars share one
  database, and an event is claimed by one of them at a time (``FOR UPDATE SKIP LOCKED`` on MariaDB,
  one guarded UPDATE on SQLite). A dispatcher that dies loses its lease and another takes over.
- ``mark_delivered`` and ``schedule_retry`` end a claim; both need the claim's token, so a dispatcher
  whose lease ran out meanwhile changes nothing.
- ``purge`` deletes delivered and given-up events once they are older than the retention.

Delivery is at least once: a receiver that answers after the lease ran out, or a database that
fails after the POST, means the event is posted again, with the same ``webhook-id``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred

from ..core.webhooks import WebhookEvent, payload
from ..mailcow.db import MARIADB, Dialect, MailcowDatabase, driver_errors, query_rows
from .store import TablesOnFirstUse, execute, transaction

T = TypeVar("T")

TABLE = "smtpapi_webhook_events"
DEFAULT_RETENTION = 7 * 24 * 3600.0  # like --status-ttl's default
MAX_ERROR = 255

# Ids and tokens compare byte for byte (ascii_bin), whatever the server's default collation.
_MARIADB_TABLE = (
    f"""CREATE TABLE IF NOT EXISTS {TABLE} (
  event_id VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
  event_type VARCHAR(16) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
  payload MEDIUMBLOB NOT NULL,
  created_at DOUBLE NOT NULL,
  next_at DOUBLE NOT NULL,
  attempts INT NOT NULL DEFAULT 0,
  lease_token VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NULL,
  lease_until DOUBLE NOT NULL DEFAULT 0,
  delivered_at DOUBLE NULL,
  gave_up_at DOUBLE NULL,
  last_error VARCHAR({MAX_ERROR}) NULL,
  give_up_at DOUBLE NOT NULL,
  PRIMARY KEY (event_id),
  KEY smtpapi_webhook_events_due (delivered_at, gave_up_at, next_at),
  KEY smtpapi_webhook_events_gave_up (gave_up_at)
) ENGINE=InnoDB""",
)
_SQLITE_TABLE = (
    f"""CREATE TABLE IF NOT EXISTS {TABLE} (
  event_id TEXT NOT NULL PRIMARY KEY,
  event_type TEXT NOT NULL,
  payload BLOB NOT NULL,
  created_at REAL NOT NULL,
  next_at REAL NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0,
  lease_token TEXT,
  lease_until REAL NOT NULL DEFAULT 0,
  delivered_at REAL,
  gave_up_at REAL,
  last_error TEXT,
  give_up_at REAL NOT NULL
)""",
    f"CREATE INDEX IF NOT EXISTS smtpapi_webhook_events_due ON {TABLE} (delivered_at, gave_up_at, next_at)",
    f"CREATE INDEX IF NOT EXISTS smtpapi_webhook_events_gave_up ON {TABLE} (gave_up_at)",
)

_DUE = "delivered_at IS NULL AND gave_up_at IS NULL AND next_at <= :now AND lease_until <= :now"
_INSERT = (
    f"INSERT INTO {TABLE} (event_id, event_type, payload, created_at, next_at, attempts, lease_until, give_up_at) "
    "VALUES (:id, :type, :payload, :created_at, :created_at, 0, 0, :give_up_at)"
)
# A second event with the same id is the same event reported again: it is kept once.
_IGNORE_DUPLICATE = {"mariadb": " ON DUPLICATE KEY UPDATE event_id = event_id", "sqlite": " ON CONFLICT (event_id) DO NOTHING"}
_CLAIMED = (
    f"SELECT event_id, payload, attempts FROM {TABLE} WHERE lease_token = :token AND lease_until = :until "
    "ORDER BY next_at, event_id"
)
_HELD = "event_id = :id AND lease_token = :token AND delivered_at IS NULL AND gave_up_at IS NULL"
_DELIVERED = (
    f"UPDATE {TABLE} SET delivered_at = :now, attempts = attempts + 1, last_error = NULL, lease_token = NULL, "
    f"lease_until = 0 WHERE {_HELD}"
)
_RETRY = (
    f"UPDATE {TABLE} SET next_at = :next_at, attempts = attempts + 1, last_error = :error, lease_token = NULL, "
    f"lease_until = 0 WHERE {_HELD} AND :next_at <= give_up_at"
)
_GIVE_UP = (
    f"UPDATE {TABLE} SET gave_up_at = :now, attempts = attempts + 1, last_error = :error, lease_token = NULL, "
    f"lease_until = 0 WHERE {_HELD}"
)
_PURGE = f"DELETE FROM {TABLE} WHERE delivered_at <= :before OR gave_up_at <= :before"
_ROW = (
    f"SELECT event_id, event_type, created_at, next_at, attempts, lease_token, lease_until, delivered_at, "
    f"gave_up_at, last_error, give_up_at FROM {TABLE} WHERE event_id = :id"
)


class Retry(enum.Enum):
    """What ``schedule_retry`` did with a failed attempt."""

    SCHEDULED = "scheduled"  # tried again at next_at
    GAVE_UP = "gave_up"  # next_at would be past give_up_at: no more attempts
    LOST = "lost"  # the claim is not held any more (its lease ran out and another took it)


@attrs.frozen
class QueuedEvent:
    """A row of the queue as stored (for tests and for the admin command)."""

    event_id: str
    event_type: str
    created_at: float
    next_at: float
    attempts: int
    lease_token: str | None
    lease_until: float
    delivered_at: float | None
    gave_up_at: float | None
    last_error: str | None
    give_up_at: float


# --------------------------------------------------------------------------- blocking SQL


def create_tables(conn: Any, dialect: Dialect) -> None:
    """Create the queue table and its indexes unless they exist (outside any transaction)."""
    for statement in _MARIADB_TABLE if dialect is MARIADB else _SQLITE_TABLE:
        execute(conn, dialect, statement)


def enqueue(conn: Any, dialect: Dialect, event: WebhookEvent, give_up_at: float) -> None:
    """Queue ``event``, due at once, to be tried until ``give_up_at``; an event with the same id
    queued before is kept as it is (the same event reported twice is posted once).

    Runs as one INSERT on ``conn`` inside whatever transaction the caller has open: no commit, no
    table creation. ``ValueError`` for a message JSON cannot hold (nothing is written then).
    """
    insert_event(conn, dialect, event, give_up_at)


def insert_event(conn: Any, dialect: Dialect, event: WebhookEvent, give_up_at: float) -> bool:
    """``enqueue``, saying whether the event is new (False: its id was queued already)."""
    params = {
        "id": event.event_id,
        "type": event.type,
        "payload": payload(event),
        "created_at": event.created_at,
        "give_up_at": give_up_at,
    }
    return execute(conn, dialect, _INSERT + _IGNORE_DUPLICATE[dialect.name], params) == 1


def enqueuer(lifetime: float) -> Callable[[Any, Dialect, WebhookEvent], None]:
    """``enqueue`` with ``give_up_at`` = the event's time + ``lifetime`` seconds, for the outbox's hook."""

    def enqueue_event(conn: Any, dialect: Dialect, event: WebhookEvent) -> None:
        enqueue(conn, dialect, event, event.created_at + lifetime)

    return enqueue_event


def claim_due(
    conn: Any, dialect: Dialect, now: float, lease_seconds: float, token: str, limit: int
) -> list[tuple[str, bytes, int]]:
    """Claim up to ``limit`` due events for ``lease_seconds``: (event_id, payload, attempts so far), oldest first.

    Due: not delivered, not given up, ``next_at <= now`` and no live lease. ``token`` must be new
    for each claim; it guards every later change to the claimed rows.
    """
    params = {"now": now, "until": now + lease_seconds, "token": token, "limit": int(limit)}
    lease = f"UPDATE {TABLE} SET lease_token = :token, lease_until = :until WHERE "
    if dialect is MARIADB:
        with transaction(conn, dialect):
            with driver_errors():
                sql = f"SELECT event_id FROM {TABLE} WHERE {_DUE} ORDER BY next_at LIMIT :limit FOR UPDATE SKIP LOCKED"
                ids = [str(row[0]) for row in query_rows(conn, dialect.params(sql), params)]
            if ids:
                marks = ", ".join(f":id{n}" for n in range(len(ids)))
                ids_params = {f"id{n}": event_id for n, event_id in enumerate(ids)}
                execute(conn, dialect, lease + f"event_id IN ({marks}) AND {_DUE}", {**params, **ids_params})
    else:
        # One statement: SQLite runs it under its write lock, so two sidecars never claim one row.
        due_ids = f"SELECT event_id FROM {TABLE} WHERE {_DUE} ORDER BY next_at LIMIT :limit"
        execute(conn, dialect, lease + f"event_id IN ({due_ids}) AND {_DUE}", params)
    with driver_errors():
        rows = query_rows(conn, dialect.params(_CLAIMED), params)
    return [(str(event_id), bytes(body), int(attempts)) for event_id, body, attempts in rows]


def mark_delivered(conn: Any, dialect: Dialect, event_id: str, token: str, now: float) -> bool:
    """Record that the receiver took the event; False when the claim ``token`` is not held any more."""
    return execute(conn, dialect, _DELIVERED, {"id": event_id, "token": token, "now": now}) == 1


def schedule_retry(
    conn: Any, dialect: Dialect, event_id: str, token: str, next_at: float, error: str, now: float
) -> Retry:
    """Record a failed attempt and its ``error``: try again at ``next_at``, or give up when that is
    past the event's ``give_up_at``. Needs the claim ``token``."""
    params = {"id": event_id, "token": token, "next_at": next_at, "error": error[:MAX_ERROR], "now": now}
    if execute(conn, dialect, _RETRY, params) == 1:
        return Retry.SCHEDULED
    if execute(conn, dialect, _GIVE_UP, params) == 1:
        return Retry.GAVE_UP
    return Retry.LOST


def purge(conn: Any, dialect: Dialect, now: float, retention: float = DEFAULT_RETENTION) -> int:
    """Delete events delivered or given up more than ``retention`` seconds before ``now``; how many."""
    return execute(conn, dialect, _PURGE, {"before": now - retention})


def fetch_event(conn: Any, dialect: Dialect, event_id: str) -> QueuedEvent | None:
    """The stored row of ``event_id``, or None."""
    with driver_errors():
        rows = query_rows(conn, dialect.params(_ROW), {"id": event_id})
    if not rows:
        return None
    event_id_, kind, created, next_at, attempts, token, until, delivered, gave_up, error, give_up = rows[0]
    return QueuedEvent(
        event_id=str(event_id_),
        event_type=str(kind),
        created_at=float(created),
        next_at=float(next_at),
        attempts=int(attempts),
        lease_token=None if token is None else str(token),
        lease_until=float(until),
        delivered_at=None if delivered is None else float(delivered),
        gave_up_at=None if gave_up is None else float(gave_up),
        last_error=None if error is None else str(error),
        give_up_at=float(give_up),
    )


# --------------------------------------------------------------------------- the store


class WebhookStore:
    """Deferred-returning operations on the webhook queue, through the state database's pooled runner.

    The table is created on the first call that reaches the database. Failures (the database down
    or slow) arrive as ``ApiError.of("smtp_db_unavailable")`` from the runner.
    """

    def __init__(self, runner: MailcowDatabase) -> None:
        self._runner = runner
        self.dialect = runner.dialect
        self._run = TablesOnFirstUse(runner, create_tables)

    def enqueue(self, event: WebhookEvent, give_up_at: float) -> Deferred[bool]:
        """Queue one event on its own (the outbox queues its events in its own transactions instead);
        fire False when an event with its id was queued already."""
        return self._run(lambda conn: insert_event(conn, self.dialect, event, give_up_at))

    def claim_due(self, now: float, lease_seconds: float, token: str, limit: int) -> Deferred[list[tuple[str, bytes, int]]]:
        """Claim due events for this dispatcher: (event_id, payload, attempts so far)."""
        return self._run(lambda conn: claim_due(conn, self.dialect, now, lease_seconds, token, limit))

    def mark_delivered(self, event_id: str, token: str, now: float) -> Deferred[bool]:
        """Record a delivery; fire False when the claim was lost meanwhile."""
        return self._run(lambda conn: mark_delivered(conn, self.dialect, event_id, token, now))

    def schedule_retry(self, event_id: str, token: str, next_at: float, error: str, now: float) -> Deferred[Retry]:
        """Record a failed attempt; fire with whether it is tried again, given up, or the claim was lost."""
        return self._run(lambda conn: schedule_retry(conn, self.dialect, event_id, token, next_at, error, now))

    def purge(self, now: float, retention: float = DEFAULT_RETENTION) -> Deferred[int]:
        """Delete finished events older than ``retention``; fire with how many."""
        return self._run(lambda conn: purge(conn, self.dialect, now, retention))

    def event(self, event_id: str) -> Deferred[QueuedEvent | None]:
        """The stored row of one event."""
        return self._run(lambda conn: fetch_event(conn, self.dialect, event_id))

    def close(self) -> None:
        """Close the pool."""
        self._runner.close()

