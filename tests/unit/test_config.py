"""Configuration: options, environment, defaults, and one-line errors for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailcow_smtp_api.core.config import ConfigError, from_options, mailcow_db_url, parse_allow
from mailcow_smtp_api.core.model import Security, SmtpTarget


def test_defaults() -> None:
    """Without options the service targets postfix-mailcow:587 and allows its four ports."""
    config = from_options({}, environ={})
    assert config.default_target == SmtpTarget("postfix-mailcow", 587)
    assert set(config.smtp_allow) == {("postfix-mailcow", p) for p in (25, 465, 587, 588)}
    assert config.db == "sqlite:smtpapi.sqlite"
    assert config.smtp_tls_verify is True


def test_environment_fills_options_and_command_line_wins() -> None:
    """SMTPAPI_* variables are read; a command-line value overrides them."""
    env = {"SMTPAPI_SMTP_HOST": "mail.example.org", "SMTPAPI_SMTP_PORT": "465", "SMTPAPI_SMTP_TLS_NO_VERIFY": "1"}
    config = from_options({"smtp-port": "587"}, environ=env)
    assert config.default_target == SmtpTarget("mail.example.org", 587)
    assert config.smtp_tls_verify is False


def test_mailcow_conf_database_names_are_used() -> None:
    """DBHOST/DBUSER/DBPASS/DBNAME from mailcow.conf build the MariaDB URL, quoted."""
    env = {"DBNAME": "mailcow", "DBUSER": "mailcow", "DBPASS": "p@ss:w/rd"}
    assert mailcow_db_url(env) == "mysql://mailcow:p%40ss%3Aw%2Frd@mysql-mailcow:3306/mailcow"
    assert from_options({}, environ=env).db.startswith("mysql://mailcow:")
    assert from_options({"db": "sqlite:x.db"}, environ=env).db == "sqlite:x.db"


def test_allow_list_forms() -> None:
    """Entries are host:port, bare host (four ports) or [v6]:port."""
    allowed = parse_allow("127.0.0.1:10587, Postfix, [::1]:465", "postfix-mailcow")
    assert ("127.0.0.1", 10587) in allowed
    assert ("postfix", 588) in allowed
    assert ("::1", 465) in allowed
    assert ("127.0.0.1", 25) not in allowed


def test_target_allowed_is_exact() -> None:
    """Only listed host/port pairs are allowed; other loopback addresses are not."""
    config = from_options({"smtp-host": "127.0.0.1", "smtp-port": "10587", "smtp-allow": "127.0.0.1:10587"}, environ={})
    assert config.allowed_target("127.0.0.1", 10587) == SmtpTarget("127.0.0.1", 10587, Security.STARTTLS)
    assert config.allowed_target("127.0.0.2", 10587) is None
    assert config.allowed_target("127.0.0.1", 25) is None


def test_allow_entries_may_name_the_security_mode() -> None:
    """host:port/tls and /plain override the port's usual mode; a bad mode is refused."""
    allowed = parse_allow("127.0.0.1:10465/tls,127.0.0.1:10025/PLAIN,127.0.0.1:10587,mail:465", "x")
    assert allowed[("127.0.0.1", 10465)] is Security.TLS
    assert allowed[("127.0.0.1", 10025)] is Security.PLAIN
    assert allowed[("127.0.0.1", 10587)] is Security.STARTTLS
    assert allowed[("mail", 465)] is Security.TLS
    with pytest.raises(ConfigError):
        parse_allow("127.0.0.1:25/ssl", "x")
    with pytest.raises(ConfigError):
        parse_allow("127.0.0.1/tls", "x")


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"smtp-port": "0"}, "--smtp-port"),
        ({"smtp-port": "x"}, "--smtp-port"),
        ({"smtp-host": "bad host"}, "--smtp-host"),
        ({"smtp-allow": "127.0.0.1:99999"}, "--smtp-allow"),
        ({"smtp-allow": "other:25"}, "--smtp-allow must include"),
        ({"smtp-ca": "/nonexistent/ca.pem"}, "--smtp-ca"),
        ({"smtp-timeout": "0"}, "--smtp-timeout"),
        ({"max-request-bytes": "1"}, "--max-request-bytes"),
        ({"db": "postgres://x"}, "--db"),
        ({"trusted-proxies": "10.0.0.0/33"}, "--trusted-proxies"),
        ({"smtp-tls-name": "a b"}, "--smtp-tls-name"),
    ],
)
def test_bad_values_give_one_line_reasons(options: dict[str, str], fragment: str) -> None:
    """Each bad value raises ConfigError naming the option, on one line."""
    with pytest.raises(ConfigError) as info:
        from_options(options, environ={})
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_ca_file_and_tls_name(tmp_path: Path) -> None:
    """An existing CA file and a TLS name are kept."""
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    config = from_options({"smtp-ca": str(ca), "smtp-tls-name": "Mail.Example.org"}, environ={})
    assert (config.smtp_ca, config.smtp_tls_name) == (str(ca), "mail.example.org")


def test_trusted_proxies_are_normalised() -> None:
    """Proxy entries become networks."""
    config = from_options({"trusted-proxies": "172.22.1.1, fd4d:6169:6c63:6f77::/64"}, environ={})
    assert config.trusted_proxies == ("172.22.1.1/32", "fd4d:6169:6c63:6f77::/64")


def test_listeners_get_a_large_backlog_unless_one_is_named() -> None:
    """tcp: and ssl: endpoints get backlog=1024 (bursts of clients); explicit values and unix: stay."""
    from mailcow_smtp_api.tap import with_backlog

    assert with_backlog("tcp:8080:interface=127.0.0.1") == "tcp:8080:interface=127.0.0.1:backlog=1024"
    assert with_backlog("ssl:8443:privateKey=k.pem") == "ssl:8443:privateKey=k.pem:backlog=1024"
    assert with_backlog("tcp:8080:backlog=10") == "tcp:8080:backlog=10"
    assert with_backlog("unix:/run/smtpapi.sock") == "unix:/run/smtpapi.sock"


def test_redis_options() -> None:
    """--redis takes mailcow's URL; the password stays out of repr and the redacted form."""
    config = from_options({"redis": "redis://:s3cret%2Fpw@redis-mailcow:6379/0"}, environ={})
    assert config.redis is not None
    assert (config.redis.host, config.redis.port, config.redis.password, config.redis.db) == (
        "redis-mailcow", 6379, "s3cret/pw", 0
    )
    assert "s3cret" not in repr(config) and "s3cret" not in config.redis.redacted()
    assert config.redis_master is None and config.redis_prefix == "smtpapi:"
    assert from_options({}, environ={}).redis is None


def test_redis_writes_go_to_the_master_of_a_replica() -> None:
    """REDIS_SLAVEOF_IP/PORT (mailcow.conf) send writes and PUBLISH to the master, with the same password."""
    environ = {"REDIS_SLAVEOF_IP": "192.0.2.50", "REDIS_SLAVEOF_PORT": "6380"}
    config = from_options({"redis": "redis://:pw@127.0.0.1:6379/2"}, environ=environ)
    assert config.redis_master is not None
    assert (config.redis_master.host, config.redis_master.port, config.redis_master.password, config.redis_master.db) == (
        "192.0.2.50", 6380, "pw", 2
    )
    explicit = from_options({"redis": "redis://127.0.0.1", "redis-master": "redis://10.0.0.9:7000/0"}, environ=environ)
    assert explicit.redis_master is not None and explicit.redis_master.host == "10.0.0.9"
    assert from_options({}, environ=environ).redis_master is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"redis": "http://redis"}, "--redis must look like"),
        ({"redis": "redis://h:99999"}, "port"),
        ({"redis": "redis://h/x"}, "database"),
        ({"redis-master": "redis://h"}, "--redis-master needs --redis"),
        ({"redis-prefix": "RL"}, "--redis-prefix"),
        ({"redis-prefix": "F2B_:"}, "--redis-prefix"),
        ({"redis-timeout": "0"}, "--redis-timeout"),
    ],
)
def test_bad_redis_options_stop_with_a_reason(options: dict[str, str], message: str) -> None:
    """Each bad Redis setting is a one-line ConfigError naming the option."""
    with pytest.raises(ConfigError, match=message):
        from_options(options, environ={})


def test_plain_target_for_send_keys() -> None:
    """A send key without a password goes to the default target if plain, else port 25, else a plain entry."""
    assert from_options({}, environ={}).plain_target == SmtpTarget("postfix-mailcow", 25, Security.PLAIN)
    named = from_options({"smtp-host": "127.0.0.1", "smtp-port": "10587", "smtp-allow": "127.0.0.1:10587,127.0.0.1:10025/plain"}, environ={})
    assert named.plain_target == SmtpTarget("127.0.0.1", 10025, Security.PLAIN)
    assert from_options({"smtp-port": "587", "smtp-allow": "postfix-mailcow:587"}, environ={}).plain_target is None


@pytest.mark.parametrize(
    ("options", "environ", "wanted"),
    [
        ({}, {}, None),  # the wiring asks the machine for its FQDN
        ({}, {"MAILCOW_HOSTNAME": "mail.example.org"}, "mail.example.org"),
        ({"smtp-helo": "api.example.org"}, {"MAILCOW_HOSTNAME": "mail.example.org"}, "api.example.org"),
        ({}, {"SMTPAPI_SMTP_HELO": "env.example.org", "MAILCOW_HOSTNAME": "mail.example.org"}, "env.example.org"),
        ({"smtp-helo": "192.0.2.7"}, {}, "[192.0.2.7]"),
        ({"smtp-helo": "2001:db8::7"}, {}, "[IPv6:2001:db8::7]"),
    ],
)
def test_the_ehlo_name_is_the_option_else_mailcow_hostname(
    options: dict[str, str], environ: dict[str, str], wanted: str | None
) -> None:
    """--smtp-helo wins, then MAILCOW_HOSTNAME; an IP address becomes an address literal."""
    assert from_options(options, environ=environ).smtp_helo == wanted


@pytest.mark.parametrize("value", ["bad name", "mail_example.org", "-lead.example.org"])
def test_a_bad_ehlo_name_stops_the_start(value: str) -> None:
    """A value that is no host name or address is refused with the option's name."""
    with pytest.raises(ConfigError, match="--smtp-helo"):
        from_options({"smtp-helo": value}, environ={})


def test_without_a_name_the_ehlo_name_is_the_machines_fqdn(monkeypatch: pytest.MonkeyPatch) -> None:
    """With neither option nor MAILCOW_HOSTNAME, the name is socket.getfqdn()'s, or localhost when
    that is no usable host name."""
    from mailcow_smtp_api import tap

    monkeypatch.setattr(tap.socket, "getfqdn", lambda: "host7.example.net")
    assert tap.machine_helo_name() == "host7.example.net"
    monkeypatch.setattr(tap.socket, "getfqdn", lambda: "bad_name")
    assert tap.machine_helo_name() == "localhost"
