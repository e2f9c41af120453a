"""The webhook dispatcher: posts queued events to the operator's ``--webhook-url``, signed, with retries.

Every ``interval`` seconds (and at once on ``wake()``) it claims due events from the queue in the
state database and POSTs each to the one configured URL:

- the body is the stored JSON, byte for byte the same on every attempt; the Standard Webhooks
  headers (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``) are made per attempt;
- any 2xx answer within ``timeout`` seconds is a delivery; anything else (another status, a
  redirect, no answer in time, a refused connection, a TLS failure) is retried with exponential
  backoff and jitter until the event's ``give_up_at``, then given up and logged;
- redirects are never followed: the request goes to the configured URL and nowhere else;
- HTTPS certificates are verified against the system's CAs (or ``ca_file``), and the name check
  fails closed: a certificate without a subjectAltName for the host is refused (Twisted's own
  check only logs that case).

Each POST gives one log line with the event id, its type, the HTTP status and the attempt number:
never the URL (it may carry a token), the secret or the body. Delivery is at least once; receivers
de-duplicate on ``webhook-id``.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Callable
from typing import Any, Protocol

from OpenSSL import SSL
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, ensureDeferred
from twisted.internet.error import ConnectError, ConnectionRefusedError, DNSLookupError
from twisted.internet.error import TimeoutError as ConnectTimeout
from twisted.internet.protocol import Protocol as ByteProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, RequestTransmissionFailed, ResponseFailed
from twisted.web.iweb import IPolicyForHTTPS
from treq.client import HTTPClient
from zope.interface import implementer  # type: ignore[import-untyped]

from ..core.errors import ApiError
from ..core.webhooks import Random, payload_type, retry_delay, sign, signing_key
from ..smtp.client import TlsSettings, _client_context, _ClientTls, _name_check
from ..state.webhooks import DEFAULT_RETENTION, Retry

log = Logger(namespace="smtpapi.webhooks")

USER_AGENT = "mailcow-smtp-api"
PURGE_INTERVAL = 300.0
# What is read of a receiver's answer before the connection is dropped: only its status counts.
MAX_ANSWER_BYTES = 64 * 1024

HttpPost = Callable[..., "Deferred[Any]"]  # treq.post's shape: (url, data=, headers=, allow_redirects=, unbuffered=)


class WebhookQueue(Protocol):
    """What the dispatcher needs of ``state.webhooks.WebhookStore``."""

    def claim_due(self, now: float, lease_seconds: float, token: str, limit: int) -> Deferred[list[tuple[str, bytes, int]]]:
        """Claim due events: (event_id, payload, attempts so far)."""
        ...

    def mark_delivered(self, event_id: str, token: str, now: float) -> Deferred[bool]:
        """Record a delivery; False when the claim was lost."""
        ...

    def schedule_retry(self, event_id: str, token: str, next_at: float, error: str, now: float) -> Deferred[Retry]:
        """Record a failed attempt."""
        ...

    def purge(self, now: float, retention: float = DEFAULT_RETENTION) -> Deferred[int]:
        """Delete finished events older than the retention."""
        ...


def lease_for(timeout: float) -> float:
    """How long a claim lasts: the POST's timeout twice over, plus time for the database to answer."""
    return 2 * timeout + 30.0


def _new_token() -> str:
    return secrets.token_hex(16)


class WebhookDispatcher(Service):
    """Claims due webhook events and POSTs them to ``url``; see the module docstring.

    ``store`` is a ``WebhookStore`` (shared with others: stopping the dispatcher does not close it),
    ``http_post`` a treq-like ``post`` (``webhook_client`` makes one), ``clock`` the reactor or a
    ``task.Clock``. ``ValueError`` at once for a secret that makes no key or a URL that is no http(s).
    """

    def __init__(
        self,
        store: WebhookQueue,
        url: str,
        secret: str,
        clock: Any,
        http_post: HttpPost,
        timeout: float,
        interval: float = 1.0,
        batch: int = 20,
        new_token: Callable[[], str] = _new_token,
        *,
        rng: Random | None = None,
        lease_seconds: float | None = None,
        purge_interval: float = PURGE_INTERVAL,
        retention: float = DEFAULT_RETENTION,
    ) -> None:
        if not url.startswith(("https://", "http://")):
            raise ValueError("the webhook URL must be http:// or https://")
        signing_key(secret)  # refuse a bad secret now, not at the first event
        self.store = store
        self._url = url
        self._secret = secret
        self.clock = clock
        self._http_post = http_post
        self.timeout = timeout
        self.interval = interval
        self.batch = batch
        self._new_token = new_token
        self._rng: Random = rng if rng is not None else random.Random()
        self.lease_seconds = lease_seconds if lease_seconds is not None else lease_for(timeout)
        self.purge_interval = purge_interval
        self.retention = retention
        self._call: Any = None  # the next round's DelayedCall
        self._round_done: Deferred[None] | None = None  # fires when the round in progress ends
        self._again = False
        self._queue_down = False
        self._next_purge = 0.0

    # ---------------------------------------------------------------- the service

    def startService(self) -> None:
        """Run the first round at once, then one every ``interval``; the first purge after ``purge_interval``."""
        super().startService()
        self._next_purge = self.clock.seconds() + self.purge_interval
        self._start_round()

    def stopService(self) -> Deferred[None] | None:
        """Stop scheduling rounds; fire once the round in progress has recorded its outcomes."""
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._round_done is None:
            return None
        done: Deferred[None] = Deferred()
        self._round_done.addBoth(lambda _: done.callback(None))
        return done

    def wake(self) -> None:
        """Run a round now (the outbox calls this after queueing events); once more after the current one."""
        if not self.running:
            return
        if self._round_done is not None:
            self._again = True
            return
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._start_round()

    def _start_round(self) -> None:
        self._call = None
        self._again = False
        done: Deferred[None] = Deferred()
        self._round_done = done
        d = ensureDeferred(self._round())
        d.addErrback(self._round_failed)
        d.addCallback(self._round_ended, done)

    def _round_failed(self, failure: Failure) -> int:
        log.failure("webhooks: a round failed", failure)
        return 0

    def _round_ended(self, claimed: int, done: Deferred[None]) -> None:
        self._round_done = None
        done.callback(None)
        if not self.running:
            return
        # A full batch means more may be due: go on at once instead of waiting an interval.
        delay = 0.0 if (self._again or claimed >= self.batch) else self.interval
        self._call = self.clock.callLater(delay, self._start_round)

    # ---------------------------------------------------------------- one round

    async def _round(self) -> int:
        now = self.clock.seconds()
        if now >= self._next_purge:
            self._next_purge = now + self.purge_interval
            await self._purge(now)
        token = self._new_token()
        try:
            due = await self.store.claim_due(now, self.lease_seconds, token, self.batch)
        except Exception as exc:
            self._queue_failed(exc)
            return 0
        if self._queue_down:
            self._queue_down = False
            log.info("webhooks: the queue answers again")
        posts = [
            ensureDeferred(self._deliver(token, event_id, body, attempts)).addErrback(self._deliver_failed, event_id)
            for event_id, body, attempts in due
        ]
        await DeferredList(posts)
        return len(due)

    def _deliver_failed(self, failure: Failure, event_id: str) -> None:
        log.failure("webhook {event_id}: delivery failed unexpectedly", failure, event_id=event_id)

    def _queue_failed(self, exc: BaseException) -> None:
        if not self._queue_down:  # once per outage, not once a second
            self._queue_down = True
            log.warn("webhooks: cannot read the queue ({code}); retrying every {interval:g} s", code=_code(exc), interval=self.interval)

    async def _purge(self, now: float) -> None:
        try:
            count = await self.store.purge(now, self.retention)
        except Exception as exc:
            log.warn("webhooks: purge failed ({code})", code=_code(exc))
            return
        if count:
            log.info("webhooks: purged {count} finished event(s)", count=count)

    async def _deliver(self, token: str, event_id: str, body: bytes, attempts: int) -> None:
        attempt = attempts + 1
        fields = {"event_id": event_id, "event_type": payload_type(body), "attempt": attempt}
        status, error = await self._post(event_id, body)
        fields["status"] = status
        now = self.clock.seconds()
        try:
            if error is None:
                if await self.store.mark_delivered(event_id, token, now):
                    log.info("webhook {event_id} ({event_type}) delivered: HTTP {status}, attempt {attempt}", **fields)
                else:
                    log.warn("webhook {event_id} ({event_type}) delivered: HTTP {status}, attempt {attempt}; "
                             "its claim had run out, so it may be posted again", **fields)
                return
            delay = retry_delay(attempt, self._rng)
            outcome = await self.store.schedule_retry(event_id, token, now + delay, error, now)
        except Exception as exc:
            log.warn("webhook {event_id} ({event_type}) {what}, attempt {attempt}; not recorded ({code}): "
                     "it is posted again when its claim runs out", what=error or f"delivered: HTTP {status}",
                     code=_code(exc), **fields)
            return
        if outcome is Retry.SCHEDULED:
            log.warn("webhook {event_id} ({event_type}) failed: {error}, attempt {attempt}; next attempt in {delay:.0f} s",
                     error=error, delay=delay, **fields)
        elif outcome is Retry.GAVE_UP:
            log.error("webhook {event_id} ({event_type}) failed: {error}, attempt {attempt}; given up, "
                      "its retry time is over", error=error, **fields)
        else:
            log.warn("webhook {event_id} ({event_type}) failed: {error}, attempt {attempt}; its claim had run out",
                     error=error, **fields)

    async def _post(self, event_id: str, body: bytes) -> tuple[int | None, str | None]:
        """(HTTP status or None, None when delivered else why not)."""
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            **sign(self._secret, event_id, int(self.clock.seconds()), body),
        }
        try:
            request = self._http_post(self._url, data=body, headers=headers, allow_redirects=False, unbuffered=True)
            request.addTimeout(self.timeout, self.clock, onTimeoutCancel=_no_answer)
            response = await request
        except Exception as exc:
            return None, describe_failure(exc)
        status = int(response.code)
        _discard_answer(response, self.clock, self.timeout)
        if 200 <= status < 300:
            return status, None
        return status, f"HTTP {status}"


# --------------------------------------------------------------------------- answers and errors


class _Discard(ByteProtocol):
    """Reads a receiver's answer body and forgets it; drops the connection past a size or a time."""

    def __init__(self, clock: Any, timeout: float) -> None:
        self._seen = 0
        self._timer = clock.callLater(timeout, self._drop)

    def dataReceived(self, data: bytes) -> None:
        self._seen += len(data)
        if self._seen > MAX_ANSWER_BYTES:
            self._drop()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._timer.active():
            self._timer.cancel()

    def _drop(self) -> None:
        if self._timer.active():
            self._timer.cancel()
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]


def _discard_answer(response: Any, clock: Any, timeout: float) -> None:
    try:
        response.deliverBody(_Discard(clock, timeout))
    except Exception:
        pass  # a response without a body to read


class NoAnswer(Exception):
    """The receiver did not answer within the timeout."""


def _no_answer(result: Any, timeout: float) -> Failure:
    return Failure(NoAnswer(f"no answer within {timeout:g} s"))


class WebhookTlsError(Exception):
    """The receiver's certificate is not valid for its host; the message says why."""


def describe_failure(exc: BaseException) -> str:
    """Why a POST got no answer, in a few words (no URL, no body, no secret)."""
    if isinstance(exc, (ResponseFailed, RequestTransmissionFailed)):
        reasons = [getattr(reason, "value", reason) for reason in exc.reasons]
        inner = next((r for r in reasons if not isinstance(r, CancelledError)), None)
        if inner is not None and not isinstance(inner, (ResponseFailed, RequestTransmissionFailed)):
            return describe_failure(inner)
        return "the connection closed before an answer"
    if isinstance(exc, NoAnswer):
        return str(exc)
    if isinstance(exc, WebhookTlsError):
        return f"TLS: {exc}"
    if isinstance(exc, SSL.Error):
        return "TLS handshake failed"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, DNSLookupError):
        return "host name not found"
    if isinstance(exc, ConnectTimeout):
        return "connecting timed out"
    if isinstance(exc, ConnectError):
        return "cannot connect"
    return type(exc).__name__


def _code(exc: BaseException) -> str:
    return exc.code if isinstance(exc, ApiError) else type(exc).__name__


# --------------------------------------------------------------------------- the HTTP client


class _VerifiedConnections(_ClientTls):
    """TLS connections to one host (with SMTP's SNI rules): the chain is verified by OpenSSL, the name
    by service-identity, and either failing ends the handshake before a byte of the request is sent."""

    def __init__(self, context: SSL.Context, host: str) -> None:
        super().__init__(context, host)
        self._check = _name_check(host)

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """A client connection with SNI and a name check that fails closed."""
        connection = super().clientConnectionForTLS(tlsProtocol)

        def verify(conn: SSL.Connection, certificate: Any, error: int, depth: int, ok: int) -> bool:
            if not ok or depth != 0:
                return bool(ok)
            try:
                problem = self._check(certificate)
            except Exception as exc:  # never let an unexpected error pass a certificate
                problem = f"the certificate could not be checked ({type(exc).__name__})"
            if problem is None:
                return True
            tlsProtocol.failVerification(Failure(WebhookTlsError(problem)))
            return False

        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, verify)
        return connection


@implementer(IPolicyForHTTPS)
class VerifyingPolicy:
    """The HTTPS policy of the webhook client: system CAs (or a PEM bundle), strict name check."""

    def __init__(self, ca_file: str | None = None) -> None:
        self._context = _client_context(TlsSettings(ca_file=ca_file))

    def creatorForNetloc(self, hostname: bytes, port: int) -> _VerifiedConnections:
        """Connections to ``hostname`` (already IDNA-encoded by the agent)."""
        return _VerifiedConnections(self._context, hostname.decode("ascii"))


def webhook_client(reactor: Any, *, ca_file: str | None = None, connect_timeout: float = 10.0) -> HttpPost:
    """A treq ``post`` for the dispatcher: a fresh connection per event, verified HTTPS, no cookies kept."""
    agent = Agent(
        reactor,
        contextFactory=VerifyingPolicy(ca_file),
        connectTimeout=connect_timeout,
        pool=HTTPConnectionPool(reactor, persistent=False),
    )
    return HTTPClient(agent).post
