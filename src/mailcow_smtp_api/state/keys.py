"""Send keys and embedded rate limits in the sidecar's own ``--state-db`` database.

Two tables beside the idempotency records, created on first use:

- ``smtpapi_send_keys``: one row per send key, holding its public id, login, scope and a keyed hash
  of its secret (never the secret);
- ``smtpapi_ratelimits``: mailcow-style limits (``"100 / 1h"``) per mailbox or domain, the limit
  source when the sidecar runs without mailcow's Redis.

The blocking functions serve the admin command and the service's thread pool alike; ``KeyStore``
wraps them in Deferreds for the service. Lookups are cached for ``--db-cache-ttl`` seconds, which
is also how long a disabled or deleted key keeps working.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred

from ..mailcow.cache import TtlCache
from ..mailcow.db import MARIADB, Dialect, MailcowDatabase, driver_errors, query_rows
from ..core.ratelimit import Limit, parse_limit
from ..core.sendkeys import SendKey
from .store import TablesOnFirstUse, execute

T = TypeVar("T")

KEYS_TABLE = "smtpapi_send_keys"
LIMITS_TABLE = "smtpapi_ratelimits"

_MARIADB_TABLES = (
    f"""CREATE TABLE IF NOT EXISTS {KEYS_TABLE} (
  key_id CHAR(12) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
  login VARCHAR(255) NOT NULL,
  salt CHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
  digest CHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
  senders TEXT NOT NULL,
  rate VARCHAR(32) NULL,
  allow_from VARCHAR(1024) NOT NULL,
  expires_at DOUBLE NULL,
  disabled TINYINT NOT NULL DEFAULT 0,
  created_at DOUBLE NOT NULL
) ENGINE=InnoDB""",
    f"""CREATE TABLE IF NOT EXISTS {LIMITS_TABLE} (
  subject VARCHAR(255) NOT NULL PRIMARY KEY,
  value VARCHAR(32) NOT NULL
) ENGINE=InnoDB""",
)
_SQLITE_TABLES = (
    f"""CREATE TABLE IF NOT EXISTS {KEYS_TABLE} (
  key_id TEXT NOT NULL PRIMARY KEY,
  login TEXT NOT NULL,
  salt TEXT NOT NULL,
  digest TEXT NOT NULL,
  senders TEXT NOT NULL,
  rate TEXT,
  allow_from TEXT NOT NULL,
  expires_at REAL,
  disabled INTEGER NOT NULL DEFAULT 0,
  created_at REAL NOT NULL
)""",
    f"""CREATE TABLE IF NOT EXISTS {LIMITS_TABLE} (
  subject TEXT NOT NULL PRIMARY KEY,
  value TEXT NOT NULL
)""",
)
_KEY_COLUMNS = "key_id, login, salt, digest, senders, rate, allow_from, expires_at, disabled, created_at"


def create_tables(conn: Any, dialect: Dialect) -> None:
    """Create both tables unless they exist."""
    for statement in _MARIADB_TABLES if dialect is MARIADB else _SQLITE_TABLES:
        execute(conn, dialect, statement)


def _key(row: tuple[Any, ...]) -> SendKey:
    key_id, login, salt, digest, senders, rate, allow_from, expires, disabled, created = row
    return SendKey(
        key_id=str(key_id),
        login=str(login),
        salt=str(salt),
        digest=str(digest),
        senders=tuple(s for s in str(senders or "").split(",") if s),
        rate=None if rate is None else str(rate),
        allow_from=str(allow_from or ""),
        expires_at=None if expires is None else float(expires),
        disabled=int(disabled) == 1,
        created_at=float(created),
    )


def fetch_key(conn: Any, dialect: Dialect, key_id: str) -> SendKey | None:
    """The send key with this id, or None."""
    with driver_errors():
        rows = query_rows(conn, dialect.params(f"SELECT {_KEY_COLUMNS} FROM {KEYS_TABLE} WHERE key_id = :id"), {"id": key_id})
    return _key(rows[0]) if rows else None


def list_keys(conn: Any, dialect: Dialect) -> list[SendKey]:
    """Every send key, oldest first."""
    with driver_errors():
        rows = query_rows(conn, f"SELECT {_KEY_COLUMNS} FROM {KEYS_TABLE} ORDER BY created_at, key_id")
    return [_key(row) for row in rows]


def insert_key(conn: Any, dialect: Dialect, key: SendKey) -> None:
    """Store a new send key."""
    params = {
        "key_id": key.key_id,
        "login": key.login,
        "salt": key.salt,
        "digest": key.digest,
        "senders": ",".join(key.senders),
        "rate": key.rate,
        "allow_from": key.allow_from,
        "expires_at": key.expires_at,
        "disabled": int(key.disabled),
        "created_at": key.created_at,
    }
    marks = ", ".join(f":{name}" for name in params)
    execute(conn, dialect, f"INSERT INTO {KEYS_TABLE} ({', '.join(params)}) VALUES ({marks})", params)


def set_disabled(conn: Any, dialect: Dialect, key_id: str, disabled: bool) -> bool:
    """Disable (or enable again) a key; False when there is no such key."""
    sql = f"UPDATE {KEYS_TABLE} SET disabled = :d WHERE key_id = :id"
    changed = execute(conn, dialect, sql, {"d": int(disabled), "id": key_id})
    # MariaDB counts only rows whose value changed: ask whether the key exists at all.
    return changed == 1 or fetch_key(conn, dialect, key_id) is not None


def delete_key(conn: Any, dialect: Dialect, key_id: str) -> bool:
    """Delete a key; False when there is no such key."""
    return execute(conn, dialect, f"DELETE FROM {KEYS_TABLE} WHERE key_id = :id", {"id": key_id}) == 1


def set_limit(conn: Any, dialect: Dialect, subject: str, limit: Limit) -> None:
    """Set (or replace) the limit of a mailbox or domain."""
    params = {"subject": subject.lower(), "value": limit.text}
    execute(conn, dialect, f"DELETE FROM {LIMITS_TABLE} WHERE subject = :subject", params)
    execute(conn, dialect, f"INSERT INTO {LIMITS_TABLE} (subject, value) VALUES (:subject, :value)", params)


def delete_limit(conn: Any, dialect: Dialect, subject: str) -> bool:
    """Remove the limit of a mailbox or domain; False when it had none."""
    return execute(conn, dialect, f"DELETE FROM {LIMITS_TABLE} WHERE subject = :s", {"s": subject.lower()}) == 1


def list_limits(conn: Any, dialect: Dialect) -> list[tuple[str, str]]:
    """Every (subject, limit text), by subject."""
    with driver_errors():
        rows = query_rows(conn, f"SELECT subject, value FROM {LIMITS_TABLE} ORDER BY subject")
    return [(str(subject), str(value)) for subject, value in rows]


def fetch_limits(conn: Any, dialect: Dialect, login: str, domain: str) -> tuple[Limit | None, Limit | None]:
    """The limits of ``login`` and of ``domain``, as the embedded limit source."""
    sql = dialect.params(f"SELECT subject, value FROM {LIMITS_TABLE} WHERE subject IN (:login, :domain)")
    with driver_errors():
        rows = dict(query_rows(conn, sql, {"login": login.lower(), "domain": domain.lower()}))
    return parse_limit(rows.get(login.lower())), parse_limit(rows.get(domain.lower()))


class KeyStore:
    """The service's reads of send keys and embedded limits, cached for ``ttl`` seconds.

    Failures (the state database down or slow) arrive as ``ApiError.of("smtp_db_unavailable")``
    from the runner; they are never cached.
    """

    def __init__(self, runner: MailcowDatabase, clock: Any, ttl: float = 5.0, max_entries: int = 10_000) -> None:
        self._runner = runner
        self.dialect = runner.dialect
        self._run = TablesOnFirstUse(runner, create_tables)
        self._cache = TtlCache(clock, ttl, max_entries)

    def send_key(self, key_id: str) -> Deferred[SendKey | None]:
        """The stored key with this id (None when there is none)."""
        return self._cached(("key", key_id), lambda conn: fetch_key(conn, self.dialect, key_id))

    def limits_for(self, login: str, domain: str) -> Deferred[tuple[Limit | None, Limit | None]]:
        """The embedded limits of ``login`` and ``domain``."""
        key = ("limits", f"{login.lower()}\n{domain.lower()}")
        return self._cached(key, lambda conn: fetch_limits(conn, self.dialect, login, domain))

    def _cached(self, key: tuple[str, str], func: Callable[[Any], T]) -> Deferred[T]:
        return self._cache.get_or_fetch(key, lambda: self._run(func))

    def close(self) -> None:
        """Close the pool."""
        self._runner.close()
