"""Helpers for the database tests: the test MariaDB's address, state loaders, scratch databases.

Imported by tests/db/conftest.py (fixtures) and by the tests themselves.
"""

from __future__ import annotations

import os
import socket
import sqlite3
from collections.abc import Sequence
from typing import Any

import attrs
import pymysql
import pytest

from mailcow_smtp_api.core import schema
from mailcow_smtp_api.core.senders import DbState

MARIADB_HOST = os.environ.get("SMTPAPI_TEST_MARIADB_HOST", "127.0.0.1")
MARIADB_PORT = int(os.environ.get("SMTPAPI_TEST_MARIADB_PORT", "3306"))
MARIADB_USER = os.environ.get("SMTPAPI_TEST_MARIADB_USER", "root")
MARIADB_PASSWORD = os.environ.get("SMTPAPI_TEST_MARIADB_PASSWORD", "")

STATE_TABLES = ("domain", "mailbox", "alias", "alias_domain", "sender_acl")


def mariadb_answers() -> bool:
    """True when something accepts TCP connections on the test MariaDB address."""
    try:
        with socket.create_connection((MARIADB_HOST, MARIADB_PORT), timeout=1):
            return True
    except OSError:
        return False


def require_mariadb() -> None:
    """Fail in CI, skip elsewhere, when MariaDB does not answer."""
    if mariadb_answers():
        return
    message = f"MariaDB does not answer on {MARIADB_HOST}:{MARIADB_PORT}"
    if os.environ.get("CI"):
        pytest.fail(message + " (CI is set: a skip would hide a broken install)")
    pytest.skip(message)


def state_rows(state: DbState) -> list[tuple[str, dict[str, Any]]]:
    """The rows of a state as (table, row) pairs, with the NOT NULL columns the rule does not read."""
    rows: list[tuple[str, dict[str, Any]]] = []
    rows += [("domain", attrs.asdict(d)) for d in state.domains]
    for box in state.mailboxes:
        row = attrs.asdict(box)
        row["attributes"] = box.attributes if box.attributes is not None else "{}"
        row["password"] = "{BLF-CRYPT}unused"
        rows.append(("mailbox", row))
    rows += [("alias", attrs.asdict(a)) for a in state.aliases]
    rows += [("alias_domain", attrs.asdict(a)) for a in state.alias_domains]
    rows += [("sender_acl", attrs.asdict(a)) for a in state.sender_acl]
    return rows


def load_state(conn: Any, state: DbState, placeholder: str) -> None:
    """Replace the contents of the rule's tables with ``state`` (``placeholder``: ``?`` or ``%s``)."""
    cursor = conn.cursor()
    for table in STATE_TABLES:
        cursor.execute(f"DELETE FROM {table}")
    for table, row in state_rows(state):
        cols = ", ".join(row)
        marks = ", ".join(placeholder for _ in row)
        cursor.execute(f"INSERT INTO {table} ({cols}) VALUES ({marks})", tuple(row.values()))
    cursor.close()
    conn.commit()


@attrs.define
class ScratchMariaDb:
    """A scratch MariaDB database with mailcow's tables, and an admin connection to fill it."""

    name: str
    admin: Any

    @property
    def url(self) -> str:
        """The --db URL of this database."""
        auth = f"{MARIADB_USER}:{MARIADB_PASSWORD}" if MARIADB_PASSWORD else MARIADB_USER
        return f"mysql://{auth}@{MARIADB_HOST}:{MARIADB_PORT}/{self.name}"

    def load(self, state: DbState) -> None:
        """Replace the rule's tables with ``state``."""
        load_state(self.admin, state, "%s")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one statement as the admin user; its rows."""
        with self.admin.cursor() as cursor:
            cursor.execute(sql, params)
            return list(cursor.fetchall())


def admin_connection(database: str | None = None) -> Any:
    return pymysql.connect(
        host=MARIADB_HOST,
        port=MARIADB_PORT,
        user=MARIADB_USER,
        password=MARIADB_PASSWORD,
        database=database,
        charset="utf8mb4",
        autocommit=True,
        connect_timeout=5,
    )


def sqlite_memory_db() -> sqlite3.Connection:
    """An in-memory SQLite database with the embedded schema (for fast property tests)."""
    conn = sqlite3.connect(":memory:")
    for statement in schema.SQLITE_TABLES:
        conn.execute(statement)
    return conn


def load_sqlite_file(path: str, state: DbState) -> None:
    """Replace the rule's tables of the SQLite file at ``path`` with ``state``."""
    conn = sqlite3.connect(path)
    try:
        load_state(conn, state, "?")
    finally:
        conn.close()
