"""The Mailgun and Postmark routes in memory (StubTreq): credentials, form and JSON decoding, the
one pipeline behind them, and the providers' answer shapes."""

from __future__ import annotations

import base64
import email
import json
from email import policy as email_policy
from typing import Any
from urllib.parse import urlencode

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailcow_smtp_api.abuse import AbuseControls, LocalBuckets
from mailcow_smtp_api.core.config import from_options
from mailcow_smtp_api.core.sendkeys import SendKey, new_key
from mailcow_smtp_api.service import IdempotentSends, SendService
from mailcow_smtp_api.web.api import SmtpApi

from .fakes import FakeKeys, FakeLocalAuth, FakeSenders, FakeSubmitter, FakeThrottle
from .test_abuse import NOW, FakeAccess, FakeBans, FakeLimits, FakeReporter, FakeSendKeys
from .test_idempotent_send import SqliteNowStore

HOST = "http://sidecar.test"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))


def multipart(fields: list[tuple[str, str]], files: list[tuple[str, str, str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body: text fields, then (field, filename, type, bytes) file parts."""
    boundary = "----sidecar-test-boundary"
    out = b""
    for name, value in fields:
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value.encode() + b"\r\n"
    for name, filename, content_type, data in files:
        out += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n"
        ).encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class ProviderBed(SynchronousTestCase):
    """A service with one send key, a plain target and an idempotency store, behind StubTreq."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW.timestamp())
        self.submitter = FakeSubmitter()
        self.send_keys = FakeSendKeys()
        senders = FakeSenders({("user1@example.org", "user1@example.org"), ("user1@example.org", "news@example.org")})
        tokens = iter(f"tok{i}" for i in range(10_000))
        service = SendService(
            config=from_options(
                {"smtp-host": "127.0.0.1", "smtp-port": "10587", "smtp-allow": "127.0.0.1:10587,127.0.0.1:10025/plain"},
                environ={},
            ),
            keys=FakeKeys(),
            senders=senders,
            submitter=self.submitter,
            throttle=FakeThrottle(limit=50),
            now=lambda: NOW,
            new_token=lambda: next(tokens),
            local_auth=FakeLocalAuth(),
            abuse=AbuseControls(
                limits=FakeLimits(), buckets=LocalBuckets(self.clock), access=FakeAccess(), bans=FakeBans(), reporter=FakeReporter()
            ),
            send_keys=self.send_keys,
        )
        sends = IdempotentSends(SqliteNowStore(), now=lambda: NOW.timestamp(), new_token=lambda: next(tokens))
        self.client = StubTreq(SmtpApi(service=service, idempotency=sends).resource())
        fresh = new_key()
        self.key = fresh.token
        self.send_keys.keys[fresh.key_id] = SendKey(key_id=fresh.key_id, login="user1@example.org", salt=fresh.salt, digest=fresh.digest)

    def post(self, path: str, data: bytes, headers: dict[str, str]) -> tuple[int, Any, Any]:
        response = self.successResultOf(self.client.request("POST", HOST + path, data=data, headers=headers))
        return response.code, json.loads(self.successResultOf(response.content())), response.headers

    def mailgun(self, fields: list[tuple[str, str]], files: list[tuple[str, str, str, bytes]] | None = None,
                path: str = "/v3/example.org/messages", user: str = "api", key: str | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
        auth = base64.b64encode(f"{user}:{key or self.key}".encode()).decode()
        if files is None:
            data, content_type = urlencode(fields).encode(), "application/x-www-form-urlencoded"
        else:
            data, content_type = multipart(fields, files)
        return self.post(path, data, {"Authorization": f"Basic {auth}", "Content-Type": content_type, **(headers or {})})

    def postmark(self, body: Any, path: str = "/email", token: str | None = None) -> tuple[int, Any, Any]:
        headers = {"Content-Type": "application/json", "Accept": "application/json", "X-Postmark-Server-Token": token or self.key}
        return self.post(path, json.dumps(body).encode(), headers)

    def sent(self, index: int = 0) -> email.message.EmailMessage:
        return email.message_from_bytes(self.submitter.sent[index][3], policy=email_policy.default)  # type: ignore[return-value]



class ProviderTests(ProviderBed):
    # ------------------------------------------------------------------ Mailgun

    def test_a_mailgun_form_with_html_an_attachment_and_an_inline_image_is_sent(self) -> None:
        fields = [
            ("from", "News <news@example.org>"), ("to", "a@example.com, \"Doe, Jane\" <jane@example.com>"),
            ("subject", "Hello"), ("text", "plain text"), ("html", '<p>hi <img src="cid:logo.png"></p>'),
            ("h:X-Campaign", "spring"), ("o:tag", "newsletter"), ("v:user-id", "42"),
        ]
        files = [("attachment", "report.pdf", "application/pdf", b"%PDF-1.4 data"), ("inline", "logo.png", "image/png", PNG)]
        code, body, _ = self.mailgun(fields, files)
        self.assertEqual(code, 200, body)
        self.assertEqual(body["message"], "Queued. Thank you.")
        self.assertTrue(body["id"].startswith("<tok") and body["id"].endswith("@example.org>"))
        envelope = self.submitter.sent[0][2]
        self.assertEqual((envelope.sender, envelope.recipients), ("news@example.org", ("a@example.com", "jane@example.com")))
        message = self.sent()
        self.assertEqual(message["Subject"], "Hello")
        self.assertEqual(message["X-Campaign"], "spring")
        self.assertEqual(message["X-Mailgun-Tag"], "newsletter")
        self.assertEqual(json.loads(message["X-Mailgun-Variables"]), {"user-id": "42"})
        parts = {part.get_filename(): part for part in message.walk() if part.get_filename()}
        self.assertEqual(parts["report.pdf"].get_content(), b"%PDF-1.4 data")
        self.assertEqual(parts["logo.png"].get_content(), PNG)
        self.assertEqual(parts["logo.png"]["Content-ID"], "<logo.png>")
        self.assertEqual(message.get_body(("plain",)).get_content().strip(), "plain text")  # type: ignore[union-attr]

    def test_recipient_variables_send_one_message_per_recipient_with_its_own_values(self) -> None:
        variables = {"a@example.com": {"name": "Ann"}, "b@example.com": {"name": "Bob"}}
        fields = [("from", "news@example.org"), ("to", "a@example.com"), ("to", "b@example.com"),
                  ("subject", "Hi %recipient.name%"), ("text", "Dear %recipient.name%"),
                  ("recipient-variables", json.dumps(variables))]
        code, body, _ = self.mailgun(fields)
        self.assertEqual(code, 200, body)
        self.assertEqual(len(self.submitter.sent), 2)
        seen = {}
        for index in range(2):
            message = self.sent(index)
            seen[message["To"]] = (message["Subject"], message.get_content().strip())
        self.assertEqual(seen, {"a@example.com": ("Hi Ann", "Dear Ann"), "b@example.com": ("Hi Bob", "Dear Bob")})

    def test_mailgun_refusals_use_mailgun_statuses_and_name_the_field(self) -> None:
        base = [("from", "news@example.org"), ("to", "a@example.com"), ("subject", "s"), ("text", "t")]
        cases = [
            (dict(user="someone"), base, 401, None),
            (dict(key="smtpapi-000000000000-" + "0" * 64), base, 401, None),
            (dict(path="/v3/other.example/messages"), base, 403, "domain"),
            ({}, base + [("o:tracking", "yes")], 400, "o:tracking"),
            ({}, base + [("template", "welcome")], 400, "template"),
            ({}, base + [("from", "user1@example.org")], 400, "from"),
            ({}, [("from", "news@example.org"), ("to", "a@example.com"), ("subject", "a\r\nBcc: x@evil.example"), ("text", "t")], 400, "subject"),
            ({}, [("from", "boss@example.org"), ("to", "a@example.com"), ("subject", "s"), ("text", "t")], 403, "from"),
            ({}, base[:1] + [("to", f"r{i}@example.com") for i in range(1001)] + base[2:]
             + [("recipient-variables", json.dumps({f"r{i}@example.com": {} for i in range(1001)}))], 400, None),
        ]
        for options, fields, status, field in cases:
            code, body, _ = self.mailgun(fields, **options)  # type: ignore[arg-type]
            self.assertEqual(code, status, (options, body))
            self.assertIsInstance(body["message"], str)
            if field is not None:
                self.assertEqual(body.get("field"), field, body)
        self.assertEqual(self.submitter.sent, [])

    def test_a_file_part_named_with_a_path_keeps_only_its_file_name(self) -> None:
        fields = [("from", "news@example.org"), ("to", "a@example.com"), ("subject", "s"), ("text", "t")]
        code, body, _ = self.mailgun(fields, [("attachment", "../../etc/passwd", "text/plain", b"x")])
        self.assertEqual(code, 200, body)
        names = [part.get_filename() for part in self.sent().walk() if part.get_filename()]
        self.assertEqual(names, ["passwd"])

    def test_testmode_answers_the_message_and_sends_nothing(self) -> None:
        fields = [("from", "news@example.org"), ("to", "a@example.com"), ("subject", "s"), ("text", "t"), ("o:testmode", "yes")]
        code, body, _ = self.mailgun(fields)
        self.assertEqual((code, body["message"]), (200, "Queued. Thank you."))
        self.assertEqual(self.submitter.sent, [])
        built = base64.b64decode(body["dry_run"][0]["message"])
        self.assertIn(b"Subject: s\r\n", built)

    def test_messages_mime_sends_the_callers_message(self) -> None:
        raw = b"From: news@example.org\r\nTo: a@example.com\r\nBcc: b@example.com\r\nSubject: mime\r\n\r\nbody\r\n"
        code, body, _ = self.mailgun([("to", "a@example.com"), ("to", "b@example.com")],
                                     [("message", "message.eml", "message/rfc822", raw)], path="/v3/example.org/messages.mime")
        self.assertEqual(code, 200, body)
        self.assertEqual(self.submitter.sent[0][2].recipients, ("a@example.com", "b@example.com"))
        self.assertNotIn(b"Bcc:", self.submitter.sent[0][3])
        self.assertIn(b"Subject: mime\r\n\r\nbody\r\n", self.submitter.sent[0][3])

    def test_a_mailgun_repeat_with_the_same_idempotency_key_sends_nothing_more(self) -> None:
        fields = [("from", "news@example.org"), ("to", "a@example.com"), ("subject", "s"), ("text", "t")]
        first = self.mailgun(fields, headers={"Idempotency-Key": "job-7"})
        second = self.mailgun(fields, headers={"Idempotency-Key": "job-7"})
        self.assertEqual(first[1], second[1])
        self.assertEqual(len(self.submitter.sent), 1)

    def test_a_form_of_the_wrong_type_is_refused(self) -> None:
        auth = base64.b64encode(f"api:{self.key}".encode()).decode()
        code, body, _ = self.post("/v3/example.org/messages", b"{}", {"Authorization": f"Basic {auth}", "Content-Type": "application/json"})
        self.assertEqual(code, 415)
        self.assertIn("multipart/form-data", body["message"])

    # ------------------------------------------------------------------ Postmark

    def test_a_postmark_email_with_an_inline_image_is_sent_and_answered_in_postmarks_shape(self) -> None:
        message = {
            "From": "news@example.org", "To": "a@example.com", "Subject": "Hello", "TextBody": "text",
            "HtmlBody": '<img src="cid:logo.png">', "Tag": "welcome", "Metadata": {"order": "7"},
            "Headers": [{"Name": "X-Campaign", "Value": "spring"}],
            "Attachments": [
                {"Name": "report.pdf", "Content": base64.b64encode(b"%PDF").decode(), "ContentType": "application/pdf"},
                {"Name": "logo.png", "Content": base64.b64encode(PNG).decode(), "ContentType": "image/png", "ContentID": "cid:logo.png"},
            ],
            "MessageStream": "outbound",
        }
        code, body, _ = self.postmark(message)
        self.assertEqual(code, 200, body)
        self.assertEqual((body["ErrorCode"], body["Message"], body["To"]), (0, "OK", "a@example.com"))
        self.assertTrue(body["MessageID"] and "<" not in body["MessageID"])
        self.assertTrue(body["SubmittedAt"].startswith(NOW.date().isoformat()))
        sent = self.sent()
        self.assertEqual((sent["X-PM-Tag"], sent["X-Campaign"]), ("welcome", "spring"))
        parts = {part.get_filename(): part for part in sent.walk() if part.get_filename()}
        self.assertEqual(parts["logo.png"]["Content-ID"], "<logo.png>")
        self.assertEqual(parts["report.pdf"].get_content(), b"%PDF")

    def test_a_postmark_token_that_is_no_key_is_401_with_error_code_10(self) -> None:
        code, body, _ = self.postmark({"From": "news@example.org", "To": "a@example.com", "TextBody": "t"}, token="nope")
        self.assertEqual((code, body["ErrorCode"]), (401, 10))
        self.assertEqual(self.submitter.sent, [])

    def test_a_postmark_batch_answers_each_message_with_http_200(self) -> None:
        good = {"From": "news@example.org", "To": "a@example.com", "Subject": "s", "TextBody": "t"}
        batch = [good, {**good, "Bogus": 1}, {**good, "From": "boss@example.org"}, {**good, "To": "b@example.com"}]
        code, body, _ = self.postmark(batch, path="/email/batch")
        self.assertEqual(code, 200)
        self.assertEqual([entry["ErrorCode"] for entry in body], [0, 300, 400, 0])
        self.assertIn("Bogus", body[1]["Message"])
        self.assertEqual(len(self.submitter.sent), 2)

    def test_a_postmark_body_that_is_no_json_is_refused_whole(self) -> None:
        headers = {"Content-Type": "application/json", "X-Postmark-Server-Token": self.key}
        code, body, _ = self.post("/email/batch", b'{"From": 1}', headers)
        self.assertEqual(code, 422, body)
        self.assertNotEqual(body["ErrorCode"], 0)



INJECTION = "x\r\nBcc: evil@example.net\r\nX-Injected: 1"
MAILGUN_BASE = [("from", "news@example.org"), ("to", "a@example.com"), ("subject", "s"), ("text", "t"), ("html", "<p>h</p>")]
MAILGUN_EXTRA = [("cc", None), ("bcc", None), ("h:X-Campaign", None), ("h:Reply-To", None), ("h:In-Reply-To", None),
                 ("h:References", None), ("h:Message-Id", None), ("v:order", None), ("o:tag", None), ("o:deliverytime", None),
                 ("o:testmode", None), ("recipient-variables", None)]
POSTMARK_BASE = {"From": "news@example.org", "To": "a@example.com", "Subject": "s", "TextBody": "t", "HtmlBody": "<p>h</p>"}


class HostileProviderTests(ProviderBed):
    """CR/LF in every field of both front ends: refused, or sent with nothing injected."""

    def assert_nothing_injected(self, code: int, body: Any) -> None:
        self.assertIn(code, (200, 400, 403, 413, 415, 422), body)
        for _target, _credentials, envelope, data in self.submitter.sent:
            header = data.split(b"\r\n\r\n", 1)[0]
            self.assertNotIn(b"\r\nX-Injected:", header)
            self.assertNotIn(b"\r\nBcc:", header)
            self.assertNotIn("evil@example.net", envelope.recipients)

    def test_crlf_in_every_mailgun_field(self) -> None:
        names = [name for name, _ in MAILGUN_BASE] + [name for name, _ in MAILGUN_EXTRA]
        for name in names:
            fields = [(n, v) for n, v in MAILGUN_BASE if n != name] + [(name, INJECTION)]
            code, body, _ = self.mailgun(fields, [("attachment", "a.txt", "text/plain", b"x")])
            self.assert_nothing_injected(code, body)
        code, body, _ = self.mailgun(MAILGUN_BASE, [("attachment", "a\r\nX-Injected: 1.txt", "text/plain", b"x")])
        self.assert_nothing_injected(code, body)
        code, body, _ = self.mailgun(MAILGUN_BASE, [("attachment", "a.txt", "text/plain\r\nX-Injected: 1", b"x")])
        self.assert_nothing_injected(code, body)

    def test_crlf_in_every_postmark_field(self) -> None:
        for name in ("From", "To", "Cc", "Bcc", "Subject", "TextBody", "HtmlBody", "ReplyTo", "Tag", "MessageStream"):
            code, body, _ = self.postmark({**POSTMARK_BASE, name: INJECTION})
            self.assert_nothing_injected(code, body)
        for extra in (
            {"Headers": [{"Name": "X-A", "Value": INJECTION}]},
            {"Headers": [{"Name": INJECTION, "Value": "v"}]},
            {"Metadata": {"k": INJECTION}},
            {"Metadata": {INJECTION: "v"}},
            {"Attachments": [{"Name": INJECTION, "Content": "eA==", "ContentType": "text/plain"}]},
            {"Attachments": [{"Name": "a.txt", "Content": "eA==", "ContentType": INJECTION}]},
        ):
            code, body, _ = self.postmark({**POSTMARK_BASE, **extra})
            self.assert_nothing_injected(code, body)

    def test_a_form_with_more_parts_than_allowed_is_refused(self) -> None:
        fields = MAILGUN_BASE + [("h:X-Pad", "v")] * 3100
        code, body, _ = self.mailgun(fields, [("attachment", "a.txt", "text/plain", b"x")])
        self.assertEqual((code, body["code"]), (413, "smtp_request_too_large"), body)
        self.assertNotIn("field", body)
        self.assertEqual(self.submitter.sent, [])
