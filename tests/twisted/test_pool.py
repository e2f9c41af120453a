"""The session pool over fake sessions and a Clock: reuse, keys, NOOP, expiry, the one retry, the limit."""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailcow_smtp_api.core.errors import SmtpFailure
from mailcow_smtp_api.core.model import Credentials, Envelope, RecipientResult, SmtpTarget, SubmitResult
from mailcow_smtp_api.smtp.pool import SessionPool

TARGET = SmtpTarget("127.0.0.1", 10587)
ALICE = Credentials("alice@example.org", "pw-a")
ENV = Envelope("alice@example.org", ("r@example.net",))
OK = SubmitResult(250, "2.0.0 Ok: queued as Q", (RecipientResult("r@example.net", 250, "ok"),), "Q")


@attrs.define(eq=False)
class FakeSession:
    """Records what it was asked; fails its next send with ``fail_next`` if set."""

    number: int
    usable: bool = True
    sent: list[bytes] = attrs.Factory(list)
    log: list[str] = attrs.Factory(list)
    fail_next: SmtpFailure | None = None
    noop_fails: bool = False

    async def send(self, envelope: Envelope, message: bytes) -> SubmitResult:
        self.log.append("send")
        if self.fail_next is not None:
            failure, self.fail_next = self.fail_next, None
            if failure.kind in ("dropped", "timeout"):
                self.usable = False
            raise failure
        self.sent.append(message)
        return OK

    async def reset(self) -> None:
        self.log.append("rset")

    async def noop(self) -> None:
        self.log.append("noop")
        if self.noop_fails:
            self.usable = False
            raise SmtpFailure("dropped", "ehlo")

    def quit(self) -> Deferred[None]:
        self.log.append("quit")
        self.usable = False
        return succeed(None)

    def abort(self) -> None:
        self.log.append("abort")
        self.usable = False


@attrs.define
class Opener:
    """Opens numbered fake sessions; records the credentials; can refuse (535)."""

    sessions: list[FakeSession] = attrs.Factory(list)
    creds: list[Credentials | None] = attrs.Factory(list)
    refuse_password: str | None = None
    pending: list[Deferred[Any]] | None = None
    fail_new_with: SmtpFailure | None = None

    def open_session(self, target: SmtpTarget, credentials: Credentials | None) -> Deferred[Any]:
        self.creds.append(credentials)
        if credentials is not None and credentials.password == self.refuse_password:
            return fail(SmtpFailure("reply", "auth", 535, "5.7.8 authentication failed"))
        session = FakeSession(len(self.sessions) + 1, fail_next=self.fail_new_with)
        self.sessions.append(session)
        if self.pending is not None:
            d: Deferred[Any] = Deferred()
            self.pending.append(d)
            d.addCallback(lambda _: session)
            return d
        return succeed(session)


class PoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.opener = Opener()
        self.pool = SessionPool(self.opener, self.clock, idle_timeout=30, max_age=300, noop_after=5)

    def send(self, creds: Credentials | None = ALICE, target: SmtpTarget = TARGET) -> Any:
        return self.successResultOf(self.pool.submit(target, creds, ENV, b"msg"))

    def test_second_message_reuses_the_session(self) -> None:
        """Two sends with the same login and password use one connection."""
        self.send()
        self.send()
        self.assertEqual(len(self.opener.sessions), 1)
        self.assertEqual(self.opener.sessions[0].sent, [b"msg", b"msg"])
        self.assertEqual(self.pool.idle, 1)

    def test_other_password_or_login_never_shares(self) -> None:
        """A different password (even for the same login) or another login gets its own connection."""
        self.send()
        self.send(Credentials("alice@example.org", "other"))
        self.send(Credentials("bob@example.org", "pw-a"))
        self.send(Credentials("ALICE@example.org", "pw-a"))  # logins compare case-insensitively
        self.assertEqual(len(self.opener.sessions), 3)

    def test_wrong_password_fails_as_on_a_fresh_connection(self) -> None:
        """With a good session pooled, a wrong password still goes to the server and gets its 535."""
        self.send()
        self.opener.refuse_password = "wrong"
        failure = self.failureResultOf(self.pool.submit(TARGET, Credentials("alice@example.org", "wrong"), ENV, b"m"), SmtpFailure)
        self.assertEqual(failure.value.code, 535)
        self.assertEqual(self.opener.sessions[0].sent, [b"msg"])

    def test_idle_session_is_checked_with_noop(self) -> None:
        """After noop_after seconds idle the session is NOOPed before reuse; a dead one is replaced."""
        self.send()
        self.clock.advance(6)
        self.send()
        self.assertEqual(self.opener.sessions[0].log, ["send", "noop", "send"])
        self.clock.advance(6)
        self.opener.sessions[0].noop_fails = True
        self.send()
        self.assertEqual(len(self.opener.sessions), 2)
        self.assertEqual(self.opener.sessions[1].sent, [b"msg"])

    def test_expired_sessions_are_closed(self) -> None:
        """Idle past idle_timeout or older than max_age: closed by the sweep, never reused."""
        self.send()
        self.pool.start()
        self.clock.advance(31)
        self.assertEqual(self.pool.idle, 0)
        self.assertIn("quit", self.opener.sessions[0].log)
        for _ in range(12):  # keep one session busy for more than max_age
            self.send()
            self.clock.advance(29)
        self.assertGreaterEqual(len(self.opener.sessions), 3)
        self.pool.close()

    def test_dead_pooled_session_is_retried_once_on_a_fresh_one(self) -> None:
        """A reused session dropped before the data: the message goes out once, on a new connection."""
        self.send()
        self.opener.sessions[0].fail_next = SmtpFailure("dropped", "mail")
        self.send()
        self.assertEqual(len(self.opener.sessions), 2)
        self.assertEqual(self.opener.sessions[1].sent, [b"msg"])

    def test_no_retry_after_the_final_dot_or_on_a_fresh_session(self) -> None:
        """A timeout after the data is never retried; nor is a failure on a just-opened session."""
        self.send()
        self.opener.sessions[0].fail_next = SmtpFailure("timeout", "message")
        failure = self.failureResultOf(self.pool.submit(TARGET, ALICE, ENV, b"m"), SmtpFailure)
        self.assertTrue(failure.value.outcome_unknown)
        self.assertEqual(len(self.opener.sessions), 1)
        opener = Opener(fail_new_with=SmtpFailure("dropped", "mail"))
        pool = SessionPool(opener, self.clock)
        self.failureResultOf(pool.submit(TARGET, ALICE, ENV, b"m"), SmtpFailure)
        self.assertEqual(len(opener.sessions), 1)

    def test_refused_transaction_is_reset_and_kept(self) -> None:
        """A 553 for every recipient leaves the session usable: RSET, then it is reused."""
        self.send()
        self.opener.sessions[0].fail_next = SmtpFailure("reply", "rcpt", 553, "not owned")
        self.failureResultOf(self.pool.submit(TARGET, ALICE, ENV, b"m"), SmtpFailure)
        self.send()
        self.assertEqual(self.opener.sessions[0].log, ["send", "send", "rset", "send"])
        self.assertEqual(len(self.opener.sessions), 1)

    def test_transient_refusal_closes_the_session(self) -> None:
        """A 451 (a failed lookup in that smtpd process, say) at RCPT or after the data: the session
        is QUIT, not RSET and kept, and the next message goes out on a new connection."""
        for phase in ("rcpt", "message"):
            opener = Opener()
            pool = SessionPool(opener, self.clock)
            self.successResultOf(pool.submit(TARGET, ALICE, ENV, b"m"))
            opener.sessions[0].fail_next = SmtpFailure("reply", phase, 451, "4.3.0 Temporary lookup failure")
            failure = self.failureResultOf(pool.submit(TARGET, ALICE, ENV, b"m"), SmtpFailure)
            self.assertEqual(failure.value.code, 451)
            self.assertEqual(opener.sessions[0].log, ["send", "send", "quit"], phase)
            self.assertEqual(pool.idle, 0)
            self.successResultOf(pool.submit(TARGET, ALICE, ENV, b"m"))
            self.assertEqual(len(opener.sessions), 2, phase)
            self.assertEqual(opener.sessions[1].sent, [b"m"])

    def test_transient_refusal_on_a_fresh_session_closes_it_too(self) -> None:
        """A new session refused with 450 is not parked either."""
        opener = Opener(fail_new_with=SmtpFailure("reply", "mail", 450, "4.7.1 try again later"))
        pool = SessionPool(opener, self.clock)
        self.failureResultOf(pool.submit(TARGET, ALICE, ENV, b"m"), SmtpFailure)
        self.assertEqual(opener.sessions[0].log, ["send", "quit"])
        self.assertEqual(pool.idle, 0)

    def test_busy_sessions_per_target_are_bounded(self) -> None:
        """Past max_busy_per_target, sends wait for a session instead of opening more connections."""
        self.opener.pending = []
        pool = SessionPool(self.opener, self.clock, max_busy_per_target=2)
        results = [pool.submit(TARGET, ALICE, ENV, b"m") for _ in range(5)]
        self.assertEqual(len(self.opener.pending), 2)
        self.opener.pending[0].callback(None)
        self.opener.pending[1].callback(None)
        self.assertEqual([self.successResultOf(r).queue_id for r in results], ["Q"] * 5)
        self.assertEqual(len(self.opener.sessions), 2)

    def test_a_send_given_up_while_it_waits_for_the_limit_takes_no_place(self) -> None:
        """A waiting send that is cancelled leaves the queue; the limit's places all come back."""
        self.opener.pending = []
        pool = SessionPool(self.opener, self.clock, max_busy_per_target=1)
        first = pool.submit(TARGET, ALICE, ENV, b"m")
        waiting = pool.submit(TARGET, ALICE, ENV, b"m")
        third = pool.submit(TARGET, ALICE, ENV, b"m")
        waiting.cancel()
        self.failureResultOf(waiting)
        self.opener.pending[0].callback(None)
        self.assertEqual(self.successResultOf(first).queue_id, "Q")
        self.assertEqual(self.successResultOf(third).queue_id, "Q")
        self.assertEqual(self.opener.sessions[0].log, ["send", "send"])
        limit = pool._limit(TARGET)
        self.assertEqual(limit.tokens, limit.limit)

    def test_idle_sessions_per_target_are_bounded(self) -> None:
        """At most max_idle_per_target sessions wait; the rest are closed."""
        self.opener.pending = []
        pool = SessionPool(self.opener, self.clock, max_idle_per_target=1)
        results = [pool.submit(TARGET, ALICE, ENV, b"m") for _ in range(3)]
        for d in list(self.opener.pending):
            d.callback(None)
        for r in results:
            self.successResultOf(r)
        self.assertEqual(pool.idle, 1)
        self.assertEqual(sum("quit" in s.log for s in self.opener.sessions), 2)

    def test_a_full_pool_closes_the_session_idle_longest_of_any_login(self) -> None:
        """Two idle places per target: a third login's session evicts the oldest, another target is apart."""
        pool = SessionPool(self.opener, self.clock, max_idle_per_target=2)
        logins = [Credentials(f"user{i}@example.org", "pw") for i in range(3)]
        for creds in logins:
            self.successResultOf(pool.submit(TARGET, creds, ENV, b"m"))
            self.clock.advance(1)
        self.assertEqual(pool.idle, 2)
        first, second, third = self.opener.sessions
        self.assertIn("quit", first.log)
        self.assertNotIn("quit", second.log + third.log)
        other = SmtpTarget("127.0.0.2", 10587)
        self.successResultOf(pool.submit(other, logins[0], ENV, b"m"))
        self.assertEqual(pool.idle, 3)  # the other target has places of its own
        self.successResultOf(pool.submit(TARGET, logins[2], ENV, b"m"))  # reuses its own session
        self.assertEqual(len(self.opener.sessions), 4)
        self.assertNotIn("quit", second.log)

    def test_password_is_not_kept(self) -> None:
        """The pool's keys hold a keyed hash, never the password."""
        self.send()
        self.assertNotIn("pw-a", repr(self.pool._idle))
        key = self.pool.key_for(TARGET, ALICE)
        self.assertNotIn(b"pw-a", key[4] or b"")
