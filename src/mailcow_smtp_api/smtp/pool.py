"""Reuse of authenticated SMTP sessions: TLS and AUTH once, many messages.

A pool key is (host, port, security, login, keyed hash of the password): a session is only ever
reused by a request that presented the very password the session authenticated with, so a wrong
password fails exactly as on a fresh connection (it gets a fresh connection). The keyed hash uses a
per-process random key and the plaintext is never stored.

Rules (the order matters for "nothing lost, nothing duplicated"):
- an idle session older than ``noop_after`` seconds is checked with NOOP before reuse;
- a session idle for ``idle_timeout`` or alive for ``max_age`` is closed (``max_age`` also bounds how
  long a password changed in mailcow keeps working through pooled sessions, like dovecot's 300 s
  authentication cache);
- a failure on a REUSED session before the final ``.`` (the server dropped it, did not answer, or
  said 421) is retried once on a fresh session; a failure after the final ``.`` never is;
- after a failed transaction the session is RSET before it goes back; if RSET fails it is closed;
- at most ``max_busy_per_target`` sessions per target are in use at once; further sends wait;
- at most ``max_idle_per_target`` sessions per target wait for reuse, whatever their logins: each
  holds one of the server's smtpd processes. A session parked when the target has that many closes
  the one idle longest (of any login), so the logins sending now keep theirs.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ..core.errors import SmtpFailure
from ..core.model import Credentials, Envelope, MessageData, Security, SmtpTarget, SubmitResult

log = Logger(namespace="smtpapi.pool")

PoolKey = tuple[str, int, Security, str | None, bytes | None]


class Session(Protocol):
    """What the pool needs of an SMTP session (smtp.SmtpSession)."""

    @property
    def usable(self) -> bool:
        """True while the connection is up and in step with the server."""

    async def send(self, envelope: Envelope, message: MessageData) -> SubmitResult:
        """One transaction."""

    async def reset(self) -> None:
        """RSET."""

    async def noop(self) -> None:
        """NOOP."""

    def quit(self) -> Deferred[None]:
        """QUIT and close; never fails."""

    def abort(self) -> None:
        """Drop the connection."""


class SessionOpener(Protocol):
    """Opens greeted, secured, authenticated sessions (smtp.SmtpSubmitter)."""

    def open_session(self, target: SmtpTarget, credentials: Credentials | None) -> Deferred[Any]:
        """A new session, or a failure with SmtpFailure."""


@attrs.define(eq=False)
class _Idle:
    session: Session
    opened: float
    last_used: float


def _retryable(failure: SmtpFailure) -> bool:
    """A reused session that died before the final dot: the server never got the message."""
    if failure.phase == "message":
        return False
    if failure.kind in ("dropped", "timeout", "protocol"):
        return True
    return failure.kind == "reply" and failure.code == 421


class SessionPool:
    """Submits through reused sessions; the same ``submit`` contract as ``smtp.SmtpSubmitter``."""

    def __init__(
        self,
        opener: SessionOpener,
        clock: Any,
        *,
        max_idle_per_target: int = 50,
        max_busy_per_target: int = 50,
        idle_timeout: float = 30.0,
        max_age: float = 300.0,
        noop_after: float = 5.0,
    ) -> None:
        self._opener = opener
        self._clock = clock
        self.max_idle_per_target = max_idle_per_target
        self.max_busy_per_target = max_busy_per_target
        self.idle_timeout = idle_timeout
        self.max_age = max_age
        self.noop_after = noop_after
        self._secret = secrets.token_bytes(32)
        self._idle: dict[PoolKey, list[_Idle]] = {}
        self._limits: OrderedDict[tuple[str, int], DeferredSemaphore] = OrderedDict()
        self.busy = 0
        self._sweeper = LoopingCall(self.sweep)
        self._sweeper.clock = clock

    # -- lifecycle

    def start(self) -> None:
        """Close expired idle sessions every few seconds."""
        if not self._sweeper.running:
            self._sweeper.start(max(1.0, min(self.idle_timeout, self.max_age) / 3), now=False)

    def close(self) -> Deferred[None]:
        """Stop sweeping and QUIT every idle session."""
        if self._sweeper.running:
            self._sweeper.stop()
        for entries in self._idle.values():
            for entry in entries:
                entry.session.quit()
        self._idle.clear()
        return Deferred.fromCoroutine(_nothing())

    @property
    def idle(self) -> int:
        """How many sessions wait for reuse."""
        return sum(len(entries) for entries in self._idle.values())

    def sweep(self) -> None:
        """Close idle sessions that are dead, idle too long, or too old."""
        now = self._clock.seconds()
        for key in list(self._idle):
            keep = []
            for entry in self._idle[key]:
                if entry.session.usable and now - entry.last_used < self.idle_timeout and now - entry.opened < self.max_age:
                    keep.append(entry)
                else:
                    entry.session.quit()
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]

    # -- submitting

    def key_for(self, target: SmtpTarget, credentials: Credentials | None) -> PoolKey:
        """The pool key: target, security, login and a keyed hash of the password."""
        if credentials is None:
            return (target.host, target.port, target.security, None, None)
        digest = hmac.new(self._secret, credentials.password.encode("utf-8"), hashlib.sha256).digest()
        return (target.host, target.port, target.security, credentials.login.lower(), digest)

    def submit(
        self, target: SmtpTarget, credentials: Credentials | None, envelope: Envelope, message: MessageData
    ) -> Deferred[SubmitResult]:
        """Send over a pooled session when one fits, else a fresh one; fail with SmtpFailure only."""
        limit = self._limit(target)
        return limit.run(lambda: Deferred.fromCoroutine(self._submit(target, credentials, envelope, message)))

    def _limit(self, target: SmtpTarget) -> DeferredSemaphore:
        name = (target.host, target.port)
        if name not in self._limits:
            self._limits[name] = DeferredSemaphore(self.max_busy_per_target)
        return self._limits[name]

    async def _submit(
        self, target: SmtpTarget, credentials: Credentials | None, envelope: Envelope, message: MessageData
    ) -> SubmitResult:
        key = self.key_for(target, credentials)
        self.busy += 1
        try:
            entry = await self._reusable(key)
            if entry is not None:
                try:
                    result = await entry.session.send(envelope, message)
                except SmtpFailure as failure:
                    if not _retryable(failure):
                        await self._after_failure(key, entry, failure)
                        raise
                    entry.session.abort()
                    log.info("pooled session to {target} failed before the data ({kind}); retrying once on a new one",
                             target=str(target), kind=failure.kind)
                else:
                    self._park(key, entry)
                    return result
            entry = await self._open(target, credentials)
            try:
                result = await entry.session.send(envelope, message)
            except SmtpFailure as failure:
                await self._after_failure(key, entry, failure)
                raise
            self._park(key, entry)
            return result
        finally:
            self.busy -= 1

    async def _reusable(self, key: PoolKey) -> _Idle | None:
        """The freshest usable idle session for ``key`` (NOOP-checked when idle for a while), or None."""
        entries = self._idle.get(key, [])
        now = self._clock.seconds()
        while entries:
            entry = entries.pop()
            if not entries:
                self._idle.pop(key, None)
            if not entry.session.usable or now - entry.opened >= self.max_age or now - entry.last_used >= self.idle_timeout:
                entry.session.quit()
                continue
            if now - entry.last_used >= self.noop_after:
                try:
                    await entry.session.noop()
                except SmtpFailure:
                    entry.session.abort()
                    continue
            return entry
        return None

    async def _open(self, target: SmtpTarget, credentials: Credentials | None) -> _Idle:
        session = await self._opener.open_session(target, credentials)
        now = self._clock.seconds()
        return _Idle(session=session, opened=now, last_used=now)

    async def _after_failure(self, key: PoolKey, entry: _Idle, failure: SmtpFailure) -> None:
        """A failed transaction: RSET and keep the session if it is still in step, else close it.

        A session refused for now (4xx) is closed too: postfix's reason is often its smtpd process's
        own (a failed lookup in a MariaDB map stays marked down there for the map's retry_interval,
        60 s by default; under stress smtpd ends a session at its first error), and another process
        may be well, so the next message is not tied to this one.
        """
        if not entry.session.usable:
            entry.session.abort()
            return
        if failure.refused_for_now:
            entry.session.quit()
            return
        try:
            await entry.session.reset()
        except SmtpFailure:
            entry.session.abort()
            return
        self._park(key, entry)

    def _park(self, key: PoolKey, entry: _Idle) -> None:
        now = self._clock.seconds()
        if not entry.session.usable or self.max_idle_per_target < 1 or now - entry.opened >= self.max_age:
            entry.session.quit()
            return
        same_target = [k for k in self._idle if k[:2] == key[:2]]
        if sum(len(self._idle[k]) for k in same_target) >= self.max_idle_per_target:
            # Entries are appended as they are parked, so each list's first is its longest idle.
            oldest = min(same_target, key=lambda k: self._idle[k][0].last_used)
            self._idle[oldest].pop(0).session.quit()
            if not self._idle[oldest]:
                del self._idle[oldest]
        entry.last_used = now
        self._idle.setdefault(key, []).append(entry)


async def _nothing() -> None:
    return None
