"""login_credentials on SQLite and MariaDB: validity, the mailbox hash only for mailcow's authsource, app passwords."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import pytest_twisted

from mailcow_smtp_api.mailcow import db
from tests.db.dbtesting import ScratchMariaDb

ROWS: list[tuple[str, tuple[Any, ...]]] = [
    ("INSERT INTO domain (domain, active) VALUES ({p}, {p})", ("example.org", 1)),
    ("INSERT INTO domain (domain, active) VALUES ({p}, {p})", ("off.example", 0)),
    (
        "INSERT INTO mailbox (username, password, local_part, domain, kind, attributes, authsource, active)"
        " VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p}, {p})",
        ("user@example.org", "{BLF-CRYPT}$2y$04$hash-of-user", "user", "example.org", "", '{"smtp_access": "1"}', "mailcow", 1),
    ),
    (
        "INSERT INTO mailbox (username, password, local_part, domain, kind, attributes, authsource, active)"
        " VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p}, {p})",
        ("sso@example.org", "", "sso", "example.org", "", '{"smtp_access": "1"}', "keycloak", 1),
    ),
    (
        "INSERT INTO mailbox (username, password, local_part, domain, kind, attributes, authsource, active)"
        " VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p}, {p})",
        ("x@off.example", "{CLEAR}x", "x", "off.example", "", '{"smtp_access": "1"}', "mailcow", 1),
    ),
    (
        "INSERT INTO app_passwd (mailbox, password, smtp_access, active) VALUES ({p}, {p}, {p}, {p})",
        ("user@example.org", "{CLEAR}app-1", 1, 1),
    ),
    (
        "INSERT INTO app_passwd (mailbox, password, smtp_access, active) VALUES ({p}, {p}, {p}, {p})",
        ("USER@example.org", "{CLEAR}app-no-smtp", 0, 1),
    ),
    (
        "INSERT INTO app_passwd (mailbox, password, smtp_access, active) VALUES ({p}, {p}, {p}, {p})",
        ("user@example.org", "{CLEAR}app-off", 1, 0),
    ),
    (
        "INSERT INTO app_passwd (mailbox, password, smtp_access, active) VALUES ({p}, {p}, {p}, {p})",
        ("sso@example.org", "{CLEAR}app-sso", 1, 1),
    ),
]


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


@pytest.fixture(params=["sqlite", "mariadb"])
def creds_db(request: Any, tmp_path: Any) -> Iterator[db.MailcowDatabase]:
    """The rows above in a database of either kind, opened through the service's interface."""
    if request.param == "sqlite":
        path = str(tmp_path / "creds.sqlite")
        db.create_sqlite_schema(path)
        with sqlite3.connect(path) as conn:
            for sql, args in ROWS:
                conn.execute(sql.format(p="?"), args)
        url = f"sqlite:{path}"
    else:
        scratch: ScratchMariaDb = request.getfixturevalue("mariadb")
        for table in ("app_passwd", "mailbox", "domain"):
            scratch.execute(f"DELETE FROM {table}")
        run: Callable[..., Any] = scratch.execute
        for sql, args in ROWS:
            run(sql.format(p="%s"), args)
        url = scratch.url
    database = db.open_database(url, _reactor())
    yield database
    database.close()


@pytest_twisted.ensureDeferred
async def test_mailbox_with_app_passwords(creds_db: db.MailcowDatabase) -> None:
    """A valid mailcow mailbox gives its hash and only its active SMTP app passwords (login case ignored)."""
    creds = await creds_db.login_credentials("User@Example.org")
    assert creds.problem is None
    assert creds.password_hash == "{BLF-CRYPT}$2y$04$hash-of-user"
    assert creds.app_hashes == ("{CLEAR}app-1",)
    assert creds.authsource == "mailcow"


@pytest_twisted.ensureDeferred
async def test_identity_provider_mailbox_has_no_local_hash(creds_db: db.MailcowDatabase) -> None:
    """An SSO mailbox offers its app passwords only; its password column is not a usable hash."""
    creds = await creds_db.login_credentials("sso@example.org")
    assert (creds.problem, creds.password_hash, creds.app_hashes, creds.authsource) == (
        None,
        None,
        ("{CLEAR}app-sso",),
        "keycloak",
    )


@pytest_twisted.ensureDeferred
async def test_unknown_login_and_inactive_domain_have_problems(creds_db: db.MailcowDatabase) -> None:
    """No mailbox, or a mailbox of an inactive domain, comes back with the reason it may not submit."""
    unknown = await creds_db.login_credentials("nobody@example.org")
    assert unknown.problem is not None and unknown.password_hash is None and unknown.app_hashes == ()
    off = await creds_db.login_credentials("x@off.example")
    assert off.problem is not None and "off.example" in off.problem
