"""The send use case: authenticate the key -> authorize login and sender -> build -> submit.

Everything with an effect comes in through a small Protocol, so tests drive this with recording
fakes and the process wires in the database, the SMTP client and the clock.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from .core import idempotency
from .abuse import AbuseControls, no_limits, rate_limited
from .core.apikeys import ip_in, parse_networks
from .core.config import Config
from .core.errors import API_AUTH_FAILED, ApiError, SmtpFailure, smtp_failure_to_api_error
from .core.idempotency import Answer, Claim, Record, State, Verdict
from .core.mime import build_message_parts, envelope_for, make_message_id
from .core.model import (
    Address,
    Credentials,
    Envelope,
    MessageData,
    Security,
    SendRequest,
    SmtpTarget,
    SubmitResult,
)
from .core.ratelimit import Decision
from .core.rawmime import raw_message_data
from .core.responses import error_body
from .core.sendkeys import SendKey, check_key, key_id_of, looks_like_send_key, parse_token
from .core.senders import not_a_mailbox

log = Logger(namespace="smtpapi.service")


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


class SendKeyLookup(Protocol):
    """The sidecar's own send keys (the state database)."""

    def send_key(self, key_id: str) -> Deferred[SendKey | None]:
        """Fire with the stored key of this id, or None."""


@attrs.frozen
class Caller:
    """Who authenticated a request: a mailcow API key (an admin key), or one of the sidecar's send keys."""

    send_key: SendKey | None = None

    @property
    def label(self) -> str:
        """The kind of key, for answers and logs: ``api_key`` or ``send_key:<id>``; never the key."""
        return "api_key" if self.send_key is None else f"send_key:{self.send_key.key_id}"


class Submitter(Protocol):
    """Submits one message over SMTP."""

    def submit(
        self, target: SmtpTarget, credentials: Credentials | None, envelope: Envelope, message: MessageData
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

    def check_login(self, login: str, password: str | None) -> Awaitable[Any]:
        """Fire when the login and password are valid; fail with an ``ApiError`` otherwise."""


class IdempotencyStore(Protocol):
    """Where idempotency records live (shared by every instance of the sidecar)."""

    def claim(self, claim: Claim) -> Deferred[Record | None]:
        """Fire None when the key is now claimed by ``claim``, or with the live record holding it."""

    def settle(self, scope: str, key: str, token: str, state: State, answer: Answer) -> Deferred[bool]:
        """Store ``answer`` on the in-flight record claimed with ``token``; fire False when it is gone."""

    def release(self, claim: Claim) -> Deferred[bool]:
        """Delete the in-flight record made by ``claim``."""


@attrs.define
class Progress:
    """How far one send got: ``reached_smtp`` turns True just before the SMTP submission starts;
    ``rate`` is the rate-limit decision, once one was made (for the RateLimit headers)."""

    reached_smtp: bool = False
    rate: Decision | None = None


# Requests larger than this are parsed and their messages built in a worker thread (``offload``).
# Below it the work takes a few milliseconds at most, less than the interpreter's switch interval
# (5 ms): a worker would hold the GIL for all of it, so the reactor would wait as long as when the
# work runs inline, and the two thread hops would cost about half a millisecond of CPU on top.
OFFLOAD_BYTES = 256 * 1024


def _size(request: SendRequest) -> int:
    """Roughly how many bytes the message will have before encoding."""
    raw = len(request.raw.data) if request.raw is not None else 0
    return raw + len(request.body) + len(request.html_body) + sum(len(a.content) for a in request.attachments)


@attrs.frozen
class Prepared:
    """A request that passed every check, with its built message, ready to hand over."""

    request: SendRequest
    target: SmtpTarget
    credentials: Credentials | None
    envelope: Envelope
    message_id: str
    message: MessageData


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
    # Runs a callable in a worker thread; None builds every message on the calling thread.
    offload: Callable[[Callable[[], Any]], Deferred[Any]] | None = None
    abuse: AbuseControls = attrs.Factory(no_limits)
    send_keys: SendKeyLookup | None = None
    # --port25-no-password-from, parsed once rather than on every request.
    _internal_networks: tuple[Any, ...] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._internal_networks = parse_networks(self.config.port25_no_password_from)

    async def authenticate(self, raw_key: str | None, client_ip: str) -> Caller:
        """Check the API key or send key for a write action; count failures toward the address's
        throttle and tell fail2ban. A banned address is refused before any database work."""
        self._refuse_if_blocked(client_ip)
        await self.abuse.refuse_if_banned(client_ip)
        if looks_like_send_key(raw_key):
            return Caller(await self._send_key(raw_key, client_ip))
        try:
            await self.keys.authenticate_key(raw_key, client_ip, True)
        except ApiError as err:
            if err.status in (401, 403) and err.bare:
                self._failed(client_ip, "api-key")
            raise
        return Caller()

    async def _send_key(self, raw_key: str | None, client_ip: str) -> SendKey:
        token = parse_token(raw_key)
        if token is None or self.send_keys is None:
            self._failed(client_ip, key_id_of(raw_key))
            raise ApiError.mailcow(401, API_AUTH_FAILED)
        key_id, secret = token
        row = await self.send_keys.send_key(key_id)
        try:
            return check_key(row, secret, client_ip, self.now().timestamp())
        except ApiError:
            self._failed(client_ip, key_id)
            raise

    def _failed(self, client_ip: str, who: str) -> None:
        """One failed API key, send key or mailbox login: the local throttle and netfilter count it."""
        self.throttle.record_failure(client_ip)
        self.abuse.report_failure(who, client_ip)

    def password_optional(self, port: int | None, client_ip: str, caller: Caller | None = None) -> bool:
        """A request may omit the mailbox password when a send key authenticated it, or towards a
        plain (port 25) target from an address the operator listed in --port25-no-password-from."""
        if caller is not None and caller.send_key is not None:
            return True
        if not self._internal_caller(client_ip):
            return False
        target = self.config.allowed_target(self.config.smtp_host, port or self.config.smtp_port)
        # A request naming another host is checked again in send(), against its real target.
        return target is None or target.security is Security.PLAIN

    def _internal_caller(self, client_ip: str) -> bool:
        return bool(self._internal_networks) and ip_in(client_ip, self._internal_networks)

    def target_for(self, request: SendRequest, key: SendKey | None = None) -> SmtpTarget:
        """The SMTP server this request goes to, refused unless the operator allows it.

        A send key without a password submits on a plain target: the one the request names, else
        the operator's plain target (see ``Config.plain_target``).
        """
        keyed_plain = key is not None and request.password is None
        if keyed_plain and request.smtp_host is None and request.smtp_port is None:
            plain = self.config.plain_target
            if plain is None:
                raise ApiError.of("smtp_no_plain_target")
            return plain
        host = request.smtp_host or self.config.smtp_host
        port = request.smtp_port or self.config.smtp_port
        target = self.config.allowed_target(host, port)
        if target is None:
            raise ApiError.of(
                "smtp_host_not_allowed",
                f"{host}:{port} is not in this server's --smtp-allow list",
                field="smtp_host" if request.smtp_host else "smtp_port",
            )
        if keyed_plain and target.security is not Security.PLAIN:
            raise ApiError.of(
                "smtp_no_plain_target",
                f"{target} uses {target.security.value}: a send key without a password submits only on a plain "
                "target; leave smtp_host/smtp_port out, or give the mailbox password",
                field="smtp_port",
            )
        return target

    async def prepare(
        self,
        request: SendRequest,
        client_ip: str,
        request_id: str = "",
        progress: Progress | None = None,
        caller: Caller | None = None,
        plain_only: bool = False,
    ) -> Prepared:
        """Run every check on ``request`` and build its message; fail with an ``ApiError``.

        ``plain_only``: the message will be handed over later, on a plain target, with no
        password at hand (the outbox): a password given is verified here, as on port 25.
        The caller's ``message_id`` is used when given (it was validated), else one is made up.
        """
        key = caller.send_key if caller is not None else None
        request = self.bind(request, caller)
        target = self.later_target(request) if plain_only else self.target_for(request, key)
        credentials: Credentials | None = None
        if request.password is None and key is None:
            await self._trusted_internal(target, request, client_ip)
        else:
            if request.password is not None:
                credentials = await self._credentials_for(target, request, client_ip)
            for sender in _senders(request):
                decision = await self.senders.authorize_sender(request.login, sender.wire)
                if not decision.allowed:
                    raise sender_refused(request, decision.reason, sender)
        envelope = envelope_for(request)
        await self._within_limits(request, envelope, client_ip, key, progress)
        message_id = _message_id_of(request) or make_message_id(self.new_token(), request.sender)
        extra = (("X-Request-Id", request_id),) if request_id else ()
        date = self.now()

        def build() -> MessageData:
            if request.raw is not None:
                return raw_message_data(request.raw, message_id=message_id, date=date, extra_headers=extra)
            return build_message_parts(request, message_id=message_id, date=date, extra_headers=extra)

        # Building megabytes of MIME (base64 of the attachments) must not stall the reactor.
        message = await self.offload(build) if self.offload is not None and _size(request) > OFFLOAD_BYTES else build()
        return Prepared(request, target, credentials, envelope, message_id, message)

    async def send(
        self,
        request: SendRequest,
        client_ip: str,
        request_id: str = "",
        progress: Progress | None = None,
        caller: Caller | None = None,
    ) -> SendOutcome:
        """Authorize, build and submit ``request`` now; fail with an ``ApiError``."""
        prepared = await self.prepare(request, client_ip, request_id, progress, caller)
        if progress is not None:
            progress.reached_smtp = True
        target = prepared.target
        try:
            result = await self.submitter.submit(target, prepared.credentials, prepared.envelope, prepared.message)
        except SmtpFailure as failure:
            err = smtp_failure_to_api_error(failure, target.address)
            if err.code == "smtp_auth_failed":
                self._failed(client_ip, prepared.request.login)
            raise err from None
        return SendOutcome(
            request=prepared.request, target=target, envelope=prepared.envelope, message_id=prepared.message_id, result=result
        )

    def later_target(self, request: SendRequest) -> SmtpTarget:
        """Where the outbox will hand the message over: a plain target, the request's or the operator's."""
        if request.smtp_host is None and request.smtp_port is None:
            plain = self.config.plain_target
            if plain is None:
                raise ApiError.of("smtp_async_unavailable")
            return plain
        target = self.target_for(request)
        if target.security is not Security.PLAIN:
            raise ApiError.of(
                "smtp_async_unavailable",
                f"{target} uses {target.security.value}: Prefer: respond-async hands messages over on a plain target "
                "only (no password is stored); leave smtp_host/smtp_port out",
                field="smtp_port",
            )
        return target

    def bind(self, request: SendRequest, caller: Caller | None) -> SendRequest:
        """The request as it is sent: with a send key, as the key's login (refused outside its scope)."""
        if caller is None or caller.send_key is None:
            return request
        return _bound_to_key(request, caller.send_key)

    async def _within_limits(
        self, request: SendRequest, envelope: Envelope, client_ip: str, key: SendKey | None, progress: Progress | None
    ) -> None:
        """mailcow's SMTP allow list for the login, then the rate limits, charged in envelope recipients."""
        await self.abuse.check_access(request.login, client_ip)
        decision = await self.abuse.admit(request.login, envelope.sender, envelope.recipients, key, charge=not request.dry_run)
        if progress is not None:
            progress.rate = decision
        if decision is not None and not decision.admitted:
            raise rate_limited(decision)

    async def _trusted_internal(self, target: SmtpTarget, request: SendRequest, client_ip: str) -> None:
        """No password: allowed only by --port25-no-password-from, and only for a local ``from``."""
        if target.security is not Security.PLAIN or not self._internal_caller(client_ip):
            raise ApiError.of("smtp_auth_required", field="password")
        for sender in _senders(request):
            if not await self.senders.sender_has_owner(sender.wire):
                raise ApiError.of(
                    "smtp_unauthorized_sender",
                    f"{sender.wire} is not a mailbox or alias of this mailcow server",
                    field=_sender_field(request, sender),
                    detail={"reason": f"no owner for {sender.wire}"},
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
                self._failed(client_ip, request.login)
            raise
        return None

    def _refuse_if_blocked(self, client_ip: str) -> None:
        wait = self.throttle.retry_after(client_ip)
        if wait is not None:
            raise ApiError.of("smtp_too_many_failures", retry_after=wait)


def _bound_to_key(request: SendRequest, key: SendKey) -> SendRequest:
    """The request as the send key's login; refused when it names another login or a sender outside
    the key's list. Without ``smtp_user`` the login is the key's, whatever ``from`` is."""
    if request.login not in (key.login.lower(), request.sender.wire.lower()):
        raise ApiError.of(
            "smtp_unauthorized_sender",
            f"this send key is bound to {key.login}; leave smtp_user out or set it to {key.login}",
            field="smtp_user",
        )
    for sender in _senders(request):
        if not key.may_send_as(sender.wire):
            raise ApiError.of(
                "smtp_unauthorized_sender",
                f"this send key may send only as {', '.join(key.senders)}",
                field=_sender_field(request, sender),
            )
    return attrs.evolve(request, login=key.login.lower())


def _senders(request: SendRequest) -> tuple[Address, ...]:
    """Every address the login must be allowed to send as: ``from`` (MAIL FROM), and for a raw
    message also its header From when that differs."""
    raw = request.raw
    if raw is None or raw.header_from.wire.lower() == request.sender.wire.lower():
        return (request.sender,)
    return (request.sender, raw.header_from)


def _sender_field(request: SendRequest, sender: Address) -> str:
    """The field an answer about ``sender`` names."""
    if request.raw is None:
        return "from"
    return "envelope.from" if sender is request.sender and sender is not request.raw.header_from else "message.From"


def _message_id_of(request: SendRequest) -> str | None:
    """The caller's Message-ID: the request's, or the one a raw message carries."""
    if request.raw is not None:
        return request.raw.message_id
    return request.message_id


def sender_refused(request: SendRequest, reason: str, sender: Address | None = None) -> ApiError:
    """403 smtp_unauthorized_sender, saying what to change.

    A login that is no mailbox at all is mostly ``from`` standing in for a missing ``smtp_user``
    (an alias cannot log in): the answer names that, rather than "X may not send as X".
    """
    if reason == not_a_mailbox(request.login):
        if request.login == request.sender.wire.lower():
            message = (
                f"{request.sender.wire} is not a mailbox, so it cannot log in; without smtp_user the login is "
                f"'from': set smtp_user to the mailbox that may send as {request.sender.wire}, with its password"
            )
        else:
            message = f"smtp_user {request.login} is not a mailbox: smtp_user must be a mailbox's login"
        return ApiError.of("smtp_unauthorized_sender", message, field="smtp_user", detail={"reason": reason})
    sender = sender or request.sender
    return ApiError.of(
        "smtp_unauthorized_sender",
        f"{request.login} may not send as {sender.wire}",
        field=_sender_field(request, sender),
        detail={"reason": reason},
    )


@attrs.frozen
class Completion:
    """A finished attempt: its answer, and how the key keeps it (None: released, nothing stored)."""

    answer: Answer
    state: State | None


@attrs.define
class IdempotentSends:
    """Runs a send at most once per (API key, Idempotency-Key) and replays its stored answer.

    The claim is taken before the body is parsed: a repeat is recognised by its raw bytes, and a
    replay needs neither the database checks nor SMTP. A repeat that finds the first one still in
    flight is refused at once (409 with Retry-After) rather than held open.
    """

    store: IdempotencyStore
    now: Callable[[], float]
    new_token: Callable[[], str]
    ttl: float = idempotency.DEFAULT_TTL_SECONDS
    lease: float = 3600.0

    async def run(
        self,
        raw_api_key: str | None,
        key: str,
        raw_body: bytes | Iterable[bytes],
        attempt: Callable[[], Awaitable[Completion]],
        request_id: str,
    ) -> tuple[Answer, bool]:
        """The answer for this request and whether it is a replay; 409/503 as ``ApiError``."""
        now = self.now()
        claim = Claim(
            scope=idempotency.scope_of(raw_api_key),
            key=key,
            fingerprint=idempotency.fingerprint(raw_body, raw_api_key),
            token=self.new_token(),
            created_at=now,
            lease_until=now + self.lease,
            expires_at=now + self.ttl,
        )
        holder = await self.store.claim(claim)
        if holder is not None:
            return await self._taken(holder, claim, request_id), True
        completion = await attempt()
        await self._keep(claim, completion)
        return completion.answer, False

    async def _taken(self, holder: Record, claim: Claim, request_id: str) -> Answer:
        verdict = idempotency.judge(holder, claim, self.now())
        if verdict is Verdict.MISMATCH:
            raise ApiError.of("smtp_idempotency_mismatch", field=idempotency.HEADER)
        if verdict is Verdict.IN_FLIGHT:
            raise ApiError.of(
                "smtp_idempotency_in_flight", field=idempotency.HEADER, retry_after=idempotency.IN_FLIGHT_RETRY_AFTER
            )
        if verdict is Verdict.INTERRUPTED:
            err = idempotency.interrupted_error()
            answer = Answer(err.status, err.code, error_body(err, None, request_id))
            await self.store.settle(holder.scope, holder.key, holder.token, State.OUTCOME_UNKNOWN, answer)
            return answer
        return holder.answer()

    async def _keep(self, claim: Claim, completion: Completion) -> None:
        """Store or release; a failure here is logged, the caller still gets the real answer.

        Left in flight, the record turns into "interrupted" when its lease ends: a retry is then
        told the outcome is unknown instead of sending a second copy.
        """
        try:
            if completion.state is None:
                await self.store.release(claim)
            elif not await self.store.settle(claim.scope, claim.key, claim.token, completion.state, completion.answer):
                log.warn("idempotency record was settled by another request meanwhile; this answer is not stored")
        except ApiError as err:
            log.error("idempotency record could not be updated ({code})", code=err.code)
        except Exception:
            log.failure("idempotency record could not be updated")
