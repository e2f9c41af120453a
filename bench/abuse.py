"""What mailcow's abuse controls cost per request, with Redis and without, against no limits, in one run.

    .venv/bin/python -m bench.abuse [--requests N] [--rounds R] [--concurrency C] [--json FILE]
                                    [--redis-url redis://127.0.0.1:6379/14]

Runs ``SendService.authenticate`` + ``SendService.send`` in this process, on the real Twisted
reactor, over the test fakes (API key, sender rule and an SMTP submitter that answers at once), so
that what differs between the variants is the abuse controls alone:

    none       abuse.no_limits(): the baseline
    redis      AbuseControls over redisio.MailcowRedis against the real Redis, wired as tap.py wires
               it (bans, SMTP allow list, limits, buckets, fail2ban reporter)
    memory     AbuseControls with a fixed limit and LocalBuckets: the deployment without --redis
    none-key   a send key, no limits: the baseline of redis-key
    redis-key  a send key with its own rate, over MailcowRedis (two buckets in one script call)

The variants run in rounds (none, redis, memory, none-key, redis-key, none, redis, ...) to spread
noise. Per variant it prints requests/s, per-request latency (p50, p99), this process's CPU per
request (``time.process_time``), the Redis server's CPU per request (``INFO cpu``), the Redis
commands per request (``INFO commandstats``), the machine's interrupt time per request and what
other processes used (``/proc/stat``), and the difference to the variant's baseline: the cost of
the checks. Speed is reported, never asserted. Talks to 127.0.0.1 only; bench/README.md
explains how to read it.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import secrets
import socket
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make `bench`, `tests` and `mailcow_smtp_api` importable
    sys.path.insert(0, str(REPO))

from bench.run import (  # noqa: E402
    format_number,
    format_table,
    machine_busy_ticks,
    machine_facts,
    make_body,
    percentile,
    read_text,
)

HOST = "127.0.0.1"
DEFAULT_REDIS_URL = f"redis://{HOST}:6379/14"  # 11-13 are the tests' (tests/db, tests/integration)
DEFAULT_PREFIX = "smtpapi-bench:"
CLIENT_IP = "192.0.2.10"  # a documentation address: never loopback, which some checks treat apart
SENDER_DOMAIN = "bench.example"
RECIPIENT = "rcpt1@sink.example"  # not the login itself, so mailcow's limit applies
BODY_BYTES = 1024
HUGE_LIMIT = "100000000 / 1d"  # never refuses within a run
REDIS_TIMEOUT = 2.0  # seconds for the checks' own Redis calls and for this tool's
IDLE_SAMPLE_SECONDS = 1.0

# Commands a client of Redis sends on a send; the bucket script runs the others itself.
CLIENT_COMMANDS = ("hgetall", "hexists", "hmget", "evalsha", "publish", "script|load")
SCRIPT_COMMANDS = ("time", "hset", "pexpire")  # only redisio.TAKE_SCRIPT issues these
MEASURING_COMMANDS = ("info", "client|list")  # this tool's own snapshots


# ================================================================================ pure helpers


class IncompleteReply(Exception):
    """The buffer ends before the reply does."""


class RedisReplyError(Exception):
    """Redis answered with an error reply."""


def encode_command(*args: str | bytes | int) -> bytes:
    """One Redis command in RESP: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode("utf-8")
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def parse_reply(data: bytes, start: int = 0) -> tuple[Any, int]:
    """One RESP2 reply at ``start``: (value, offset after it); ``IncompleteReply`` when it is not whole.

    Simple strings come back as ``str``, bulk strings as ``bytes``, nil as None, integers as ``int``,
    arrays as lists and error replies as ``RedisReplyError`` instances (raised by the caller).
    """
    end = data.find(b"\r\n", start)
    if end < 0:
        raise IncompleteReply
    kind, line, after = data[start : start + 1], data[start + 1 : end], end + 2
    if kind == b"+":
        return line.decode("utf-8", "replace"), after
    if kind == b"-":
        return RedisReplyError(line.decode("utf-8", "replace")), after
    if kind == b":":
        return int(line), after
    if kind == b"$":
        length = int(line)
        if length < 0:
            return None, after
        if len(data) < after + length + 2:
            raise IncompleteReply
        return data[after : after + length], after + length + 2
    if kind == b"*":
        count = int(line)
        if count < 0:
            return None, after
        items = []
        for _ in range(count):
            item, after = parse_reply(data, after)
            items.append(item)
        return items, after
    raise ValueError(f"not a RESP reply: {data[start : start + 20]!r}")


def parse_info(text: str) -> dict[str, str]:
    """The ``field:value`` lines of an ``INFO`` reply; section headers and blank lines are skipped."""
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition(":")
        if sep:
            out[key] = value
    return out


def cpu_seconds(info: Mapping[str, str]) -> float:
    """The Redis server's CPU time so far: ``used_cpu_sys + used_cpu_user`` (``INFO cpu``)."""
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def command_stats(info: Mapping[str, str], name: str = "calls") -> dict[str, float]:
    """One field per command from ``INFO commandstats`` (``cmdstat_hmget:calls=3,usec=41,...``).

    ``name`` is ``calls`` or ``usec`` (microseconds spent executing it). Subcommands keep Redis's
    name (``script|load``). Commands run inside a script count too.
    """
    out: dict[str, float] = {}
    for key, value in info.items():
        if key.startswith("cmdstat_"):
            fields = dict(part.partition("=")[::2] for part in value.split(","))
            out[key[len("cmdstat_") :]] = float(fields[name])
    return out


def command_calls(info: Mapping[str, str]) -> dict[str, int]:
    """Calls per command so far (``command_stats``' ``calls``)."""
    return {command: int(count) for command, count in command_stats(info, "calls").items()}


def calls_delta(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, Any]:
    """What grew between two ``command_stats`` snapshots, per command (only those that grew)."""
    grown = {name: count - before.get(name, 0) for name, count in after.items()}
    return {name: count for name, count in sorted(grown.items()) if count > 0}


def client_calls(delta: Mapping[str, int]) -> dict[str, int]:
    """The round trips behind a ``calls_delta``: commands a client sent, without those the bucket script ran.

    commandstats also counts the commands a script calls. redisio's script reads each bucket with
    an HMGET and, when it admits, writes it back with one HSET: with every message admitted, the
    client's own HMGETs are the HMGETs less the HSETs. Ignores this tool's INFO and other commands.
    """
    out = {name: delta.get(name, 0) for name in CLIENT_COMMANDS}
    out["hmget"] = max(0, out["hmget"] - delta.get("hset", 0))
    return out


def top_level_usec(calls: Mapping[str, int], usec: Mapping[str, float]) -> float:
    """µs Redis spent executing the commands clients sent (``calls_delta`` of calls and of usec).

    A script's EVALSHA time already holds the commands it ran, which commandstats also lists on
    their own: those are left out. HMGET is both, so only the client's share of its time counts,
    pro rata by calls.
    """
    own = client_calls(calls)
    total = 0.0
    for name, count in own.items():
        if calls.get(name, 0) > 0:
            total += usec.get(name, 0.0) * count / calls[name]
    return total


def foreign_calls(delta: Mapping[str, int]) -> dict[str, int]:
    """Commands in a delta that neither the checks nor this tool send: another Redis client was busy."""
    known = set(CLIENT_COMMANDS) | set(SCRIPT_COMMANDS) | set(MEASURING_COMMANDS)
    return {name: count for name, count in delta.items() if name not in known}


def summed(mappings: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """The values of several mappings added up per key, keys sorted."""
    total: dict[str, float] = {}
    for mapping in mappings:
        for name, value in mapping.items():
            total[name] = total.get(name, 0) + value
    return dict(sorted(total.items()))


def per_request(counts: Mapping[str, float], requests: int) -> dict[str, float]:
    """Each count divided by the number of requests (empty when there were none)."""
    if requests <= 0:
        return {}
    return {name: count / requests for name, count in counts.items()}


def interrupt_ticks(proc_stat_text: str) -> int:
    """Ticks all CPUs spent in interrupts (irq + softirq), from the first line of /proc/stat.

    Loopback TCP is mostly softirq work that no process is charged with.
    """
    first = proc_stat_text.splitlines()[0].split()
    if first[0] != "cpu":
        raise ValueError("not the text of /proc/stat")
    return int(first[6]) + int(first[7])


def parse_client_list(text: str) -> list[dict[str, str]]:
    """``CLIENT LIST``: one ``field=value`` mapping per connected client."""
    clients = []
    for line in text.splitlines():
        if line.strip():
            clients.append(dict(part.partition("=")[::2] for part in line.split()))
    return clients


def active_foreign_clients(clients: Sequence[Mapping[str, str]], own_db: int, within_s: float) -> list[str]:
    """Clients of another db that sent a command in the last ``within_s`` seconds (whole seconds, rounded up).

    This run's connections all use ``own_db``; ``idle`` is the seconds since a client's last command.
    """
    limit = math.ceil(within_s)
    out = []
    for client in clients:
        if client.get("db") != str(own_db):
            idle = int(client.get("idle", "0") or 0)
            if idle <= limit:
                out.append(f"{client.get('addr', '?')} db={client.get('db', '?')} cmd={client.get('cmd', '?')}")
    return out


@dataclass(frozen=True)
class Snapshot:
    """The Redis server's counters at one moment."""

    cpu_s: float
    calls: dict[str, int]
    usec: dict[str, float]
    connections: int  # total_connections_received
    clients: list[dict[str, str]]


def shared_by(before: Snapshot, after: Snapshot, own_db: int, wall_s: float) -> list[str]:
    """Signs that another client used Redis between two snapshots: new connections, active clients."""
    signs = active_foreign_clients(after.clients, own_db, wall_s)
    connected = after.connections - before.connections
    if connected > 0:
        signs.append(f"{connected} new connection(s)")
    return signs


@dataclass
class RoundResult:
    """One round of one variant: what it sent, what it took and what Redis did meanwhile."""

    variant: str
    round: int
    requests: int
    errors: dict[str, int]
    wall_s: float
    cpu_s: float
    redis_cpu_s: float
    redis_calls: dict[str, int]
    redis_usec: dict[str, float]  # µs Redis spent executing each command
    latencies_s: list[float] = field(repr=False)
    shared: list[str] = field(default_factory=list)  # signs of other Redis clients during the round
    machine_busy_s: float | None = None  # all CPUs' busy time (/proc/stat) during the round
    interrupt_s: float | None = None  # of which in interrupts (irq + softirq)


def summarise(variant: str, rounds: Sequence[RoundResult]) -> dict[str, Any]:
    """The figures of one variant over its rounds: rates and percentiles in µs per request."""
    requests = sum(r.requests for r in rounds)
    wall = sum(r.wall_s for r in rounds)
    cpu = sum(r.cpu_s for r in rounds)
    redis_cpu = sum(r.redis_cpu_s for r in rounds)
    latencies = [value for r in rounds for value in r.latencies_s]
    calls = {name: int(count) for name, count in summed(r.redis_calls for r in rounds).items()}
    usec = summed(r.redis_usec for r in rounds)
    errors = {code: int(count) for code, count in summed(r.errors for r in rounds).items()}
    per_round_cpu = [r.cpu_s / r.requests * 1e6 for r in rounds if r.requests]
    busy = [r for r in rounds if r.machine_busy_s is not None and r.interrupt_s is not None]
    interrupts = sum(r.interrupt_s or 0.0 for r in busy)
    others = sum((r.machine_busy_s or 0.0) - (r.interrupt_s or 0.0) - r.cpu_s - r.redis_cpu_s for r in busy)
    busy_wall = sum(r.wall_s for r in busy)
    busy_requests = sum(r.requests for r in busy)
    trips = per_request(client_calls(calls), requests)
    return {
        "variant": variant,
        "rounds": len(rounds),
        "requests": requests,
        "errors": sum(errors.values()),
        "error_codes": errors,
        "wall_s": wall,
        "req_per_s": requests / wall if wall > 0 else None,
        "p50_us": percentile(latencies, 50) * 1e6 if latencies else None,
        "p99_us": percentile(latencies, 99) * 1e6 if latencies else None,
        "cpu_us": cpu / requests * 1e6 if requests else None,
        "cpu_us_rounds": per_round_cpu,
        "redis_cpu_us": redis_cpu / requests * 1e6 if requests else None,
        "redis_calls_per_request": per_request(calls, requests),
        "redis_usec_per_request": per_request(usec, requests),
        "redis_command_us": top_level_usec(calls, usec) / requests if requests else None,
        "round_trips": trips,
        "round_trips_total": sum(trips.values()) if trips else None,
        "foreign_calls": foreign_calls(calls),
        "shared_rounds": sum(1 for r in rounds if r.shared),
        "interrupt_us": interrupts / busy_requests * 1e6 if busy_requests else None,
        # Everything else the machine ran meanwhile, in % of one CPU: other processes competing.
        "others_cpu_pct": others / busy_wall * 100 if busy and busy_wall > 0 else None,
    }


def difference(value: float | None, base: float | None) -> float | None:
    """``value - base``, or None when either is unknown."""
    if value is None or base is None:
        return None
    return value - base


def cost_of_checks(summary: Mapping[str, Any], baseline: Mapping[str, Any]) -> dict[str, float | None]:
    """What a variant costs per request beyond its baseline, in µs: our CPU, Redis's CPU, latency."""
    return {
        "cpu_us": difference(summary["cpu_us"], baseline["cpu_us"]),
        "redis_cpu_us": difference(summary["redis_cpu_us"], baseline["redis_cpu_us"]),
        "p50_us": difference(summary["p50_us"], baseline["p50_us"]),
    }


def spread(values: Sequence[float]) -> str:
    """The smallest and largest of per-round figures, ``min-max``; ``-`` without any."""
    if not values:
        return "-"
    return f"{format_number(min(values))}-{format_number(max(values))}"


def render_report(summaries: Sequence[Mapping[str, Any]], baselines: Mapping[str, str]) -> str:
    """Two tables: the figures and costs per variant, then the Redis round trips per request."""
    by_name = {s["variant"]: s for s in summaries}
    rows = []
    for s in summaries:
        base_name = baselines.get(s["variant"], s["variant"])
        base = by_name.get(base_name)
        cost = cost_of_checks(s, base) if base is not None and base is not s else None
        rows.append(
            [
                s["variant"],
                f"{s['requests']:,}",
                f"{s['errors']:,}",
                format_number(s["req_per_s"], 0),
                format_number(s["p50_us"]),
                format_number(s["p99_us"]),
                format_number(s["cpu_us"]),
                spread(s["cpu_us_rounds"]),
                format_number(s["redis_cpu_us"]),
                base_name if cost is not None else "-",
                format_number(cost["cpu_us"]) if cost else "-",
                format_number(cost["redis_cpu_us"]) if cost else "-",
                format_number(cost["p50_us"]) if cost else "-",
            ]
        )
    figures = format_table(
        [
            "variant", "requests", "err", "req/s", "p50 µs", "p99 µs", "CPU µs/req", "rounds: CPU µs",
            "Redis CPU µs/req", "vs", "Δ CPU µs", "Δ Redis CPU µs", "Δ p50 µs",
        ],
        rows,
        numeric_from=1,
    )  # fmt: skip
    trip_rows = []
    for s in summaries:
        trips = s["round_trips"]
        trip_rows.append(
            [s["variant"]]
            + [format_number(trips.get(name), 3) for name in CLIENT_COMMANDS]
            + [
                format_number(s["round_trips_total"], 3),
                format_number(s["redis_command_us"]),
                format_number(s["interrupt_us"]),
                f"{s['shared_rounds']}/{s['rounds']}",
                format_number(s["others_cpu_pct"], 0),
            ]
        )
    headers = ["variant", *CLIENT_COMMANDS, "round trips", "µs in commands", "irq µs/req", "rounds shared",
               "others' CPU %"]  # fmt: skip
    trips_table = format_table(headers, trip_rows, 1)
    return (
        "Per request, this process and the Redis server:\n"
        + figures
        + "\n\nRedis round trips per request (INFO commandstats, the bucket script's own calls removed):\n"
        + trips_table
    )


def check_redis_url(text: str) -> Any:
    """The parsed ``--redis-url``; refused unless it names 127.0.0.1."""
    from mailcow_smtp_api.core.config import ConfigError, parse_redis_url

    try:
        url = parse_redis_url(text, "redis-url")
    except ConfigError as err:
        raise SystemExit(f"bench.abuse: {err}") from None
    if url.host != HOST:
        raise SystemExit(f"bench.abuse: --redis-url must name {HOST}, not {url.host}")
    return url


# ================================================================================ Redis, blocking


class RedisClient:
    """A blocking RESP client for set-up, snapshots and clean-up, outside the measured windows."""

    def __init__(self, url: Any, timeout: float = REDIS_TIMEOUT) -> None:
        self.sock = socket.create_connection((url.host, url.port), timeout=timeout)
        self.buffer = b""
        if url.password:
            self.call("AUTH", url.password)
        self.call("SELECT", url.db)

    def call(self, *args: str | bytes | int) -> Any:
        """Send one command and wait for its reply; an error reply raises ``RedisReplyError``."""
        self.sock.sendall(encode_command(*args))
        while True:
            try:
                value, used = parse_reply(self.buffer)
            except IncompleteReply:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("Redis closed the connection") from None
                self.buffer += chunk
                continue
            self.buffer = self.buffer[used:]
            if isinstance(value, RedisReplyError):
                raise value
            return value

    def info(self, *sections: str) -> dict[str, str]:
        """``INFO`` of the given sections, parsed."""
        merged: dict[str, str] = {}
        for section in sections:
            merged.update(parse_info(self.call("INFO", section).decode("utf-8", "replace")))
        return merged

    def snapshot(self, cpu_first: bool) -> Snapshot:
        """The server's counters now. Its CPU is read first after a round and last before one, so that
        the other snapshot commands stay outside the window."""
        cpu = cpu_seconds(self.info("cpu")) if cpu_first else None
        info = self.info("commandstats", "stats")
        clients = parse_client_list(self.call("CLIENT", "LIST").decode("utf-8", "replace"))
        if cpu is None:
            cpu = cpu_seconds(self.info("cpu"))
        return Snapshot(
            cpu, command_calls(info), command_stats(info, "usec"), int(info["total_connections_received"]), clients
        )

    def close(self) -> None:
        """Disconnect."""
        self.sock.close()


def connect_or_exit(url: Any) -> RedisClient:
    """A connection that answered PING, else exit 2 with what to do."""
    try:
        client = RedisClient(url)
        client.call("PING")
        return client
    except (OSError, RedisReplyError) as err:
        print(
            f"bench.abuse: Redis does not answer at {url.redacted()}: {err}\n"
            "Start one on 127.0.0.1:6379: `scripts/redis.sh ensure` where that script exists, or Debian's "
            "redis-server package (`apt-get install redis-server`, then `redis-server --bind 127.0.0.1 --daemonize yes`).",
            file=sys.stderr,
        )
        raise SystemExit(2) from None


# ================================================================================ the variants


@dataclass(frozen=True)
class Variant:
    """One way of running the same sends; ``baseline`` names the variant its costs are measured against."""

    name: str
    controls: str  # "none", "redis" or "memory"
    send_key: bool
    baseline: str
    description: str


VARIANTS = (
    Variant("none", "none", False, "none", "abuse.no_limits(), mailcow API key: the baseline"),
    Variant("redis", "redis", False, "none", "AbuseControls over MailcowRedis, as tap.py wires it with --redis"),
    Variant("memory", "memory", False, "none", "AbuseControls with a fixed limit and LocalBuckets (no --redis)"),
    Variant("none-key", "none", True, "none-key", "abuse.no_limits(), a send key without a rate: baseline of redis-key"),
    Variant("redis-key", "redis", True, "none-key", "a send key with its own rate, over MailcowRedis (two buckets)"),
)
VARIANT_NAMES = tuple(v.name for v in VARIANTS)


def selected_variants(text: str | None) -> list[Variant]:
    """The variants picked by ``--variants``, each with its baseline, in the canonical order."""
    if not text:
        return list(VARIANTS)
    wanted = {name.strip() for name in text.split(",") if name.strip()}
    unknown = sorted(wanted - set(VARIANT_NAMES))
    if unknown:
        raise SystemExit(f"bench.abuse: unknown variants: {', '.join(unknown)} (known: {', '.join(VARIANT_NAMES)})")
    wanted |= {v.baseline for v in VARIANTS if v.name in wanted}
    return [v for v in VARIANTS if v.name in wanted]


@dataclass
class Setup:
    """What the variants share: the login, the keys, and the Redis keys this run created."""

    login: str
    api_token: str
    key_token: str
    key: Any  # sendkeys.SendKey without a rate
    rated_key: Any  # the same key with HUGE_LIMIT as its rate
    rated_token: str
    created_keys: list[str] = field(default_factory=list)


def make_setup() -> Setup:
    """A fresh login (so that no bucket or RL_VALUE field of an earlier run is reused) and two send keys."""
    from mailcow_smtp_api.core.sendkeys import SendKey, new_key

    from tests.twisted.fakes import GOOD_KEY

    login = f"abuse-{secrets.token_hex(4)}@{SENDER_DOMAIN}"
    plain, rated = new_key(), new_key()
    key = SendKey(key_id=plain.key_id, login=login, salt=plain.salt, digest=plain.digest)
    rated_key = SendKey(key_id=rated.key_id, login=login, salt=rated.salt, digest=rated.digest, rate=HUGE_LIMIT)
    return Setup(login, GOOD_KEY, plain.token, key, rated_key, rated.token)


class FixedLimits:
    """A limit source that gives every login the same limit: the state database's part, without a database."""

    def __init__(self, text: str) -> None:
        from mailcow_smtp_api.core.ratelimit import parse_limit

        self.limit = parse_limit(text)

    async def limits_for(self, login: str, domain: str) -> tuple[Any, Any]:
        """The fixed limit for the login; none for the domain."""
        return self.limit, None


class OneKey:
    """A ``SendKeyLookup`` that knows one send key."""

    def __init__(self, key: Any) -> None:
        self.key = key

    def send_key(self, key_id: str) -> Any:
        """The key when the id is its id, else None."""
        from twisted.internet.defer import succeed

        return succeed(self.key if key_id == self.key.key_id else None)


@dataclass
class Runner:
    """One variant ready to run: its service, the key it presents and its parsed request."""

    variant: Variant
    service: Any
    raw_key: str
    request: Any
    fakes: tuple[Any, ...]

    def forget(self) -> None:
        """Empty the fakes' records, so that they do not grow over the run."""
        for fake in self.fakes:
            for name in ("calls", "sent"):
                if isinstance(getattr(fake, name, None), list):
                    getattr(fake, name).clear()


def build_runner(variant: Variant, setup: Setup, reactor: Any, redis: Any) -> Runner:
    """A ``SendService`` over the test fakes with this variant's abuse controls."""
    from mailcow_smtp_api.abuse import AbuseControls, LocalBuckets, no_limits
    from mailcow_smtp_api.service import Caller
    from mailcow_smtp_api.core.validate import ParsePolicy, parse_request

    from tests.twisted.test_service import make as make_service

    if variant.controls == "redis":
        abuse = AbuseControls(limits=redis, buckets=redis, access=redis, bans=redis, reporter=redis)
    elif variant.controls == "memory":
        abuse = AbuseControls(limits=FixedLimits(HUGE_LIMIT), buckets=LocalBuckets(reactor))
    else:
        abuse = no_limits()
    key = setup.rated_key if variant.controls != "none" else setup.key
    # The service of the service tests: their configuration (587 by default, 10025 plain) and fakes.
    service, keys, senders, submitter, throttle = make_service()
    senders.allowed = {(setup.login, setup.login)}
    service.abuse = abuse
    service.send_keys = OneKey(key) if variant.send_key else None
    fields: dict[str, Any] = {"from": setup.login, "to": [RECIPIENT], "subject": "bench", "body": make_body(BODY_BYTES)}
    if variant.send_key:  # no password: the key proves who sends, and the message goes to the plain target
        raw_key = setup.rated_token if variant.controls != "none" else setup.key_token
    else:
        raw_key = setup.api_token
        fields["password"] = "bench-password"  # never checked: the fake submitter accepts every message
    caller = Caller(send_key=key if variant.send_key else None)
    policy = ParsePolicy(password_optional=lambda port: service.password_optional(port, CLIENT_IP, caller))
    return Runner(variant, service, raw_key, parse_request(fields, policy), (keys, senders, submitter, throttle))


async def run_round(runner: Runner, requests: int, concurrency: int, deadline: float) -> tuple[int, Counter[str], list[float], float]:
    """``requests`` sends by ``concurrency`` concurrent callers; stops handing out new ones at ``deadline``.

    Returns (requests made, error codes, latencies in seconds, wall seconds). With answers that are
    all synchronous (no Redis), each caller runs to the end before the next starts.
    """
    from twisted.internet.defer import ensureDeferred, gatherResults

    from mailcow_smtp_api.core.errors import ApiError
    from mailcow_smtp_api.service import Progress

    left = [requests]
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    service, raw_key, request = runner.service, runner.raw_key, runner.request

    async def caller() -> None:
        while left[0] > 0 and time.monotonic() < deadline:
            left[0] -= 1
            began = time.perf_counter()
            try:
                who = await service.authenticate(raw_key, CLIENT_IP)
                await service.send(request, CLIENT_IP, "bench-request", Progress(), who)
            except ApiError as err:
                errors[err.code] += 1
            latencies.append(time.perf_counter() - began)

    started = time.perf_counter()
    await gatherResults([ensureDeferred(caller()) for _ in range(concurrency)], consumeErrors=True)
    return len(latencies), errors, latencies, time.perf_counter() - started


async def measure(
    reactor: Any, options: argparse.Namespace, variants: Sequence[Variant], setup: Setup, snapshots: RedisClient, url: Any
) -> list[RoundResult]:
    """The warm-up round, then every round of every variant in turn."""
    from mailcow_smtp_api.mailcow.redisio import MailcowRedis

    redis = MailcowRedis(reactor, url, prefix=options.redis_prefix, timeout=REDIS_TIMEOUT, ban_cache_ttl=options.ban_cache_ttl)
    setup.created_keys = bucket_keys(setup, redis)  # deleted at the end, whatever happens
    try:
        runners = [build_runner(v, setup, reactor, redis) for v in variants]
        deadline = time.monotonic() + options.max_seconds
        for runner in runners:  # connects, loads the script, fills the ban cache; not counted
            await run_round(runner, min(options.requests, 200), options.concurrency, deadline)
            runner.forget()
        results: list[RoundResult] = []
        for number in range(1, options.rounds + 1):
            for runner in runners:
                if time.monotonic() >= deadline:
                    progress(f"--max-seconds {options.max_seconds:g} reached: the remaining rounds are left out")
                    return results
                gc.collect()
                before = snapshots.snapshot(cpu_first=False)
                machine_before = machine_cpu_seconds()
                cpu_before = time.process_time()
                made, errors, latencies, wall = await run_round(runner, options.requests, options.concurrency, deadline)
                cpu = time.process_time() - cpu_before
                machine_after = machine_cpu_seconds()
                after = snapshots.snapshot(cpu_first=True)
                runner.forget()
                result = RoundResult(
                    runner.variant.name, number, made, dict(errors), wall, cpu, after.cpu_s - before.cpu_s,
                    calls_delta(before.calls, after.calls), calls_delta(before.usec, after.usec), latencies,
                    shared_by(before, after, url.db, wall),
                    *machine_deltas(machine_before, machine_after),
                )  # fmt: skip
                results.append(result)
                progress(
                    f"round {number} {runner.variant.name:9} {made:,} requests, {sum(errors.values())} errors, "
                    f"{cpu / max(made, 1) * 1e6:.1f} µs CPU/req, {result.redis_cpu_s / max(made, 1) * 1e6:.1f} µs Redis CPU/req"
                )
        return results
    finally:
        await redis.close()


def run_reactor(coroutine_factory: Any) -> Any:
    """Run ``coroutine_factory(reactor)`` on the global reactor until it finishes; its result or exception."""
    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred
    from twisted.python.failure import Failure

    outcome: list[Any] = []

    def start() -> None:
        d = ensureDeferred(coroutine_factory(reactor))
        d.addBoth(outcome.append)
        d.addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]

    reactor.callWhenRunning(start)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    if not outcome:
        raise SystemExit("bench.abuse: the reactor stopped before the measurements finished")
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


def machine_cpu_seconds() -> tuple[float, float] | None:
    """All CPUs' (busy, interrupt) time so far (``/proc/stat``), or None where there is none."""
    try:
        text = read_text("/proc/stat")
        tick = os.sysconf("SC_CLK_TCK")
        return machine_busy_ticks(text) / tick, interrupt_ticks(text) / tick
    except (OSError, ValueError):
        return None


def machine_deltas(
    before: tuple[float, float] | None, after: tuple[float, float] | None
) -> tuple[float | None, float | None]:
    """(busy, interrupt) seconds between two ``machine_cpu_seconds``; (None, None) when unknown."""
    if before is None or after is None:
        return None, None
    return after[0] - before[0], after[1] - before[1]


def progress(text: str) -> None:
    """A line on stderr while the run goes on."""
    print(f"bench.abuse: {text}", file=sys.stderr, flush=True)


def bucket_keys(setup: Setup, redis: Any) -> list[str]:
    """The Redis keys of every bucket this run can charge, as ``redis`` names them."""
    from mailcow_smtp_api.abuse import policies_for
    from mailcow_smtp_api.core.ratelimit import parse_limit

    policies = policies_for(setup.login, SENDER_DOMAIN, parse_limit(HUGE_LIMIT), None, setup.rated_key)
    return [redis.bucket_key(policy) for policy in policies]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m bench.abuse", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, metavar="N", help="requests per variant per round (2000)")
    parser.add_argument("--rounds", type=int, default=3, metavar="R", help="rounds over all variants (3)")
    parser.add_argument("--concurrency", type=int, default=10, metavar="C", help="concurrent callers (10)")
    parser.add_argument("--json", metavar="FILE", help="write every raw number to FILE")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL, help=f"Redis on {HOST} and its db ({DEFAULT_REDIS_URL})")
    parser.add_argument("--redis-prefix", default=DEFAULT_PREFIX, help=f"prefix of the bucket keys ({DEFAULT_PREFIX})")
    parser.add_argument(
        "--ban-cache-ttl", type=float, default=5.0, metavar="S", help="seconds the ban lists are cached (--db-cache-ttl: 5)"
    )
    parser.add_argument("--variants", help=f"comma-separated subset of: {', '.join(VARIANT_NAMES)} (baselines are added)")
    parser.add_argument("--max-seconds", type=float, default=120.0, metavar="S", help="stop handing out requests after S (120)")
    options = parser.parse_args(argv)
    for name in ("requests", "rounds", "concurrency"):
        if not 1 <= getattr(options, name) <= 1_000_000:
            parser.error(f"--{name} must be between 1 and 1,000,000")
    if not 1 <= options.max_seconds <= 3600:
        parser.error("--max-seconds must be between 1 and 3600")
    return options


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m bench.abuse``."""
    options = parse_args(argv)
    variants = selected_variants(options.variants)
    url = check_redis_url(options.redis_url)
    snapshots = connect_or_exit(url)
    setup = make_setup()
    began = time.monotonic()
    try:
        server = snapshots.info("server")
        idle_before = cpu_seconds(snapshots.info("cpu"))
        time.sleep(IDLE_SAMPLE_SECONDS)
        idle_rate = (cpu_seconds(snapshots.info("cpu")) - idle_before) / IDLE_SAMPLE_SECONDS
        # The login is new: its RL_VALUE field and buckets are this run's, and go at the end.
        snapshots.call("HSET", "RL_VALUE", setup.login, HUGE_LIMIT)
        results = run_reactor(lambda reactor: measure(reactor, options, variants, setup, snapshots, url))
    finally:
        snapshots.call("HDEL", "RL_VALUE", setup.login)
        if setup.created_keys:
            snapshots.call("DEL", *setup.created_keys)
        snapshots.close()
    elapsed = time.monotonic() - began
    summaries = [summarise(v.name, [r for r in results if r.variant == v.name]) for v in variants]
    summaries = [s for s in summaries if s["rounds"]]
    baselines = {v.name: v.baseline for v in variants}
    print(render_report(summaries, baselines))
    try:
        facts = machine_facts()
    except OSError:
        facts = {}
    print(
        f"\n{options.rounds} rounds x {options.requests:,} requests per variant, {options.concurrency} concurrent callers; "
        f"{facts.get('cpus', '?')} CPUs ({facts.get('cpu', '?')}); Redis {server.get('redis_version', '?')} "
        f"at {url.redacted()}, idle {idle_rate * 1e6:,.0f} µs CPU/s; whole run {elapsed:.1f} s"
    )
    if any(s["shared_rounds"] or s["foreign_calls"] for s in summaries):
        print(
            "WARNING: other clients used this Redis during some rounds ('rounds shared'); their Redis CPU and "
            "command counts include that work (--json lists the signs per round)"
        )
    if options.json:
        document = {
            "meta": {
                **facts,
                "command": sys.orig_argv,
                "options": vars(options),
                "elapsed_s": elapsed,
                "redis_version": server.get("redis_version"),
                "redis_idle_cpu_us_per_s": idle_rate * 1e6,
                "variants": [asdict(v) for v in variants],
            },
            "summaries": summaries,
            "costs": {
                s["variant"]: cost_of_checks(s, next(b for b in summaries if b["variant"] == baselines[s["variant"]]))
                for s in summaries
                if any(b["variant"] == baselines[s["variant"]] for b in summaries)
            },
            "rounds": [asdict(r) for r in results],
        }
        Path(options.json).write_text(json.dumps(document, indent=2) + "\n")
    return 1 if any(s["errors"] for s in summaries) else 0


if __name__ == "__main__":
    sys.exit(main())
