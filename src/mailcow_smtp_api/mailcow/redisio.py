"""mailcow's Redis: its rate limits, SMTP allow lists and fail2ban bans, read; the sidecar's own buckets.

The only module that imports txredisapi. What it touches (mailcow.md section 7), and nothing else:

- reads ``RL_VALUE`` (limits per mailbox or domain), ``SMTP_LIMITED_ACCESS`` and
  ``SMTP_ALLOW_NETS_<login>`` (the per-mailbox SMTP source-IP allow list), ``F2B_ACTIVE_BANS`` and
  ``F2B_PERM_BANS`` (netfilter's bans), and ``POSTFIX_MAILLOG`` (postfix's log, with ``--postfix-log redis``);
- writes only keys under the sidecar's own prefix (``smtpapi:`` by default): its leaky buckets,
  through one Lua script so that every replica sees one bucket. Never rspamd's ``RL*`` buckets:
  mail that later also passes rspamd would be counted twice;
- publishes only on ``F2B_CHANNEL``, the failed-login lines netfilter bans on. Never ``MC_CHANNEL``,
  whose messages restart mailcow's containers.

Writes and PUBLISH go to the master when mailcow runs Redis as a replica (``REDIS_SLAVEOF_IP``):
netfilter subscribes there. Every call has a deadline; a Redis that is down or slow is an
``ApiError`` ``smtp_ratelimit_unavailable`` (fail closed: no limit check, no sending).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

import txredisapi
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..core.apikeys import IPNetwork, parse_ip
from ..core.config import RedisUrl
from ..core.errors import ApiError
from ..core.readiness import SafeReason
from ..core.ratelimit import Decision, Limit, Policy, admitted_as, judge, parse_limit

log = Logger(namespace="smtpapi.redis")

RL_VALUE = "RL_VALUE"
SMTP_LIMITED_ACCESS = "SMTP_LIMITED_ACCESS"
SMTP_ALLOW_NETS = "SMTP_ALLOW_NETS_"
F2B_ACTIVE_BANS = "F2B_ACTIVE_BANS"
F2B_PERM_BANS = "F2B_PERM_BANS"
F2B_CHANNEL = "F2B_CHANNEL"
POSTFIX_MAILLOG = "POSTFIX_MAILLOG"

# KEYS: the buckets. ARGV[1]: recipients to add; then per bucket its size and its window in ms.
# The time is Redis's own, so replicas on hosts whose clocks differ still share one bucket.
# Levels come back as strings: Lua numbers would be truncated to integers in the reply.
TAKE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = tonumber(ARGV[1])
local levels = {}
local fits = true
for i, key in ipairs(KEYS) do
  local size = tonumber(ARGV[2 * i])
  local window = tonumber(ARGV[2 * i + 1])
  local stored = redis.call('HMGET', key, 'level', 'at')
  local level = tonumber(stored[1]) or 0
  local at = tonumber(stored[2]) or now
  if now > at then
    level = math.max(0, level - (now - at) * size / window)
  end
  levels[i] = level
  if level + n > size + 1e-9 then
    fits = false
  end
end
local reply = {fits and 1 or 0}
for i, key in ipairs(KEYS) do
  if fits then
    redis.call('HSET', key, 'level', tostring(levels[i] + n), 'at', tostring(now))
    redis.call('PEXPIRE', key, tonumber(ARGV[2 * i + 1]))
  end
  reply[i + 1] = tostring(levels[i])
end
return reply
"""


def allow_list_fields(ip: str) -> list[str]:
    """The fields rspamd looks up in ``SMTP_ALLOW_NETS_<login>`` for a client: the address itself,
    then its network at every mask from /32 down to /8 (IPv6: /128 down to /32)."""
    address = parse_ip(ip)
    if address is None:
        return []
    longest, shortest = (32, 8) if address.version == 4 else (128, 32)
    fields = [str(address)]
    for bits in range(longest, shortest - 1, -1):
        fields.append(str(ipaddress.ip_network(f"{address}/{bits}", strict=False)))
    return fields


def _ban_networks(entries: dict[Any, Any], now: float, permanent: bool) -> list[tuple[IPNetwork, float | None]]:
    """netfilter's ban fields (an address or ``net/bits``) that are still in force."""
    out: list[tuple[IPNetwork, float | None]] = []
    for field, value in entries.items():
        text = field.decode() if isinstance(field, bytes) else str(field)
        try:
            network = ipaddress.ip_network(text.strip(), strict=False)
        except ValueError:
            continue
        until: float | None = None
        if not permanent:
            try:
                until = float(value)
            except (TypeError, ValueError):
                until = None
            if until is not None and until <= now:
                continue
        out.append((network, until))
    return out


def _safe_reason(exc: BaseException) -> str:
    """Why Redis failed, for /readyz: the kind of trouble and the option to check, no address or secret."""
    text = str(exc)
    if "WRONGPASS" in text or "NOAUTH" in text or "invalid password" in text.lower():
        return "Redis refused the login: check the password in --redis"
    if isinstance(exc, TimeoutError) or isinstance(exc, txredisapi.TimeoutError):
        return "no answer from Redis in time (see --redis-timeout)"
    if isinstance(exc, txredisapi.ConnectionError):
        return "cannot connect to Redis (see --redis)"
    return f"Redis failed ({type(exc).__name__})"


def _unavailable(failure: Failure) -> Failure:
    if failure.check(ApiError):
        return failure
    log.warn("redis: {kind}: {text}", kind=type(failure.value).__name__, text=str(failure.value)[:200])
    err = ApiError.of("smtp_ratelimit_unavailable", retry_after=5)
    err.__cause__ = SafeReason(_safe_reason(failure.value or RuntimeError()))
    return Failure(err)


class MailcowRedis:
    """Deferred-returning operations on mailcow's Redis, each bounded by ``timeout`` seconds."""

    def __init__(
        self,
        reactor: Any,
        read: RedisUrl,
        write: RedisUrl | None = None,
        *,
        prefix: str = "smtpapi:",
        timeout: float = 2.0,
        ban_cache_ttl: float = 5.0,
    ) -> None:
        self.reactor = reactor
        self.prefix = prefix
        self.timeout = timeout
        self.ban_cache_ttl = ban_cache_ttl
        self.description = read.redacted() + (f" (writes: {write.redacted()})" if write else "")
        self._read = self._connect(read)
        self._write = self._connect(write) if write is not None and write != read else self._read
        self._script_sha: str | None = None
        self._bans: tuple[float, list[tuple[IPNetwork, float | None]]] | None = None
        self._ban_waiters: list[Deferred[list[tuple[IPNetwork, float | None]]]] | None = None

    def _connect(self, url: RedisUrl) -> Any:
        return txredisapi.lazyConnectionPool(
            host=url.host,
            port=url.port,
            dbid=url.db,
            poolsize=2,
            reconnect=True,
            password=url.password,
            connectTimeout=self.timeout,
            replyTimeout=self.timeout,
            convertNumbers=False,
        )

    def _bounded(self, d: Deferred[Any]) -> Deferred[Any]:
        """``d``'s result, or ``smtp_ratelimit_unavailable`` after ``timeout`` seconds.

        txredisapi queues commands while it reconnects to a Redis that is down; the caller must not
        wait for that. The command itself is left to finish or fail on its own.
        """
        outer: Deferred[Any] = Deferred()

        def settle(result: Any) -> None:
            if outer.called:
                return
            if isinstance(result, Failure):
                outer.errback(_unavailable(result))
            else:
                outer.callback(result)

        def expire() -> None:
            if not outer.called:
                outer.errback(_unavailable(Failure(TimeoutError(f"no answer within {self.timeout} s"))))

        d.addBoth(settle)
        timer = self.reactor.callLater(self.timeout, expire)

        def stop_timer(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        return outer.addBoth(stop_timer)

    # --------------------------------------------------------------------- reads

    def limits_for(self, login: str, domain: str) -> Deferred[tuple[Limit | None, Limit | None]]:
        """mailcow's limits for the login and for the sender's domain (``RL_VALUE``)."""
        d = self._bounded(self._read.hmget(RL_VALUE, [login.lower(), domain.lower()]))
        return d.addCallback(lambda values: (parse_limit(_text(values[0])), parse_limit(_text(values[1]))))

    async def smtp_allowed(self, login: str, ip: str) -> bool:
        """False when mailcow limits the login's SMTP use to networks that ``ip`` is not in."""
        limited = await self._bounded(self._read.hexists(SMTP_LIMITED_ACCESS, login.lower()))
        if not limited:
            return True
        fields = allow_list_fields(ip)
        if not fields:
            return False
        values = await self._bounded(self._read.hmget(SMTP_ALLOW_NETS + login.lower(), fields))
        return any(_text(value) == "1" for value in values)

    async def ban_for(self, ip: str) -> tuple[bool, int | None]:
        """(banned, seconds until the ban ends; None for a permanent one) for a client address."""
        address = parse_ip(ip)
        if address is None:
            return False, None
        now = self.reactor.seconds()
        if self._bans is None or self.ban_cache_ttl <= 0 or now - self._bans[0] >= self.ban_cache_ttl:
            bans = await self._refresh_bans(now)
        else:
            bans = self._bans[1]
        for network, until in bans:
            if address.version == network.version and address in network:
                return True, None if until is None else max(1, int(until - now + 0.999))
        return False, None

    def _refresh_bans(self, now: float) -> Deferred[list[tuple[IPNetwork, float | None]]]:
        """Read both ban lists once for every request that finds the cache stale at the same time."""
        waiter: Deferred[list[tuple[IPNetwork, float | None]]] = Deferred()
        if self._ban_waiters is None:
            self._ban_waiters = []
            ensureDeferred(self._load_bans(now)).addBoth(self._bans_loaded)
        self._ban_waiters.append(waiter)
        return waiter

    def _bans_loaded(self, result: Any) -> None:
        waiters, self._ban_waiters = self._ban_waiters or [], None
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    async def _load_bans(self, now: float) -> list[tuple[IPNetwork, float | None]]:
        active = await self._bounded(self._read.hgetall(F2B_ACTIVE_BANS))
        permanent = await self._bounded(self._read.hgetall(F2B_PERM_BANS))
        bans = _ban_networks(permanent or {}, now, True) + _ban_networks(active or {}, now, False)
        self._bans = (now, bans)
        return bans

    def maillog(self, count: int) -> Deferred[list[bytes]]:
        """The ``count`` newest entries of ``POSTFIX_MAILLOG`` (postfix's log lines as JSON), newest first."""
        d = self._bounded(self._read.lrange(POSTFIX_MAILLOG, 0, count - 1))
        return d.addCallback(lambda values: [v if isinstance(v, bytes) else str(v).encode("utf-8") for v in values or []])

    # --------------------------------------------------------------------- writes

    def bucket_key(self, policy: Policy) -> str:
        """Where a bucket lives: under the sidecar's prefix, never an rspamd ``RL*`` key."""
        return f"{self.prefix}rl:{policy.key}"

    async def take(self, policies: Sequence[Policy], recipients: int) -> Decision:
        """Charge ``recipients`` to every bucket, all or none, atomically for every replica."""
        keys = [self.bucket_key(p) for p in policies]
        args: list[Any] = [recipients]
        for policy in policies:
            args += [policy.limit.count, policy.limit.window * 1000]
        reply = await self._bounded(ensureDeferred(self._eval(keys, args)))
        levels = [float(_text(value) or 0) for value in reply[1:]]
        decision = judge(policies, levels, recipients)
        admitted = _text(reply[0]) == "1"
        if decision.admitted != admitted:
            # Float rounding at the very edge of a bucket: the script's decision is the one stored.
            decision = admitted_as(decision, admitted, recipients)
        return decision

    async def _eval(self, keys: list[str], args: list[Any]) -> Any:
        if self._script_sha is None:
            self._script_sha = _text(await self._write.script_load(TAKE_SCRIPT))
        try:
            return await self._write.evalsha(self._script_sha, keys, args)
        except txredisapi.ScriptDoesNotExist:
            # Redis restarted (or SCRIPT FLUSH): load it again once.
            self._script_sha = _text(await self._write.script_load(TAKE_SCRIPT))
            return await self._write.evalsha(self._script_sha, keys, args)

    def publish_failure(self, line: str) -> Deferred[None]:
        """Publish one fail2ban line on ``F2B_CHANNEL``; a failure is logged, never raised."""
        d = self._bounded(self._write.publish(F2B_CHANNEL, line))
        return d.addCallbacks(lambda _: None, lambda f: log.warn("redis: fail2ban line not published"))

    # --------------------------------------------------------------------- operations

    def ping(self) -> Deferred[Any]:
        """Fire when Redis answers (both ends, when writes go to a master)."""
        d = self._bounded(self._read.ping())
        if self._write is not self._read:
            d.addCallback(lambda _: self._bounded(self._write.ping()))
        return d

    def close(self) -> Deferred[Any]:
        """Disconnect."""
        pools = [self._read] if self._write is self._read else [self._read, self._write]
        return gatherResults([pool.disconnect() for pool in pools], consumeErrors=True)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
