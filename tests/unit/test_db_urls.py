"""The --db URL forms and mailcow.conf's DB* environment fallback."""

from __future__ import annotations

import pytest

from mailcow_smtp_api.core.config import default_db_url
from mailcow_smtp_api.core.config import mailcow_db_url as url_from_environ
from mailcow_smtp_api.mailcow.db import MysqlUrl, SqliteUrl, parse_db_url


@pytest.mark.parametrize(
    ("url", "parsed"),
    [
        ("sqlite:smtpapi.sqlite", SqliteUrl("smtpapi.sqlite")),
        ("sqlite:/var/lib/smtpapi/db.sqlite", SqliteUrl("/var/lib/smtpapi/db.sqlite")),
        ("sqlite:///var/lib/smtpapi/db.sqlite", SqliteUrl("/var/lib/smtpapi/db.sqlite")),
        ("mysql://mailcow:pw@mysql-mailcow:3306/mailcow", MysqlUrl("mailcow", "pw", "mailcow", "mysql-mailcow", 3306)),
        ("mysql://mailcow@127.0.0.1/mailcow", MysqlUrl("mailcow", "", "mailcow", "127.0.0.1", 3306)),
        ("mysql://u:p%40ss%2Fw@[::1]:3307/db", MysqlUrl("u", "p@ss/w", "db", "::1", 3307)),
        (
            "mysql://u:p@/mailcow?unix_socket=/var/run/mysqld/mysqld.sock",
            MysqlUrl("u", "p", "mailcow", "localhost", 3306, "/var/run/mysqld/mysqld.sock"),
        ),
    ],
)
def test_parse_db_url(url: str, parsed: object) -> None:
    """Each accepted form parses to its parts, the userinfo percent-decoded."""
    assert parse_db_url(url) == parsed


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:",
        "sqlite::memory:",
        "postgres://u:p@h/db",
        "mysql://host/db",
        "mysql://u:p@host",
        "mysql://u:p@host/a/b",
        "mysql://u:p@/db",
        "mysql://u:p@host:notaport/db",
        "mysql://u:p@host/db?ssl=1",
    ],
)
def test_bad_urls_are_refused(url: str) -> None:
    """Malformed URLs raise ValueError with a reason that never echoes the password."""
    with pytest.raises(ValueError) as caught:
        parse_db_url(url)
    assert ":p@" not in str(caught.value)


def test_mysql_url_hides_its_password() -> None:
    """Neither repr nor the redacted form contains the password."""
    url = parse_db_url("mysql://mailcow:TopSecret@mysql-mailcow:3306/mailcow")
    assert "TopSecret" not in repr(url)
    assert url.redacted() == "mysql://mailcow:***@mysql-mailcow:3306/mailcow"


def test_url_from_mailcow_environment() -> None:
    """DBNAME/DBUSER/DBPASS (and DBHOST) from mailcow.conf make a MariaDB URL; no DBNAME, none."""
    env = {"DBNAME": "mailcow", "DBUSER": "mailcow", "DBPASS": "p@ss:word"}
    assert url_from_environ(env) == "mysql://mailcow:p%40ss%3Aword@mysql-mailcow:3306/mailcow"
    assert parse_db_url(url_from_environ(env) or "") == MysqlUrl("mailcow", "p@ss:word", "mailcow", "mysql-mailcow", 3306)
    socket_env = dict(env, DBHOST="/var/run/mysqld/mysqld.sock")
    parsed = parse_db_url(url_from_environ(socket_env) or "")
    assert isinstance(parsed, MysqlUrl) and parsed.unix_socket == "/var/run/mysqld/mysqld.sock"
    assert url_from_environ({"DBUSER": "x"}) is None


def test_default_db_url_order() -> None:
    """SMTPAPI_DB wins, then mailcow's DB* names, then the embedded database."""
    assert default_db_url({"SMTPAPI_DB": "sqlite:/x", "DBNAME": "m"}) == "sqlite:/x"
    assert default_db_url({"DBNAME": "m", "DBPASS": "p"}).startswith("mysql://mailcow:p@mysql-mailcow:3306/m")
    assert default_db_url({}) == "sqlite:smtpapi.sqlite"
