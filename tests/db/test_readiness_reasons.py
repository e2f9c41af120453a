"""/readyz's reasons from real database failures: the kind of trouble, never the driver's message."""

from __future__ import annotations

import pytest
import pytest_twisted

from mailcow_smtp_api.mailcow import db
from mailcow_smtp_api.core.readiness import reason
from tests.db.dbtesting import MARIADB_HOST, MARIADB_PORT, ScratchMariaDb

from .test_db_service import _closed_port, _failure_of, _reactor


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    ("url", "wanted"),
    [
        (f"mysql://root:wrong-Secret-9@{MARIADB_HOST}:{MARIADB_PORT}/mysql", "database access denied: check the user and password in --db"),
        (f"mysql://u:wrong-Secret-9@127.0.0.1:{{closed}}/mailcow", "cannot connect to the database server (connection refused)"),
    ],
)
async def test_ping_failures_say_why_without_secrets(url: str, wanted: str, mariadb: ScratchMariaDb) -> None:
    """A wrong password reads "access denied", a closed port "connection refused"; neither reason
    names the password, the user or the host."""
    database = db.open_database(url.replace("{closed}", str(_closed_port())), _reactor(), timeout=5)
    try:
        err = await _failure_of(database.ping())
    finally:
        database.close()
    assert err.code == "smtp_db_unavailable"
    text = reason(err)
    assert text == wanted
    for secret in ("wrong-Secret-9", "root", "127.0.0.1", "'u'"):
        assert secret not in text


@pytest_twisted.ensureDeferred
async def test_an_unknown_database_names_the_option_to_check(mariadb: ScratchMariaDb) -> None:
    """A database name that does not exist is "unknown database", pointing at --db."""
    database = db.open_database(f"mysql://root@{MARIADB_HOST}:{MARIADB_PORT}/no_such_db_here", _reactor(), timeout=5)
    try:
        err = await _failure_of(database.ping())
    finally:
        database.close()
    assert reason(err) == "unknown database: check the database name in --db"
