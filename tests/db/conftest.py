"""Fixtures for the database tests: a scratch MariaDB database per module, a temporary SQLite path.

A scratch MariaDB database is created per test module with mailcow's column types and collation
(``schema.MARIADB_TABLES``) and dropped afterwards. When 127.0.0.1:3306 does not answer, MariaDB
tests fail if the environment variable CI is set (a skip there would hide a broken install) and
are skipped otherwise. No reactor import here: pytest-twisted installs its own reactor first.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import pytest

from mailcow_smtp_api.core import schema
from tests.db.dbtesting import ScratchMariaDb, admin_connection, require_mariadb


@pytest.fixture(scope="module")
def mariadb() -> Iterator[ScratchMariaDb]:
    """A scratch database for this module, with schema.MARIADB_TABLES; dropped afterwards."""
    require_mariadb()
    name = f"smtpapi_test_{secrets.token_hex(4)}"
    server = admin_connection()
    with server.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci")
    server.close()
    admin = admin_connection(name)
    try:
        with admin.cursor() as cursor:
            for statement in schema.MARIADB_TABLES:
                cursor.execute(statement)
        yield ScratchMariaDb(name=name, admin=admin)
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")
        admin.close()


@pytest.fixture
def sqlite_path(tmp_path: Any) -> str:
    """A path for a new embedded database (created on first use)."""
    return str(tmp_path / "smtpapi.sqlite")
