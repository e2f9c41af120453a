"""The HTTP shell in memory (treq's StubTreq): routes, content type, rendering, error shapes."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail
from twisted.trial.unittest import SynchronousTestCase

from mailcow_smtp_api.core.config import from_options
from mailcow_smtp_api.service import OFFLOAD_BYTES, SendService
from mailcow_smtp_api.web.api import SmtpApi, shield

from .fakes import GOOD_KEY, FakeKeys, FakeSenders, FakeSubmitter, FakeThrottle

URL = "http://sidecar.test/api/v1/send/email"
EXAMPLE = {
    "from": "user1@example.org",
    "to": ["recipient@example.com"],
    "subject": "Test Email",
    "body": "This is a test email.",
    "password": "mailbox-secret-pw",
}


class WebTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.submitter = FakeSubmitter()
        self.throttle = FakeThrottle()
        self.keys = FakeKeys()
        service = SendService(
            config=from_options(
                {"smtp-host": "127.0.0.1", "smtp-port": "10587", "smtp-allow": "127.0.0.1:10587"}, environ={}
            ),
            keys=self.keys,
            senders=FakeSenders({("user1@example.org", "user1@example.org")}),
            submitter=self.submitter,
            throttle=self.throttle,
            now=lambda: datetime(2026, 1, 1, tzinfo=timezone.utc),
            new_token=lambda: "tok",
        )
        self.ready: list[bool] = [True]

        def db_ping() -> Deferred[None]:
            from twisted.internet.defer import succeed

            return succeed(None) if self.ready[0] else fail(RuntimeError("down"))

        self.offloaded: list[str] = []

        def offload(work: Any) -> Deferred[Any]:
            from twisted.internet.defer import maybeDeferred

            self.offloaded.append("work")
            return maybeDeferred(work)

        api = SmtpApi(service=service, ready_checks=(("database", db_ping),), offload=offload)
        self.client = StubTreq(api.resource())

    def call(self, method: str, url: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
        hdrs = {"Content-Type": "application/json", "X-API-Key": GOOD_KEY}
        hdrs.update(headers or {})
        data = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else None)
        response = self.successResultOf(self.client.request(method, url, data=data, headers=hdrs))
        content = self.successResultOf(response.content())
        parsed = json.loads(content) if content else None
        return response.code, parsed, response.headers

    def test_example_request_sends_and_answers_mailcow_success(self) -> None:
        """The basic example answers 200 with smtp_mail_sent and an X-Request-Id."""
        code, body, headers = self.call("POST", URL, EXAMPLE)
        self.assertEqual(code, 200)
        self.assertEqual(body[0]["msg"], ["smtp_mail_sent", "user1@example.org", "recipient@example.com"])
        self.assertEqual(body[0]["queue_id"], "QID1")
        request_id = headers.getRawHeaders("X-Request-Id")[0]
        self.assertEqual(body[0]["log"][2]["request_id"], request_id)
        self.assertEqual(len(self.submitter.sent), 1)
        self.assertNotIn("mailbox-secret-pw", json.dumps(body))

    def test_only_requests_past_the_offload_size_are_parsed_in_a_worker(self) -> None:
        """A 100 KB request is parsed on the calling thread; one past OFFLOAD_BYTES by the offload function."""
        code, _, _ = self.call("POST", URL, {**EXAMPLE, "body": "a line of text\n" * 6_700})
        self.assertEqual((code, self.offloaded), (200, []))
        code, _, _ = self.call("POST", URL, {**EXAMPLE, "body": "a line of text\n" * (OFFLOAD_BYTES // 15 + 1)})
        self.assertEqual((code, self.offloaded), (200, ["work"]))
        self.assertEqual(len(self.submitter.sent), 2)

    def test_wrong_key_is_mailcow_401_before_parsing(self) -> None:
        """A bad key answers mailcow's bare 401 even when the body is garbage."""
        code, body, _ = self.call("POST", URL, b"not json", {"X-API-Key": "nope"})
        self.assertEqual((code, body), (401, {"type": "error", "msg": "authentication failed"}))

    def test_wrong_content_type_is_415(self) -> None:
        """A non-JSON content type is refused with a code."""
        code, body, _ = self.call("POST", URL, EXAMPLE, {"Content-Type": "text/plain"})
        self.assertEqual((code, body[0]["msg"]), (415, "smtp_unsupported_media_type"))

    def test_validation_error_is_400_list(self) -> None:
        """Validation errors render as mailcow's list with the code in msg."""
        code, body, _ = self.call("POST", URL, {**EXAMPLE, "subject": ""})
        self.assertEqual(code, 400)
        self.assertEqual(body[0]["type"], "error")
        self.assertEqual(body[0]["msg"], "smtp_empty_subject")
        self.assertEqual(body[0]["field"], "subject")
        self.assertEqual(self.submitter.sent, [])

    def test_blocked_address_gets_retry_after(self) -> None:
        """Repeated key failures block the address with 429 and Retry-After."""
        for _ in range(3):
            self.call("POST", URL, EXAMPLE, {"X-API-Key": "bad"})
        code, body, headers = self.call("POST", URL, EXAMPLE)
        self.assertEqual((code, body[0]["msg"]), (429, "smtp_too_many_failures"))
        self.assertEqual(headers.getRawHeaders("Retry-After"), ["600"])

    def test_unexpected_exception_is_500_without_traceback(self) -> None:
        """A bug answers smtp_internal_error; no traceback text reaches the client."""
        self.submitter.sent = None  # type: ignore[assignment]  # makes the fake raise AttributeError
        code, body, _ = self.call("POST", URL, EXAMPLE)
        self.assertEqual((code, body[0]["msg"]), (500, "smtp_internal_error"))
        self.assertNotIn("Traceback", json.dumps(body))
        self.flushLoggedErrors(AttributeError)

    def test_unknown_route_and_wrong_method_are_coded(self) -> None:
        """404 and 405 answer JSON with codes, not HTML."""
        code, body, _ = self.call("GET", "http://sidecar.test/nope")
        self.assertEqual((code, body[0]["msg"]), (404, "not_found"))
        code, body, _ = self.call("GET", URL)
        self.assertEqual((code, body[0]["msg"]), (405, "method_not_allowed"))

    def test_health_and_readiness(self) -> None:
        """/healthz is always ok; /readyz names a failing dependency with 503."""
        self.assertEqual(self.call("GET", "http://sidecar.test/healthz")[:2], (200, {"status": "ok"}))
        self.assertEqual(self.call("GET", "http://sidecar.test/readyz")[:2], (200, {"status": "ok"}))
        self.ready[0] = False
        self.assertEqual(
            self.call("GET", "http://sidecar.test/readyz")[:2],
            (503, {"status": "unavailable", "failing": ["database"], "reasons": {"database": "unexpected error (RuntimeError)"}}),
        )


class ShieldTests(SynchronousTestCase):
    def test_cancelling_the_shield_does_not_cancel_the_work(self) -> None:
        """A client disconnect cancels the outer Deferred only; the send goes on and its result is dropped."""
        inner: Deferred[str] = Deferred()
        outer = shield(inner)
        outer.cancel()
        self.failureResultOf(outer)
        self.assertFalse(inner.called)
        inner.callback("sent")
        self.assertTrue(inner.called)

    def test_shield_passes_results_and_failures(self) -> None:
        """Without cancellation the shield mirrors the inner result."""
        inner: Deferred[str] = Deferred()
        outer = shield(inner)
        inner.callback("ok")
        self.assertEqual(self.successResultOf(outer), "ok")


def test_the_send_route_gets_only_its_own_log_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """A route of one message logs that message's line; every other route gets one line with its request id,
    client, method, path, status and code (Twisted's access-log line is not written)."""
    from twisted.internet.address import IPv4Address
    from twisted.web import server
    from twisted.web.resource import Resource
    from twisted.web.test.requesthelper import DummyRequest

    from mailcow_smtp_api.web import api as web

    twisted_lines: list[bytes] = []
    ours: list[tuple[Any, ...]] = []
    monkeypatch.setattr(server.Site, "log", lambda self, request: twisted_lines.append(request.path))
    monkeypatch.setattr(web, "log_answer", lambda *fields: ours.append(fields))
    site = web.ApiSite(Resource())
    for method, path in ((b"POST", b"/api/v1/send/email"), (b"GET", b"/healthz"), (b"GET", b"/api/v1/openapi.json")):
        request = DummyRequest([])
        request.method = method
        request.path = path
        request.code = 200
        request.client = IPv4Address("TCP", "192.0.2.7", 40000)
        request.request_id = "id-" + path.decode()
        # The pipeline marks a request of one message whose line it wrote (SmtpApi.single).
        request.message_logged = path == b"/api/v1/send/email"
        site.log(request)
    assert twisted_lines == []
    assert ours == [
        ("id-/healthz", "192.0.2.7", "GET", "/healthz", 200, "-"),
        ("id-/api/v1/openapi.json", "192.0.2.7", "GET", "/api/v1/openapi.json", 200, "-"),
    ]
