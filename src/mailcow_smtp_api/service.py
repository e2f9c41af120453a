"""The send use case: authenticate the key -> authorize login and sender -> build -> submit.

Everything with an effect comes in through a small Protocol, so tests drive this with recording
fakes and the process wires in the database, the SMTP client and the clock.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred

from .apikeys import ip_in, parse_networks
from .config import Config
from .errors import ApiError, SmtpFailure, smtp_failure_to_api_error
from .mime import build_message, envelope_for, make_message_id
from .model import Credentials, Envelope, Security, SendRequest, SmtpTarget, SubmitResult


class KeyChecker(Protocol):
    """Decides whether an X-API-Key may send from a client address (mailcow's api table)."""

    def authenticate_key(self, raw_header: str | None, client_ip: str, need_write: bool) -> Deferred[Any]:
        """Fire with the key's row, or fail with an ``ApiError``."""


class SenderDecisionLike(Protocol):
    """What the sender check answers."""

    allowed: bool
    reason: str


class SenderChecker(Protocol):
    """mailcow's sender rule: may ``login`` send as ``sender``? Includes the login's own validity."""

    def authorize_sender(self, login: str, sender: str) -> Deferred[Any]:
        """Fire with a decision (``allowed``, ``reason``); fail only when the database is unreachable."""

    def sender_has_owner(self, sender: str) -> Deferred[bool]:
        """Fire True when some mailbox owns ``sender`` in mailcow's sender map (a local address)."""


class Submitter(Protocol):
    """Submits one message over SMTP."""

    def submit(
        self, target: SmtpTarget, credentials: Credentials | None, envelope: Envelope, message: bytes
    ) -> Deferred[SubmitResult]:
        """Fire with the server's answer, or fail with ``SmtpFailure``."""


class FailureThrottle(Protocol):
    """Counts authentication failures per client address and blocks after too many."""

    def retry_after(self, ip: str) -> int | None:
        """Seconds until ``ip`` may try again, or None when it is not blocked."""

    def record_failure(self, ip: str) -> None:
        """Count one failed authentication from ``ip``."""


class LocalAuthenticator(Protocol):
    """Verifies a mailbox password against the database (for port 25, where postfix checks nothing)."""

    def check_login(self, login: str, password: str | None) -> Deferred[Any]:
        """Fire when the login and password are valid; fail with an ``ApiError`` otherwise."""


@attrs.frozen
class SendOutcome:
    """A message the SMTP server accepted, and how."""

    request: SendRequest
    target: SmtpTarget
    envelope: Envelope
    message_id: str
    result: SubmitResult


@attrs.define
class SendService:
    """Runs one send request through every check, in the order that keeps secrets and postfix safe."""

    config: Config
    keys: KeyChecker
    senders: SenderChecker
    submitter: Submitter
    throttle: FailureThrottle
    now: Callable[[], datetime]
    new_token: Callable[[], str]
    local_auth: LocalAuthenticator | None = None

    async def authenticate(self, raw_key: str | None, client_ip: str) -> Any:
        """Check the API key for a write action; count failures toward the address's throttle."""
        self._refuse_if_blocked(client_ip)
        try:
            return await self.keys.authenticate_key(raw_key, client_ip, True)
        except ApiError as err:
            if err.status in (401, 403) and err.bare:
                self.throttle.record_failure(client_ip)
            raise

    def password_optional(self, port: int | None, client_ip: str) -> bool:
        """A request may omit the mailbox password only towards a plain (port 25) target, and only
        from an address the operator listed in --port25-no-password-from."""
        if not self._internal_caller(client_ip):
            return False
        target = self.config.allowed_target(self.config.smtp_host, port or self.config.smtp_port)
        # A request naming another host is checked again in send(), against its real target.
        return target is None or target.security is Security.PLAIN

    def _internal_caller(self, client_ip: str) -> bool:
        networks = self.config.port25_no_password_from
        return bool(networks) and ip_in(client_ip, parse_networks(networks))

    def target_for(self, request: SendRequest) -> SmtpTarget:
        """The SMTP server this request goes to, refused unless the operator allows it."""
        host = request.smtp_host or self.config.smtp_host
        port = request.smtp_port or self.config.smtp_port
        target = self.config.allowed_target(host, port)
        if target is None:
            raise ApiError.of(
                "smtp_host_not_allowed",
                f"{host}:{port} is not in this server's --smtp-allow list",
                field="smtp_host" if request.smtp_host else "smtp_port",
            )
        return target

    async def send(self, request: SendRequest, client_ip: str, request_id: str = "") -> SendOutcome:
        """Authorize, build and submit ``request``; fail with an ``ApiError``."""
        target = self.target_for(request)
        if request.password is None:
            credentials = await self._trusted_internal(target, request, client_ip)
        else:
            credentials = await self._credentials_for(target, request, client_ip)
            decision = await self.senders.authorize_sender(request.login, request.sender.wire)
            if not decision.allowed:
                raise ApiError.of(
                    "smtp_unauthorized_sender",
                    f"{request.login} may not send as {request.sender.wire}",
                    field="from",
                    detail={"reason": decision.reason},
                )
        message_id = make_message_id(self.new_token(), request.sender)
        extra = (("X-Request-Id", request_id),) if request_id else ()
        message = build_message(request, message_id=message_id, date=self.now(), extra_headers=extra)
        envelope = envelope_for(request)
        try:
            result = await self.submitter.submit(target, credentials, envelope, message)
        except SmtpFailure as failure:
            err = smtp_failure_to_api_error(failure)
            if err.code == "smtp_auth_failed":
                self.throttle.record_failure(client_ip)
            raise err from None
        return SendOutcome(request=request, target=target, envelope=envelope, message_id=message_id, result=result)

    async def _trusted_internal(self, target: SmtpTarget, request: SendRequest, client_ip: str) -> None:
        """No password: allowed only by --port25-no-password-from, and only for a local ``from``."""
        if target.security is not Security.PLAIN or not self._internal_caller(client_ip):
            raise ApiError.of("smtp_auth_required", field="password")
        if not await self.senders.sender_has_owner(request.sender.wire):
            raise ApiError.of(
                "smtp_unauthorized_sender",
                f"{request.sender.wire} is not a mailbox or alias of this mailcow server",
                field="from",
                detail={"reason": f"no owner for {request.sender.wire}"},
            )
        return None

    async def _credentials_for(self, target: SmtpTarget, request: SendRequest, client_ip: str) -> Credentials | None:
        """Port 25 checks nothing: the password is verified here, and no AUTH is sent."""
        if target.security is not Security.PLAIN:
            assert request.password is not None
            return Credentials(request.login, request.password)
        if self.local_auth is None:
            raise ApiError.of("smtp_port25_unavailable", field="smtp_port")
        self._refuse_if_blocked(client_ip)
        try:
            await self.local_auth.check_login(request.login, request.password)
        except ApiError as err:
            if err.code == "smtp_auth_failed":
                self.throttle.record_failure(client_ip)
            raise
        return None

    def _refuse_if_blocked(self, client_ip: str) -> None:
        wait = self.throttle.retry_after(client_ip)
        if wait is not None:
            raise ApiError.of("smtp_too_many_failures", retry_after=wait)
