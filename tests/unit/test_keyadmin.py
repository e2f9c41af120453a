"""``smtpapi-admin sendkey`` and ``ratelimit``: keys and limits in the state database, secrets shown once."""

from __future__ import annotations

import io
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from mailcow_smtp_api import cli

from mailcow_smtp_api.state import keys as keystore
from mailcow_smtp_api.keyadmin import parse_expiry
from mailcow_smtp_api.core.sendkeys import parse_token, secret_matches
from mailcow_smtp_api.state.store import SQLITE

from .test_cli import Run


@pytest.fixture
def admin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """smtpapi-admin with a fresh embedded database and state database; example.org, user1, alias shop@."""
    monkeypatch.delenv("SMTPAPI_STATE_DB", raising=False)
    urls = ["--db", f"sqlite:{tmp_path / 'm.sqlite'}", "--state-db", f"sqlite:{tmp_path / 's.sqlite'}"]

    def run(*argv: str, stdin: str = "") -> Run:
        out, err = io.StringIO(), io.StringIO()
        status = cli.main([*urls, *argv], stdin=io.StringIO(stdin), stdout=out, stderr=err)
        return Run(status, out.getvalue(), err.getvalue())

    assert run("domain", "add", "example.org").status == 0
    assert run("mailbox", "add", "user1@example.org", "--password-stdin", "--bcrypt-rounds", "4", stdin="pw1\n").status == 0
    assert run("alias", "add", "shop@example.org", "user1@example.org").status == 0
    return run


def state_rows(tmp_path: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(tmp_path / "s.sqlite") as conn:
        return conn.execute(sql).fetchall()


def test_sendkey_add_prints_the_key_once_and_stores_only_its_hash(admin: Any, tmp_path: Path) -> None:
    """The token goes to stdout once; the state database holds the id, salt and HMAC, never the secret."""
    made = admin("sendkey", "add", "--login", "User1@example.org", "--from", "shop@example.org,user1@example.org",
                 "--rate", "100/1h", "--allow-from", "192.0.2.0/24", "--expires", "2030-01-31")
    assert made.status == 0, made.err
    token = made.out.strip()
    parsed = parse_token(token)
    assert parsed is not None
    key_id, secret = parsed
    dump = "\n".join(str(row) for row in state_rows(tmp_path, f"SELECT * FROM {keystore.KEYS_TABLE}"))
    assert key_id in dump and secret not in dump and token not in dump
    conn = sqlite3.connect(tmp_path / "s.sqlite")
    key = keystore.fetch_key(conn, SQLITE, key_id)
    assert key is not None and secret_matches(key, secret)
    assert (key.login, key.senders, key.rate, key.allow_from) == (
        "user1@example.org", ("shop@example.org", "user1@example.org"), "100 / 1h", "192.0.2.0/24"
    )
    listing = admin("sendkey", "list").out
    assert key_id in listing and "active" in listing and "expires 2030-01-31T00:00:00Z" in listing and secret not in listing


def test_sendkey_add_checks_the_login_and_its_senders(admin: Any) -> None:
    """An unknown mailbox, a sender the login does not own, a bad rate or network: refused, nothing stored."""
    assert admin("sendkey", "add", "--login", "ghost@example.org").status == 1
    refused = admin("sendkey", "add", "--login", "user1@example.org", "--from", "other@example.org")
    assert refused.status == 1 and "may not send as other@example.org" in refused.err
    assert admin("sendkey", "add", "--login", "user1@example.org", "--rate", "lots").status == 2
    assert admin("sendkey", "add", "--login", "user1@example.org", "--allow-from", "nowhere").status == 2
    assert admin("sendkey", "add", "--login", "user1@example.org", "--expires", "soon").status == 2
    assert admin("sendkey", "list").out == ""


def test_sendkey_disable_enable_delete(admin: Any) -> None:
    """A key can be disabled, enabled again and deleted by id; an unknown id fails."""
    key_id = parse_token(admin("sendkey", "add", "--login", "user1@example.org").out.strip())[0]  # type: ignore[index]
    assert admin("sendkey", "disable", key_id).status == 0
    assert "disabled" in admin("sendkey", "list").out
    assert admin("sendkey", "disable", "--enable", key_id).status == 0
    assert "\tactive\t" in admin("sendkey", "list").out
    assert admin("sendkey", "delete", key_id).status == 0
    assert admin("sendkey", "delete", key_id).status == 1
    assert admin("sendkey", "disable", "0123456789ab").status == 1
    assert admin("sendkey", "disable", "not-an-id").status == 2


def test_ratelimit_set_list_delete(admin: Any) -> None:
    """Limits per mailbox or domain are stored in mailcow's form and can be replaced and removed."""
    assert admin("ratelimit", "set", "Example.ORG", "1000/1d").out == "example.org\t1000 / 1d\n"
    assert admin("ratelimit", "set", "user1@example.org", "10 / 1h").status == 0
    assert admin("ratelimit", "set", "user1@example.org", "20 / 1h").status == 0
    assert admin("ratelimit", "list").out == "example.org\t1000 / 1d\nuser1@example.org\t20 / 1h\n"
    assert admin("ratelimit", "set", "user1@example.org", "often").status == 2
    assert admin("ratelimit", "delete", "example.org").status == 0
    assert admin("ratelimit", "delete", "example.org").status == 1
    assert admin("ratelimit", "list").out == "user1@example.org\t20 / 1h\n"


def test_state_db_may_not_be_mailcows_database(tmp_path: Path) -> None:
    """The state database must be another database than --db."""
    url = f"sqlite:{tmp_path / 'same.sqlite'}"
    err = io.StringIO()
    status = cli.main(["--db", url, "--state-db", url, "ratelimit", "list"], stdout=io.StringIO(), stderr=err)
    assert status == 2 and "mailcow's database" in err.getvalue()


def test_expiry_forms() -> None:
    """A bare date means the start of that day in UTC; a time needs its zone."""
    assert parse_expiry("2030-01-31") == 1896048000.0
    assert parse_expiry("2030-01-31T01:00:00Z") == 1896051600.0
    with pytest.raises(cli.UsageError):
        parse_expiry("2030-01-31T01:00:00")


def test_embedded_limits_are_read_for_login_and_domain(tmp_path: Path) -> None:
    """The embedded limit source answers the login's and the domain's limit in one query."""
    conn = sqlite3.connect(tmp_path / "x.sqlite", isolation_level=None)
    keystore.create_tables(conn, SQLITE)
    from mailcow_smtp_api.core.ratelimit import Limit

    keystore.set_limit(conn, SQLITE, "Example.org", Limit(5, 60))
    assert keystore.fetch_limits(conn, SQLITE, "user@example.org", "EXAMPLE.org") == (None, Limit(5, 60))
    keystore.set_limit(conn, SQLITE, "user@example.org", Limit(1, 1))
    assert keystore.fetch_limits(conn, SQLITE, "USER@example.org", "example.org") == (Limit(1, 1), Limit(5, 60))
