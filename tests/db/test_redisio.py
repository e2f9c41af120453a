"""mailcow's Redis through redisio.MailcowRedis, on the real reactor against a real Redis at 127.0.0.1:6379.

Each test works in databases 11 and 12 under its own prefix and deletes the keys it made; mailcow's
key names (RL_VALUE, F2B_*...) exist only there. When Redis does not answer, the tests fail under
CI (scripts/redis.sh starts one) and are skipped elsewhere.
"""

from __future__ import annotations

import os
import secrets
import socket
from typing import Any

import pytest
import pytest_twisted
import txredisapi
from twisted.internet.defer import DeferredList

from mailcow_smtp_api.core.config import RedisUrl
from mailcow_smtp_api.core.errors import ApiError
from mailcow_smtp_api.core.ratelimit import Limit, Policy
from mailcow_smtp_api.mailcow.redisio import MailcowRedis

READ_DB, WRITE_DB = 11, 12
MAILCOW_KEYS = ("RL_VALUE", "SMTP_LIMITED_ACCESS", "F2B_ACTIVE_BANS", "F2B_PERM_BANS")


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def _redis_answers() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=1) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture
def require_redis() -> None:
    if not _redis_answers():
        if os.environ.get("CI"):
            pytest.fail("Redis does not answer on 127.0.0.1:6379 (scripts/redis.sh ensure starts one)")
        pytest.skip("Redis does not answer on 127.0.0.1:6379")


async def connect() -> dict[int, Any]:
    """Plain connections to both databases, for setting up and looking at keys."""
    return {db: await txredisapi.Connection("127.0.0.1", 6379, dbid=db, reconnect=False) for db in (READ_DB, WRITE_DB)}


async def clean(conns: dict[int, Any], *stores: MailcowRedis) -> None:
    """Delete every key a test made in both databases, and close every connection."""
    for redis in stores:
        await redis.close()
    for conn in conns.values():
        keys = await conn.keys("smtpapi-test-*") + await conn.keys("SMTP_ALLOW_NETS_*")
        for key in [*keys, *MAILCOW_KEYS]:
            await conn.delete(key)
        await conn.disconnect()


def store(write_db: int | None = WRITE_DB, port: int = 6379, timeout: float = 2.0) -> tuple[MailcowRedis, str]:
    prefix = f"smtpapi-test-{secrets.token_hex(4)}:"
    read = RedisUrl("127.0.0.1", port, None, READ_DB)
    write = RedisUrl("127.0.0.1", port, None, write_db) if write_db is not None else None
    return MailcowRedis(_reactor(), read, write, prefix=prefix, timeout=timeout, ban_cache_ttl=0), prefix


def mailbox(count: int, window: int, who: str = "user@example.org") -> Policy:
    return Policy("mailbox", f"mbox:{who}", Limit(count, window), who)


@pytest_twisted.ensureDeferred
async def test_limits_are_read_from_rl_value(require_redis: None) -> None:
    """The login's and the domain's entries of RL_VALUE, looked up in lower case."""
    raw = await connect()
    await raw[READ_DB].hset("RL_VALUE", "user@example.org", "10 / 1h")
    await raw[READ_DB].hset("RL_VALUE", "example.org", "100 / 1d")
    redis, _ = store()
    try:
        assert await redis.limits_for("User@Example.org", "EXAMPLE.org") == (Limit(10, 3600), Limit(100, 86400))
        assert await redis.limits_for("other@example.net", "example.net") == (None, None)
    finally:
        await clean(raw, redis)


@pytest_twisted.ensureDeferred
async def test_buckets_live_under_the_prefix_on_the_write_side(require_redis: None) -> None:
    """The bucket is written where writes go, under the sidecar's prefix, with an expiry; no RL* key appears."""
    raw = await connect()
    redis, prefix = store()
    try:
        first = await redis.take([mailbox(5, 60)], 3)
        second = await redis.take([mailbox(5, 60)], 2)
        third = await redis.take([mailbox(5, 60)], 1)
        assert (first.admitted, second.admitted, third.admitted) == (True, True, False)
        assert second.buckets[0].remaining == 0 and third.retry_after == 12
        key = f"{prefix}rl:mbox:user@example.org"
        assert await raw[WRITE_DB].exists(key) and not await raw[READ_DB].exists(key)
        assert 0 < await raw[WRITE_DB].execute_command("PTTL", key) <= 60_000
        assert await raw[WRITE_DB].keys("RL*") == [] and await raw[READ_DB].keys("RL[^_]*") == []
    finally:
        await clean(raw, redis)


@pytest_twisted.ensureDeferred
async def test_concurrent_replicas_share_one_bucket(require_redis: None) -> None:
    """Three stores (as three sidecars) charging one bucket at once admit exactly its size."""
    raw = await connect()
    stores = [store()[0] for _ in range(3)]
    prefix = "smtpapi-test-shared:"
    for redis in stores:
        redis.prefix = prefix
    try:
        results = await DeferredList(
            [_take(stores[n % 3], mailbox(10, 3600), 1) for n in range(30)],
            consumeErrors=True,
        )
        admitted = [result.admitted for ok, result in results if ok]
        assert len(admitted) == 30 and admitted.count(True) == 10
    finally:
        await clean(raw, *stores)


def _take(redis: MailcowRedis, policy: Policy, n: int) -> Any:
    from twisted.internet.defer import ensureDeferred

    return ensureDeferred(redis.take([policy], n))


@pytest_twisted.ensureDeferred
async def test_script_is_loaded_again_after_a_flush(require_redis: None) -> None:
    """After SCRIPT FLUSH (or a Redis restart) the bucket script is loaded again, once."""
    raw = await connect()
    redis, _ = store()
    try:
        assert (await redis.take([mailbox(5, 60)], 1)).admitted
        await raw[WRITE_DB].execute_command("SCRIPT", "FLUSH")
        decision = await redis.take([mailbox(5, 60)], 1)
        assert decision.admitted and decision.buckets[0].remaining == 3
    finally:
        await clean(raw, redis)


@pytest_twisted.ensureDeferred
async def test_smtp_allow_list(require_redis: None) -> None:
    """A limited mailbox is allowed from an address or network field with value 1, and from nothing else."""
    raw = await connect()
    await raw[READ_DB].hset("SMTP_LIMITED_ACCESS", "user@example.org", "1")
    await raw[READ_DB].hset("SMTP_ALLOW_NETS_user@example.org", "192.0.2.0/24", "1")
    await raw[READ_DB].hset("SMTP_ALLOW_NETS_user@example.org", "198.51.100.7", "1")
    await raw[READ_DB].hset("SMTP_ALLOW_NETS_user@example.org", "203.0.113.0/24", "0")
    redis, _ = store()
    try:
        assert await redis.smtp_allowed("User@example.org", "192.0.2.200")
        assert await redis.smtp_allowed("user@example.org", "198.51.100.7")
        assert not await redis.smtp_allowed("user@example.org", "198.51.100.8")
        assert not await redis.smtp_allowed("user@example.org", "203.0.113.1")
        assert await redis.smtp_allowed("free@example.org", "203.0.113.1")
    finally:
        await clean(raw, redis)


@pytest_twisted.ensureDeferred
async def test_bans_active_permanent_and_expired(require_redis: None) -> None:
    """netfilter's active bans hold until their expiry, permanent ones always; nets match whole ranges."""
    now = _reactor().seconds()
    raw = await connect()
    await raw[READ_DB].hset("F2B_ACTIVE_BANS", "192.0.2.0/24", str(int(now + 600)))
    await raw[READ_DB].hset("F2B_ACTIVE_BANS", "198.51.100.9/32", str(int(now - 5)))
    await raw[READ_DB].hset("F2B_PERM_BANS", "2001:db8::/64", "1")
    redis, _ = store()
    try:
        banned, seconds = await redis.ban_for("192.0.2.44")
        assert banned and seconds is not None and 590 <= seconds <= 601
        assert await redis.ban_for("198.51.100.9") == (False, None)
        assert await redis.ban_for("2001:db8::5") == (True, None)
        assert await redis.ban_for("203.0.113.1") == (False, None)
    finally:
        await clean(raw, redis)


@pytest_twisted.ensureDeferred
async def test_redis_down_is_503_within_the_timeout(require_redis: None) -> None:
    """Every operation on a Redis that does not answer fails with smtp_ratelimit_unavailable, in time."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    redis, _ = store(port=closed_port, timeout=0.5)
    started = _reactor().seconds()
    try:
        for operation in (
            lambda: redis.limits_for("user@example.org", "example.org"),
            lambda: _take(redis, mailbox(5, 60), 1),
            lambda: _ban(redis),
        ):
            with pytest.raises(ApiError) as caught:
                await operation()
            assert (caught.value.code, caught.value.status) == ("smtp_ratelimit_unavailable", 503)
        assert _reactor().seconds() - started < 5
    finally:
        await redis.close()


def _ban(redis: MailcowRedis) -> Any:
    from twisted.internet.defer import ensureDeferred

    return ensureDeferred(redis.ban_for("192.0.2.1"))


ALLOWED_READS = {
    "HMGET": ("RL_VALUE", "SMTP_ALLOW_NETS_"),
    "HEXISTS": ("SMTP_LIMITED_ACCESS",),
    "HGETALL": ("F2B_ACTIVE_BANS", "F2B_PERM_BANS"),
    "LRANGE": ("POSTFIX_MAILLOG",),
}


@pytest_twisted.ensureDeferred
async def test_only_the_documented_keys_and_commands_are_used(require_redis: None) -> None:
    """Watched with MONITOR, the adapter reads only mailcow's documented keys, writes only under its
    prefix, and publishes only on F2B_CHANNEL: never MC_CHANNEL, never netfilter's or rspamd's keys."""
    import subprocess
    import threading
    import time

    monitor = subprocess.Popen(["redis-cli", "-h", "127.0.0.1", "-p", "6379", "monitor"], stdout=subprocess.PIPE, text=True)
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(monitor.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()

    def wait_for(text: str) -> None:
        deadline = time.monotonic() + 5
        while not any(text in line for line in seen) and time.monotonic() < deadline:
            time.sleep(0.02)

    raw = await connect()
    redis, prefix = store()
    marker = f"end-{secrets.token_hex(4)}"
    try:
        wait_for("OK")  # redis-cli prints OK once MONITOR listens
        await raw[READ_DB].hset("SMTP_LIMITED_ACCESS", "user@example.org", "1")
        await redis.limits_for("user@example.org", "example.org")
        await redis.smtp_allowed("user@example.org", "192.0.2.1")
        await redis.ban_for("192.0.2.1")
        await redis.take([mailbox(5, 60)], 1)
        await redis.publish_failure("mailcow UI: Invalid password for smtp-api:x@example.org by 192.0.2.1")
        await redis.ping()
        await redis.maillog(10)
        await raw[READ_DB].execute_command("ECHO", marker)
        wait_for(marker)
    finally:
        monitor.terminate()
        monitor.wait(timeout=10)
        reader.join(timeout=5)
        await clean(raw, redis)
    output = "".join(seen)
    ours = [line for line in output.splitlines() if f"[{READ_DB} " in line or f"[{WRITE_DB} " in line]
    used: list[tuple[str, str]] = []
    for line in ours:
        words = [w.strip('"') for w in line.split("] ", 1)[1].split('" "')]
        command, first = words[0].upper(), words[1] if len(words) > 1 else ""
        if command in ("HSET", "DEL", "KEYS", "SELECT", "CLIENT", "QUIT", "ECHO") and not first.startswith(prefix):
            continue  # the test's own set-up and clean-up connection
        used.append((command, first))
    commands = {command for command, _ in used}
    assert {"HMGET", "HEXISTS", "HGETALL", "EVALSHA", "PUBLISH", "PING", "LRANGE"} <= commands, used
    for command, first in used:
        if command in ("HMGET", "HSET", "PEXPIRE") and first.startswith(prefix):
            continue  # the bucket script, on the sidecar's own keys
        if command in ALLOWED_READS:
            assert first.startswith(ALLOWED_READS[command]), (command, first)
        elif command == "PUBLISH":
            assert first == "F2B_CHANNEL"
        else:
            assert command in ("EVALSHA", "SCRIPT", "PING", "SELECT", "TIME", "INFO", "CLIENT"), (command, first)
    assert "MC_CHANNEL" not in output


@pytest_twisted.ensureDeferred
async def test_readiness_says_why_redis_fails(require_redis: None) -> None:
    """/readyz's reason for a Redis that does not answer names the option to check, and no address."""
    from mailcow_smtp_api.core.readiness import reason

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    redis, _ = store(port=closed_port, timeout=0.5)
    try:
        with pytest.raises(ApiError) as caught:
            await redis.ping()
        text = reason(caught.value)
        assert "--redis" in text and "127.0.0.1" not in text and str(closed_port) not in text
    finally:
        await redis.close()


@pytest_twisted.ensureDeferred
async def test_concurrent_requests_read_the_ban_lists_once(require_redis: None) -> None:
    """Requests that find the ban cache stale together share one read of the two ban lists."""
    raw = await connect()
    redis, _ = store()
    redis.ban_cache_ttl = 60
    reads: list[str] = []
    real = redis._read.hgetall

    def counting(key: str) -> Any:
        reads.append(key)
        return real(key)

    redis._read = attrs_proxy(redis._read, hgetall=counting)
    try:
        await raw[READ_DB].hset("F2B_PERM_BANS", "203.0.113.0/24", "1")
        results = await DeferredList([_ban(redis) for _ in range(20)], consumeErrors=True)
        assert all(ok for ok, _ in results) and reads == ["F2B_ACTIVE_BANS", "F2B_PERM_BANS"]
        assert await redis.ban_for("203.0.113.5") == (True, None) and len(reads) == 2
    finally:
        await clean(raw, redis)


class attrs_proxy:
    """Another object's attributes, with some of them replaced."""

    def __init__(self, inner: Any, **replaced: Any) -> None:
        self._inner, self._replaced = inner, replaced

    def __getattr__(self, name: str) -> Any:
        return self._replaced.get(name) or getattr(self._inner, name)
