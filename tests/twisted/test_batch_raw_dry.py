"""The native batch, raw and dry-run routes in memory (StubTreq): one pipeline, every check, and
each message's own answer."""

from __future__ import annotations

import base64
import json
from datetime import datetime, timezone
from typing import Any

from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase

from mailcow_smtp_api.core.config import from_options
from mailcow_smtp_api.service import IdempotentSends, SendService
from mailcow_smtp_api.web.api import SmtpApi

from .fakes import GOOD_KEY, FakeKeys, FakeSenders, FakeSubmitter, FakeThrottle
from .test_idempotent_send import SqliteNowStore
from .test_web import EXAMPLE

BASE = "http://sidecar.test/api/v1/send"
RAW = (
    b"From: User One <user1@example.org>\n"
    b"To: recipient@example.com\n"
    b"Bcc: hidden@example.net\n"
    b"Subject: raw\n"
    b" folded on\n"
    b"\n"
    b"Hello\n"
    b".a line starting with a dot\n"
)


class RoutesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.submitter = FakeSubmitter()
        self.senders = FakeSenders({("user1@example.org", "user1@example.org")})
        self.tokens = iter(f"tok{i}" for i in range(1000))
        service = SendService(
            config=from_options(
                {"smtp-host": "127.0.0.1", "smtp-port": "10587", "smtp-allow": "127.0.0.1:10587", "max-batch": "3"},
                environ={},
            ),
            keys=FakeKeys(),
            senders=self.senders,
            submitter=self.submitter,
            throttle=FakeThrottle(),
            now=lambda: datetime(2026, 1, 1, tzinfo=timezone.utc),
            new_token=lambda: next(self.tokens),
        )
        self.store = SqliteNowStore()
        sends = IdempotentSends(self.store, now=lambda: 1000.0, new_token=lambda: next(self.tokens))
        self.client = StubTreq(SmtpApi(service=service, idempotency=sends).resource())

    def call(self, path: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
        hdrs = {"Content-Type": "application/json", "X-API-Key": GOOD_KEY, **(headers or {})}
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = self.successResultOf(self.client.request("POST", f"{BASE}/{path}", data=data, headers=hdrs))
        content = self.successResultOf(response.content())
        return response.code, json.loads(content), response.headers

    # -- dry run

    def test_a_dry_run_answers_the_exact_bytes_a_send_submits_and_sends_nothing(self) -> None:
        """dry_run runs every check and returns the message and envelope; postfix is not contacted."""
        code, body, _ = self.call("email", {**EXAMPLE, "dry_run": True, "message_id": "<fixed@example.org>"})
        self.assertEqual(code, 200)
        self.assertEqual(body[0]["msg"][0], "smtp_dry_run")
        self.assertEqual(self.submitter.sent, [])
        self.assertEqual(body[0]["envelope"], {"from": "user1@example.org", "to": ["recipient@example.com"]})
        self.assertEqual(body[0]["target"], "127.0.0.1:10587")
        built = base64.b64decode(body[0]["message"])
        request_id = body[0]["log"][2]["request_id"]
        # The same request sent for real: the bytes differ only in the request id header.
        code, sent_body, _ = self.call("email", {**EXAMPLE, "message_id": "<fixed@example.org>"})
        self.assertEqual(code, 200)
        submitted = self.submitter.sent[0][3]
        sent_id = sent_body[0]["log"][2]["request_id"]
        self.assertEqual(built.replace(request_id.encode(), sent_id.encode()), submitted)
        self.assertNotIn("mailbox-secret-pw", json.dumps(body))

    def test_a_dry_run_is_refused_where_a_send_would_be(self) -> None:
        """A sender the login may not use is refused in a dry run too, with the same code."""
        code, body, _ = self.call("email", {**EXAMPLE, "from": "other@example.org", "smtp_user": "user1@example.org", "dry_run": True})
        self.assertEqual((code, body[0]["msg"], body[0]["field"]), (403, "smtp_unauthorized_sender", "from"))

    def test_dry_run_must_be_a_boolean(self) -> None:
        """dry_run: "yes" is refused by name."""
        code, body, _ = self.call("email", {**EXAMPLE, "dry_run": "yes"})
        self.assertEqual((code, body[0]["msg"], body[0]["field"]), (400, "smtp_invalid_field", "dry_run"))

    # -- batch

    def test_a_batch_answers_each_message_and_one_failure_touches_no_other(self) -> None:
        """Three messages, the second invalid: two sent, one refused by field, answer 200 with three results."""
        messages = [
            {**EXAMPLE, "to": ["a@example.com"]},
            {**EXAMPLE, "subject": ""},
            {**EXAMPLE, "to": ["c@example.com"]},
        ]
        code, body, _ = self.call("batch", {"messages": messages})
        self.assertEqual(code, 200)
        self.assertEqual([r["status"] for r in body["results"]], [200, 400, 200])
        self.assertEqual([r["code"] for r in body["results"]], ["smtp_mail_sent", "smtp_empty_subject", "smtp_mail_sent"])
        self.assertEqual((body["ok"], body["failed"]), (2, 1))
        self.assertEqual(sorted(s[2].recipients for s in self.submitter.sent), [("a@example.com",), ("c@example.com",)])
        self.assertTrue(body["results"][0]["message_id"].startswith("<tok"))
        self.assertEqual(body["results"][1]["answer"][0]["field"], "subject")
        self.assertNotIn("mailbox-secret-pw", json.dumps(body))

    def test_each_batch_message_is_sent_once_per_idempotency_key(self) -> None:
        """A repeated batch replays the messages that have a key and sends again those without."""
        messages = [{**EXAMPLE, "idempotency_key": "order-1"}, {**EXAMPLE, "to": ["b@example.com"]}]
        self.call("batch", {"messages": messages})
        self.assertEqual(len(self.submitter.sent), 2)
        code, body, _ = self.call("batch", {"messages": messages})
        self.assertEqual(code, 200)
        self.assertEqual([r["replayed"] for r in body["results"]], [True, False])
        self.assertEqual(len(self.submitter.sent), 3)

    def test_the_request_idempotency_key_gives_each_message_its_own(self) -> None:
        """With Idempotency-Key on the batch, message i is keyed <key>:<i>: a repeat sends nothing."""
        messages = [EXAMPLE, {**EXAMPLE, "to": ["b@example.com"]}]
        self.call("batch", {"messages": messages}, {"Idempotency-Key": "nightly-42"})
        _, body, _ = self.call("batch", {"messages": messages}, {"Idempotency-Key": "nightly-42"})
        self.assertEqual([r["replayed"] for r in body["results"]], [True, True])
        self.assertEqual(len(self.submitter.sent), 2)
        self.assertEqual({row[0] for row in self.store.rows()}, {"nightly-42:0", "nightly-42:1"})

    def test_a_batch_over_the_limit_or_of_the_wrong_shape_is_refused_whole(self) -> None:
        """More than --max-batch messages, no list, an unknown field: 400, nothing sent."""
        cases = [
            ({"messages": [EXAMPLE] * 4}, "smtp_too_many_messages", "messages"),
            ({"messages": []}, "smtp_invalid_field", "messages"),
            ({"messages": EXAMPLE}, "smtp_invalid_field", "messages"),
            ({"messages": [EXAMPLE], "extra": 1}, "smtp_unknown_field", "extra"),
        ]
        for batch, code_name, field in cases:
            code, body, _ = self.call("batch", batch)
            self.assertEqual((code, body[0]["msg"], body[0]["field"]), (400, code_name, field), batch)
        self.assertEqual(self.submitter.sent, [])

    def test_a_batch_item_that_is_no_object_or_has_a_bad_key_fails_alone(self) -> None:
        """A string in place of a message, and a key that is no string, fail their slot only."""
        code, body, _ = self.call("batch", {"messages": ["nope", {**EXAMPLE, "idempotency_key": 5}, EXAMPLE]})
        self.assertEqual(code, 200)
        self.assertEqual([r["code"] for r in body["results"]], ["smtp_invalid_json", "smtp_invalid_idempotency_key", "smtp_mail_sent"])
        self.assertEqual(len(self.submitter.sent), 1)

    def test_a_batch_with_a_wrong_key_is_401_and_sends_nothing(self) -> None:
        code, body, _ = self.call("batch", {"messages": [EXAMPLE]}, {"X-API-Key": "wrong"})
        self.assertEqual((code, body), (401, {"type": "error", "msg": "authentication failed"}))
        self.assertEqual(self.submitter.sent, [])

    # -- raw

    def raw(self, message: bytes, **fields: Any) -> dict[str, Any]:
        return {
            "message": base64.b64encode(message).decode(),
            "envelope": {"to": ["recipient@example.com", "hidden@example.net"]},
            "password": "mailbox-secret-pw",
            **fields,
        }

    def test_a_raw_message_goes_out_as_written_without_bcc(self) -> None:
        """CRLF line ends, no Bcc line, a Message-ID and Date added, the header kept, the envelope as given."""
        code, body, _ = self.call("raw", self.raw(RAW))
        self.assertEqual(code, 200, body)
        _target, credentials, envelope, data = self.submitter.sent[0]
        self.assertEqual(envelope.sender, "user1@example.org")
        self.assertEqual(envelope.recipients, ("recipient@example.com", "hidden@example.net"))
        self.assertEqual(credentials.login if credentials else None, "user1@example.org")
        self.assertNotIn(b"Bcc", data)
        self.assertNotIn(b"hidden@example.net", data)
        self.assertIn(b"\r\nSubject: raw\r\n folded on\r\n\r\nHello\r\n.a line starting with a dot\r\n", data)
        self.assertTrue(data.startswith(b"Message-ID: <tok"), data[:80])
        self.assertIn(b"\r\nDate: ", data)
        self.assertNotIn(b"\n", data.replace(b"\r\n", b""))

    def test_a_raw_message_keeps_its_own_message_id(self) -> None:
        code, body, _ = self.call("raw", self.raw(b"Message-ID: <mine@example.org>\r\n" + RAW))
        self.assertEqual((code, body[0]["message_id"]), (200, "<mine@example.org>"))
        self.assertEqual(self.submitter.sent[0][3].count(b"Message-ID:"), 1)

    def test_the_header_from_must_be_an_address_the_login_may_send_as(self) -> None:
        """The envelope sender is allowed, the header From is not: 403 naming message.From."""
        forged = RAW.replace(b"From: User One <user1@example.org>", b"From: Boss <boss@example.org>")
        code, body, _ = self.call("raw", self.raw(forged, envelope={"from": "user1@example.org", "to": ["r@example.com"]}))
        self.assertEqual((code, body[0]["msg"], body[0]["field"]), (403, "smtp_unauthorized_sender", "message.From"))
        self.assertEqual(self.submitter.sent, [])

    def test_malformed_raw_messages_are_refused_by_field(self) -> None:
        cases = [
            (b"From: a@example.org\r\nFrom: user1@example.org\r\n\r\nx\r\n", "smtp_invalid_raw_message", "message"),
            (b"Subject: no from\r\n\r\nx\r\n", "smtp_invalid_raw_message", "message"),
            (b"From: user1@example.org\r\n\r\n" + b"x" * 999 + b"\r\n", "smtp_invalid_raw_message", "message"),
            (b"From: user1@example.org\r\nSubject: caf\xc3\xa9\r\n\r\nx\r\n", "smtp_invalid_raw_message", "message"),
            (b"From: user1@example.org, other@example.org\r\n\r\nx\r\n", "smtp_invalid_raw_message", "message.From"),
        ]
        for message, code_name, field in cases:
            code, body, _ = self.call("raw", self.raw(message))
            self.assertEqual((code, body[0]["msg"], body[0]["field"]), (400, code_name, field), message)
        code, body, _ = self.call("raw", {**self.raw(RAW), "subject": "x"})
        self.assertEqual((code, body[0]["msg"], body[0]["field"]), (400, "smtp_unknown_field", "subject"))
        code, body, _ = self.call("raw", {**self.raw(RAW), "message": "not base64!"})
        self.assertEqual((code, body[0]["msg"], body[0]["field"]), (400, "smtp_invalid_raw_message", "message"))
        self.assertEqual(self.submitter.sent, [])

    def test_a_raw_dry_run_shows_the_message_as_it_would_leave(self) -> None:
        code, body, _ = self.call("raw", self.raw(RAW, dry_run=True))
        self.assertEqual((code, body[0]["msg"][0]), (200, "smtp_dry_run"))
        built = base64.b64decode(body[0]["message"])
        self.assertNotIn(b"Bcc", built)
        self.assertEqual(body[0]["envelope"]["to"], ["recipient@example.com", "hidden@example.net"])
        self.assertEqual(self.submitter.sent, [])
