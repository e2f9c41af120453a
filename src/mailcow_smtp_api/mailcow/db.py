"""mailcow's database: API keys and the sender rule, over MariaDB (read-only) or embedded SQLite.

The only module that imports pymysql, sqlite3 and twisted.enterprise.adbapi. It holds:

- the ``--db`` URL (``mysql://USER:PASS@HOST:PORT/NAME``, ``mysql://USER:PASS@/NAME?unix_socket=PATH``,
  ``sqlite:PATH``) and mailcow.conf's ``DBHOST``/``DBUSER``/``DBPASS``/``DBNAME`` fallback;
- the SQL of mailcow's sender login map in both dialects (it must agree with ``core/senders.py`` for
  every database state; the tests check that);
- blocking functions over one DB-API connection, shared by the service's adbapi pool and by the
  admin command;
- ``MailcowDatabase``, the Deferred-returning interface the service uses. Every database failure
  (down, timeout, lost connection, missing table) reaches the caller as
  ``ApiError.of("smtp_db_unavailable")`` within ``timeout`` seconds.

The sidecar never writes to MariaDB: its sessions are ``READ ONLY`` and the write helpers refuse
anything but the embedded SQLite database.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import attrs
import pymysql  # type: ignore[import-untyped]
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..core import schema
from ..core.apikeys import ApiKey, authenticate, normalise_key
from ..core.errors import API_AUTH_FAILED, ApiError
from ..core.model import LoginCredentials
from ..core.readiness import SafeReason
from ..core.senders import (
    Domain,
    Grant,
    LookupKey,
    Mailbox,
    OwnerLookup,
    SenderDecision,
    decide,
    grants_from_rows,
    login_problem,
    resolve_owners,
)

log = Logger()
T = TypeVar("T")



# --------------------------------------------------------------------------- URLs


@attrs.frozen
class SqliteUrl:
    """The embedded database file."""

    path: str

    def redacted(self) -> str:
        """The URL for logs."""
        return f"sqlite:{self.path}"


@attrs.frozen
class MysqlUrl:
    """A MariaDB server (TCP or unix socket). The password never appears in repr."""

    user: str
    password: str = attrs.field(repr=False)
    database: str
    host: str = "127.0.0.1"
    port: int = 3306
    unix_socket: str | None = None

    def redacted(self) -> str:
        """The URL for logs, without the password."""
        where = f"?unix_socket={self.unix_socket}" if self.unix_socket else ""
        host = "" if self.unix_socket else (f"[{self.host}]" if ":" in self.host else self.host) + f":{self.port}"
        return f"mysql://{self.user}:***@{host}/{self.database}{where}"


DbUrl = SqliteUrl | MysqlUrl


def parse_db_url(url: str) -> DbUrl:
    """Parse a ``--db`` value; raise ``ValueError`` with a one-line reason (never echoing a password)."""
    url = url.strip()
    if url.startswith("sqlite:"):
        path = url[len("sqlite:") :]
        path = path.removeprefix("//")  # sqlite:///abs/path and sqlite://rel both mean the path after //
        if not path or path == ":memory:":
            # An in-memory database would be a different, empty one in every pooled connection.
            raise ValueError("sqlite: needs a file path, e.g. sqlite:/var/lib/smtpapi/smtpapi.sqlite")
        return SqliteUrl(path)
    if not url.startswith("mysql://"):
        raise ValueError("expected sqlite:PATH or mysql://USER:PASS@HOST:PORT/NAME")
    return _parse_mysql_url(url)


def _parse_mysql_url(url: str) -> MysqlUrl:
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        raise ValueError("mysql:// needs USER[:PASS]@ before the host")
    database = unquote(parts.path.lstrip("/"))
    if not database or "/" in database:
        raise ValueError("mysql:// needs the database name as the path: mysql://USER:PASS@HOST:PORT/NAME")
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - {"unix_socket"})
    if unknown:
        raise ValueError(f"mysql:// has unknown option(s): {', '.join(unknown)} (only unix_socket)")
    socket_path = query.get("unix_socket", [None])[-1] or None
    try:
        port = parts.port or 3306
    except ValueError:
        raise ValueError("mysql:// has an invalid port") from None
    host = parts.hostname or ""
    if not host and not socket_path:
        raise ValueError("mysql:// needs a host, or ?unix_socket=PATH")
    return MysqlUrl(
        user=unquote(parts.username or ""),
        password=unquote(parts.password or ""),
        database=database,
        host=host or "localhost",
        port=port,
        unix_socket=socket_path,
    )


# --------------------------------------------------------------------------- SQL in two dialects


@attrs.frozen
class Dialect:
    """How one SQL text differs between MariaDB and SQLite."""

    name: str
    collate: str  # appended to a compared column: SQLite's NOCASE, or nothing (general_ci already)

    def concat(self, *parts: str) -> str:
        """String concatenation (SQLite 3.40 has no CONCAT; MariaDB's ``||`` means OR)."""
        return " || ".join(parts) if self.name == "sqlite" else f"CONCAT({', '.join(parts)})"

    def params(self, sql: str) -> str:
        """Turn ``:name`` placeholders into this driver's style."""
        return sql if self.name == "sqlite" else re.sub(r":(\w+)", r"%(\1)s", sql)


MARIADB = Dialect("mariadb", "")
SQLITE = Dialect("sqlite", " COLLATE NOCASE")


def owner_sql(d: Dialect) -> str:
    """mailcow's sender login map for one key (:k = %s, :u = %u, :d = %d), with provenance.

    Mirrors ``mysql_virtual_sender_acl.cf`` part by part (see core/senders.py): A picks one alias row
    (exact address, else the catch-all, both with active IN (1,2) and sender_allowed = 1) and keeps
    it only if active = 1, sender_allowed = 1 and its domain is an active domain or alias domain; B
    keeps mailcow's ``a OR b OR c OR d OR e AND f`` precedence; C maps alias domains to mailboxes.
    """
    ci = d.collate
    at_d = d.concat("'@'", ":d")
    return d.params(
        f"""SELECT 'alias', a.goto, a.address FROM alias a
 WHERE a.id = COALESCE(
     (SELECT x.id FROM alias x WHERE x.address{ci} = :k AND x.active IN (1, 2) AND x.sender_allowed = 1),
     (SELECT y.id FROM alias y WHERE y.address{ci} = {at_d} AND y.active IN (1, 2) AND y.sender_allowed = 1))
   AND a.active = 1 AND a.sender_allowed = 1
   AND (a.domain{ci} IN (SELECT o.domain FROM domain o WHERE o.domain{ci} = :d AND o.active = 1)
        OR a.domain{ci} IN (SELECT p.alias_domain FROM alias_domain p WHERE p.alias_domain{ci} = :d AND p.active = 1))
UNION ALL
SELECT 'sender_acl', s.logged_in_as, s.send_as FROM sender_acl s
 WHERE s.send_as{ci} = {at_d}
    OR s.send_as{ci} = :k
    OR s.send_as = '*'
    OR s.send_as{ci} IN (SELECT {d.concat("'@'", "t.target_domain")} FROM alias_domain t WHERE t.alias_domain{ci} = :d)
    OR (s.send_as{ci} IN (SELECT {d.concat(":u", "'@'", "t.target_domain")} FROM alias_domain t
                          WHERE t.alias_domain{ci} = :d)
        AND s.logged_in_as{ci} NOT IN (SELECT g.goto FROM alias g WHERE g.address{ci} = :k))
UNION ALL
SELECT 'alias_domain', m.username, ad.alias_domain FROM alias_domain ad
  JOIN mailbox m ON m.username{ci} = {d.concat(":u", "'@'", "ad.target_domain")}
 WHERE ad.alias_domain{ci} = :d AND ad.active = 1 AND m.active IN (1, 2)"""
    )


def login_sql(d: Dialect) -> str:
    """The login's mailbox row and its domain row (the domain row may be missing)."""
    ci = d.collate
    return d.params(
        f"""SELECT m.username, m.domain, m.kind, m.attributes, m.active, o.domain, o.active
  FROM mailbox m LEFT JOIN domain o ON o.domain{ci} = m.domain
 WHERE m.username{ci} = :login"""
    )


def password_sql(d: Dialect) -> str:
    """The mailbox's stored password and authsource, for local verification on port 25."""
    return d.params(f"SELECT password, authsource FROM mailbox WHERE username{d.collate} = :login")


def app_password_sql(d: Dialect) -> str:
    """The login's app passwords that may be used for SMTP (mailcow: active = 1 AND smtp_access = 1)."""
    return d.params(
        f"SELECT password FROM app_passwd WHERE mailbox{d.collate} = :login AND active = 1 AND smtp_access = 1 ORDER BY id"
    )


API_KEYS_SQL = "SELECT api_key, allow_from, skip_ip_check, access, active FROM api WHERE active = 1"

_COLUMNS_SQL = {
    "mariadb": "SELECT TABLE_NAME, COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE()",
    "sqlite": "SELECT m.name, p.name FROM sqlite_master m JOIN pragma_table_info(m.name) p WHERE m.type = 'table'",
}

_SQL: dict[str, dict[str, str]] = {
    d.name: {"owners": owner_sql(d), "login": login_sql(d), "password": password_sql(d), "app": app_password_sql(d)}
    for d in (MARIADB, SQLITE)
}


# --------------------------------------------------------------------------- blocking reads


def query_rows(conn: Any, sql: str, params: Mapping[str, Any] | Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Every row ``sql`` returns on ``conn`` (a DB-API connection of either driver)."""
    cursor = conn.cursor()
    try:
        cursor.execute(sql, params)
        return [tuple(row) for row in cursor.fetchall()]
    finally:
        cursor.close()


def fetch_grants(conn: Any, dialect: Dialect, key: LookupKey) -> tuple[Grant, ...]:
    """The sender login map's values for one key, with provenance."""
    return grants_from_rows(query_rows(conn, _SQL[dialect.name]["owners"], key.params))


def fetch_login(conn: Any, dialect: Dialect, login: str) -> tuple[Mailbox | None, Domain | None]:
    """The login's mailbox row and its domain row."""
    rows = query_rows(conn, _SQL[dialect.name]["login"], {"login": login})
    if not rows:
        return None, None
    username, domain, kind, attributes, active, domain_name, domain_active = rows[0]
    box = Mailbox(username=username, domain=domain, kind=kind or "", attributes=_text(attributes), active=int(active))
    dom = None if domain_name is None else Domain(domain=domain_name, active=int(domain_active))
    return box, dom


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def sender_lookup(conn: Any, dialect: Dialect, sender: str) -> OwnerLookup:
    """postfix's lookup of ``sender`` in the sender login map: full key, then without the ``+tag``."""
    return resolve_owners(sender, lambda key: fetch_grants(conn, dialect, key))


def sender_decision(conn: Any, dialect: Dialect, login: str, sender: str) -> SenderDecision:
    """mailcow's decision for ``login`` sending as ``sender``: the login's validity, then ownership."""
    box, dom = fetch_login(conn, dialect, login)
    return decide(login, sender, sender_lookup(conn, dialect, sender), login_problem(login, box, dom))


def fetch_credentials(conn: Any, dialect: Dialect, login: str) -> LoginCredentials:
    """The login's validity and password hashes (mailbox password only when mailcow itself checks it)."""
    box, dom = fetch_login(conn, dialect, login)
    problem = login_problem(login, box, dom)
    rows = query_rows(conn, _SQL[dialect.name]["password"], {"login": login})
    stored, authsource = (_text(rows[0][0]), str(rows[0][1] or "mailcow")) if rows else (None, "mailcow")
    app_rows = query_rows(conn, _SQL[dialect.name]["app"], {"login": login})
    apps = tuple(text for (value,) in app_rows if (text := _text(value)))
    return LoginCredentials(
        login=login,
        problem=problem,
        # An identity provider (keycloak, OIDC, LDAP) owns the password; the column holds no usable hash.
        password_hash=stored if authsource == "mailcow" and stored else None,
        app_hashes=apps,
        authsource=authsource,
    )


def fetch_api_keys(conn: Any) -> list[ApiKey]:
    """Every active API key row (compared in constant time by the caller, never in SQL)."""
    return [
        ApiKey(
            api_key=str(key),
            allow_from=str(allow_from or ""),
            skip_ip_check=int(skip) == 1,
            access=str(access or ""),
            active=int(active) == 1,
        )
        for key, allow_from, skip, access, active in query_rows(conn, API_KEYS_SQL)
    ]


def schema_problems(conn: Any, dialect: Dialect) -> list[str]:
    """What the database lacks of ``schema.REQUIRED_COLUMNS``, one sentence each; empty when fine."""
    present: dict[str, set[str]] = {}
    for table, column in query_rows(conn, _COLUMNS_SQL[dialect.name]):
        present.setdefault(str(table).lower(), set()).add(str(column).lower())
    problems = []
    for table, columns in schema.REQUIRED_COLUMNS.items():
        if table not in present:
            problems.append(f"missing table {table} (needs columns {', '.join(columns)})")
            continue
        missing = [c for c in columns if c not in present[table]]
        if missing:
            problems.append(f"table {table} lacks column(s) {', '.join(missing)}")
    return problems


def ping(conn: Any, dialect: Dialect) -> None:
    """Make sure a pooled connection works, replacing a MariaDB link the server dropped.

    adbapi cannot do this: without cp_reconnect a pool never recovers after a server restart, and
    with it each pooled connection still fails once. A COM_PING costs one round trip; when it
    fails (restart, KILL, wait_timeout), adbapi's ``reconnect`` closes the dead connection and
    opens a new one, so the real query runs on a live link. A SQLite file needs nothing.
    ``conn`` is adbapi's connection wrapper.
    """
    if dialect is not MARIADB:
        return
    try:
        conn.ping()
    except (pymysql.Error, OSError):
        conn.reconnect()


# --------------------------------------------------------------------------- connections


def create_sqlite_schema(path: str) -> None:
    """Create the embedded database's tables if they do not exist yet."""
    conn = sqlite3.connect(path, timeout=5)
    try:
        with conn:
            for statement in schema.SQLITE_TABLES:
                conn.execute(statement)
    finally:
        conn.close()


def mysql_connect_args(url: MysqlUrl, timeout: float) -> dict[str, Any]:
    """PyMySQL's connect() arguments for ``url``: TCP or unix socket, ``timeout`` on connect, read and
    write, and read-only sessions (a caller that writes, as the state store does, drops init_command)."""
    args: dict[str, Any] = {
        "user": url.user,
        "password": url.password,
        "database": url.database,
        "charset": "utf8mb4",
        "autocommit": True,
        # Every statement of the sidecar's sessions is read-only: it never writes to mailcow.
        "init_command": "SET SESSION TRANSACTION READ ONLY",
        "connect_timeout": timeout,
        "read_timeout": timeout,
        "write_timeout": timeout,
    }
    if url.unix_socket:
        args["unix_socket"] = url.unix_socket
    else:
        args["host"] = url.host
        args["port"] = url.port
    return args


def _sqlite_read_only(conn: Any) -> None:
    conn.execute("PRAGMA query_only = ON")


class _PooledConnection(adbapi.Connection):
    """A pooled connection used in autocommit mode for reads only.

    There is nothing to commit or roll back, so both are no-ops: that saves a round trip per query,
    and a broken link does not log a "Rollback failed" traceback. The ping before each use repairs it.
    """

    def commit(self) -> None:
        """Nothing to commit: autocommit, reads only."""

    def rollback(self) -> None:
        """Nothing to roll back: autocommit, reads only."""


# --------------------------------------------------------------------------- the service's interface


# Calls that may wait for a pooled connection before new ones are refused. A healthy pool answers
# thousands of these small reads within the timeout, so the cap only has to stop a pile-up while
# the database hangs; at 64 a burst of 200 concurrent requests (two reads each) on a healthy
# database had a tenth of them refused with smtp_db_unavailable.
DEFAULT_MAX_PENDING = 512


class MailcowDatabase:
    """Deferred-returning reads of mailcow's database for the HTTP service.

    Each call runs in adbapi's thread pool: ping, query, decide. A call fails with
    ``ApiError.of("smtp_db_unavailable")`` when the database fails, when it does not answer within
    ``timeout`` seconds, or when ``max_pending`` calls are already waiting for it.
    """

    def __init__(
        self,
        pool: Any,
        dialect: Dialect,
        reactor: Any,
        *,
        timeout: float = 5.0,
        max_pending: int = DEFAULT_MAX_PENDING,
        description: str = "",
    ) -> None:
        self._pool = pool
        self._pool.connectionFactory = _PooledConnection
        self.dialect = dialect
        self._reactor = reactor
        self.timeout = timeout
        self.max_pending = max_pending
        self.description = description
        self._pending = 0
        self._closed = False

    def authenticate_key(self, raw_header: str | None, client_ip: str, need_write: bool) -> Deferred[ApiKey]:
        """The API key for an X-API-Key header, or an ``ApiError`` (mailcow's bare ones, or db trouble)."""
        if not normalise_key(raw_header):
            # mailcow ignores a missing or empty header: no key can match, so spare the database.
            return fail(ApiError.mailcow(401, API_AUTH_FAILED))
        rows: Deferred[list[ApiKey]] = self.api_keys()
        return rows.addCallback(lambda keys: authenticate(raw_header, client_ip, need_write, keys))

    def api_keys(self) -> Deferred[list[ApiKey]]:
        """Every active API key row (the caller compares them in constant time)."""
        return self._run(fetch_api_keys)

    def authorize_sender(self, login: str, sender: str) -> Deferred[SenderDecision]:
        """mailcow's decision for ``login`` sending as ``sender``; fails only for database trouble."""
        return self._run(lambda conn: sender_decision(conn, self.dialect, login, sender))

    def sender_has_owner(self, sender: str) -> Deferred[bool]:
        """Fire True when mailcow's sender login map gives ``sender`` any owner at all.

        A ``sender_acl`` row with ``send_as = '*'`` gives every address an owner.
        """
        return self._run(lambda conn: bool(sender_lookup(conn, self.dialect, sender).owners))

    def login_credentials(self, login: str) -> Deferred[LoginCredentials]:
        """The login's validity and password hashes, for verifying a password locally (port 25)."""
        return self._run(lambda conn: fetch_credentials(conn, self.dialect, login))

    def ping(self) -> Deferred[None]:
        """Fire when the database answers (for a readiness check)."""
        return self._run(_select_one)

    def check_schema(self) -> Deferred[list[str]]:
        """Human-readable problems with the schema; an empty list when everything needed is there."""
        return self._run(lambda conn: schema_problems(conn, self.dialect))

    def close(self) -> None:
        """Stop the pool and close its connections."""
        if not self._closed:
            self._closed = True
            self._pool.close()

    def _run(self, func: Callable[[Any], T]) -> Deferred[T]:
        if self._closed or self._pending >= self.max_pending:
            return fail(_unavailable())
        self._pending += 1

        def work(conn: Any) -> T:
            ping(conn, self.dialect)
            return func(conn)

        inner: Deferred[T] = self._pool.runWithConnection(work)
        outer: Deferred[T] = Deferred()

        def settle(result: Any) -> None:
            self._pending -= 1
            if outer.called:
                return  # already answered by the timer
            if isinstance(result, Failure):
                outer.errback(_as_api_error(result))
            else:
                outer.callback(result)

        inner.addBoth(settle)
        # A thread blocked in the driver cannot be interrupted; the caller gets its answer anyway.
        timer = self._reactor.callLater(self.timeout, _time_out, outer, self.timeout)
        outer.addBoth(_cancel_timer, timer)
        return outer


def _select_one(conn: Any) -> None:
    query_rows(conn, "SELECT 1")


def _time_out(outer: Deferred[Any], seconds: float) -> None:
    if not outer.called:
        log.warn("database: no answer within {seconds} s", seconds=seconds)
        err = _unavailable()
        err.__cause__ = SafeReason(f"the database did not answer within {seconds:g} s")
        outer.errback(err)


def _cancel_timer(result: T, timer: Any) -> T:
    if timer.active():
        timer.cancel()
    return result


def _unavailable() -> ApiError:
    return ApiError.of("smtp_db_unavailable", retry_after=5)


def _as_api_error(failure: Failure) -> Failure:
    if failure.check(ApiError):
        return failure
    exc = failure.value
    # Driver messages name the host, user and error number, never the password.
    log.warn("database error: {kind}: {text}", kind=type(exc).__name__, text=str(exc)[:300])
    err = _unavailable()
    err.__cause__ = SafeReason(problem_text(exc))
    return Failure(err)


# MariaDB's error numbers (server errors, and the client's 2xxx) -> what to check.
_DRIVER_PROBLEMS = {
    1044: "database access denied: the user may not use this database (check its GRANTs)",
    1045: "database access denied: check the user and password in --db",
    1049: "unknown database: check the database name in --db",
    1142: "database access denied: a table is not readable by the user (check its GRANTs)",
    1143: "database access denied: a column is not readable by the user (check its GRANTs)",
    1146: "a table is missing (is this mailcow's database?)",
    2002: "cannot connect to the database server's socket",
    2003: "cannot connect to the database server",
    2005: "the database server's host name is not found",
    2006: "the database server closed the connection",
    2013: "the database server closed the connection",
}


def problem_text(exc: BaseException | None) -> str:
    """A database failure in words safe for an unauthenticated reader (``/readyz``): the kind of
    trouble and what to check, without the driver's message (it names the user and the host)."""
    number = exc.args[0] if exc is not None and exc.args and isinstance(exc.args[0], int) else None
    if isinstance(exc, pymysql.Error) and number in _DRIVER_PROBLEMS:
        text = _DRIVER_PROBLEMS[number]
        if number in (2002, 2003) and "refused" in str(exc).lower():
            text += " (connection refused)"
        return text
    if isinstance(exc, sqlite3.Error):
        # SQLite's messages hold no secret ("unable to open database file", "no such table: api").
        return f"SQLite: {exc}"
    return f"database error ({type(exc).__name__})"


def open_database(
    url: str, reactor: Any, *, timeout: float = 5.0, pool_size: int = 5, max_pending: int = DEFAULT_MAX_PENDING
) -> MailcowDatabase:
    """A ``MailcowDatabase`` for a ``--db`` URL; raise ``ValueError`` for a bad URL.

    SQLite: the schema is created on first use and every pooled connection is query-only. MariaDB:
    PyMySQL with connect/read/write timeouts below ``timeout``, read-only sessions, utf8mb4.
    """
    parsed = parse_db_url(url)
    common = {"cp_min": 1, "cp_max": max(1, pool_size), "cp_noisy": False, "cp_reactor": reactor}
    if isinstance(parsed, SqliteUrl):
        create_sqlite_schema(parsed.path)
        pool = adbapi.ConnectionPool(
            "sqlite3",
            parsed.path,
            timeout=timeout,
            check_same_thread=False,
            isolation_level=None,
            cp_openfun=_sqlite_read_only,
            **common,
        )
        dialect = SQLITE
    else:
        driver_timeout = max(1.0, timeout * 0.6)
        pool = adbapi.ConnectionPool(
            "pymysql", cp_reconnect=True, **mysql_connect_args(parsed, driver_timeout), **common
        )
        dialect = MARIADB
    return MailcowDatabase(
        pool, dialect, reactor, timeout=timeout, max_pending=max_pending, description=parsed.redacted()
    )


# --------------------------------------------------------------------------- blocking use (admin command)


class ReadOnlyDatabase(Exception):
    """A write was asked of mailcow's MariaDB, which the sidecar never writes to."""


class Conflict(Exception):
    """A row with the same key exists already."""


class DatabaseFailure(Exception):
    """The database could not be reached or refused a statement; the message is safe to print."""


@contextmanager
def driver_errors() -> Iterator[None]:
    """Turn driver exceptions into ``Conflict`` / ``DatabaseFailure`` so callers need no driver imports."""
    try:
        yield
    except (sqlite3.IntegrityError, pymysql.IntegrityError) as exc:
        raise Conflict(str(exc)) from None
    except (sqlite3.Error, pymysql.Error, OSError) as exc:
        raise DatabaseFailure(f"{type(exc).__name__}: {exc}") from None


class BlockingDatabase:
    """One plain DB-API connection for the admin command: reads on any database, writes on SQLite only."""

    def __init__(self, conn: Any, dialect: Dialect, description: str) -> None:
        self.conn = conn
        self.dialect = dialect
        self.description = description

    @property
    def writable(self) -> bool:
        """True for the embedded database."""
        return self.dialect is SQLITE

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()

    # reads ---------------------------------------------------------------

    def authorize_sender(self, login: str, sender: str) -> SenderDecision:
        """mailcow's decision for ``login`` sending as ``sender``."""
        with driver_errors():
            return sender_decision(self.conn, self.dialect, login, sender)

    def check_schema(self) -> list[str]:
        """Problems with the schema; empty when fine."""
        with driver_errors():
            return schema_problems(self.conn, self.dialect)

    def rows(self, table: str) -> list[dict[str, Any]]:
        """Every row of one of mailcow's tables, as dicts, in a stable order."""
        columns, order = _LISTED[table]
        cols = ", ".join(columns)
        with driver_errors():
            rows = query_rows(self.conn, f"SELECT {cols} FROM {table} ORDER BY {order}")
        return [dict(zip(columns, row)) for row in rows]

    def api_keys(self) -> list[ApiKey]:
        """Every API key row, active or not."""
        sql = "SELECT api_key, allow_from, skip_ip_check, access, active FROM api ORDER BY created, api_key"
        with driver_errors():
            rows = query_rows(self.conn, sql)
        return [
            ApiKey(api_key=k, allow_from=a or "", skip_ip_check=int(s) == 1, access=c, active=int(x) == 1)
            for k, a, s, c, x in rows
        ]

    def exists(self, table: str, column: str, value: str) -> bool:
        """True when ``table.column`` holds ``value`` (case-insensitively)."""
        _check_table(table)
        ci = self.dialect.collate
        sql = self.dialect.params(f"SELECT 1 FROM {table} WHERE {column}{ci} = :v LIMIT 1")
        with driver_errors():
            return bool(query_rows(self.conn, sql, {"v": value}))

    # writes (embedded database only) --------------------------------------

    def insert(self, table: str, row: Mapping[str, Any]) -> None:
        """Insert one row into one of mailcow's tables."""
        self.insert_many([(table, row)])

    def insert_many(self, rows: Iterable[tuple[str, Mapping[str, Any]]]) -> None:
        """Insert rows into mailcow's tables in one transaction."""
        self._require_writable()
        with driver_errors(), self.conn:
            for table, row in rows:
                _check_table(table)
                cols = ", ".join(row)
                marks = ", ".join(f":{c}" for c in row)
                self.conn.execute(f"INSERT INTO {table} ({cols}) VALUES ({marks})", dict(row))

    def delete(self, table: str, where: Mapping[str, Any]) -> int:
        """Delete the rows of ``table`` whose columns equal ``where`` (case-insensitively); the count."""
        return self.delete_many([(table, where)])[0]

    def delete_many(self, deletions: Iterable[tuple[str, Mapping[str, Any]]]) -> list[int]:
        """Several deletes in one transaction; the number of rows each removed."""
        self._require_writable()
        counts = []
        with driver_errors(), self.conn:
            for table, where in deletions:
                _check_table(table)
                cond = " AND ".join(f"{c} COLLATE NOCASE = :{c}" for c in where)
                counts.append(self.conn.execute(f"DELETE FROM {table} WHERE {cond}", dict(where)).rowcount)
        return counts

    def _require_writable(self) -> None:
        if not self.writable:
            raise ReadOnlyDatabase("the sidecar never writes to mailcow's MariaDB; use mailcow's UI or API")


# Tables and columns the admin command lists, and their order.
_LISTED: dict[str, tuple[tuple[str, ...], str]] = {
    "domain": (("domain", "active"), "domain"),
    "mailbox": (("username", "name", "kind", "attributes", "active"), "username"),
    "alias": (("address", "goto", "domain", "active", "sender_allowed"), "address"),
    "alias_domain": (("alias_domain", "target_domain", "active"), "alias_domain"),
    "sender_acl": (("id", "logged_in_as", "send_as", "external"), "logged_in_as, send_as, id"),
}


def _check_table(table: str) -> None:
    # Table and column names are never taken from user input, but say so where the SQL is built.
    if table not in schema.REQUIRED_COLUMNS:
        raise ValueError(f"not one of mailcow's tables: {table}")


def connect_blocking(url: str, *, timeout: float = 5.0) -> BlockingDatabase:
    """A plain connection for the admin command; SQLite's schema is created on first use.

    Raises ``ValueError`` for a bad URL and ``DatabaseFailure`` when the database cannot be opened.
    """
    parsed = parse_db_url(url)
    with driver_errors():
        if isinstance(parsed, SqliteUrl):
            create_sqlite_schema(parsed.path)
            return BlockingDatabase(sqlite3.connect(parsed.path, timeout=timeout), SQLITE, parsed.redacted())
        return BlockingDatabase(pymysql.connect(**mysql_connect_args(parsed, timeout)), MARIADB, parsed.redacted())
