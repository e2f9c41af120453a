"""The operator's configuration: built once from options and environment, validated, then frozen.

Every option ``--name`` can also be given as the environment variable ``SMTPAPI_NAME`` (upper case,
dashes as underscores); the command line wins. Pure core.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping

import attrs

from .model import Security, SmtpTarget

DEFAULT_PORTS = (25, 465, 587, 588)
_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?")


class ConfigError(ValueError):
    """A bad option value; the message is one line saying which option and why."""


@attrs.frozen
class RedisUrl:
    """Where mailcow's Redis answers. The password never appears in repr."""

    host: str
    port: int = 6379
    password: str | None = attrs.field(default=None, repr=False)
    db: int = 0

    def redacted(self) -> str:
        """The URL with the password masked, for logs."""
        auth = ":***@" if self.password else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"redis://{auth}{host}:{self.port}/{self.db}"


def parse_redis_url(value: str, option: str = "redis") -> RedisUrl:
    """``redis://[:PASSWORD@]HOST[:PORT][/DB]`` (mailcow: ``redis://:REDISPASS@redis-mailcow:6379/0``)."""
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(value.strip())
    if parts.scheme != "redis" or not parts.hostname:
        raise ConfigError(f"--{option} must look like redis://:PASSWORD@HOST:PORT/DB")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ConfigError(f"--{option}: the port is not a number 1-65535") from None
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ConfigError(f"--{option}: the database after the host must be a number, e.g. /0")
    password = unquote(parts.password) if parts.password is not None else None
    return RedisUrl(host=_host(parts.hostname, option), port=port, password=password or None, db=int(path or 0))


_PREFIX = re.compile(r"[a-z][a-z0-9_.-]{0,30}:")


def redis_master_url(environ: Mapping[str, str], read: RedisUrl | None) -> RedisUrl | None:
    """Where writes and PUBLISH go when mailcow's Redis is a replica (``REDIS_SLAVEOF_IP``/``_PORT``):
    the master, with the same password and database."""
    host = environ.get("REDIS_SLAVEOF_IP", "").strip()
    if read is None or not host:
        return None
    port = _int(environ.get("REDIS_SLAVEOF_PORT", "").strip() or "6379", "redis-master", 1, 65535)
    return attrs.evolve(read, host=_host(host, "redis-master"), port=port)


@attrs.frozen
class Config:
    """Validated settings of one sidecar process."""

    listen: str = "tcp:8080:interface=127.0.0.1"
    db: str = "sqlite:smtpapi.sqlite"
    smtp_host: str = "postfix-mailcow"
    smtp_port: int = 587
    smtp_allow: Mapping[tuple[str, int], Security] = attrs.field(factory=dict)
    smtp_ca: str | None = None
    smtp_tls_name: str | None = None
    smtp_tls_verify: bool = True
    smtp_timeout: float = 30.0
    max_request_bytes: int = 30 * 1024 * 1024
    request_timeout: float = 300.0
    max_recipients: int = 100
    max_attachments: int = 50
    max_batch: int = 100
    trusted_proxies: tuple[str, ...] = ()
    port25_no_password_from: tuple[str, ...] = ()
    local_auth_threads: int = 4
    metrics_listen: str | None = None
    log_format: str = "text"
    state_db: str = "sqlite:smtpapi-state.sqlite"
    smtp_pool_size: int = 50
    smtp_pool_max_age: float = 300.0
    smtp_max_connections: int = 50
    db_cache_ttl: float = 5.0
    idempotency_ttl: float = 24 * 3600.0
    redis: RedisUrl | None = None
    redis_master: RedisUrl | None = None
    redis_prefix: str = "smtpapi:"
    redis_timeout: float = 2.0
    # The EHLO name; None: the machine's fully qualified name, found when the process is wired.
    smtp_helo: str | None = None
    outbox_max_messages: int = 10_000
    outbox_max_bytes: int = 1024 * 1024 * 1024
    outbox_lifetime: float = 24 * 3600.0
    max_schedule: float = 7 * 24 * 3600.0
    status_ttl: float = 7 * 24 * 3600.0
    postfix_log: str | None = None  # None, "redis" or "file:PATH"
    webhook_url: str | None = None
    webhook_secret: str | None = attrs.field(default=None, repr=False)
    webhook_allow_hosts: tuple[str, ...] = ()
    webhook_timeout: float = 10.0

    @property
    def default_target(self) -> SmtpTarget:
        """Where a request that names no smtp_host/smtp_port goes."""
        target = self.allowed_target(self.smtp_host, self.smtp_port)
        return target if target is not None else SmtpTarget(self.smtp_host, self.smtp_port)

    @property
    def plain_target(self) -> SmtpTarget | None:
        """Where a send key without a password submits: the default target if it is plain, else
        the default host's plain port 25, else the first plain entry of --smtp-allow; None if none is."""
        default = self.default_target
        if default.security is Security.PLAIN:
            return default
        plain = [(host, port) for (host, port), mode in self.smtp_allow.items() if mode is Security.PLAIN]
        if (self.smtp_host, 25) in plain:
            return SmtpTarget(self.smtp_host, 25, Security.PLAIN)
        plain.sort(key=lambda entry: (entry[0] != self.smtp_host, entry))
        return SmtpTarget(plain[0][0], plain[0][1], Security.PLAIN) if plain else None

    def allowed_target(self, host: str, port: int) -> SmtpTarget | None:
        """The target for ``host:port`` with its security mode, or None when the operator does not allow it."""
        security = self.smtp_allow.get((host.lower(), port))
        return None if security is None else SmtpTarget(host.lower(), port, security)


# option name -> default as text, used by the twistd Options and by ``from_options``.
_DEFAULTS = Config()
OPTION_DEFAULTS: dict[str, str | None] = {
    "listen": _DEFAULTS.listen,
    "db": None,  # None: SMTPAPI_DB, then mailcow's DBHOST/DBUSER/DBPASS/DBNAME, then sqlite:smtpapi.sqlite
    "smtp-host": _DEFAULTS.smtp_host,
    "smtp-port": str(_DEFAULTS.smtp_port),
    "smtp-allow": None,  # None: the default host on ports 25, 465, 587, 588
    "smtp-ca": None,
    "smtp-tls-name": None,
    "smtp-timeout": str(_DEFAULTS.smtp_timeout),
    "max-request-bytes": str(_DEFAULTS.max_request_bytes),
    "request-timeout": str(int(_DEFAULTS.request_timeout)),
    "max-recipients": str(_DEFAULTS.max_recipients),
    "max-attachments": str(_DEFAULTS.max_attachments),
    "max-batch": str(_DEFAULTS.max_batch),
    "trusted-proxies": "",
    "port25-no-password-from": "",
    "local-auth-threads": str(_DEFAULTS.local_auth_threads),
    "metrics-listen": None,
    "log-format": _DEFAULTS.log_format,
    "state-db": _DEFAULTS.state_db,
    "smtp-pool-size": str(_DEFAULTS.smtp_pool_size),
    "smtp-pool-max-age": str(int(_DEFAULTS.smtp_pool_max_age)),
    "smtp-max-connections": str(_DEFAULTS.smtp_max_connections),
    "db-cache-ttl": str(int(_DEFAULTS.db_cache_ttl)),
    "idempotency-ttl": str(int(_DEFAULTS.idempotency_ttl)),
    "redis": None,
    "redis-master": None,  # None: REDIS_SLAVEOF_IP/REDIS_SLAVEOF_PORT from mailcow.conf, else --redis itself
    "redis-prefix": _DEFAULTS.redis_prefix,
    "redis-timeout": str(int(_DEFAULTS.redis_timeout)),
    "smtp-helo": None,
    "outbox-max-messages": str(_DEFAULTS.outbox_max_messages),
    "outbox-max-bytes": str(_DEFAULTS.outbox_max_bytes),
    "outbox-lifetime": str(int(_DEFAULTS.outbox_lifetime)),
    "max-schedule": str(int(_DEFAULTS.max_schedule)),
    "status-ttl": str(int(_DEFAULTS.status_ttl)),
    "postfix-log": None,
    "webhook-url": None,
    "webhook-secret": None,
    "webhook-allow-hosts": "",
    "webhook-timeout": str(int(_DEFAULTS.webhook_timeout)),  # None: MAILCOW_HOSTNAME from the environment, else the machine's FQDN
}
FLAGS = ("smtp-tls-no-verify",)


def env_name(option: str) -> str:
    """``smtp-host`` -> ``SMTPAPI_SMTP_HOST``."""
    return "SMTPAPI_" + option.upper().replace("-", "_")


def _host(value: str, option: str) -> str:
    value = value.strip().lower()
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if not _HOST.fullmatch(value) or len(value) > 253:
        raise ConfigError(f"--{option}: {value!r} is not a host name or IP address")
    return value.rstrip(".")


def _int(value: str, option: str, low: int, high: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"--{option}: {value!r} is not a whole number") from None
    if not low <= number <= high:
        raise ConfigError(f"--{option}: {number} is outside {low}..{high}")
    return number


def _float(value: str, option: str, low: float, high: float) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"--{option}: {value!r} is not a number") from None
    if not low <= number <= high:
        raise ConfigError(f"--{option}: {number} is outside {low}..{high}")
    return number


def parse_allow(value: str | None, default_host: str) -> dict[tuple[str, int], Security]:
    """``host[:port][/mode]`` entries separated by commas or spaces -> allowed targets and their security.

    A bare host means ports 25, 465, 587, 588. IPv6 addresses with a port are written ``[::1]:587``.
    ``mode`` is ``plain``, ``starttls`` or ``tls``; without it the port decides as on mailcow
    (25 plain, 465 implicit TLS, any other STARTTLS).
    """
    if value is None or not value.strip():
        return {(default_host, port): Security.for_port(port) for port in DEFAULT_PORTS}
    allowed: dict[tuple[str, int], Security] = {}
    for item in re.split(r"[,\s]+", value.strip()):
        if not item:
            continue
        entry, _, mode = item.partition("/")
        match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?", entry)
        if match:
            host, port_text = match.group(1), match.group(2)
        elif entry.count(":") == 1:
            host, port_text = entry.split(":")
        else:
            host, port_text = entry, None
        host = _host(host, "smtp-allow")
        ports = DEFAULT_PORTS if port_text is None else (_int(port_text, "smtp-allow", 1, 65535),)
        if mode and port_text is None:
            raise ConfigError(f"--smtp-allow: {item!r}: a /mode needs an explicit port")
        for port in ports:
            allowed[(host, port)] = _security(mode, port, item)
    return allowed


def _security(mode: str, port: int, item: str) -> Security:
    if not mode:
        return Security.for_port(port)
    try:
        return Security(mode.lower())
    except ValueError:
        raise ConfigError(f"--smtp-allow: {item!r}: mode must be plain, starttls or tls") from None


def parse_networks(value: str, option: str) -> tuple[str, ...]:
    """IP addresses or CIDR networks separated by commas or spaces, normalised."""
    out: list[str] = []
    for entry in re.split(r"[,\s]+", value.strip()):
        if not entry:
            continue
        try:
            out.append(str(ipaddress.ip_network(entry, strict=False)))
        except ValueError:
            raise ConfigError(f"--{option}: {entry!r} is not an IP address or network") from None
    return tuple(out)


MAILCOW_DB_HOST = "mysql-mailcow"
DEFAULT_DB = "sqlite:smtpapi.sqlite"


def mailcow_db_url(environ: Mapping[str, str]) -> str | None:
    """A MariaDB URL from mailcow.conf's names (DBNAME, DBUSER, DBPASS, DBHOST), or None without DBNAME.

    DBHOST defaults to ``mysql-mailcow`` (mailcow's database container); a DBHOST starting with
    ``/`` is the server's unix socket (mailcow's containers use /var/run/mysqld/mysqld.sock).
    """
    from urllib.parse import quote

    name = environ.get("DBNAME")
    if not name:
        return None
    user = quote(environ.get("DBUSER", "mailcow"), safe="")
    password = quote(environ.get("DBPASS", ""), safe="")
    host = environ.get("DBHOST", MAILCOW_DB_HOST)
    if host.startswith("/"):
        return f"mysql://{user}:{password}@/{quote(name, safe='')}?unix_socket={quote(host)}"
    port = environ.get("DBPORT", "3306")
    netloc = f"[{host}]" if ":" in host else host
    return f"mysql://{user}:{password}@{netloc}:{port}/{quote(name, safe='')}"


def default_db_url(environ: Mapping[str, str]) -> str:
    """The database when no ``--db`` is given: SMTPAPI_DB, then mailcow's DB* names, then embedded SQLite."""
    return environ.get(env_name("db")) or mailcow_db_url(environ) or DEFAULT_DB


def resolve_text(options: Mapping[str, object], environ: Mapping[str, str]) -> dict[str, str | None]:
    """Each option's text: command line first, then SMTPAPI_* in the environment, then the default."""
    out: dict[str, str | None] = {}
    for name, default in OPTION_DEFAULTS.items():
        given = options.get(name)
        if given is not None:
            out[name] = str(given)
        else:
            out[name] = environ.get(env_name(name), default)
    if out["db"] is None:
        out["db"] = default_db_url(environ)
    return out


def helo_name(value: str, option: str = "smtp-helo") -> str:
    """An EHLO argument (RFC 5321 4.1.1.1): a host name, or an IP address as an address literal."""
    value = value.strip()
    try:
        address = ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        return _host(value, option)
    return f"[IPv6:{address}]" if address.version == 6 else f"[{address}]"


def _flag(options: Mapping[str, object], environ: Mapping[str, str], name: str) -> bool:
    if options.get(name):
        return True
    return environ.get(env_name(name), "").strip().lower() in ("1", "true", "yes", "on")


def _postfix_log(value: str | None, have_redis: bool) -> str | None:
    """``redis`` (mailcow's POSTFIX_MAILLOG, needs --redis) or ``file:PATH``; empty is none."""
    value = (value or "").strip()
    if not value:
        return None
    if value == "redis":
        if not have_redis:
            raise ConfigError("--postfix-log redis needs --redis")
        return value
    if value.startswith("file:") and len(value) > len("file:"):
        return value
    raise ConfigError("--postfix-log must be redis or file:PATH")


def _webhook_url(value: str | None, allowed_hosts: tuple[str, ...]) -> str | None:
    """An https:// URL, or http(s) to a host in --webhook-allow-hosts; never caller input."""
    from urllib.parse import urlsplit

    value = (value or "").strip()
    if not value:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.username or parts.password:
        raise ConfigError("--webhook-url must be an https:// URL without credentials in it")
    host = parts.hostname.lower()
    if parts.scheme != "https" and host not in allowed_hosts:
        raise ConfigError("--webhook-url: plain http:// only to a host listed in --webhook-allow-hosts")
    return value


def from_options(options: Mapping[str, object], environ: Mapping[str, str] | None = None) -> Config:
    """Build and validate the configuration; raise ConfigError with a one-line reason."""
    environ = os.environ if environ is None else environ
    text = resolve_text(options, environ)
    smtp_host = _host(text["smtp-host"] or "", "smtp-host")
    smtp_port = _int(text["smtp-port"] or "", "smtp-port", 1, 65535)
    allow = parse_allow(text["smtp-allow"], smtp_host)
    if (smtp_host, smtp_port) not in allow:
        raise ConfigError(f"--smtp-allow must include the default target {smtp_host}:{smtp_port}")
    ca = text["smtp-ca"] or None
    if ca is not None and not os.path.isfile(ca):
        raise ConfigError(f"--smtp-ca: no such file {ca!r}")
    tls_name = text["smtp-tls-name"] or None
    if tls_name is not None:
        tls_name = _host(tls_name, "smtp-tls-name")
    db = (text["db"] or "").strip()
    if not (db.startswith("sqlite:") or db.startswith("mysql://")):
        raise ConfigError("--db must be sqlite:PATH or mysql://USER:PASS@HOST:PORT/NAME")
    state_db = (text["state-db"] or "").strip()
    if not state_db.startswith(("sqlite:", "mysql://")):
        raise ConfigError("--state-db must be sqlite:PATH or mysql://USER:PASS@HOST:PORT/NAME")
    if state_db == db:
        raise ConfigError("--state-db must not be the --db database: the sidecar never writes to mailcow's database")
    log_format = (text["log-format"] or "text").strip().lower()
    if log_format not in ("text", "json"):
        raise ConfigError("--log-format must be text or json")
    metrics_listen = (text["metrics-listen"] or "").strip() or None
    listen = (text["listen"] or "").strip()
    if not listen:
        raise ConfigError("--listen must be a Twisted endpoint description such as tcp:8080")
    redis_text = (text["redis"] or "").strip()
    redis = parse_redis_url(redis_text) if redis_text else None
    redis_master: RedisUrl | None
    if (text["redis-master"] or "").strip():
        if redis is None:
            raise ConfigError("--redis-master needs --redis")
        redis_master = parse_redis_url(text["redis-master"] or "", "redis-master")
    else:
        redis_master = redis_master_url(environ, redis)
    prefix = (text["redis-prefix"] or "").strip()
    if not _PREFIX.fullmatch(prefix):
        # Lower case keeps it apart from mailcow's own keys (RL_VALUE, F2B_*, rspamd's RL buckets).
        raise ConfigError("--redis-prefix must be lower-case letters, digits, '_', '.', '-' ending in ':' (e.g. smtpapi:)")
    webhook_hosts = tuple(_host(h, "webhook-allow-hosts") for h in re.split(r"[,\s]+", (text["webhook-allow-hosts"] or "").strip()) if h)
    webhook_url = _webhook_url(text["webhook-url"], webhook_hosts)
    webhook_secret = (text["webhook-secret"] or "").strip() or None
    if webhook_url is not None and (webhook_secret is None or len(webhook_secret) < 16):
        raise ConfigError("--webhook-url needs --webhook-secret of at least 16 characters (the HMAC-SHA256 key)")
    return Config(
        redis=redis,
        redis_master=redis_master,
        redis_prefix=prefix,
        redis_timeout=_float(text["redis-timeout"] or "", "redis-timeout", 0.1, 60.0),
        listen=listen,
        db=db,
        smtp_host=smtp_host,
        smtp_port=smtp_port,
        smtp_allow=allow,
        smtp_ca=ca,
        smtp_tls_name=tls_name,
        smtp_tls_verify=not _flag(options, environ, "smtp-tls-no-verify"),
        smtp_timeout=_float(text["smtp-timeout"] or "", "smtp-timeout", 1.0, 3600.0),
        max_request_bytes=_int(text["max-request-bytes"] or "", "max-request-bytes", 1024, 1024**3),
        request_timeout=_float(text["request-timeout"] or "", "request-timeout", 1.0, 3600.0),
        max_recipients=_int(text["max-recipients"] or "", "max-recipients", 1, 10000),
        max_attachments=_int(text["max-attachments"] or "", "max-attachments", 0, 10000),
        max_batch=_int(text["max-batch"] or "", "max-batch", 1, 1000),
        trusted_proxies=parse_networks(text["trusted-proxies"] or "", "trusted-proxies"),
        port25_no_password_from=parse_networks(text["port25-no-password-from"] or "", "port25-no-password-from"),
        local_auth_threads=_int(text["local-auth-threads"] or "", "local-auth-threads", 1, 64),
        metrics_listen=metrics_listen,
        log_format=log_format,
        state_db=state_db,
        smtp_pool_size=_int(text["smtp-pool-size"] or "", "smtp-pool-size", 0, 1000),
        smtp_pool_max_age=_float(text["smtp-pool-max-age"] or "", "smtp-pool-max-age", 1.0, 3600.0),
        smtp_max_connections=_int(text["smtp-max-connections"] or "", "smtp-max-connections", 1, 1000),
        db_cache_ttl=_float(text["db-cache-ttl"] or "", "db-cache-ttl", 0.0, 300.0),
        # At least a minute (a retry must find its record), at most a year.
        idempotency_ttl=_float(text["idempotency-ttl"] or "", "idempotency-ttl", 60.0, 365 * 24 * 3600.0),
        smtp_helo=_helo_option(text["smtp-helo"], environ),
        outbox_max_messages=_int(text["outbox-max-messages"] or "", "outbox-max-messages", 1, 10_000_000),
        outbox_max_bytes=_int(text["outbox-max-bytes"] or "", "outbox-max-bytes", 1024 * 1024, 1024**4),
        outbox_lifetime=_float(text["outbox-lifetime"] or "", "outbox-lifetime", 60.0, 30 * 24 * 3600.0),
        max_schedule=_float(text["max-schedule"] or "", "max-schedule", 0.0, 365 * 24 * 3600.0),
        status_ttl=_float(text["status-ttl"] or "", "status-ttl", 60.0, 365 * 24 * 3600.0),
        postfix_log=_postfix_log(text["postfix-log"], redis is not None),
        webhook_url=webhook_url,
        webhook_secret=webhook_secret,
        webhook_allow_hosts=webhook_hosts,
        webhook_timeout=_float(text["webhook-timeout"] or "", "webhook-timeout", 1.0, 300.0),
    )


def _helo_option(given: str | None, environ: Mapping[str, str]) -> str | None:
    """--smtp-helo, else mailcow.conf's MAILCOW_HOSTNAME (the name postfix's certificate and DNS
    know the server by), else None: the wiring then asks the machine for its FQDN."""
    if given and given.strip():
        return helo_name(given)
    hostname = environ.get("MAILCOW_HOSTNAME", "").strip()
    return helo_name(hostname, "smtp-helo (from MAILCOW_HOSTNAME)") if hostname else None
