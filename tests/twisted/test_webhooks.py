"""The webhook dispatcher in memory: treq's StubTreq as the receiver, task.Clock for every wait, and the
real queue SQL on an in-memory SQLite database answering at once (no threads).

What is checked: what a POST carries (body, headers, a signature a receiver can verify), what counts
as a delivery, retries with backoff after errors, timeouts and redirects, giving up, wake(), the
log lines, and that nothing leaves for anywhere but the configured URL.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import sqlite3
from typing import Any

import attrs
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from mailcow_smtp_api.core.errors import ApiError
from mailcow_smtp_api.core.webhooks import WebhookEvent, new_event, payload, retry_delay
from mailcow_smtp_api.mailcow.db import SQLITE
from mailcow_smtp_api.state import webhooks as queue
from mailcow_smtp_api.state.webhooks import WebhookStore
from mailcow_smtp_api.web import webhooks
from mailcow_smtp_api.web.webhooks import WebhookDispatcher

NOW = 1_800_000_000.0
URL = "https://hooks.example.net/mailcow?token=operator-path-secret"
SECRET = "webhook-secret-for-tests"
TIMEOUT = 10.0
LIFETIME = 24 * 3600.0


class FixedRandom:
    """Jitter pinned to the middle of the range."""

    def random(self) -> float:
        return 0.5


class InlineRunner:
    """MailcowDatabase's ``_run`` on one in-memory SQLite connection, answering synchronously."""

    dialect = SQLITE

    def __init__(self) -> None:
        self.conn = sqlite3.connect(":memory:", isolation_level=None)
        self.down = False
        self.closed = False

    def _run(self, func: Any) -> Deferred[Any]:
        if self.down:
            return fail(ApiError.of("smtp_db_unavailable"))
        try:
            return succeed(func(self.conn))
        except Exception:
            return fail()

    def close(self) -> None:
        self.closed = True


@attrs.frozen
class Seen:
    """One request as the receiver got it."""

    method: bytes
    uri: bytes
    headers: dict[str, str]
    body: bytes


class Receiver(Resource):
    """Records each request; answers with the next scripted status (200 when none), or hangs on "hang"."""

    isLeaf = True

    def __init__(self, *script: Any) -> None:
        super().__init__()
        self.script = list(script)
        self.seen: list[Seen] = []
        self.hanging: list[Any] = []

    def render(self, request: Any) -> Any:
        headers = {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        self.seen.append(Seen(request.method, request.uri, headers, request.content.read()))
        action = self.script.pop(0) if self.script else 200
        if action == "hang":
            self.hanging.append(request)
            return NOT_DONE_YET
        request.setResponseCode(action)
        if 300 <= action < 400:
            request.setHeader(b"Location", b"https://elsewhere.example.org/stolen")
        return b"thanks"


def verify(seen: Seen, secret: str = SECRET) -> None:
    """Check a request's signature the way a receiver does (Standard Webhooks, key = UTF-8 of the secret)."""
    signed = f"{seen.headers['webhook-id']}.{seen.headers['webhook-timestamp']}.".encode() + seen.body
    expected = base64.b64encode(hmac.new(secret.encode(), signed, hashlib.sha256).digest()).decode()
    assert seen.headers["webhook-signature"] == "v1," + expected, seen.headers


def event(n: int, kind: str = "delivered") -> WebhookEvent:
    return new_event(kind, {"id": f"msg_{n}", "state": kind}, NOW, f"token-{n:06d}")


class DispatcherTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.runner = InlineRunner()
        self.store = WebhookStore(self.runner)  # type: ignore[arg-type]
        self.tokens = iter(f"claim-{n:04d}" for n in range(10_000))
        self.posted: list[str] = []

    def dispatcher(self, receiver: Resource, **kwargs: Any) -> WebhookDispatcher:
        stub = StubTreq(receiver)
        self.stub = stub

        def post(url: str, **options: Any) -> Deferred[Any]:
            self.posted.append(url)
            assert options["allow_redirects"] is False
            return stub.post(url, **options)

        kwargs.setdefault("http_post", post)
        made = WebhookDispatcher(
            self.store,
            URL,
            kwargs.pop("secret", SECRET),
            self.clock,
            kwargs.pop("http_post"),
            TIMEOUT,
            new_token=lambda: next(self.tokens),
            rng=FixedRandom(),
            **kwargs,
        )
        self.addCleanup(lambda: made.running and made.stopService())
        return made

    def enqueue(self, *events: WebhookEvent, give_up_at: float = NOW + LIFETIME) -> None:
        for item in events:
            self.successResultOf(self.store.enqueue(item, give_up_at))

    def row(self, event_id: str) -> queue.QueuedEvent:
        found = self.successResultOf(self.store.event(event_id))
        assert found is not None
        return found

    # ---------------------------------------------------------------- one POST

    def test_a_due_event_is_posted_signed_to_the_configured_url_and_marked_delivered(self) -> None:
        """One POST with the stored body, JSON content type, our User-Agent and a signature that
        verifies; the event is delivered once and not posted again."""
        receiver = Receiver(200)
        self.enqueue(event(1))
        with capturedLogs() as events:
            self.dispatcher(receiver).startService()
        [seen] = receiver.seen
        assert (seen.method, seen.uri, seen.body) == (b"POST", b"/mailcow?token=operator-path-secret", payload(event(1)))
        assert seen.headers["content-type"] == "application/json"
        assert seen.headers["user-agent"] == "mailcow-smtp-api"
        assert seen.headers["host"] == "hooks.example.net"
        assert (seen.headers["webhook-id"], seen.headers["webhook-timestamp"]) == ("evt_token-000001", "1800000000")
        verify(seen)
        assert "cookie" not in seen.headers and "authorization" not in seen.headers
        row = self.row("evt_token-000001")
        assert (row.delivered_at, row.attempts) == (NOW, 1)
        self.clock.advance(3600)
        assert len(receiver.seen) == 1
        assert self.posted == [URL]
        [line] = [formatEvent(e) for e in events if "evt_token-000001" in formatEvent(e)]
        assert line == "webhook evt_token-000001 (delivered) delivered: HTTP 200, attempt 1"
        [logged] = [e for e in events if e.get("event_id") == "evt_token-000001"]
        assert (logged["event_type"], logged["status"], logged["attempt"]) == ("delivered", 200, 1)

    def test_every_2xx_is_a_delivery(self) -> None:
        """201, 202 and 204 count as delivered, like 200."""
        receiver = Receiver(201, 202, 204)
        self.enqueue(event(1), event(2), event(3))
        self.dispatcher(receiver).startService()
        assert len(receiver.seen) == 3
        assert all(self.row(f"evt_token-00000{n}").delivered_at == NOW for n in (1, 2, 3))

    # ---------------------------------------------------------------- retries

    def test_a_500_is_retried_after_the_backoff_with_the_same_id_and_a_fresh_signature(self) -> None:
        """The failed attempt is kept with its status; the retry comes retry_delay(1) later, carries the
        same webhook-id and body, a new timestamp, and a signature valid for that timestamp."""
        receiver = Receiver(500, 200)
        self.enqueue(event(1))
        with capturedLogs() as events:
            self.dispatcher(receiver).startService()
            delay = retry_delay(1, FixedRandom())
            row = self.row("evt_token-000001")
            assert (row.attempts, row.last_error, row.next_at, row.delivered_at) == (1, "HTTP 500", NOW + delay, None)
            self.clock.advance(delay - 1)
            assert len(receiver.seen) == 1
            self.clock.advance(1)
        first, second = receiver.seen
        assert first.headers["webhook-id"] == second.headers["webhook-id"] and first.body == second.body
        assert int(second.headers["webhook-timestamp"]) == int(NOW + delay)
        verify(first)
        verify(second)
        assert self.row("evt_token-000001").attempts == 2 and self.row("evt_token-000001").delivered_at is not None
        lines = [formatEvent(e) for e in events if e.get("event_id")]
        assert lines == [
            f"webhook evt_token-000001 (delivered) failed: HTTP 500, attempt 1; next attempt in {delay:.0f} s",
            "webhook evt_token-000001 (delivered) delivered: HTTP 200, attempt 2",
        ]

    def test_backoff_doubles_between_attempts(self) -> None:
        """Each failure waits retry_delay(n) before attempt n + 1."""
        receiver = Receiver(503, 503, 503, 200)
        self.enqueue(event(1))
        self.dispatcher(receiver).startService()
        times = [NOW]
        for attempt in (1, 2, 3):
            delay = retry_delay(attempt, FixedRandom())
            self.clock.advance(delay)
            times.append(self.clock.seconds())
        assert len(receiver.seen) == 4
        assert [int(s.headers["webhook-timestamp"]) for s in receiver.seen] == [int(t) for t in times]
        assert [b - a for a, b in zip(times, times[1:])] == [7.5, 15.0, 30.0]

    def test_a_receiver_that_does_not_answer_in_time_is_a_failed_attempt(self) -> None:
        """No answer within the timeout cancels the request and schedules a retry; nothing waits longer."""
        receiver = Receiver("hang", 200)
        self.enqueue(event(1))
        dispatcher = self.dispatcher(receiver)
        with capturedLogs() as events:
            dispatcher.startService()
            self.clock.advance(TIMEOUT - 0.1)
            assert self.row("evt_token-000001").attempts == 0
            self.clock.advance(0.1)
        row = self.row("evt_token-000001")
        assert (row.attempts, row.last_error, row.lease_token) == (1, "no answer within 10 s", None)
        assert any(e.get("status") is None and "no answer within 10 s" in formatEvent(e) for e in events)
        self.clock.advance(retry_delay(1, FixedRandom()))
        assert len(receiver.seen) == 2 and self.row("evt_token-000001").delivered_at is not None

    def test_a_refused_connection_is_a_failed_attempt(self) -> None:
        """A connection error is recorded in a few words and retried."""
        calls: list[str] = []

        def refuse(url: str, **options: Any) -> Deferred[Any]:
            calls.append(url)
            return fail(ConnectionRefusedError())

        self.enqueue(event(1))
        self.dispatcher(Receiver(), http_post=refuse).startService()
        row = self.row("evt_token-000001")
        assert (row.attempts, row.last_error) == (1, "connection refused")
        self.clock.advance(retry_delay(1, FixedRandom()))
        assert calls == [URL, URL]

    def test_a_client_that_raises_at_once_is_a_failed_attempt(self) -> None:
        """An exception from the HTTP client itself is recorded and retried like any failed POST."""

        def broken(url: str, **options: Any) -> Deferred[Any]:
            raise TypeError("unexpected keyword")

        self.enqueue(event(1))
        self.dispatcher(Receiver(), http_post=broken).startService()
        row = self.row("evt_token-000001")
        assert (row.attempts, row.last_error, row.lease_token) == (1, "TypeError", None)

    def test_redirects_are_never_followed(self) -> None:
        """A 303 or 307 is a failed attempt: nothing is sent to the Location, only to the configured URL."""
        receiver = Receiver(303, 307)
        self.enqueue(event(1), event(2))
        self.dispatcher(receiver, http_post=StubTreq(receiver).post).startService()  # treq as it is
        assert [s.uri for s in receiver.seen] == [b"/mailcow?token=operator-path-secret"] * 2
        assert {self.row(f"evt_token-00000{n}").last_error for n in (1, 2)} == {"HTTP 303", "HTTP 307"}

    def test_an_event_is_given_up_when_its_next_attempt_would_be_too_late(self) -> None:
        """Past give_up_at there are no more attempts; one error line says so, without body or secret."""
        receiver = Receiver(500, 500, 500)
        self.enqueue(event(1), give_up_at=NOW + 20)
        with capturedLogs() as events:
            self.dispatcher(receiver).startService()  # attempt 1 at NOW, retry at NOW + 7.5
            self.clock.advance(7.5)  # attempt 2; a retry 15 s later is past give_up_at
            self.clock.advance(3600 * 24)
        assert len(receiver.seen) == 2
        row = self.row("evt_token-000001")
        assert (row.attempts, row.gave_up_at, row.last_error) == (2, NOW + 7.5, "HTTP 500")
        lines = [formatEvent(e) for e in events if e.get("event_id")]
        assert lines[-1] == "webhook evt_token-000001 (delivered) failed: HTTP 500, attempt 2; given up, its retry time is over"
        assert [e["log_level"].name for e in events if e.get("event_id")] == ["warn", "error"]
        everything = "\n".join(formatEvent(e) + repr(e) for e in events)
        assert SECRET not in everything and "operator-path-secret" not in everything
        assert payload(event(1)).decode() not in everything and "msg_1" not in everything

    # ---------------------------------------------------------------- rounds

    def test_rounds_run_every_interval_and_wake_runs_one_at_once(self) -> None:
        """An event queued between rounds waits for the next one, unless wake() is called."""
        receiver = Receiver()
        dispatcher = self.dispatcher(receiver, interval=5.0)
        dispatcher.startService()
        self.enqueue(event(1))
        self.clock.advance(4.9)
        assert receiver.seen == []
        self.clock.advance(0.1)
        assert len(receiver.seen) == 1
        self.enqueue(event(2))
        dispatcher.wake()
        assert len(receiver.seen) == 2
        self.clock.advance(0)  # wake() rescheduled the round: nothing runs twice
        assert len(receiver.seen) == 2

    def test_wake_during_a_round_runs_another_right_after_it(self) -> None:
        """An event queued while a POST is in flight is posted as soon as that round ends."""
        receiver = Receiver("hang", 200)
        dispatcher = self.dispatcher(receiver, interval=60.0)
        self.enqueue(event(1))
        dispatcher.startService()
        self.enqueue(event(2))
        dispatcher.wake()
        assert len(receiver.seen) == 1
        receiver.hanging[0].setResponseCode(200)
        receiver.hanging[0].finish()
        self.stub.flush()
        self.clock.advance(0)
        assert [s.headers["webhook-id"] for s in receiver.seen] == ["evt_token-000001", "evt_token-000002"]

    def test_a_full_batch_goes_on_without_waiting_an_interval(self) -> None:
        """Five events with a batch of two are all posted at once, in rounds of at most two."""
        receiver = Receiver()
        self.enqueue(*(event(n) for n in range(5)))
        dispatcher = self.dispatcher(receiver, batch=2, interval=60.0)
        dispatcher.startService()
        for _ in range(3):
            self.clock.advance(0)
        assert len(receiver.seen) == 5
        assert len({s.headers["webhook-id"] for s in receiver.seen}) == 5

    def test_a_queue_that_cannot_be_read_is_logged_once_and_retried(self) -> None:
        """The database down: one warning, not one per round; events go out when it is back."""
        receiver = Receiver()
        self.enqueue(event(1))
        self.runner.down = True
        with capturedLogs() as events:
            self.dispatcher(receiver).startService()
            for _ in range(10):
                self.clock.advance(1.0)
            self.runner.down = False
            self.clock.advance(1.0)
        text = [formatEvent(e) for e in events]
        assert sum("cannot read the queue (smtp_db_unavailable)" in line for line in text) == 1
        assert any("the queue answers again" in line for line in text)
        assert len(receiver.seen) == 1

    def test_stopping_waits_for_the_post_in_flight_to_be_recorded(self) -> None:
        """stopService fires after the outcome of the POST in progress is stored; no round follows."""
        receiver = Receiver("hang")
        self.enqueue(event(1))
        dispatcher = self.dispatcher(receiver)
        dispatcher.startService()
        stopped = dispatcher.stopService()
        assert stopped is not None
        self.assertNoResult(stopped)
        self.clock.advance(TIMEOUT)
        self.successResultOf(stopped)
        assert self.row("evt_token-000001").last_error == "no answer within 10 s"
        self.clock.advance(3600)
        assert len(receiver.seen) == 1 and not self.runner.closed

    def test_finished_events_are_purged_every_purge_interval(self) -> None:
        """The purge runs after purge_interval and deletes delivered events older than the retention."""
        receiver = Receiver()
        self.enqueue(event(1))
        self.dispatcher(receiver, purge_interval=300.0, retention=100.0).startService()
        assert self.row("evt_token-000001").delivered_at == NOW
        self.clock.advance(299.0)
        assert self.successResultOf(self.store.event("evt_token-000001")) is not None
        self.clock.advance(1.0)
        assert self.successResultOf(self.store.event("evt_token-000001")) is None

    # ---------------------------------------------------------------- configuration

    def test_a_secret_that_makes_no_key_or_a_url_that_is_no_http_is_refused_at_once(self) -> None:
        """ValueError when the dispatcher is made, not at the first event."""
        for secret, url in [("whsec_!!!!not-base64!!!!", URL), ("short", URL), (SECRET, "ftp://hooks.example.net/")]:
            with self.assertRaises(ValueError):
                WebhookDispatcher(self.store, url, secret, self.clock, StubTreq(Receiver()).post, TIMEOUT)

    def test_a_whsec_secret_signs_with_its_decoded_key(self) -> None:
        """With a Standard Webhooks secret the receiver verifies with the decoded bytes."""
        raw = b"0123456789abcdef0123"
        receiver = Receiver()
        self.enqueue(event(1))
        self.dispatcher(receiver, secret="whsec_" + base64.b64encode(raw).decode()).startService()
        [seen] = receiver.seen
        signed = f"{seen.headers['webhook-id']}.{seen.headers['webhook-timestamp']}.".encode() + seen.body
        assert seen.headers["webhook-signature"] == "v1," + base64.b64encode(hmac.new(raw, signed, hashlib.sha256).digest()).decode()

    def test_the_type_in_log_lines_comes_from_the_stored_body(self) -> None:
        """Each event's own type is named."""
        receiver = Receiver()
        self.enqueue(event(1, "bounced"), event(2, "submitted"))
        with capturedLogs() as events:
            self.dispatcher(receiver).startService()
        assert sorted(e["event_type"] for e in events if e.get("event_id")) == ["bounced", "submitted"]
        assert {json.loads(s.body)["type"] for s in receiver.seen} == {"bounced", "submitted"}


class AnswerBodyTests(SynchronousTestCase):
    def test_a_large_answer_is_cut_off_and_a_slow_one_dropped(self) -> None:
        """Only the status counts: past 64 KiB, or after the timeout, the answer's connection is dropped."""

        class Transport:
            stopped = 0

            def stopProducing(self) -> None:
                self.stopped += 1

        clock = Clock()
        big = webhooks._Discard(clock, 10.0)
        big.makeConnection(Transport())  # type: ignore[arg-type]
        big.dataReceived(b"x" * webhooks.MAX_ANSWER_BYTES)
        assert big.transport.stopped == 0  # type: ignore[union-attr]
        big.dataReceived(b"x")
        assert big.transport.stopped == 1  # type: ignore[union-attr]
        slow = webhooks._Discard(clock, 10.0)
        slow.makeConnection(Transport())  # type: ignore[arg-type]
        clock.advance(10.0)
        assert slow.transport.stopped == 1  # type: ignore[union-attr]
        done = webhooks._Discard(clock, 10.0)
        done.makeConnection(Transport())  # type: ignore[arg-type]
        done.connectionLost(None)  # type: ignore[arg-type]
        clock.advance(10.0)
        assert done.transport.stopped == 0  # type: ignore[union-attr]
        assert clock.getDelayedCalls() == []
