"""twistd wiring: ``twistd -n smtpapi [options]``. The only module that takes the global reactor."""

from __future__ import annotations

import secrets
import socket
import sys
from datetime import datetime, timezone
from typing import Any

from twisted.application import service as app_service
from twisted.application import strports
from twisted.application.service import IServiceMaker
from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.python import usage
from twisted.web.server import Site
from zope.interface import implementer

from .core.config import FLAGS, OPTION_DEFAULTS, Config, ConfigError, env_name, from_options, helo_name

log = Logger(namespace="smtpapi")

_HELP = {
    "listen": "Twisted endpoint to serve HTTP on, e.g. tcp:8080:interface=127.0.0.1 or "
    "ssl:8443:privateKey=key.pem:certKey=cert.pem",
    "db": "mailcow database: mysql://USER:PASS@HOST:PORT/NAME, mysql://USER:PASS@/NAME?unix_socket=PATH "
    "or sqlite:PATH. Default: mailcow.conf's DBHOST/DBUSER/DBPASS/DBNAME when DBNAME is set, "
    "else sqlite:smtpapi.sqlite",
    "smtp-host": "postfix host used when a request names none",
    "smtp-port": "postfix port used when a request names none (25 plain, 465 implicit TLS, others STARTTLS)",
    "smtp-allow": "host[:port][/mode] entries (comma separated) a request may name in smtp_host/smtp_port; "
    "a bare host allows ports 25, 465, 587, 588. mode is /plain (no TLS, no AUTH: port 25's way), /starttls "
    "(STARTTLS required before AUTH) or /tls (implicit TLS); without it the port decides (25 plain, 465 tls, "
    "any other starttls), so a non-standard plain or implicit-TLS port needs one, e.g. 10.0.0.5:2525/plain "
    "or [::1]:10465/tls. Default: the --smtp-host on ports 25, 465, 587, 588",
    "smtp-ca": "PEM file of CA certificates that verify postfix's certificate (default: system CAs)",
    "smtp-tls-name": "name postfix's certificate must carry (default: the host connected to)",
    "smtp-timeout": "seconds to wait for each SMTP step",
    "max-request-bytes": "largest request body accepted (413 above). base64 makes a file a third larger, so "
    "the default 31457280 (30 MiB) carries attachments of about 22 MiB in all",
    "request-timeout": "seconds a request may take to arrive whole, from its first line to the last byte of its "
    "body (408 after that, so a client sending a byte now and then cannot hold a connection open)",
    "max-recipients": "most recipients (to+cc+bcc) in one request",
    "max-attachments": "most attachments in one request",
    "max-batch": "most messages in one POST /api/v1/send/batch (1-1000)",
    "trusted-proxies": "IPs/networks whose X-Forwarded-For is believed (e.g. mailcow's nginx); "
    "default: none, the TCP peer is the client",
    "port25-no-password-from": "RISKY: client IPs/networks that may send on a port-25 (plain) target without a "
    "mailbox password; the API key is still required and 'from' must be a local mailbox or alias. "
    "Anyone there with the key can send as any local address. Default: none",
    "local-auth-threads": "threads that verify mailbox passwords for port 25 (bounds the CPU a flood can use)",
    "metrics-listen": "Twisted endpoint serving Prometheus metrics at /metrics, e.g. tcp:9090:interface=127.0.0.1 "
    "(kept off the API's port); default: no metrics endpoint",
    "log-format": "text (one line per event) or json (one JSON object per line)",
    "state-db": "the sidecar's own database for Idempotency-Key records: sqlite:PATH (this instance, or "
    "instances on one host) or mysql://USER:PASS@HOST:PORT/NAME (shared by every instance; not mailcow's "
    "database); its table is created on first use",
    "idempotency-ttl": "seconds an Idempotency-Key and its stored answer are kept",
    "smtp-pool-size": "idle authenticated SMTP sessions kept per target for reuse, all logins together (each "
    "holds one smtpd process; the one idle longest makes room); a session only carries mail of the login and "
    "password it authenticated; 0 opens a new connection for every message",
    "smtp-pool-max-age": "seconds a pooled session is used at most (also how long a password changed in mailcow "
    "keeps working through an open session)",
    "smtp-max-connections": "SMTP sessions in use at once per target; further sends wait for one",
    "db-cache-ttl": "seconds API-key rows, send keys, sender decisions, fail2ban bans and port 25's credential "
    "rows (stored hashes, never passwords) are cached (also the longest a revoked or disabled key, a withdrawn "
    "sender right or a changed mailbox password on port 25 keeps working); 0 asks on every request",
    "redis": "mailcow's Redis, redis://:REDISPASS@redis-mailcow:6379/0: rate limits (RL_VALUE), SMTP allow lists "
    "and fail2ban bans are read there, failed logins published on F2B_CHANNEL, and the sidecar's own buckets kept "
    "under --redis-prefix (shared by replicas). Redis down means 503 smtp_ratelimit_unavailable. Default: none "
    "(limits from the state database, buckets in this process, no fail2ban)",
    "redis-master": "where Redis writes and PUBLISH go when mailcow's Redis is a replica; default: "
    "REDIS_SLAVEOF_IP/REDIS_SLAVEOF_PORT from the environment (mailcow.conf), else --redis itself",
    "redis-prefix": "key prefix of the sidecar's own Redis keys (its rate-limit buckets); lower case, ends in ':'",
    "redis-timeout": "seconds to wait for each Redis answer",
    "smtp-helo": "name the sidecar gives in EHLO: a host name, or an IP address (sent as an address literal). "
    "Default: MAILCOW_HOSTNAME from the environment when set, else the machine's fully qualified name",
    "outbox-max-messages": "most messages the outbox holds (accepted with Prefer: respond-async and not yet handed to "
    "postfix); a full outbox answers 503 smtp_outbox_full with Retry-After",
    "outbox-max-bytes": "most bytes of message data the outbox holds; beyond, 503 smtp_outbox_full",
    "outbox-lifetime": "seconds the outbox keeps trying to hand a message to postfix before it is failed",
    "max-schedule": "how far ahead send_at may lie, in seconds",
    "status-ttl": "seconds a message's status record is kept after its last change",
    "postfix-log": "where delivery results come from: redis (mailcow's POSTFIX_MAILLOG, needs --redis) or "
    "file:PATH (a postfix log file); default: none (status ends at submitted, and a message whose hand-over "
    "was cut off stays unknown)",
    "webhook-url": "operator's URL for delivery events (submitted, delivered, deferred, bounced, failed), signed with "
    "HMAC-SHA256; https:// only, or http:// to a host in --webhook-allow-hosts",
    "webhook-secret": "the HMAC-SHA256 key of webhook signatures (at least 16 characters); needed with --webhook-url",
    "webhook-allow-hosts": "hosts (comma separated) --webhook-url may name with plain http://",
    "webhook-timeout": "seconds to wait for the webhook receiver's answer",
}


class Options(usage.Options):
    """Command-line options; each also read from SMTPAPI_<OPTION> in the environment."""

    synopsis = "[options]"
    longdesc = (
        "Serve POST /api/v1/send/email for mailcow: check the X-API-Key and the mailbox's right to send as "
        "'from' in mailcow's database, then submit the message to postfix. Every option can also be set "
        "as an environment variable SMTPAPI_<OPTION> (for example SMTPAPI_SMTP_HOST); the command line wins."
    )
    optParameters = [
        [name, None, None, f"{_HELP[name]} [env {env_name(name)}" + (f"; default {default}]" if default else "]")]
        for name, default in OPTION_DEFAULTS.items()
    ]
    optFlags = [
        [
            "smtp-tls-no-verify",
            None,
            "do NOT verify postfix's TLS certificate (insecure; logs a warning) [env SMTPAPI_SMTP_TLS_NO_VERIFY=1]",
        ]
    ]

    config: Config

    def postOptions(self) -> None:
        """Validate everything once; a bad value stops the process with one line, not a traceback."""
        given = {name: self[name] for name in OPTION_DEFAULTS}
        given.update({name: self[name] for name in FLAGS})
        try:
            self.config = from_options(given)
        except ConfigError as err:
            raise SystemExit(f"smtpapi: {err}") from None
        if self.parent is not None:
            # twistd builds its log observer from its own --logger option after parsing.
            if self.config.log_format == "json":
                self.parent["logger"] = f"{__name__}.json_logger"
            elif self.parent.get("logger") is None and text_to_stdout(self.parent):
                self.parent["logger"] = f"{__name__}.text_logger"


LISTEN_BACKLOG = 1024
OUTBOX_BATCH = 20  # messages one outbox round hands over at once, each on a session of the outbox's own


def with_backlog(description: str) -> str:
    """A tcp:/ssl: endpoint description with a large accept queue unless it names one.

    Twisted's default backlog of 50 resets connections of a burst of clients before their request
    is read; the kernel caps the value at net.core.somaxconn anyway.
    """
    kind = description.split(":", 1)[0].lower()
    if kind in ("tcp", "tcp6", "ssl") and "backlog=" not in description:
        return f"{description}:backlog={LISTEN_BACKLOG}"
    return description


def machine_helo_name() -> str:
    """The machine's fully qualified name as an EHLO argument; ``localhost`` when it has no usable one."""
    try:
        return helo_name(socket.getfqdn())
    except ConfigError:
        return "localhost"


def json_logger() -> Any:
    """twistd --logger factory: JSON lines on standard output."""
    from .web.logs import json_lines_observer

    return json_lines_observer(sys.stdout)


def text_to_stdout(twistd: Any) -> bool:
    """True when twistd's own options send its text log to standard output: ``-n`` without
    ``--logfile`` or with ``--logfile=-``, and no ``--syslog`` (log files and syslog stay twistd's)."""
    if twistd.get("syslog"):
        return False
    logfile = twistd.get("logfile")
    return logfile == "-" or (bool(twistd.get("nodaemon")) and not logfile)


def text_logger() -> Any:
    """twistd --logger factory: twistd's text lines on standard output, rendered with less work."""
    from .web.logs import text_observer

    return text_observer(sys.stdout)


# glibc's mallopt parameters (malloc.h) and the environment variables that set them at start.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MALLOC_VARIABLES = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
KEEP_FREED_BYTES = 32 * 1024 * 1024


def keep_freed_memory(limit: int = KEEP_FREED_BYTES) -> bool:
    """Have glibc's allocator reuse memory of large messages instead of asking the kernel each time.

    By default glibc maps every allocation over 128 KiB (later: over the largest one freed) fresh
    from the kernel and returns it when freed, and gives the heap's free top back beyond twice
    that. A message of megabytes is held in several copies on its way (the JSON text, the body,
    its encoded bytes), each one fresh pages that the kernel must fault in and zero: on a VM that
    cost more than building the message itself (a 5 MB text body: 28-33 ms to build, 13-16 ms
    with memory up to ``limit`` kept and reused). Freed memory up to ``limit`` bytes stays with the
    process; larger allocations are still mapped and returned at once. Nothing is done where an
    operator set one of glibc's MALLOC_* variables, or where the C library is not glibc. Returns
    whether the limits were set.
    """
    import ctypes
    import os

    if any(name in os.environ for name in _MALLOC_VARIABLES):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, limit)) and bool(mallopt(_M_TRIM_THRESHOLD, limit))


def _now() -> datetime:
    return datetime.now(timezone.utc)


def build_service(config: Config, reactor: Any) -> app_service.MultiService:
    """Wire the database, SMTP client, password checks, throttle, service and HTTP site into one tree."""
    from .abuse import AbuseControls, LocalBuckets
    from .mailcow.cache import CachedDatabase
    from .state.keys import KeyStore
    from .mailcow.db import open_database
    from .mailcow.localauth import LocalPasswordVerifier
    from .mailcow.locallogin import LocalLogin
    from .web.metrics import Metrics, MetricsResource
    from .smtp.pool import SessionPool
    from .core.idempotency import lease_seconds
    from .core.outbox import Limits, outbox_lease
    from .delivery import Outbox
    from .state.outbox import OutboxStore, inline_records
    from .web.later import Later
    from .service import IdempotentSends, SendService
    from .smtp.client import SmtpSubmitter, TlsSettings
    from .state.store import IdempotencyStore, StatePurger, open_state_runner
    from .core.throttle import Throttle
    from .web.api import ApiSite, SmtpApi, channel_factory, request_factory

    if not config.smtp_tls_verify:
        log.warn("TLS certificate verification towards postfix is OFF (--smtp-tls-no-verify): insecure")
    if config.port25_no_password_from:
        log.warn(
            "requests from {networks} may send on port 25 without a mailbox password (--port25-no-password-from)",
            networks=", ".join(config.port25_no_password_from),
        )
    try:
        database = open_database(config.db, reactor)
    except ValueError as err:
        raise SystemExit(f"smtpapi: --db: {err}") from None
    try:
        state_runner = open_state_runner(config.state_db, reactor, mailcow_db=config.db)
    except ValueError as err:
        raise SystemExit(f"smtpapi: --state-db: {err}") from None
    state = IdempotencyStore(state_runner, state_runner.dialect, description=state_runner.description)
    send_keys = KeyStore(state_runner, reactor, ttl=config.db_cache_ttl)
    top = app_service.MultiService()
    cached = CachedDatabase(database, reactor, ttl=config.db_cache_ttl)
    ready_checks: list[tuple[str, Any]] = [("database", database.ping)]
    if config.redis is not None:
        from .mailcow.redisio import MailcowRedis

        redis = MailcowRedis(
            reactor,
            config.redis,
            config.redis_master,
            prefix=config.redis_prefix,
            timeout=config.redis_timeout,
            ban_cache_ttl=config.db_cache_ttl,
        )
        RedisService(redis).setServiceParent(top)
        abuse = AbuseControls(limits=redis, buckets=redis, access=redis, bans=redis, reporter=redis)
        log.info("abuse controls: mailcow's Redis at {redis}", redis=redis.description)
    else:
        abuse = AbuseControls(limits=send_keys, buckets=LocalBuckets(reactor))
        log.info("abuse controls: no --redis; limits from the state database, buckets in this process only")
    StatePurger(state, reactor).setServiceParent(top)
    submitter = SmtpSubmitter(
        reactor,
        TlsSettings(ca_file=config.smtp_ca, server_name=config.smtp_tls_name, verify=config.smtp_tls_verify),
        timeout=config.smtp_timeout,
        helo_name=config.smtp_helo or machine_helo_name(),
    )
    verifier = LocalPasswordVerifier(reactor, config.local_auth_threads, reactor)
    verifier.setServiceParent(top)
    metrics = Metrics()
    pool = SessionPool(
        submitter,
        reactor,
        max_idle_per_target=config.smtp_pool_size,
        max_busy_per_target=config.smtp_max_connections,
        max_age=config.smtp_pool_max_age,
        idle_timeout=min(30.0, config.smtp_pool_max_age),
    )
    metrics.watch_pool(pool)
    PoolService(pool).setServiceParent(top)
    workers = Workers(reactor)
    workers.setServiceParent(top)
    send_service = SendService(
        config=config,
        keys=cached,
        senders=cached,
        submitter=pool,
        offload=workers.run,
        throttle=Throttle(clock=reactor.seconds),
        now=_now,
        new_token=lambda: secrets.token_hex(16),
        local_auth=LocalLogin(cached, verifier),
        abuse=abuse,
        send_keys=send_keys,
    )

    def postfix_ready() -> Any:
        # Greeting, TLS (with certificate checks) and EHLO on the default target; no AUTH, no mail.
        return submitter.open_session(config.default_target, None).addCallback(lambda session: session.quit())

    postfix_log: Any = None
    if config.postfix_log == "redis":
        from .mailcow.postfixlog import RedisLog

        postfix_log = RedisLog(redis, reactor)
    elif config.postfix_log is not None:
        from .mailcow.postfixlog import FileLog

        postfix_log = FileLog(config.postfix_log.removeprefix("file:"), reactor)
    if postfix_log is not None:
        PostfixLogService(postfix_log).setServiceParent(top)
    dispatcher: Any = None
    make_event: Any = None
    enqueue: Any = None
    if config.webhook_url is not None and config.webhook_secret is not None:
        from .core.webhooks import new_event
        from .state.webhooks import WebhookStore, enqueuer
        from .web.webhooks import WebhookDispatcher, webhook_client

        dispatcher = WebhookDispatcher(
            WebhookStore(state_runner),
            config.webhook_url,
            config.webhook_secret,
            reactor,
            webhook_client(reactor),
            config.webhook_timeout,
        )
        dispatcher.setServiceParent(top)
        enqueue = enqueuer(config.outbox_lifetime + config.status_ttl)

        def make_event(name: str, message: Any, now: float) -> Any:
            return new_event(name, message, now, secrets.token_hex(16))

    from .state import webhooks as webhook_tables

    # The outbox hands over at most OUTBOX_BATCH messages at once on sessions of its own: it never
    # waits behind synchronous sends for a session, so a handover never outlasts its lease there.
    outbox_pool = SessionPool(
        submitter,
        reactor,
        max_idle_per_target=min(config.smtp_pool_size, OUTBOX_BATCH),
        max_busy_per_target=OUTBOX_BATCH,
        max_age=config.smtp_pool_max_age,
        idle_timeout=min(30.0, config.smtp_pool_max_age),
    )
    PoolService(outbox_pool).setServiceParent(top)
    inline = inline_records(config.state_db)
    if inline is not None:
        reactor.addSystemEventTrigger("after", "shutdown", inline.close)
    outbox = Outbox(
        store=OutboxStore(state_runner, enqueue=enqueue, more_tables=webhook_tables.create_tables, inline=inline),
        postfix_log=postfix_log,
        make_event=make_event,
        on_events=dispatcher.wake if dispatcher is not None else None,
        submitter=outbox_pool,
        batch=OUTBOX_BATCH,
        clock=reactor,
        new_token=lambda: secrets.token_hex(16),
        limits=Limits(
            max_messages=config.outbox_max_messages,
            max_bytes=config.outbox_max_bytes,
            lifetime=config.outbox_lifetime,
            max_schedule=config.max_schedule,
            status_ttl=config.status_ttl,
        ),
        lease=outbox_lease(config.smtp_timeout),
    )
    OutboxService(outbox, reactor).setServiceParent(top)
    ready_checks += [("postfix", postfix_ready), ("state", state.ping)]
    if config.redis is not None:
        ready_checks.append(("redis", redis.ping))
    api = SmtpApi(
        service=send_service,
        ready_checks=tuple(ready_checks),
        trusted_proxies=config.trusted_proxies,
        clock=reactor.seconds,
        metrics=metrics,
        offload=workers.run,
        idempotency=IdempotentSends(
            store=state,
            now=reactor.seconds,
            new_token=lambda: secrets.token_hex(16),
            ttl=config.idempotency_ttl,
            lease=lease_seconds(config.smtp_timeout, config.max_recipients),
        ),
        outbox=Later(outbox),
    )
    site = ApiSite(api.resource())
    site.trusted_proxies = config.trusted_proxies
    site.requestFactory = request_factory(config.max_request_bytes, config.request_timeout)
    site.protocol = channel_factory  # type: ignore[method-assign]  # a factory callable, as twisted.web sets it
    site.displayTracebacks = False
    SchemaCheck(database, reactor).setServiceParent(top)
    strports.service(with_backlog(config.listen), site, reactor=reactor).setServiceParent(top)
    if config.metrics_listen:
        metrics_site = Site(MetricsResource(metrics))
        metrics_site.displayTracebacks = False
        strports.service(config.metrics_listen, metrics_site, reactor=reactor).setServiceParent(top)
    return top


class Workers(app_service.Service):
    """A small thread pool for CPU work on large messages (JSON and base64 decoding, MIME building)."""

    def __init__(self, reactor: Any, threads: int = 2) -> None:
        from twisted.python.threadpool import ThreadPool

        self.reactor = reactor
        self.pool = ThreadPool(minthreads=0, maxthreads=threads, name="smtpapi-workers")

    def run(self, work: Any) -> Any:
        """Run ``work()`` in the pool; a Deferred with its result."""
        from twisted.internet.threads import deferToThreadPool

        return deferToThreadPool(self.reactor, self.pool, work)

    def startService(self) -> None:
        """Start the threads with the process."""
        super().startService()
        self.pool.start()

    def stopService(self) -> Any:
        """Stop the threads."""
        super().stopService()
        self.pool.stop()


class RedisService(app_service.Service):
    """Disconnects from Redis when the process stops."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis

    def stopService(self) -> Any:
        """Close the connections."""
        super().stopService()
        return self.redis.close()


class PostfixLogService(app_service.Service):
    """Follows postfix's log (a file, or mailcow's Redis list) with the process."""

    def __init__(self, postfix_log: Any) -> None:
        self.postfix_log = postfix_log

    def startService(self) -> None:
        """Begin reading."""
        super().startService()
        self.postfix_log.start()

    def stopService(self) -> Any:
        """Stop reading."""
        super().stopService()
        return self.postfix_log.stop()


class OutboxService(app_service.Service):
    """Runs the outbox: a delivery round every second, the purge of old status records every 5 minutes."""

    def __init__(self, outbox: Any, clock: Any, interval: float = 1.0, purge_interval: float = 300.0) -> None:
        from twisted.internet.task import LoopingCall

        self.outbox = outbox
        self._rounds = LoopingCall(outbox.tick)
        self._rounds.clock = clock
        self._purges = LoopingCall(self._purge)
        self._purges.clock = clock
        self.interval = interval
        self.purge_interval = purge_interval

    def startService(self) -> None:
        """Start delivering (also what an earlier process left in the outbox)."""
        super().startService()
        self._rounds.start(self.interval, now=True)
        self._purges.start(self.purge_interval, now=False)

    def stopService(self) -> Any:
        """Stop starting rounds; a handover in flight finishes or is resolved by the next process."""
        super().stopService()
        for loop in (self._rounds, self._purges):
            if loop.running:
                loop.stop()

    def _purge(self) -> Any:
        d = ensureDeferred(self.outbox.purge())
        return d.addErrback(lambda f: log.warn("outbox: purge failed ({kind})", kind=type(f.value).__name__))


class PoolService(app_service.Service):
    """Starts the SMTP session pool's sweeper with the process and says QUIT to idle sessions at the end."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    def startService(self) -> None:
        """Begin closing expired idle sessions periodically."""
        super().startService()
        self.pool.start()

    def stopService(self) -> Any:
        """QUIT every idle session."""
        super().stopService()
        return self.pool.close()


class SchemaCheck(app_service.Service):
    """At start-up, says clearly what the database lacks; stops the process when tables are missing."""

    def __init__(self, database: Any, reactor: Any) -> None:
        self.database = database
        self.reactor = reactor

    def startService(self) -> None:
        """Run the schema check once the reactor runs."""
        super().startService()
        d = self.database.check_schema()
        d.addCallbacks(self._checked, self._unreachable)

    def _checked(self, problems: list[str]) -> None:
        if problems:
            for problem in problems:
                log.critical("database schema: {problem}", problem=problem)
            log.critical("stopping: the database lacks what the service needs")
            self.reactor.stop()
        else:
            log.info("database schema: ok")

    def _unreachable(self, failure: Any) -> None:
        # Not fatal: requests get smtp_db_unavailable until the database answers.
        log.error("database not reachable at start-up; will keep trying per request")

    def stopService(self) -> Any:
        """Close the database pool."""
        super().stopService()
        self.database.close()


@implementer(IServiceMaker, IPlugin)
class SmtpApiServiceMaker:
    """The ``smtpapi`` twistd plugin."""

    tapname = "smtpapi"
    description = "mailcow send API: POST /api/v1/send/email -> postfix"
    options = Options

    def makeService(self, options: Options) -> app_service.IService:
        """Build the service tree with the running reactor."""
        import gc

        from twisted.internet import reactor

        keep_freed_memory()
        # The start creates about 80,000 objects (modules, classes, functions) that live as long
        # as the process: the collector would walk them again and again, during the start (a
        # sixth of its time) and in every later full collection. It waits until they are all
        # made, and then leaves them out of its collections for good.
        gc.disable()
        try:
            return build_service(options.config, reactor)
        finally:
            gc.freeze()
            gc.enable()


def main() -> None:  # pragma: no cover - convenience for `python -m mailcow_smtp_api.tap`
    """Run ``twistd -n smtpapi`` with this process's arguments."""
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", "-n", "smtpapi", *sys.argv[1:]]
    run()
