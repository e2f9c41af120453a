"""Idempotency-Key through the HTTP shell in memory, over the real SQL of state/store.py on SQLite.

The store runs state/store.py's blocking functions on an in-memory SQLite connection synchronously, so
every answer is available at once (``successResultOf``) while the claim, settle and release
statements are the real ones. Time is a ``task.Clock``; SMTP is the recording fake submitter.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timezone
from typing import Any

import attrs
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailcow_smtp_api.state import store as state
from mailcow_smtp_api.core.config import from_options
from mailcow_smtp_api.mailcow.db import SQLITE
from mailcow_smtp_api.core.errors import API_AUTH_FAILED, ApiError, SmtpFailure
from mailcow_smtp_api.core.idempotency import (
    Answer,
    Claim,
    Record,
    State,
    fingerprint,
    scope_of,
)
from mailcow_smtp_api.core.model import (
    Credentials,
    Envelope,
    MessageData,
    RecipientResult,
    SmtpTarget,
    SubmitResult,
)
from mailcow_smtp_api.service import IdempotentSends, SendService
from mailcow_smtp_api.web.api import SmtpApi

from .fakes import GOOD_KEY, FakeSenders, FakeSubmitter, FakeThrottle, joined

URL = "http://sidecar.test/api/v1/send/email"
OTHER_KEY = "111111-222222-333333-444444-555555"
TTL = 3600.0
LEASE = 600.0
BODY = {
    "from": "user1@example.org",
    "to": ["recipient@example.com"],
    "subject": "Order 1234 confirmed",
    "body": "Thank you.",
    "password": "mailbox-secret-pw",
}


@attrs.define
class TwoKeys:
    """Accepts GOOD_KEY and OTHER_KEY (two API keys of one mailcow)."""

    def authenticate_key(self, raw_header: str | None, client_ip: str, need_write: bool) -> Deferred[Any]:
        if raw_header in (GOOD_KEY, OTHER_KEY):
            return succeed({"api_key": raw_header})
        return fail(ApiError.mailcow(401, API_AUTH_FAILED))


@attrs.define
class SqliteNowStore:
    """state/store.py's SQL on one SQLite connection, run at once; ``down`` makes every call fail."""

    conn: sqlite3.Connection = attrs.field(factory=lambda: sqlite3.connect(":memory:", isolation_level=None))
    down: bool = False

    def __attrs_post_init__(self) -> None:
        state.create_table(self.conn, SQLITE)

    def _call(self, func: Any, *args: Any) -> Deferred[Any]:
        if self.down:
            return fail(ApiError.of("smtp_idempotency_unavailable", retry_after=5))
        return maybeDeferred(func, self.conn, SQLITE, *args)

    def claim(self, claim: Claim) -> Deferred[Record | None]:
        return self._call(state.claim_key, claim)

    def settle(self, scope: str, key: str, token: str, record_state: State, answer: Answer) -> Deferred[bool]:
        return self._call(state.settle_key, scope, key, token, record_state, answer)

    def release(self, claim: Claim) -> Deferred[bool]:
        return self._call(state.release_key, claim)

    def rows(self) -> list[tuple[Any, ...]]:
        return list(self.conn.execute("SELECT idem_key, record_state, http_status, msg_code FROM smtpapi_idempotency"))


@attrs.define
class HeldSubmitter(FakeSubmitter):
    """A submitter whose answers are held until the test fires them."""

    pending: list[Deferred[SubmitResult]] = attrs.Factory(list)

    def submit(
        self, target: SmtpTarget, credentials: Credentials | None, envelope: Envelope, message: MessageData
    ) -> Deferred[SubmitResult]:
        self.sent.append((target, credentials, envelope, joined(message)))
        d: Deferred[SubmitResult] = Deferred()
        self.pending.append(d)
        return d


def accepted(envelope_recipients: tuple[str, ...] = ("recipient@example.com",)) -> SubmitResult:
    rcpts = tuple(RecipientResult(r, 250, "2.1.5 Ok") for r in envelope_recipients)
    return SubmitResult(250, "2.0.0 Ok: queued as QID7", rcpts, "QID7")


class IdempotentSendTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.store = SqliteNowStore()
        self.submitter: FakeSubmitter = FakeSubmitter()
        self.tokens = iter(f"{i:032x}" for i in range(1000))
        self.make_client()

    def make_client(self, with_store: bool = True) -> None:
        service = SendService(
            config=from_options({"smtp-host": "127.0.0.1", "smtp-port": "10587", "smtp-allow": "127.0.0.1:10587"}, environ={}),
            keys=TwoKeys(),
            senders=FakeSenders({("user1@example.org", "user1@example.org")}),
            submitter=self.submitter,
            throttle=FakeThrottle(),
            now=lambda: datetime(2026, 1, 1, tzinfo=timezone.utc),
            new_token=lambda: "tok",
        )
        guard = IdempotentSends(store=self.store, now=self.clock.seconds, new_token=lambda: next(self.tokens), ttl=TTL, lease=LEASE)
        api = SmtpApi(service=service, clock=self.clock.seconds, idempotency=guard if with_store else None)
        self.client = StubTreq(api.resource())

    def post(self, body: Any = BODY, key: str | None = "order-1234", api_key: str = GOOD_KEY, **headers: str) -> Deferred[Any]:
        hdrs = {"Content-Type": "application/json", "X-API-Key": api_key, **headers}
        if key is not None:
            hdrs["Idempotency-Key"] = key
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.client.request("POST", URL, data=data, headers=hdrs)

    def answer(self, d: Deferred[Any]) -> tuple[int, Any, Any]:
        self.client.flush()  # delivers answers whose handler finished after the request was made
        response = self.successResultOf(d)
        return response.code, json.loads(self.successResultOf(response.content())), response.headers

    def call(self, *args: Any, **kwargs: Any) -> tuple[int, Any, Any]:
        return self.answer(self.post(*args, **kwargs))

    @staticmethod
    def replayed(headers: Any) -> bool:
        return headers.getRawHeaders("Idempotent-Replayed") == ["true"]

    # ------------------------------------------------------------------ the basic promise

    def test_repeat_returns_the_stored_answer_and_sends_nothing(self) -> None:
        """The second request with the same key and body gets the first answer, marked, with no second send."""
        first = self.call()
        second = self.call()
        self.assertEqual(first[0], 200)
        self.assertFalse(self.replayed(first[2]))
        self.assertEqual((second[0], second[1]), (first[0], first[1]))
        self.assertTrue(self.replayed(second[2]))
        self.assertEqual(len(self.submitter.sent), 1)
        self.assertEqual(self.store.rows(), [("order-1234", "done", 200, "smtp_mail_sent")])

    def test_a_new_request_gets_a_new_request_id_header_but_the_stored_body(self) -> None:
        """A replay has its own X-Request-Id; the body still names the request that sent."""
        first, second = self.call(), self.call()
        self.assertNotEqual(first[2].getRawHeaders("X-Request-Id"), second[2].getRawHeaders("X-Request-Id"))
        self.assertEqual(second[1][0]["log"][2]["request_id"], first[2].getRawHeaders("X-Request-Id")[0])

    def test_same_key_other_body_is_a_conflict(self) -> None:
        """Another body with a used key answers 409 smtp_idempotency_mismatch and sends nothing."""
        self.call()
        code, body, headers = self.call({**BODY, "subject": "Order 1235 confirmed"})
        self.assertEqual((code, body[0]["msg"], body[0]["field"]), (409, "smtp_idempotency_mismatch", "Idempotency-Key"))
        self.assertFalse(self.replayed(headers))
        self.assertEqual(len(self.submitter.sent), 1)

    def test_bodies_compare_byte_for_byte(self) -> None:
        """The same JSON with other white space is another body."""
        self.call(json.dumps(BODY).encode())
        code, body, _ = self.call(json.dumps(BODY, indent=2).encode())
        self.assertEqual((code, body[0]["msg"]), (409, "smtp_idempotency_mismatch"))

    def test_keys_are_scoped_to_the_api_key(self) -> None:
        """Another API key may use the same Idempotency-Key for its own message."""
        self.call()
        code, _, headers = self.call(api_key=OTHER_KEY)
        self.assertEqual(code, 200)
        self.assertFalse(self.replayed(headers))
        self.assertEqual(len(self.submitter.sent), 2)

    def test_keys_are_case_sensitive(self) -> None:
        """Order-1234 and order-1234 are two keys."""
        self.call(key="order-1234")
        self.assertEqual(self.call(key="ORDER-1234")[0], 200)
        self.assertEqual(len(self.submitter.sent), 2)

    def test_without_the_header_nothing_is_stored(self) -> None:
        """Requests without Idempotency-Key send every time and leave no record."""
        self.call(key=None)
        self.call(key=None)
        self.assertEqual((len(self.submitter.sent), self.store.rows()), (2, []))

    def test_key_is_free_again_after_its_keep_time(self) -> None:
        """After --idempotency-ttl the key's record is gone and the same request sends again."""
        self.call()
        self.clock.advance(TTL - 1)
        self.assertTrue(self.replayed(self.call()[2]))
        self.clock.advance(1)
        code, _, headers = self.call()
        self.assertEqual(code, 200)
        self.assertFalse(self.replayed(headers))
        self.assertEqual(len(self.submitter.sent), 2)
        self.assertEqual(len(self.store.rows()), 1)

    # ------------------------------------------------------------------ in flight

    def test_repeat_while_in_flight_is_refused_then_replayed(self) -> None:
        """While the first send runs, a repeat gets 409 with Retry-After; afterwards it gets the answer."""
        held = self.submitter = HeldSubmitter()
        self.make_client()
        first = self.post()
        self.assertNoResult(first)
        code, body, headers = self.call()
        self.assertEqual((code, body[0]["msg"]), (409, "smtp_idempotency_in_flight"))
        self.assertEqual(headers.getRawHeaders("Retry-After"), ["2"])
        held.pending[0].callback(accepted())
        self.assertEqual(self.answer(first)[0], 200)
        self.assertTrue(self.replayed(self.call()[2]))
        self.assertEqual(len(held.sent), 1)

    def test_a_send_that_never_finished_is_answered_as_outcome_unknown(self) -> None:
        """A claim left in flight past its lease (the process died) replays a 504 outcome-unknown, never a send."""
        body = json.dumps(BODY).encode()
        dead = Claim(scope_of(GOOD_KEY), "order-1234", fingerprint(body, GOOD_KEY), "f" * 32,
                     self.clock.seconds(), self.clock.seconds() + LEASE, self.clock.seconds() + TTL)
        self.assertIsNone(self.successResultOf(self.store.claim(dead)))
        self.assertEqual(self.call(body)[0], 409)
        self.clock.advance(LEASE)
        code, answer, headers = self.call(body)
        self.assertEqual((code, answer[0]["msg"]), (504, "smtp_error"))
        self.assertTrue(answer[0]["detail"]["outcome_unknown"])
        self.assertTrue(self.replayed(headers))
        self.assertEqual(self.call(body)[:2], (code, answer))
        self.assertEqual(self.submitter.sent, [])
        self.assertEqual(self.store.rows(), [("order-1234", "outcome_unknown", 504, "smtp_error")])

    def test_a_late_finish_does_not_overwrite_the_interrupted_record(self) -> None:
        """A send that outlives its lease keeps its own answer but cannot replace what was stored meanwhile."""
        held = self.submitter = HeldSubmitter()
        self.make_client()
        first = self.post()
        self.clock.advance(LEASE)
        self.assertEqual(self.call()[0], 504)
        held.pending[0].callback(accepted())
        self.assertEqual(self.answer(first)[0], 200)
        self.assertEqual(self.store.rows(), [("order-1234", "outcome_unknown", 504, "smtp_error")])

    # ------------------------------------------------------------------ what is stored

    def test_timeout_after_the_data_is_stored_as_outcome_unknown(self) -> None:
        """No reply to the final dot: 504 outcome_unknown is stored, and a retry does not send a second copy."""
        self.submitter.failure = SmtpFailure("timeout", "message", reason="no answer")
        first = self.call()
        self.assertEqual((first[0], first[1][0]["detail"]["outcome_unknown"]), (504, True))
        second = self.call()
        self.assertEqual(second[:2], first[:2])
        self.assertTrue(self.replayed(second[2]))
        self.assertEqual(len(self.submitter.sent), 1)
        self.assertEqual(self.store.rows(), [("order-1234", "outcome_unknown", 504, "smtp_error")])

    def test_permanent_refusal_is_stored(self) -> None:
        """A 5xx from postfix is a final answer for the key: replayed, not retried."""
        self.submitter.failure = SmtpFailure("reply", "message", 554, "5.7.0 rejected by policy")
        self.assertEqual(self.call()[0], 502)
        self.submitter.failure = None
        code, _, headers = self.call()
        self.assertEqual(code, 502)
        self.assertTrue(self.replayed(headers))
        self.assertEqual(len(self.submitter.sent), 1)

    def test_partial_acceptance_is_stored_with_its_refused_list(self) -> None:
        """smtp_partially_sent is replayed with the same refused recipients."""
        self.submitter.refuse = {"b@example.com"}
        first = self.call({**BODY, "to": ["recipient@example.com", "b@example.com"]})
        self.assertEqual((first[0], first[1][0]["refused"]), (200, ["b@example.com"]))
        second = self.call({**BODY, "to": ["recipient@example.com", "b@example.com"]})
        self.assertEqual(second[1], first[1])
        self.assertEqual(self.store.rows()[0][1:], ("done", 200, "smtp_partially_sent"))

    def test_retry_later_answer_releases_the_key(self) -> None:
        """postfix unreachable (503, nothing accepted): the key is released and the retry sends."""
        self.submitter.failure = SmtpFailure("connect", "connect", reason="connection refused")
        code, _, headers = self.call()
        self.assertEqual((code, headers.getRawHeaders("Retry-After")), (503, ["60"]))
        self.assertEqual(self.store.rows(), [])
        self.submitter.failure = None
        code, _, headers = self.call()
        self.assertEqual(code, 200)
        self.assertFalse(self.replayed(headers))
        self.assertEqual(len(self.submitter.sent), 2)

    def test_failures_before_smtp_release_the_key(self) -> None:
        """A refused sender or a bad body stores nothing: the corrected request may reuse the key."""
        code, body, _ = self.call({**BODY, "from": "boss@example.org"})
        self.assertEqual((code, body[0]["msg"]), (403, "smtp_unauthorized_sender"))
        code, body, _ = self.call({**BODY, "subject": ""})
        self.assertEqual((code, body[0]["msg"]), (400, "smtp_empty_subject"))
        self.assertEqual(self.call()[0], 200)
        self.assertTrue(self.replayed(self.call()[2]))
        self.assertEqual(len(self.submitter.sent), 1)

    # ------------------------------------------------------------------ refusals

    def test_bad_keys_are_refused_before_anything_is_claimed(self) -> None:
        """A malformed key answers 400 and leaves no record; the API key is still checked first."""
        code, body, _ = self.call(key="x" * 256)
        self.assertEqual((code, body[0]["msg"]), (400, "smtp_invalid_idempotency_key"))
        code, body, _ = self.call(key="x" * 256, api_key="WRONG")
        self.assertEqual((code, body), (401, {"type": "error", "msg": "authentication failed"}))
        self.assertEqual((self.store.rows(), self.submitter.sent), ([], []))

    def test_store_down_refuses_rather_than_risk_a_duplicate(self) -> None:
        """When the state database fails, a keyed request gets 503 and nothing is sent."""
        self.store.down = True
        code, body, headers = self.call()
        self.assertEqual((code, body[0]["msg"], headers.getRawHeaders("Retry-After")), (503, "smtp_idempotency_unavailable", ["5"]))
        self.assertEqual(self.submitter.sent, [])
        self.assertEqual(self.call(key=None)[0], 200)

    def test_a_key_without_a_store_is_refused(self) -> None:
        """A server built without a store does not silently ignore the header."""
        self.make_client(with_store=False)
        self.assertEqual(self.call()[1][0]["msg"], "smtp_idempotency_unavailable")
        self.assertEqual(self.submitter.sent, [])

    def test_failure_to_store_the_answer_still_answers(self) -> None:
        """If the answer cannot be stored, the caller still gets it; the record stays in flight (never resent)."""
        held = self.submitter = HeldSubmitter()
        self.make_client()
        first = self.post()
        self.store.down = True
        held.pending[0].callback(accepted())
        self.assertEqual(self.answer(first)[0], 200)
        self.store.down = False
        self.assertEqual(self.call()[1][0]["msg"], "smtp_idempotency_in_flight")
        self.assertEqual(self.store.rows(), [("order-1234", "in_flight", None, None)])


@attrs.define
class PurgeRecorder:
    """Records purge times; fails the calls whose index is in ``failing``; counts close()."""

    calls: list[float] = attrs.Factory(list)
    failing: set[int] = attrs.Factory(set)
    closed: int = 0

    def purge(self, now: float) -> Deferred[int]:
        self.calls.append(now)
        if len(self.calls) - 1 in self.failing:
            return fail(ApiError.of("smtp_idempotency_unavailable"))
        return succeed(2)

    def close(self) -> None:
        self.closed += 1


class PurgerTests(SynchronousTestCase):
    def test_expired_records_are_purged_periodically_even_after_a_failure(self) -> None:
        """The purge runs every interval with the clock's time; a failed run does not stop later ones."""
        clock, store = Clock(), PurgeRecorder(failing={1})
        purger = state.StatePurger(store, clock, interval=300.0)  # type: ignore[arg-type]
        purger.startService()
        self.assertEqual(store.calls, [])
        for _ in range(3):
            clock.advance(300.0)
        self.assertEqual(store.calls, [300.0, 600.0, 900.0])
        purger.stopService()
        clock.advance(3000.0)
        self.assertEqual((len(store.calls), store.closed), (3, 1))
