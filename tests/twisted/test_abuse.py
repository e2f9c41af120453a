"""Send keys and abuse controls through the HTTP shell, in memory: every check over recording fakes."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import Any

import attrs
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailcow_smtp_api.abuse import AbuseControls, LocalBuckets, failure_line
from mailcow_smtp_api.core.config import from_options
from mailcow_smtp_api.core.errors import ApiError
from mailcow_smtp_api.core.model import Security
from mailcow_smtp_api.core.ratelimit import Limit, parse_limit
from mailcow_smtp_api.core.sendkeys import SendKey, new_key
from mailcow_smtp_api.service import SendService
from mailcow_smtp_api.web.api import SmtpApi

from .fakes import GOOD_KEY, FakeKeys, FakeLocalAuth, FakeSenders, FakeSubmitter, FakeThrottle

URL = "http://sidecar.test/api/v1/send/email"
NOW = datetime(2026, 6, 1, tzinfo=timezone.utc)
# netfilter-mailcow's default rule 1
NETFILTER_RULE_1 = re.compile(r"mailcow UI: Invalid password for .+ by ([0-9a-f\.:]+)")


@attrs.define
class FakeLimits:
    """mailcow's limits by subject; ``down`` answers like a Redis that does not answer."""

    values: dict[str, str] = attrs.Factory(dict)
    down: bool = False
    calls: list[tuple[str, str]] = attrs.Factory(list)

    def limits_for(self, login: str, domain: str) -> Deferred[tuple[Limit | None, Limit | None]]:
        self.calls.append((login, domain))
        if self.down:
            return fail(ApiError.of("smtp_ratelimit_unavailable", retry_after=5))
        return succeed((parse_limit(self.values.get(login)), parse_limit(self.values.get(domain))))


@attrs.define
class FakeAccess:
    """Logins limited to some client addresses."""

    allowed: dict[str, set[str]] = attrs.Factory(dict)

    def smtp_allowed(self, login: str, ip: str) -> Deferred[bool]:
        return succeed(login not in self.allowed or ip in self.allowed[login])


@attrs.define
class FakeBans:
    banned: dict[str, int | None] = attrs.Factory(dict)

    def ban_for(self, ip: str) -> Deferred[tuple[bool, int | None]]:
        return succeed((ip in self.banned, self.banned.get(ip)))


@attrs.define
class FakeReporter:
    lines: list[str] = attrs.Factory(list)

    def publish_failure(self, line: str) -> None:
        self.lines.append(line)


@attrs.define
class FakeSendKeys:
    keys: dict[str, SendKey] = attrs.Factory(dict)

    def send_key(self, key_id: str) -> Deferred[SendKey | None]:
        return succeed(self.keys.get(key_id))


class AbuseWebTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.build("127.0.0.1:10587,127.0.0.1:10025/plain")

    def build(self, allow: str) -> None:
        self.clock = Clock()
        self.clock.advance(NOW.timestamp())
        self.submitter, self.throttle, self.keys = FakeSubmitter(), FakeThrottle(limit=10), FakeKeys()
        self.limits, self.access, self.bans, self.reporter = FakeLimits(), FakeAccess(), FakeBans(), FakeReporter()
        self.send_keys = FakeSendKeys()
        self.senders = FakeSenders({("user1@example.org", "user1@example.org"), ("user1@example.org", "shop@example.org")})
        service = SendService(
            config=from_options({"smtp-host": "127.0.0.1", "smtp-port": "10587", "smtp-allow": allow}, environ={}),
            keys=self.keys,
            senders=self.senders,
            submitter=self.submitter,
            throttle=self.throttle,
            now=lambda: NOW,
            new_token=lambda: "tok",
            local_auth=FakeLocalAuth(),
            abuse=AbuseControls(
                limits=self.limits,
                buckets=LocalBuckets(self.clock),
                access=self.access,
                bans=self.bans,
                reporter=self.reporter,
            ),
            send_keys=self.send_keys,
        )
        api = SmtpApi(service=service, trusted_proxies=("127.0.0.1/32",))
        self.client = StubTreq(api.resource())

    def add_key(self, **changes: Any) -> tuple[str, SendKey]:
        fresh = new_key()
        key = SendKey(key_id=fresh.key_id, login="user1@example.org", salt=fresh.salt, digest=fresh.digest)
        key = attrs.evolve(key, **changes)
        self.send_keys.keys[key.key_id] = key
        return fresh.token, key

    def send(self, key: str = GOOD_KEY, ip: str = "192.0.2.10", **fields: Any) -> tuple[int, Any, Any]:
        body = {"from": "user1@example.org", "to": ["r1@example.net"], "subject": "s", "body": "b"}
        body.update(fields)
        body = {k: v for k, v in body.items() if v is not None}
        headers = {"Content-Type": "application/json", "X-API-Key": key, "X-Forwarded-For": ip}
        response = self.successResultOf(self.client.request("POST", URL, data=json.dumps(body).encode(), headers=headers))
        return response.code, json.loads(self.successResultOf(response.content())), response.headers

    # ------------------------------------------------------------------ send keys

    def test_send_key_sends_without_password_on_the_plain_target(self) -> None:
        """A send key needs no password: the message goes to the plain target without AUTH, as its login."""
        token, key = self.add_key()
        code, body, _ = self.send(token, **{"from": "shop@example.org"})
        self.assertEqual(code, 200, body)
        target, credentials, envelope, _ = self.submitter.sent[0]
        self.assertEqual((target.port, target.security, credentials), (10025, Security.PLAIN, None))
        self.assertEqual(envelope.sender, "shop@example.org")
        self.assertIn(("user1@example.org", "shop@example.org"), self.senders.calls)
        self.assertEqual(body[0]["log"][2]["key"], f"send_key:{key.key_id}")
        self.assertNotIn(token, json.dumps(body))

    def test_send_key_with_password_submits_with_auth(self) -> None:
        """With a password as well, the usual authenticated submission on 587 is used."""
        token, _ = self.add_key()
        code, _, _ = self.send(token, password="pw1")
        self.assertEqual(code, 200)
        target, credentials, _, _ = self.submitter.sent[0]
        self.assertEqual((target.port, credentials.login if credentials else None), (10587, "user1@example.org"))

    def test_send_key_scope_is_enforced(self) -> None:
        """Another smtp_user, a sender outside the key's list or one the login does not own: 403, nothing sent."""
        token, _ = self.add_key(senders=("user1@example.org",))
        cases = [
            ({"smtp_user": "other@example.org"}, "smtp_user"),
            ({"from": "shop@example.org"}, "from"),
        ]
        for fields, field in cases:
            code, body, _ = self.send(token, **fields)
            self.assertEqual((code, body[0]["msg"], body[0]["field"]), (403, "smtp_unauthorized_sender", field))
        open_token, _ = self.add_key()
        code, body, _ = self.send(open_token, **{"from": "stranger@example.org"})
        self.assertEqual((code, body[0]["msg"]), (403, "smtp_unauthorized_sender"))
        self.assertEqual(self.submitter.sent, [])

    def test_disabled_expired_and_wrong_keys_fail_and_are_reported(self) -> None:
        """Each bad send key answers mailcow's 401, counts against the address and tells fail2ban its id only."""
        good, key = self.add_key()
        disabled, dkey = self.add_key(disabled=True)
        expired, ekey = self.add_key(expires_at=NOW.timestamp())
        wrong = good[:-4] + ("0000" if not good.endswith("0000") else "1111")
        for token in (disabled, expired, wrong, "smtpapi-not-a-key"):
            code, body, _ = self.send(token, ip="203.0.113.5")
            self.assertEqual((code, body), (401, {"type": "error", "msg": "authentication failed"}))
        self.assertEqual(self.throttle.failures["203.0.113.5"], 4)
        self.assertEqual(
            self.reporter.lines,
            [failure_line(k, "203.0.113.5") for k in (dkey.key_id, ekey.key_id, key.key_id, "invalid")],
        )
        for line in self.reporter.lines:
            self.assertEqual(NETFILTER_RULE_1.search(line).group(1), "203.0.113.5")  # type: ignore[union-attr]
            self.assertNotIn(good.split("-")[-1], line)
        self.assertEqual(self.submitter.sent, [])

    def test_send_key_networks(self) -> None:
        """A key with --allow-from works only from there."""
        token, _ = self.add_key(allow_from="192.0.2.0/24")
        self.assertEqual(self.send(token, ip="192.0.2.77")[0], 200)
        code, body, _ = self.send(token, ip="198.51.100.1")
        self.assertEqual((code, body), (401, {"type": "error", "msg": "api access denied for ip 198.51.100.1"}))

    def test_no_plain_target_is_a_clear_403(self) -> None:
        """Without a plain target in --smtp-allow, or naming a TLS port, a password-less send key send is refused."""
        self.build("127.0.0.1:10587")
        token, _ = self.add_key()
        code, body, _ = self.send(token)
        self.assertEqual((code, body[0]["msg"]), (403, "smtp_no_plain_target"))
        self.build("127.0.0.1:10587,127.0.0.1:10025/plain")
        token, _ = self.add_key()
        code, body, _ = self.send(token, smtp_port=10587)
        self.assertEqual((code, body[0]["msg"], body[0]["field"]), (403, "smtp_no_plain_target", "smtp_port"))
        self.assertEqual(self.submitter.sent, [])

    def test_mailcow_key_failure_is_reported_without_the_key(self) -> None:
        """A wrong mailcow API key is published as smtp-api:api-key, and the admin key still works with a password."""
        self.send("WRONG-KEY-123456", ip="203.0.113.9", password="pw1")
        self.assertEqual(self.reporter.lines, ["mailcow UI: Invalid password for smtp-api:api-key by 203.0.113.9"])
        code, body, _ = self.send(GOOD_KEY, password="pw1")
        self.assertEqual((code, body[0]["log"][2]["key"]), (200, "api_key"))

    def test_wrong_mailbox_password_on_port_25_is_reported_with_the_login(self) -> None:
        """A failed local password check names the login in the fail2ban line."""
        code, body, _ = self.send(GOOD_KEY, ip="203.0.113.7", password="wrong", smtp_port=10025)
        self.assertEqual((code, body[0]["msg"]), (403, "smtp_auth_failed"))
        self.assertEqual(self.reporter.lines, [failure_line("user1@example.org", "203.0.113.7")])

    # ------------------------------------------------------------------ bans and allow lists

    def test_banned_address_is_refused_before_any_key_check(self) -> None:
        """An address netfilter banned gets 429 with the ban's remaining time; no key or database work."""
        self.bans.banned["203.0.113.66"] = 1200
        self.bans.banned["203.0.113.67"] = None
        code, body, headers = self.send(GOOD_KEY, ip="203.0.113.66", password="pw1")
        self.assertEqual((code, body[0]["msg"], headers.getRawHeaders("Retry-After")), (429, "smtp_too_many_failures", ["1200"]))
        code, _, headers = self.send("bad", ip="203.0.113.67")
        self.assertEqual((code, headers.getRawHeaders("Retry-After")), (429, None))
        self.assertEqual((self.keys.calls, self.reporter.lines, self.submitter.sent), ([], [], []))

    def test_smtp_allow_list(self) -> None:
        """A limited mailbox sends only from its networks; others are not affected."""
        self.access.allowed["user1@example.org"] = {"192.0.2.10"}
        self.assertEqual(self.send(GOOD_KEY, ip="192.0.2.10", password="pw1")[0], 200)
        code, body, _ = self.send(GOOD_KEY, ip="192.0.2.11", password="pw1")
        self.assertEqual((code, body[0]["msg"]), (403, "smtp_access_denied"))
        self.assertEqual(len(self.submitter.sent), 1)

    # ------------------------------------------------------------------ rate limits

    def test_mailbox_limit_counts_recipients_and_sets_headers(self) -> None:
        """Recipients (to, cc, bcc) fill the bucket exactly; the next one is 429 and nothing is sent."""
        self.limits.values = {"user1@example.org": "3 / 1h", "example.org": "100 / 1h"}
        code, _, headers = self.send(password="pw1", to=["a@example.net"], bcc=["b@example.net"])
        self.assertEqual(code, 200)
        self.assertEqual(headers.getRawHeaders("RateLimit-Policy"), ['"mailbox";q=3;w=3600'])
        self.assertEqual(headers.getRawHeaders("RateLimit"), ['"mailbox";r=1;t=2400'])
        code, _, headers = self.send(password="pw1", cc=None, to=["c@example.net"])
        self.assertEqual((code, headers.getRawHeaders("RateLimit")), (200, ['"mailbox";r=0;t=3600']))
        code, body, headers = self.send(password="pw1")
        self.assertEqual((code, body[0]["msg"]), (429, "smtp_rate_limited"))
        self.assertEqual(headers.getRawHeaders("Retry-After"), ["1200"])
        self.assertEqual(body[0]["detail"], {"policy": "mailbox", "limit": "3 / 1h", "subject": "user1@example.org"})
        self.assertEqual(headers.getRawHeaders("RateLimit"), ['"mailbox";r=0;t=3600'])
        self.assertEqual(len(self.submitter.sent), 2)
        self.clock.advance(1200)
        self.assertEqual(self.send(password="pw1")[0], 200)

    def test_domain_limit_applies_when_the_login_has_none(self) -> None:
        """Without an entry for the login, the envelope sender's domain limit counts."""
        self.limits.values = {"example.org": "1 / 1m"}
        _, _, headers = self.send(password="pw1")
        self.assertEqual(headers.getRawHeaders("RateLimit-Policy"), ['"domain";q=1;w=60'])
        self.assertEqual(self.send(password="pw1")[0], 429)

    def test_mail_to_oneself_is_not_limited(self) -> None:
        """Mail whose only recipient is the login passes a full bucket and carries no limit headers."""
        self.limits.values = {"user1@example.org": "1 / 1h"}
        self.assertEqual(self.send(password="pw1")[0], 200)
        for _ in range(3):
            code, _, headers = self.send(password="pw1", to=["user1@example.org"])
            self.assertEqual((code, headers.getRawHeaders("RateLimit")), (200, None))

    def test_send_key_rate_is_a_second_bucket(self) -> None:
        """A key's own rate limits it below mailcow's limit; both are reported."""
        self.limits.values = {"user1@example.org": "100 / 1h"}
        token, key = self.add_key(rate="2 / 1m")
        code, _, headers = self.send(token, to=["a@example.net", "b@example.net"])
        self.assertEqual(code, 200)
        self.assertEqual(headers.getRawHeaders("RateLimit-Policy"), ['"mailbox";q=100;w=3600, "key";q=2;w=60'])
        code, body, _ = self.send(token)
        self.assertEqual((code, body[0]["detail"]["policy"], body[0]["detail"]["subject"]), (429, "key", key.key_id))

    def test_too_many_recipients_for_the_limit(self) -> None:
        """A message larger than the whole limit is refused without Retry-After: it has to be split."""
        self.limits.values = {"user1@example.org": "2 / 1h"}
        code, body, headers = self.send(password="pw1", to=["a@example.net", "b@example.net", "c@example.net"])
        self.assertEqual((code, body[0]["msg"], headers.getRawHeaders("Retry-After")), (429, "smtp_rate_limited", None))
        self.assertIn("split", body[0]["message"])

    def test_limit_source_down_fails_closed(self) -> None:
        """When the limit source does not answer, nothing is sent: 503 smtp_ratelimit_unavailable."""
        self.limits.down = True
        code, body, headers = self.send(password="pw1")
        self.assertEqual((code, body[0]["msg"], headers.getRawHeaders("Retry-After")), (503, "smtp_ratelimit_unavailable", ["5"]))
        self.assertEqual(self.submitter.sent, [])

    def test_answer_names_the_login_the_key_sent_as(self) -> None:
        """With a send key and no smtp_user, the answer's log shows the key's login, not the from address."""
        token, _ = self.add_key()
        code, body, _ = self.send(token, **{"from": "shop@example.org"})
        self.assertEqual((code, body[0]["log"][2]["smtp_user"]), (200, "user1@example.org"))
        code, body, _ = self.send(token, **{"from": "stranger@example.org"})
        self.assertEqual((code, body[0]["log"][2]["smtp_user"]), (403, "user1@example.org"))
