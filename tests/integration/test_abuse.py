"""mailcow's abuse controls end to end: rate limits, the SMTP allow list, fail2ban, send keys.

Every test runs ``twistd smtpapi`` against the bed's real postfix and MariaDB, a real Redis (its
own database, see ``redis_db``) and a real state database written by ``smtpapi-admin``, and checks
what postfix delivered to the sink, or that it delivered nothing. Client addresses other than
127.0.0.1 come through ``--trusted-proxies 127.0.0.1`` and ``X-Forwarded-For``, as behind
mailcow's nginx.
"""

from __future__ import annotations

import json
import re
import secrets
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .conftest import (
    API_KEY,
    PASSWORD,
    SENDER,
    F2bSubscriber,
    RedisClient,
    SinkMessage,
    Sidecar,
    StateAdmin,
    Testbed,
    free_port,
)
from .test_send_api import example_body, post

pytestmark = pytest.mark.integration

PLAIN = 10025
SUBMISSION = 10587
SMTPS = 10465
OTHER = "other@example.com"
OTHER_PASSWORD = "other-password"
SHARED = "shared@example.com"  # an alias of SENDER
RATELIMITED = "ratelimited@example.com"  # testbed.sh: 451 4.7.1 Ratelimit on 10587 and 10465
# A mailcow API key that skips the IP check, for callers behind the proxy.
ANY_IP_KEY = "A1B2C3-D4E5F6-A7B8C9-D0E1F2-A3B4C5"
# netfilter-mailcow's default rule 1 (mailcow.md section 7); its first group is the address it bans.
RULE_1 = re.compile(r"mailcow UI: Invalid password for .+ by ([0-9a-f\.:]+)")
QUEUE_WAIT = 10.0


@pytest.fixture
def abuse_bed(bed: Testbed) -> Testbed:
    """The bed with a second mailbox in the same domain, an alias of the sender, the 451 sender
    and an API key usable from any address."""
    bed.add_mailbox(OTHER, OTHER_PASSWORD)
    bed.add_mailbox(RATELIMITED, PASSWORD)
    bed.add_alias(SHARED, SENDER)
    bed.add_api_key(ANY_IP_KEY, skip_ip_check=1)
    return bed


def rcpts(count: int, tag: str) -> list[str]:
    """``count`` distinct recipients (postfix relays them all to the sink)."""
    return [f"{tag}{i}@dest.example" for i in range(count)]


def send(
    service: Sidecar, *, key: str = API_KEY, ip: str | None = None, **changes: Any
) -> tuple[int, Any, Any]:
    """POST one send (the API document's body with ``changes``), from ``ip`` through the proxy header."""
    headers = {"X-Forwarded-For": ip} if ip else None
    return post(service.url, example_body(**changes), key, headers)


def code(body: Any) -> str:
    """The ``msg`` of an answer: the error code, mailcow's text of a key failure, or ``smtp_mail_sent``."""
    entry = body[0] if isinstance(body, list) else body
    return entry["msg"] if isinstance(entry["msg"], str) else entry["msg"][0]


def settled(bed: Testbed, count: int) -> list[SinkMessage]:
    """The sink once ``count`` messages arrived and postfix's queue is empty: exactly ``count``.

    The service answers 200 only after postfix queued the message, so a message accepted by
    mistake would still be queued or already in the sink: an empty queue makes the count final.
    """
    bed.wait_for_messages(count, timeout=QUEUE_WAIT)
    deadline = time.monotonic() + QUEUE_WAIT
    while True:
        queued = subprocess.run(
            ["postqueue", "-c", str(bed.directory / "postfix"), "-j"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        if not queued:
            break
        assert time.monotonic() < deadline, f"postfix's queue did not drain: {queued[:500]}"
        time.sleep(0.05)
    found = bed.messages()
    assert len(found) == count, [(m.mail_from, m.rcpt_to, m.message["Subject"]) for m in found]
    return found


def delivered_recipients(messages: list[SinkMessage]) -> int:
    """Envelope recipients postfix delivered, all messages together."""
    return sum(len(m.rcpt_to) for m in messages)


def redis_service(sidecar: Callable[..., Sidecar], redis: RedisClient, admin: StateAdmin, *extra: str) -> Sidecar:
    """A sidecar on the tests' Redis database and ``admin``'s state database, behind a trusted proxy."""
    return sidecar("--redis", redis.url, "--state-db", admin.state_url, "--trusted-proxies", "127.0.0.1", *extra)


# ------------------------------------------------------------------------------ rate limits


@pytest.mark.parametrize("source", ["redis", "embedded"])
def test_mailbox_and_domain_limits_count_recipients(
    source: str, abuse_bed: Testbed, sidecar: Callable[..., Sidecar], redis_db: RedisClient, state_admin: StateAdmin
) -> None:
    """A mailbox limit and a domain limit count envelope recipients; the limit is reached exactly,
    then the next message is 429 and nothing is sent; the login's entry wins over its domain's."""
    if source == "redis":
        # As mailcow's UI writes them (mailcow.md section 7).
        redis_db.hset("RL_VALUE", {SENDER: "5 / 1h", "example.com": "2 / 1h"})
        service = redis_service(sidecar, redis_db, state_admin)
    else:
        state_admin.ok("ratelimit", "set", SENDER, "5 / 1h")
        state_admin.ok("ratelimit", "set", "example.com", "2 / 1h")
        service = sidecar("--state-db", state_admin.state_url)

    # More recipients than the limit holds never fit: no Retry-After, the answer says to split.
    status, body, headers = send(service, to=rcpts(6, "x"), subject="six at once")
    assert (status, code(body)) == (429, "smtp_rate_limited"), body
    assert "Retry-After" not in headers and "split it" in body[0]["message"]
    # The login's own 5 apply, not the domain's 2: three recipients (to, cc, bcc) pass at once.
    status, body, headers = send(service, to=rcpts(1, "a"), cc=rcpts(1, "b"), bcc=rcpts(1, "c"), subject="three")
    assert status == 200, body
    assert headers["RateLimit-Policy"] == '"mailbox";q=5;w=3600'
    assert headers["RateLimit"].startswith('"mailbox";r=2;t=')
    status, body, headers = send(service, to=rcpts(2, "d"), subject="two")
    assert status == 200, body
    assert headers["RateLimit"].startswith('"mailbox";r=0;t=')
    # Full: one more recipient is refused whole, with how long until it would fit (one
    # recipient leaks out every 3600 / 5 = 720 s).
    status, body, headers = send(service, to=rcpts(1, "e"), subject="one too many")
    assert (status, code(body)) == (429, "smtp_rate_limited"), body
    assert 700 <= int(headers["Retry-After"]) <= 720
    assert body[0]["detail"] == {"policy": "mailbox", "limit": "5 / 1h", "subject": SENDER}
    assert headers["RateLimit"].startswith('"mailbox";r=0;')

    # Another mailbox of the domain has no entry of its own: the domain's 2 apply to it.
    other: dict[str, Any] = {"from": OTHER, "password": OTHER_PASSWORD}
    status, body, headers = send(service, to=rcpts(2, "f"), subject="domain two", **other)
    assert status == 200, body
    assert headers["RateLimit-Policy"] == '"domain";q=2;w=3600'
    assert headers["RateLimit"].startswith('"domain";r=0;t=')
    status, body, headers = send(service, to=rcpts(1, "g"), subject="domain one too many", **other)
    assert (status, code(body)) == (429, "smtp_rate_limited"), body
    assert body[0]["detail"] == {"policy": "domain", "limit": "2 / 1h", "subject": "example.com"}
    assert 1700 <= int(headers["Retry-After"]) <= 1800

    messages = settled(abuse_bed, 3)
    assert sorted(str(m.message["Subject"]) for m in messages) == ["domain two", "three", "two"]
    assert delivered_recipients(messages) == 7
    if source == "redis":
        # The buckets are the service's own, under its prefix; never rspamd's RL* keys.
        assert redis_db.keys() == ["RL_VALUE", "smtpapi:rl:domain:example.com", f"smtpapi:rl:mbox:{SENDER}"]
        assert float(redis_db.hgetall(f"smtpapi:rl:mbox:{SENDER}")["level"]) == pytest.approx(5, abs=0.01)


def test_mail_only_to_the_login_is_not_limited(
    abuse_bed: Testbed, sidecar: Callable[..., Sidecar], redis_db: RedisClient, state_admin: StateAdmin
) -> None:
    """Mail whose only recipient is the login itself is neither counted nor refused, as in mailcow."""
    redis_db.hset("RL_VALUE", {SENDER: "1 / 1h"})
    service = redis_service(sidecar, redis_db, state_admin)
    for number in range(3):
        status, body, headers = send(service, to=[SENDER], subject=f"note to self {number}")
        assert status == 200, body
        assert "RateLimit" not in headers
    # The self-mails left the bucket empty: the one recipient the limit allows still fits.
    status, body, _ = send(service, to=["friend@dest.example"], subject="counted")
    assert status == 200, body
    status, body, _ = send(service, to=["friend@dest.example"], subject="over")
    assert (status, code(body)) == (429, "smtp_rate_limited")
    # Past the limit, mail to the login alone still goes, and so does mail only to postmaster
    # (rspamd's whitelisted_rcpts in mailcow); with anyone else beside them, it is counted.
    assert send(service, to=[SENDER.upper()], subject="self past the limit")[0] == 200
    assert send(service, to=["postmaster@dest.example"], subject="postmaster past the limit")[0] == 200
    status, body, _ = send(service, to=[SENDER], cc=["friend@dest.example"], subject="self and friend")
    assert (status, code(body)) == (429, "smtp_rate_limited")
    subjects = sorted(str(m.message["Subject"]) for m in settled(abuse_bed, 6))
    assert subjects == [
        "counted", "note to self 0", "note to self 1", "note to self 2", "postmaster past the limit", "self past the limit"
    ]


def test_bucket_leaks_back(
    abuse_bed: Testbed, sidecar: Callable[..., Sidecar], redis_db: RedisClient, state_admin: StateAdmin
) -> None:
    """A full bucket of "2 / 2s" leaks one recipient per second: a refused recipient fits again
    about a second later, and not before."""
    redis_db.hset("RL_VALUE", {SENDER: "2 / 2s"})
    service = redis_service(sidecar, redis_db, state_admin)
    status, body, headers = send(service, to=rcpts(2, "a"), subject="fill")
    assert status == 200, body
    full_at = time.monotonic()
    assert headers["RateLimit-Policy"] == '"mailbox";q=2;w=2'
    assert headers["RateLimit"] == '"mailbox";r=0;t=2'
    status, body, headers = send(service, to=rcpts(1, "b"), subject="refused")
    assert (status, code(body)) == (429, "smtp_rate_limited")
    assert headers["Retry-After"] == "1"
    refusals = 0
    while True:
        status, body, headers = send(service, to=rcpts(1, "b"), subject="after the leak")
        if status == 200:
            break
        assert (status, code(body)) == (429, "smtp_rate_limited"), body
        refusals += 1
        assert time.monotonic() - full_at < 3.0, "the bucket did not leak within 3 s"
        time.sleep(0.1)
    waited = time.monotonic() - full_at
    assert 0.8 <= waited < 3.0, waited
    assert refusals >= 1
    # One recipient was admitted onto a bucket that had leaked about one: it is full again.
    assert headers["RateLimit"].startswith('"mailbox";r=0;')
    assert [str(m.message["Subject"]) for m in settled(abuse_bed, 2)] == ["fill", "after the leak"]


@pytest.mark.parametrize("port", [SUBMISSION, SMTPS])
def test_postfix_ratelimit_451_is_429(port: int, abuse_bed: Testbed, sidecar: Callable[..., Sidecar]) -> None:
    """postfix's 451 4.7.1 Ratelimit (rspamd's verdict on 587/465) answers 429 smtp_rate_limited,
    not a generic 503; other mailboxes on the same port are not affected."""
    service = sidecar()
    limited: dict[str, Any] = {"from": RATELIMITED, "smtp_port": port, "subject": "rspamd says no"}
    status, body, headers = send(service, **limited)
    assert (status, code(body)) == (429, "smtp_rate_limited"), body
    assert headers["Retry-After"] == "60"
    detail = body[0]["detail"]
    assert detail["smtp_code"] == 451
    assert "4.7.1" in detail["smtp_text"] and 'Ratelimit "mailcow" exceeded' in detail["smtp_text"]
    status, body, _ = send(service, smtp_port=port, subject="not limited")
    assert status == 200, body
    (message,) = settled(abuse_bed, 1)
    assert message.mail_from == SENDER


# ------------------------------------------------------------------------------ SMTP allow list


def test_smtp_allow_list_inside_outside_and_behind_the_proxy(
    abuse_bed: Testbed, sidecar: Callable[..., Sidecar], redis_db: RedisClient, state_admin: StateAdmin
) -> None:
    """A mailbox that mailcow limits to some networks sends only from a caller address inside
    them, the address seen through the trusted proxy; an untrusted X-Forwarded-For is ignored."""
    redis_db.hset("SMTP_LIMITED_ACCESS", {SENDER: "1"})
    redis_db.hset(f"SMTP_ALLOW_NETS_{SENDER}", {"198.51.100.0/24": "1", "192.0.2.5": "1"})
    service = redis_service(sidecar, redis_db, state_admin)
    on_25: dict[str, Any] = {"key": ANY_IP_KEY, "smtp_port": PLAIN}

    status, body, _ = send(service, ip="198.51.100.7", subject="inside the network", **on_25)
    assert status == 200, body
    status, body, _ = send(service, ip="192.0.2.5", subject="the listed address", **on_25)
    assert status == 200, body
    # The proxy appends the address it saw: an allowed address the client put before it is
    # the client's own claim and counts for nothing.
    for forwarded, caller in (("192.0.2.6", "192.0.2.6"), ("203.0.113.9", "203.0.113.9"),
                              ("198.51.100.7, 203.0.113.9", "203.0.113.9"), (None, "127.0.0.1")):
        status, body, _ = send(service, ip=forwarded, subject="outside", **on_25)
        assert (status, code(body)) == (403, "smtp_access_denied"), (forwarded, body)
        assert f"and {caller} is not one of them" in body[0]["message"]
    # On 587 as well, and a mailbox that is not limited sends from anywhere.
    status, body, _ = send(service, ip="203.0.113.9", key=ANY_IP_KEY, subject="outside on 587")
    assert (status, code(body)) == (403, "smtp_access_denied")
    other: dict[str, Any] = {"from": OTHER, "password": OTHER_PASSWORD}
    assert send(service, ip="203.0.113.9", subject="not limited", **on_25, **other)[0] == 200

    # Without --trusted-proxies the header is the client's own claim: the caller is 127.0.0.1.
    direct = sidecar("--redis", redis_db.url, "--state-db", state_admin.state_url)
    status, body, _ = send(direct, ip="198.51.100.7", subject="spoofed header", **on_25)
    assert (status, code(body)) == (403, "smtp_access_denied")
    assert "127.0.0.1" in body[0]["message"]

    subjects = sorted(str(m.message["Subject"]) for m in settled(abuse_bed, 3))
    assert subjects == ["inside the network", "not limited", "the listed address"]


# ------------------------------------------------------------------------------ fail2ban


def rule_1_address(line: str) -> str:
    """The address netfilter's default rule 1 bans for ``line`` (the test fails if it does not match)."""
    match = RULE_1.search(line)
    assert match is not None, line
    return match.group(1)


def test_failures_are_published_for_netfilter(
    abuse_bed: Testbed,
    sidecar: Callable[..., Sidecar],
    redis_db: RedisClient,
    state_admin: StateAdmin,
    f2b_lines: F2bSubscriber,
) -> None:
    """Each failed API key, mailbox login and send key publishes one line on F2B_CHANNEL that
    netfilter's default rule 1 matches, capturing the client address; no secret is in it."""
    token, key_id = state_admin.add_send_key(SENDER)
    wrong_token = token[:-8] + ("0" * 8 if not token.endswith("0" * 8) else "1" * 8)
    service = redis_service(sidecar, redis_db, state_admin)
    wrong_key = "BAD0BA-D0BAD0-BAD0BA-D0BAD0-BAD0BA"
    unknown_id = secrets.token_hex(6)
    cases: list[tuple[str, dict[str, Any], str]] = [
        # (what fails, request, expected line)
        ("mailcow API key", {"key": wrong_key, "ip": "198.51.100.31"},
         "mailcow UI: Invalid password for smtp-api:api-key by 198.51.100.31"),
        ("password on port 25", {"key": ANY_IP_KEY, "ip": "198.51.100.32", "smtp_port": PLAIN, "password": "wrong-pw-25"},
         f"mailcow UI: Invalid password for smtp-api:{SENDER} by 198.51.100.32"),
        ("password on 587 (postfix 535)", {"key": ANY_IP_KEY, "ip": "198.51.100.33", "password": "wrong-pw-587"},
         f"mailcow UI: Invalid password for smtp-api:{SENDER} by 198.51.100.33"),
        ("send key", {"key": wrong_token, "ip": "2001:db8::5", "password": None},
         f"mailcow UI: Invalid password for smtp-api:{key_id} by 2001:db8::5"),
        # Loopback is exempt from the service's own counter, not from netfilter's lines.
        ("send key from loopback", {"key": f"smtpapi-{unknown_id}-{'0' * 64}", "password": None},
         f"mailcow UI: Invalid password for smtp-api:{unknown_id} by 127.0.0.1"),
    ]
    hidden = [wrong_key, API_KEY, ANY_IP_KEY, PASSWORD, "wrong-pw-25", "wrong-pw-587", token.rpartition("-")[2],
              wrong_token.rpartition("-")[2]]
    for what, request, expected in cases:
        status, body, _ = send(service, **request)
        assert status in (401, 403), (what, status, body)
        line = f2b_lines.wait_for(expected.__eq__)
        assert rule_1_address(line) == expected.rpartition(" by ")[2], what
        assert not any(secret.lower() in line.lower() for secret in hidden), line
    # One line per failure, none for anything else (other publishers on this Redis may add theirs).
    expected_lines = [expected for _, _, expected in cases]
    seen = f2b_lines.drain(0.3)
    ours = [line for line in seen if any(line.endswith(" by " + e.rpartition(" by ")[2]) for e in expected_lines[:-1])
            or unknown_id in line]
    assert ours == expected_lines, seen
    assert abuse_bed.messages() == []


def test_banned_addresses_are_refused_before_any_check(
    abuse_bed: Testbed,
    sidecar: Callable[..., Sidecar],
    redis_db: RedisClient,
    state_admin: StateAdmin,
    f2b_lines: F2bSubscriber,
) -> None:
    """An address in netfilter's active or permanent bans gets 429 before its key is even looked
    at: a wrong key is refused the same way and counted nowhere; an expired ban is no ban."""
    now = int(time.time())
    redis_db.hset("F2B_ACTIVE_BANS", {"198.51.100.0/24": now + 600, "192.0.2.0/24": now - 5})
    redis_db.hset("F2B_PERM_BANS", {"203.0.113.7": "1"})
    service = redis_service(sidecar, redis_db, state_admin)

    status, body, headers = send(service, key=ANY_IP_KEY, ip="198.51.100.50", subject="banned")
    assert (status, code(body)) == (429, "smtp_too_many_failures"), body
    assert 590 <= int(headers["Retry-After"]) <= 600
    status, body, headers = send(service, key=ANY_IP_KEY, ip="203.0.113.7", subject="banned for good")
    assert (status, code(body)) == (429, "smtp_too_many_failures"), body
    # A wrong key from a banned address is not checked: no 401, no failure line.
    for ip in ("198.51.100.50", "203.0.113.7"):
        for key in ("BAD0BA-D0BAD0-BAD0BA-D0BAD0-BAD0BA", "smtpapi-0123456789ab-" + "0" * 64):
            status, body, _ = send(service, key=key, ip=ip)
            assert (status, code(body)) == (429, "smtp_too_many_failures"), (ip, key, body)
    # The expired ban lets its address through; its failure is published as usual, and is the
    # only line: nothing was published for the banned requests before it.
    status, body, _ = send(service, key=ANY_IP_KEY, ip="192.0.2.66", subject="ban expired")
    assert status == 200, body
    unknown_id = secrets.token_hex(6)
    assert send(service, key=f"smtpapi-{unknown_id}-{'0' * 64}", password=None, ip="192.0.2.66")[0] == 401
    marker = f"mailcow UI: Invalid password for smtp-api:{unknown_id} by 192.0.2.66"
    f2b_lines.wait_for(marker.__eq__)
    seen = f2b_lines.drain(0.3)
    ours = [line for line in seen if line.endswith((" by 198.51.100.50", " by 203.0.113.7")) or unknown_id in line]
    assert ours == [marker], seen
    (message,) = settled(abuse_bed, 1)
    assert message.message["Subject"] == "ban expired"


# ------------------------------------------------------------------------------ Redis down


def test_redis_down_fails_closed(abuse_bed: Testbed, sidecar: Callable[..., Sidecar], state_admin: StateAdmin) -> None:
    """With its Redis unreachable the service refuses every send with 503
    smtp_ratelimit_unavailable within --redis-timeout, sends nothing, and /readyz names redis."""
    closed = f"redis://127.0.0.1:{free_port()}/0"
    service = sidecar("--redis", closed, "--redis-timeout", "1", "--state-db", state_admin.state_url)
    token, _ = state_admin.add_send_key(SENDER)
    for request in ({}, {"smtp_port": PLAIN}, {"key": token, "password": None}):
        started = time.monotonic()
        status, body, _ = send(service, subject="no limits known", **request)
        elapsed = time.monotonic() - started
        assert (status, code(body)) == (503, "smtp_ratelimit_unavailable"), (request, body)
        assert elapsed < 3.0, elapsed
    status, ready, _ = get(service, "/readyz")
    assert (status, ready["failing"]) == (503, ["redis"])
    assert settled(abuse_bed, 0) == []


def get(service: Sidecar, path: str) -> tuple[int, Any, Any]:
    """GET a JSON resource of the service."""
    try:
        with urllib.request.urlopen(service.url + path, timeout=30) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), err.headers


# ------------------------------------------------------------------------------ send keys


def last_log_line(bed: Testbed, fragment: str) -> str:
    """postfix's last log line holding ``fragment`` (queue ids are reused over time: the last one)."""
    lines = [line for line in bed.log_text("postfix").splitlines() if fragment in line]
    assert lines, fragment
    return lines[-1]


def test_send_key_is_bound_to_its_login_senders_and_rate(
    abuse_bed: Testbed, sidecar: Callable[..., Sidecar], redis_db: RedisClient, state_admin: StateAdmin
) -> None:
    """A send key sends only as its login, only with senders of its list that the login owns, and
    within its own rate (a bucket of its own beside mailcow's)."""
    refused = state_admin.run("sendkey", "add", "--login", SENDER, "--from", OTHER)
    assert refused.returncode == 1 and f"may not send as {OTHER}" in refused.stderr
    token, key_id = state_admin.add_send_key(SENDER, "--from", f"{SENDER},{SHARED}", "--rate", "3 / 1h")
    anything_owned, _ = state_admin.add_send_key(SENDER)
    service = redis_service(sidecar, redis_db, state_admin)
    keyed: dict[str, Any] = {"key": token, "password": None}

    status, body, headers = send(service, **keyed, **{"from": SHARED, "subject": "as the alias"})
    assert status == 200, body
    assert body[0]["log"][2]["key"] == f"send_key:{key_id}"
    assert headers["RateLimit-Policy"] == '"key";q=3;w=3600'
    assert headers["RateLimit"].startswith('"key";r=2;')
    for changes, field in (
        ({"smtp_user": OTHER}, "smtp_user"),  # another login
        # smtp_user equal to from reads as no smtp_user; the key's list refuses the sender.
        ({"from": OTHER, "smtp_user": OTHER}, "from"),
        ({"from": OTHER}, "from"),  # not in the key's list (and not the login's)
        ({"from": "ceo@example.com"}, "from"),
    ):
        status, body, _ = send(service, **keyed, **changes)
        assert (status, code(body), body[0].get("field")) == (403, "smtp_unauthorized_sender", field), changes
    # Without a list the login's own rule decides: its alias yes, another mailbox's address no.
    assert send(service, key=anything_owned, password=None, **{"from": SHARED, "subject": "any owned"})[0] == 200
    status, body, _ = send(service, key=anything_owned, password=None, **{"from": OTHER})
    assert (status, code(body)) == (403, "smtp_unauthorized_sender")

    # The key's own rate: two of its three recipients are left; three more do not fit, two do.
    status, body, _ = send(service, **keyed, to=rcpts(3, "r"), subject="over the key's rate")
    assert (status, code(body)) == (429, "smtp_rate_limited")
    assert body[0]["detail"] == {"policy": "key", "limit": "3 / 1h", "subject": key_id}
    status, body, headers = send(service, **keyed, to=rcpts(2, "r"), subject="last two")
    assert status == 200, body
    assert headers["RateLimit"].startswith('"key";r=0;')
    assert send(service, **keyed, to=rcpts(1, "s"))[0] == 429
    assert f"smtpapi:rl:key:{key_id}" in redis_db.keys()

    messages = settled(abuse_bed, 3)
    assert sorted((m.mail_from, str(m.message["Subject"])) for m in messages) == [
        (SENDER, "last two"), (SHARED, "any owned"), (SHARED, "as the alias")
    ]


def test_send_key_submits_without_password_on_the_plain_port(
    abuse_bed: Testbed, sidecar: Callable[..., Sidecar], state_admin: StateAdmin
) -> None:
    """A send key without a password is submitted on postfix's plain port (10025, no AUTH); with
    the password it goes to 587 with AUTH; a mailcow admin key with a password still works."""
    token, key_id = state_admin.add_send_key(SENDER)
    service = sidecar("--state-db", state_admin.state_url)

    status, body, _ = send(service, key=token, password=None, subject="keyed, no password")
    assert status == 200, body
    assert body[0]["log"][2]["key"] == f"send_key:{key_id}"
    assert "password" not in body[0]["log"][2]
    plain_qid = body[0]["queue_id"]
    line = last_log_line(abuse_bed, f": {plain_qid}: client=")
    assert "postfix/plain/smtpd[" in line and "sasl_username" not in line, line

    status, body, _ = send(service, key=token, subject="keyed, with password")
    assert status == 200, body
    assert body[0]["log"][2]["key"] == f"send_key:{key_id}"
    keyed_587_qid = body[0]["queue_id"]
    line = last_log_line(abuse_bed, f": {keyed_587_qid}: client=")
    assert "postfix/submission/smtpd[" in line and f"sasl_username={SENDER}" in line, line

    status, body, _ = send(service, subject="admin key, with password")
    assert status == 200, body
    assert body[0]["log"][2]["key"] == "api_key"
    # The admin key still needs the mailbox password.
    status, body, _ = send(service, password=None)
    assert (status, code(body)) == (400, "smtp_auth_required")

    received = {str(m.message["Subject"]): str(m.message["Received"]) for m in settled(abuse_bed, 3)}
    # postfix names the protocol: ESMTP on the plain port, ESMTPSA after TLS and AUTH.
    assert f"with ESMTP id {plain_qid}" in received["keyed, no password"]
    assert f"with ESMTPSA id {keyed_587_qid}" in received["keyed, with password"]
    assert "with ESMTPSA id" in received["admin key, with password"]
    assert token.rpartition("-")[2] not in service.log_text()
    assert f"key=send_key:{key_id}" in service.log_text()


def test_send_key_expiry_networks_disable_and_delete(
    abuse_bed: Testbed, sidecar: Callable[..., Sidecar], state_admin: StateAdmin
) -> None:
    """An expired key, a key used outside its networks, a disabled and a deleted key are refused
    as mailcow refuses a bad API key; enabled again, the key works."""
    expired, expired_id = state_admin.add_send_key(SENDER, "--expires", "2020-01-01")
    valid, valid_id = state_admin.add_send_key(SENDER, "--expires", "2099-12-31T23:59:59Z")
    networked, _ = state_admin.add_send_key(SENDER, "--allow-from", "198.51.100.0/24")
    service = sidecar("--state-db", state_admin.state_url, "--trusted-proxies", "127.0.0.1")
    failed = {"type": "error", "msg": "authentication failed"}

    assert send(service, key=expired, password=None) [:2] == (401, failed)
    assert send(service, key=valid, password=None, subject="before its expiry")[0] == 200
    assert send(service, key=networked, password=None)[:2] == (401, {"type": "error", "msg": "api access denied for ip 127.0.0.1"})
    assert send(service, key=networked, password=None, ip="198.51.100.9", subject="from its network")[0] == 200
    states = {line.split()[0]: line.split()[2] for line in state_admin.ok("sendkey", "list").splitlines()}
    assert (states[expired_id], states[valid_id]) == ("expired", "active")

    state_admin.ok("sendkey", "disable", valid_id)
    assert send(service, key=valid, password=None)[:2] == (401, failed)
    state_admin.ok("sendkey", "disable", "--enable", valid_id)
    assert send(service, key=valid, password=None, subject="enabled again")[0] == 200
    state_admin.ok("sendkey", "delete", valid_id)
    assert send(service, key=valid, password=None)[:2] == (401, failed)

    subjects = sorted(str(m.message["Subject"]) for m in settled(abuse_bed, 3))
    assert subjects == ["before its expiry", "enabled again", "from its network"]


def test_wrong_send_keys_count_as_failures(
    abuse_bed: Testbed,
    sidecar: Callable[..., Sidecar],
    redis_db: RedisClient,
    state_admin: StateAdmin,
    f2b_lines: F2bSubscriber,
) -> None:
    """A wrong send key is a failed login: netfilter is told the key id, and after 10 from one
    (non-loopback) address the service's own counter refuses that address, even the right key."""
    token, key_id = state_admin.add_send_key(SENDER)
    wrong = token[:-1] + ("0" if token[-1] != "0" else "1")
    service = redis_service(sidecar, redis_db, state_admin)
    for _ in range(10):
        assert send(service, key=wrong, password=None, ip="198.51.100.77")[:2] == (
            401, {"type": "error", "msg": "authentication failed"}
        )
    status, body, headers = send(service, key=token, password=None, ip="198.51.100.77")
    assert (status, code(body)) == (429, "smtp_too_many_failures"), body
    assert 1790 <= int(headers["Retry-After"]) <= 1800
    # The ban is the address's, not the key's.
    assert send(service, key=token, password=None, ip="198.51.100.78", subject="another address")[0] == 200
    expected = f"mailcow UI: Invalid password for smtp-api:{key_id} by 198.51.100.77"
    f2b_lines.wait_for(lambda line: line == expected)
    seen = f2b_lines.drain(0.3)
    assert [line for line in seen if line.endswith(" by 198.51.100.77")] == [expected] * 10, seen
    assert rule_1_address(expected) == "198.51.100.77"
    (message,) = settled(abuse_bed, 1)
    assert message.message["Subject"] == "another address"


def start_private_redis(port: int, directory: Path) -> subprocess.Popen[bytes]:
    """A Redis server of this test's own on ``port`` (no persistence), answering PING (bounded)."""
    process = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
         "--dir", str(directory)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as probe:
                probe.sendall(b"PING\r\n")
                if probe.recv(16).startswith(b"+PONG"):
                    return process
        except OSError:
            pass
        assert process.poll() is None and time.monotonic() < deadline, "private redis-server did not start"
        time.sleep(0.05)


def test_redis_outage_fails_closed_and_recovers(
    abuse_bed: Testbed, sidecar: Callable[..., Sidecar], state_admin: StateAdmin, tmp_path: Path
) -> None:
    """When the service's Redis stops, sends are refused (503) within --redis-timeout and nothing
    is sent; once Redis is back, sends go through again by themselves."""
    port = free_port()
    server = start_private_redis(port, tmp_path)
    try:
        service = sidecar("--redis", f"redis://127.0.0.1:{port}/0", "--redis-timeout", "1", "--state-db", state_admin.state_url)
        assert send(service, subject="before the outage")[0] == 200
        server.terminate()
        server.wait(10)
        started = time.monotonic()
        status, body, _ = send(service, subject="during the outage")
        assert (status, code(body)) == (503, "smtp_ratelimit_unavailable"), body
        assert time.monotonic() - started < 3.0
        server = start_private_redis(port, tmp_path)
        back = time.monotonic()
        while (status := send(service, subject="after the outage")[0]) != 200:
            assert status == 503
            assert time.monotonic() - back < 20, "no recovery within 20 s of Redis answering again"
            time.sleep(0.2)
    finally:
        server.terminate()
        server.wait(10)
    subjects = sorted(str(m.message["Subject"]) for m in settled(abuse_bed, 2))
    assert subjects == ["after the outage", "before the outage"]
