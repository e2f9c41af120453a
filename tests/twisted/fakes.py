"""Recording fakes for the service's seams (keys, sender rule, SMTP submitter, throttle)."""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail, succeed

from mailcow_smtp_api.core.errors import API_AUTH_FAILED, ApiError, SmtpFailure
from mailcow_smtp_api.core.model import Credentials, Envelope, MessageData, RecipientResult, SmtpTarget, SubmitResult

GOOD_KEY = "AAAAAA-BBBBBB-CCCCCC-DDDDDD-EEEEEE"


@attrs.define
class Decision:
    """A sender decision as the database answers it."""

    allowed: bool
    reason: str


@attrs.define
class FakeKeys:
    """Accepts GOOD_KEY only; records every call."""

    calls: list[tuple[Any, str, bool]] = attrs.Factory(list)
    down: bool = False

    def authenticate_key(self, raw_header: str | None, client_ip: str, need_write: bool) -> Deferred[Any]:
        self.calls.append((raw_header, client_ip, need_write))
        if self.down:
            return fail(ApiError.of("smtp_db_unavailable"))
        if raw_header == GOOD_KEY:
            return succeed({"api_key": GOOD_KEY})
        return fail(ApiError.mailcow(401, API_AUTH_FAILED))


@attrs.define
class FakeSenders:
    """Allows the pairs in ``allowed``; records every question."""

    allowed: set[tuple[str, str]] = attrs.Factory(set)
    calls: list[tuple[str, str]] = attrs.Factory(list)

    def authorize_sender(self, login: str, sender: str) -> Deferred[Any]:
        self.calls.append((login, sender))
        ok = (login.lower(), sender.lower()) in self.allowed
        return succeed(Decision(ok, "test rule" if ok else f"no owner for {sender}"))

    def sender_has_owner(self, sender: str) -> Deferred[bool]:
        self.calls.append(("", sender))
        return succeed(any(s == sender.lower() for _, s in self.allowed))


@attrs.define
class FakeLocalAuth:
    """Accepts one login/password pair; records every check."""

    login: str = "user1@example.org"
    password: str = "pw1"
    calls: list[tuple[str, str | None]] = attrs.Factory(list)

    def check_login(self, login: str, password: str | None) -> Deferred[Any]:
        self.calls.append((login, password))
        if (login, password) == (self.login, self.password):
            return succeed(None)
        return fail(ApiError.of("smtp_auth_failed"))


def joined(message: MessageData) -> bytes:
    """A submitted message as one string, whether it came as one or in pieces."""
    return message if isinstance(message, bytes) else b"".join(message)


@attrs.define
class FakeSubmitter:
    """Records submissions; answers with ``failure`` or a success accepting every recipient."""

    failure: SmtpFailure | None = None
    refuse: set[str] = attrs.Factory(set)
    sent: list[tuple[SmtpTarget, Credentials | None, Envelope, bytes]] = attrs.Factory(list)

    def submit(
        self, target: SmtpTarget, credentials: Credentials | None, envelope: Envelope, message: MessageData
    ) -> Deferred[SubmitResult]:
        self.sent.append((target, credentials, envelope, joined(message)))
        if self.failure is not None:
            return fail(self.failure)
        rcpts = tuple(
            RecipientResult(r, 550 if r in self.refuse else 250, "5.1.1 no" if r in self.refuse else "2.1.5 Ok")
            for r in envelope.recipients
        )
        return succeed(SubmitResult(250, "2.0.0 Ok: queued as QID1", rcpts, "QID1"))


@attrs.define
class FakeThrottle:
    """Blocks an address after ``limit`` failures."""

    limit: int = 3
    failures: dict[str, int] = attrs.Factory(dict)

    def retry_after(self, ip: str) -> int | None:
        return 600 if self.failures.get(ip, 0) >= self.limit else None

    def record_failure(self, ip: str) -> None:
        self.failures[ip] = self.failures.get(ip, 0) + 1
