"""HTTP shell: Klein routes, request-body limits, rendering, one place for errors.

A handler reads, calls the service, renders. Nothing here decides policy.
"""

from __future__ import annotations

import io
import json
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

import attrs
from klein import Klein
from twisted.internet.defer import Deferred, DeferredSemaphore, ensureDeferred, gatherResults
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.iweb import IRequest
from werkzeug.exceptions import MethodNotAllowed, NotFound

from ..core import idempotency
from ..core.apikeys import client_address
from ..core.errors import ApiError
from ..core.idempotency import Answer
from .later import Later, accepted_body, accepted_id, prefers_async
from .dispatch import DirectRoutes
from .linger import Lingering
from .logs import info_line
from .metrics import Metrics
from .providers import Mailgun, Postmark
from ..core.model import SendRequest
from ..core.openapi import document as openapi_document
from ..core.readiness import reason as failure_reason
from ..core.responses import ItemResult, dry_run_body, error_body, success_body
from ..core.ratelimit import policy_header, ratelimit_header
from ..service import OFFLOAD_BYTES, Caller, Completion, IdempotentSends, Progress, SendOutcome, SendService
from ..core.rawmime import parse_raw_request
from ..core.validate import ParsePolicy, decode_body, parse_json_text, parse_request

log = Logger(namespace="smtpapi")

JSON = b"application/json"
MEMORY_BODY = 1024 * 1024  # request bodies up to this size are buffered in memory, larger ones on disk
# The Server header names no product version (twisted.web would send TwistedWeb/<version>).
SERVER_NAME = b"mailcow-smtp-api"


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _error_response(err: ApiError, request_id: str) -> bytes:
    """A complete raw HTTP response, for refusing a request before Twisted has buffered it."""
    body = _json_bytes(error_body(err, None, request_id))
    reason = {400: b"Bad Request", 408: b"Request Timeout", 413: b"Payload Too Large"}.get(err.status, b"Error")
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"X-Request-Id: %s\r\nConnection: close\r\n\r\n%s"
        % (err.status, reason, len(body), request_id.encode("ascii"), body)
    )


class LimitedRequest(server.Request):
    """A request that refuses a body over ``max_body`` bytes before buffering it.

    twisted.web has no body limit of its own: it would spool any size to a temporary file. The
    declared Content-Length is checked as soon as the headers are in, and a chunked or
    under-declared body is counted as it arrives; either way the client gets 413 and the
    connection closes.

    The whole request, from its first line to the last byte of its body, must arrive within
    ``deadline`` seconds, else 408 and the connection closes: twisted.web's own timeout only
    counts idle time, so a client sending a byte now and then could hold a connection for ever.
    """

    max_body = 30 * 1024 * 1024
    deadline = 300.0
    _refused = False
    _received = 0
    _deadline_call: Any = None

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        # Every answer carries this id (X-Request-Id, the body's request_id, its log line).
        self.request_id = secrets.token_hex(8)
        # The API reads only JSON bodies. twisted.web would otherwise parse every urlencoded or
        # multipart POST into request.args before any route runs (CPU on up to max_body bytes),
        # and answer a malformed multipart body with a bare 400 instead of the coded 415.
        kwargs["parsePOSTFormSubmission"] = False
        super().__init__(channel, *args, **kwargs)
        # twisted.web creates the request at its first line; the channel's callLater is the Site's
        # reactor (a Clock in tests).
        call_later = getattr(channel, "callLater", None)
        if call_later is not None:
            self._deadline_call = call_later(self.deadline, self._too_slow)

    def _stop_deadline(self) -> None:
        call, self._deadline_call = self._deadline_call, None
        if call is not None and call.active():
            call.cancel()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        """The whole request is in: the deadline no longer applies."""
        self._stop_deadline()
        super().requestReceived(command, path, version)

    def connectionLost(self, reason: Any) -> None:
        """The client is gone: nothing to time out."""
        self._stop_deadline()
        super().connectionLost(reason)

    def _too_slow(self) -> None:
        self._deadline_call = None
        err = ApiError.of(
            "smtp_request_timeout", f"the request did not arrive whole within {self.deadline:g} s (--request-timeout)"
        )
        self._answer_and_close(err)

    def gotLength(self, length: int | None) -> None:
        """Refuse at once when the declared length is over the limit; else choose the buffer.

        Twisted keeps bodies under 100,000 bytes in memory and opens a temporary file for larger
        ones, which cost more CPU than the rest of a 100 KB send. Bodies declared up to
        ``MEMORY_BODY`` stay in memory; larger or chunked ones still go to a temporary file.
        """
        if length is not None and length > self.max_body:
            # Suppress Twisted's automatic "100 Continue": the client must not start uploading.
            self.requestHeaders.removeHeader(b"expect")
            self._refuse()
            return
        if length is not None and length <= MEMORY_BODY:
            self.content = io.BytesIO()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        """Count what arrives; past the limit, answer 413 and stop storing."""
        if self._refused:
            return
        self._received += len(data)
        if self._received > self.max_body:
            self._refuse()
            return
        super().handleContentChunk(data)

    def _refuse(self) -> None:
        err = ApiError.of(
            "smtp_request_too_large", f"the request body is larger than {self.max_body} bytes (--max-request-bytes)"
        )
        self._answer_and_close(err)

    def _answer_and_close(self, err: ApiError) -> None:
        """Answer ``err`` at once, store nothing more, never dispatch, and close the connection
        once the client had time to read the answer (see ``linger``)."""
        self._stop_deadline()
        self._refused = True
        self.content = io.BytesIO()
        transport = self.channel.transport
        if transport is None:  # the client is already gone
            return
        transport.write(_error_response(err, self.request_id))
        method, path = _request_line(self)
        log_answer(self.request_id, _peer_client(self), method, path, err.status, err.code)
        linger = getattr(self.channel, "linger", None)
        if linger is not None:
            linger()
        else:
            transport.loseConnection()

    def process(self) -> None:
        """A refused request is never dispatched to a route; every other answer carries its id."""
        if self._refused:
            return
        self.setHeader(b"X-Request-Id", self.request_id.encode("ascii"))
        super().process()

    def setHeader(self, name: bytes | str, value: bytes | str) -> None:
        """Headers as given, but a neutral ``Server`` (twisted.web would name its version)."""
        if (name.encode("latin-1") if isinstance(name, str) else name).lower() == b"server":
            value = SERVER_NAME
        super().setHeader(name, value)


class CodedHTTPChannel(http.HTTPChannel):
    """An HTTP channel whose framing errors (bad Content-Length, CL with chunked...) answer a coded 400.

    twisted.web answers them with a bare ``400 Bad Request`` and closes; the behaviour stays (no
    request smuggling, nothing reaches a route), the answer becomes the API's JSON shape.
    """

    _lingering: Lingering | None = None

    def _respondToBadRequestAndDisconnect(self) -> None:
        if self.transport is None:
            return
        err = ApiError.of("smtp_bad_http_request")
        request_id = secrets.token_hex(8)
        self.transport.write(_error_response(err, request_id))
        peer = getattr(self.transport.getPeer(), "host", "") or "-"
        log_answer(request_id, peer, "-", "-", err.status, err.code)
        self.linger()

    def linger(self) -> None:
        """Read no more requests: discard what the client still sends, then close (``Lingering``)."""
        if self._lingering is None and self.transport is not None:
            # Nothing after an early answer is parsed: no line, no body, no pipelined request.
            self.paused = True
            self._buffer = b""
            self._lingering = Lingering(self.transport, self.callLater)

    def dataReceived(self, data: bytes) -> None:
        """Bytes of the connection; after an early answer they are only counted and dropped."""
        if self._lingering is not None:
            self._lingering.discard(data)
            return
        super().dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """The client is gone: stop lingering."""
        if self._lingering is not None:
            self._lingering.stop()
        super().connectionLost(reason)


def channel_factory() -> Any:
    """The Site's protocol: Twisted's HTTP/1.1-or-2 switch around a ``CodedHTTPChannel``."""
    return http._GenericHTTPChannelProtocol(CodedHTTPChannel())  # the public factory hard-codes HTTPChannel


SEND_PATH = b"/api/v1/send/email"


class ApiSite(server.Site):
    """The API's site: one log line with the request id for every answer. The send route logs its
    own, more telling line (login, sender, result code, queue id); the other routes get this one."""

    trusted_proxies: tuple[str, ...] = ()

    def log(self, request: Any) -> None:
        # A route of one message logged that message's line itself (``SmtpApi.single``).
        if not getattr(request, "message_logged", False):
            log_answer(
                getattr(request, "request_id", "-"),
                _peer_client(request, self.trusted_proxies),
                request.method.decode("latin-1"),
                request.path.decode("latin-1"),
                request.code,
                getattr(request, "answer_code", "-"),
            )


def log_answer(request_id: str, client_ip: str, method: str, path: str, status: int, code: str) -> None:
    """The log line of an answer that is not a send (other routes, early refusals)."""
    info_line(
        log,
        "http {request_id} ip={client_ip} {method} {path} status={status} code={code}",
        request_id=request_id,
        client_ip=client_ip,
        method=method,
        path=path[:200],
        status=status,
        code=code,
    )


def _peer_client(request: Any, trusted_proxies: tuple[str, ...] | None = None) -> str:
    """The client's address as the send route sees it: the peer, or X-Forwarded-For from a trusted proxy."""
    if trusted_proxies is None:
        trusted_proxies = getattr(getattr(request.channel, "site", None), "trusted_proxies", ())
    peer = getattr(request.getClientAddress(), "host", "") or ""
    return client_address(peer, request.getHeader("x-forwarded-for"), trusted_proxies) or "-"


def _request_line(request: Any) -> tuple[str, str]:
    """Method and path of a request refused before twisted.web stored them on it."""
    channel = request.channel
    method = getattr(request, "method", None) or getattr(channel, "_command", None) or b"-"
    path = getattr(request, "uri", None) or getattr(channel, "_path", None) or b"-"
    return method.decode("latin-1"), path.split(b"?", 1)[0].decode("latin-1")


def request_factory(max_body: int, deadline: float = LimitedRequest.deadline) -> type[LimitedRequest]:
    """A ``LimitedRequest`` class with the operator's limits."""
    return type("ConfiguredRequest", (LimitedRequest,), {"max_body": max_body, "deadline": deadline})


class RequestBody:
    """A request's body where Twisted buffered it: memory, or a temporary file past 100 kB.

    It is read when needed rather than held: a body of megabytes is in memory only while it is
    parsed, not for the whole request.
    """

    CHUNK = 1024 * 1024

    def __init__(self, content: IO[bytes] | None) -> None:
        self._content = content

    def size(self) -> int:
        """The body's length in bytes."""
        if self._content is None:
            return 0
        return self._content.seek(0, io.SEEK_END)

    def read(self) -> bytes:
        """The whole body, a new copy each time."""
        if self._content is None:
            return b""
        self._content.seek(0)
        return self._content.read()

    def chunks(self) -> Iterator[bytes]:
        """The body in consecutive pieces of at most ``CHUNK`` bytes."""
        if self._content is None:
            return
        self._content.seek(0)
        while chunk := self._content.read(self.CHUNK):
            yield chunk


def parse_body(body: RequestBody, policy: ParsePolicy, raw: bool = False) -> SendRequest:
    """The parsed request (a raw message's with ``raw``). The body's bytes are released once
    decoded, its text once parsed."""
    obj = parse_json_text(decode_body(body.read()))
    return parse_raw_request(obj, policy) if raw else parse_request(obj, policy)


def require_json(request: IRequest) -> None:
    """415 unless the body is declared ``application/json``."""
    content_type = (request.getHeader("content-type") or "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise ApiError.of("smtp_unsupported_media_type", field="Content-Type")


def _no_send_at(parsed: SendRequest) -> None:
    if parsed.send_at is not None:
        raise ApiError.of("smtp_invalid_send_at", "send_at needs the header Prefer: respond-async", field="send_at")


# One log line per message; its first word is the route the message came by (a constant).
ROUTES = ("send", "batch", "raw", "mailgun", "postmark")
_SEND_LINES = {
    route: route + " {request_id} ip={client_ip} key={key} login={login} from={sender} rcpts={rcpts} status={status} "
    "code={code} queue_id={queue_id} replayed={replayed} ms={ms}"
    for route in ROUTES
}

# Messages of one batch in flight at once (each takes a pooled session while it is submitted).
BATCH_PARALLEL = 8


def shield(d: Deferred[Any]) -> Deferred[Any]:
    """A Deferred that follows ``d`` but whose cancellation does not cancel ``d``.

    Klein cancels a handler's Deferred when the HTTP client goes away; an SMTP transaction in
    flight must finish (or fail) on its own terms instead of being cut mid-DATA.
    """
    outer: Deferred[Any] = Deferred()

    def forward(result: Any) -> None:
        if not outer.called:
            if isinstance(result, Failure):
                outer.errback(result)
            else:
                outer.callback(result)

    d.addBoth(forward)
    return outer


@attrs.define
class _Run:
    """What one send request got to: who called, the parsed request, how far it went and the SMTP
    outcome, for the answer's headers and the log line."""

    caller: Caller | None = None
    parsed: SendRequest | None = None
    progress: Progress = attrs.Factory(Progress)
    outcome: SendOutcome | None = None

    @property
    def key(self) -> str:
        """Which kind of key authenticated the request (never the key)."""
        return self.caller.label if self.caller is not None else ""


@attrs.frozen
class Item:
    """One message of a request, as the pipeline takes it from any front end.

    ``parse`` turns the front end's input into the native ``SendRequest`` (the one validation);
    it is pure and may run in a worker thread (``size`` bytes past ``OFFLOAD_BYTES``).
    ``fingerprint`` is what a repeat with the same ``idempotency_key`` must match; ``queued``
    asks for the outbox's semantics (Prefer: respond-async, or a provider's "queued").
    """

    parse: Callable[[ParsePolicy], SendRequest]
    size: int = 0
    idempotency_key: str | None = None
    fingerprint: bytes | Iterable[bytes] = b""
    queued: bool = False
    request_id: str = ""


@attrs.frozen
class Done:
    """One message's answer in the native shape, with how far it got and whether it was replayed."""

    answer: Answer
    run: _Run
    replayed: bool = False


def _refusing(err: ApiError) -> Callable[[ParsePolicy], SendRequest]:
    def parse(policy: ParsePolicy) -> SendRequest:
        raise err

    return parse


def batch_item(message: Any, index: int, header_key: str | None, queued: bool, request_id: str, size: int) -> Item:
    """One message of a native batch. Its own ``idempotency_key`` wins; else the request's
    Idempotency-Key with ``:<index>``. A malformed key refuses this message only."""
    if not isinstance(message, dict):
        err = ApiError.of("smtp_invalid_json", f"messages[{index}] must be a JSON object", field=f"messages[{index}]")
        return Item(parse=_refusing(err), request_id=request_id)
    fields = dict(message)
    own = fields.pop("idempotency_key", None)
    try:
        if own is not None:
            if not isinstance(own, str):
                raise ApiError.of("smtp_invalid_idempotency_key", "'idempotency_key' must be a string")
            key = idempotency.parse_key([own.encode("utf-8")])
        else:
            key = idempotency.item_key(header_key, index) if header_key is not None else None
    except ApiError as err:
        return Item(parse=_refusing(attrs.evolve(err, field="idempotency_key")), request_id=request_id)
    fingerprint = (json.dumps(fields, sort_keys=True, separators=(",", ":")).encode("utf-8") for _ in (0,))
    return Item(
        parse=lambda policy: parse_request(fields, policy),
        size=size,
        idempotency_key=key,
        fingerprint=fingerprint,
        queued=queued,
        request_id=request_id,
    )


def item_result(done: Done) -> ItemResult:
    """One message's native answer as an ``ItemResult`` (also for a replayed answer: only its body is kept)."""
    answer = done.answer
    body = answer.body
    entry: dict[str, Any] = body[0] if isinstance(body, list) and body and isinstance(body[0], dict) else {}
    if isinstance(body, dict):
        message = str(body.get("msg", ""))
    else:
        message = str(entry.get("message", ""))
    recipients: tuple[str, ...] = ()
    if done.run.outcome is not None:
        recipients = done.run.outcome.envelope.recipients
    elif "envelope" in entry:
        recipients = tuple(entry["envelope"].get("to", ()))
    elif done.run.parsed is not None:
        recipients = tuple(a.wire for a in done.run.parsed.recipients())
    dry = None
    if answer.code == "smtp_dry_run":
        dry = {"envelope": entry.get("envelope"), "message": entry.get("message")}
    return ItemResult(
        status=answer.status,
        code=answer.code,
        message=message,
        field=entry.get("field"),
        message_id=entry.get("message_id"),
        status_id=entry.get("id") if answer.status in (200, 202) else None,
        recipients=recipients,
        retry_after=answer.retry_after,
        dry_run=dry,
        refused=tuple(entry.get("refused", ())) if answer.status == 200 else (),
    )


def _unexpected(run: _Run, request_id: str) -> Answer:
    """A bug's answer (500 smtp_internal_error, no traceback); called inside the ``except`` that
    caught it, whose traceback goes to the log."""
    log.failure("unexpected error in request {request_id}", request_id=request_id)
    return _error_answer(ApiError.of("smtp_internal_error"), run, request_id)


def _error_answer(err: ApiError, run: _Run, request_id: str) -> Answer:
    return Answer(err.status, err.code, error_body(err, run.parsed, request_id, run.key), err.retry_after)


@attrs.define
class SmtpApi:
    """The HTTP API. ``app`` is class-held, as Klein recommends for testable apps."""

    service: SendService
    ready_checks: tuple[tuple[str, Callable[[], Deferred[Any]]], ...] = ()
    trusted_proxies: tuple[str, ...] = ()
    clock: Callable[[], float] = time.monotonic
    metrics: Metrics | None = None
    # Runs a callable in a worker thread (tap: a small dedicated pool); None runs everything inline.
    offload: Callable[[Callable[[], Any]], Deferred[Any]] | None = None
    idempotency: IdempotentSends | None = None
    # The outbox (Prefer: respond-async, status records); None: synchronous sends only, no status.
    outbox: Later | None = None

    app = Klein()

    def resource(self) -> Any:
        """The twisted.web resource serving this API: the send route dispatched directly, the rest by Klein."""
        return DirectRoutes({SEND_PATH: self.send_email}, self.app.resource())

    def can_queue(self) -> bool:
        """True when messages can go to the outbox without naming a target (a provider's "queued")."""
        return self.outbox is not None and self.service.config.plain_target is not None

    async def off_reactor(self, work: Callable[[], Any], size: int) -> Any:
        """``work()``, in a worker thread when the input is ``size`` bytes past ``OFFLOAD_BYTES``."""
        if self.offload is not None and size > OFFLOAD_BYTES:
            return await self.offload(work)
        return work()

    def client_ip(self, request: IRequest) -> str:
        """The caller's address: the peer, or X-Forwarded-For from a trusted proxy."""
        return self._client_ip(request)

    def _client_ip(self, request: IRequest) -> str:
        peer = request.getClientAddress()
        peer_ip = getattr(peer, "host", "") or ""
        forwarded = request.getHeader("x-forwarded-for")
        return client_address(peer_ip, forwarded, self.trusted_proxies)

    @app.route("/api/v1/send/email", methods=["POST"])
    def send_email(self, request: IRequest) -> Deferred[bytes]:
        """POST /api/v1/send/email: send one message."""
        request_id = getattr(request, "request_id", None) or secrets.token_hex(8)
        return shield(ensureDeferred(self._send(request, request_id)))

    async def _send(self, request: IRequest, request_id: str, raw: bool = False) -> bytes:
        client_ip = self._client_ip(request)
        request.setHeader("X-Request-Id", request_id)
        raw_key = request.getHeader("x-api-key")
        done = await self.single(
            request, raw_key, client_ip, request_id, lambda: self._native_item(request, request_id, raw), "raw" if raw else "send"
        )
        return self._native_answer(request, done)

    def _native_answer(self, request: IRequest, done: Done) -> bytes:
        """A native route's answer: status, headers (Retry-After, replay, Location, RateLimit) and body."""
        answer, run, replayed = done.answer, done.run, done.replayed
        request.setResponseCode(answer.status)
        request.setHeader("Content-Type", "application/json")
        if answer.retry_after is not None:
            request.setHeader("Retry-After", str(answer.retry_after))
        if replayed:
            request.setHeader(idempotency.REPLAYED_HEADER, "true")
        if answer.status == 202:
            request.setHeader("Preference-Applied", "respond-async")
            request.setHeader("Location", f"/api/v1/send/status/{accepted_id(answer.body)}")
        rate = run.progress.rate
        if rate is not None and rate.buckets and not replayed:
            # draft-ietf-httpapi-ratelimit-headers: the quota in recipients, what is left, when it resets.
            request.setHeader("RateLimit-Policy", policy_header(rate.buckets))
            request.setHeader("RateLimit", ratelimit_header(rate.buckets))
        return answer.body_bytes()

    def _native_item(self, request: IRequest, request_id: str, raw: bool = False) -> Item:
        """POST /api/v1/send/email's (or /raw's) body as the pipeline's one item."""
        require_json(request)
        body = RequestBody(request.content)
        return Item(
            parse=lambda policy: parse_body(body, policy, raw),
            size=body.size(),
            idempotency_key=idempotency.parse_key(request.requestHeaders.getRawHeaders(b"idempotency-key")),
            fingerprint=body.chunks(),
            queued=prefers_async(request),
            request_id=request_id,
        )

    async def single(
        self,
        request: IRequest,
        raw_key: str | None,
        client_ip: str,
        request_id: str,
        item: Callable[[], Item],
        route: str = "send",
    ) -> Done:
        """The pipeline for a request of one message: the key, then ``item()`` (the front end's
        reading of the request, which may refuse it), then the message. Logged and counted."""
        setattr(request, "message_logged", True)
        caller, refusal = await self.authenticated(raw_key, client_ip, request_id, route)
        if caller is None:
            assert refusal is not None
            return refusal
        try:
            made = item()
        except ApiError as err:
            return self.refused(err, client_ip, request_id, route, caller)
        return await self.message(made, raw_key, client_ip, caller, route)

    async def authenticated(
        self, raw_key: str | None, client_ip: str, request_id: str, route: str
    ) -> tuple[Caller | None, Done | None]:
        """The caller of a request of several messages, or the refusal (logged and counted)."""
        run = _Run()
        started = self.clock()
        try:
            return await self.service.authenticate(raw_key, client_ip), None
        except ApiError as err:
            answer = _error_answer(err, run, request_id)
        except Exception:
            answer = _unexpected(run, request_id)
        self._account(route, request_id, client_ip, run, answer, started, False)
        return None, Done(answer, run)

    def refused(self, err: ApiError, client_ip: str, request_id: str, route: str, caller: Caller | None) -> Done:
        """A request of several messages refused whole (its shape): logged and counted as one answer."""
        run = _Run(caller=caller)
        answer = _error_answer(err, run, request_id)
        self._account(route, request_id, client_ip, run, answer, self.clock(), False)
        return Done(answer, run)

    async def messages(
        self, items: Iterable[Item], raw_key: str | None, client_ip: str, caller: Caller, route: str
    ) -> list[Done]:
        """Several messages of one authenticated request, each on its own: at most
        ``BATCH_PARALLEL`` at a time over the pooled sessions; one's failure never touches another."""
        gate = DeferredSemaphore(BATCH_PARALLEL)

        def one(item: Item) -> Deferred[Done]:
            return gate.run(lambda: ensureDeferred(self.message(item, raw_key, client_ip, caller, route)))

        return list(await gatherResults([one(item) for item in items]))

    async def message(self, item: Item, raw_key: str | None, client_ip: str, caller: Caller, route: str) -> Done:
        """One message through the pipeline: once per Idempotency-Key, parsed, checked, sent or
        queued or built (dry run); every failure an answer. Logged and counted."""
        run = _Run(caller=caller)
        started = self.clock()
        replayed = False
        request_id = item.request_id
        try:
            if item.idempotency_key is None:
                answer = (await self._attempt(item, raw_key, client_ip, run)).answer
            else:
                answer, replayed = await self._once(item, raw_key, client_ip, run)
        except ApiError as err:
            answer = _error_answer(err, run, request_id)
        except Exception:
            answer = _unexpected(run, request_id)
        self._account(route, request_id, client_ip, run, answer, started, replayed)
        return Done(answer, run, replayed)

    def _account(
        self, route: str, request_id: str, client_ip: str, run: _Run, answer: Answer, started: float, replayed: bool
    ) -> None:
        self._log_send(request_id, client_ip, run, answer.status, answer.code, started, replayed, route)
        self._count(answer.status, answer.code, answer.body, started, replayed, route)

    async def _once(self, item: Item, raw_key: str | None, client_ip: str, run: _Run) -> tuple[Answer, bool]:
        """A message with an Idempotency-Key: sent at most once, its answer kept and replayed."""
        if self.idempotency is None:
            raise ApiError.of("smtp_idempotency_unavailable", field=idempotency.HEADER)
        assert item.idempotency_key is not None
        return await self.idempotency.run(
            raw_key,
            item.idempotency_key,
            item.fingerprint,
            lambda: self._attempt(item, raw_key, client_ip, run),
            item.request_id,
        )

    async def _attempt(self, item: Item, raw_key: str | None, client_ip: str, run: _Run) -> Completion:
        """Parse and send; every failure becomes an answer, with how far the send got."""
        progress = run.progress = Progress()
        outcome_unknown = False
        request_id = item.request_id
        try:
            run.parsed = await self._parse_off_reactor(item, client_ip, run.caller)
            # Answers and logs show the request as sent: a send key's as the key's login.
            run.parsed = self.service.bind(run.parsed, run.caller)
            if run.parsed.dry_run:
                answer = await self._dry(item, client_ip, run)
            elif item.queued:
                answer = await self._later(raw_key, client_ip, request_id, run)
            else:
                answer = await self._now(raw_key, client_ip, request_id, run)
        except ApiError as err:
            answer = _error_answer(err, run, request_id)
            outcome_unknown = bool((err.detail or {}).get("outcome_unknown"))
        except Exception:
            answer = _unexpected(run, request_id)
        return Completion(answer, idempotency.settled_state(progress.reached_smtp, answer, outcome_unknown))

    async def _now(self, raw_key: str | None, client_ip: str, request_id: str, run: _Run) -> Answer:
        """Send at once; the answer gains the id of the message's status record."""
        assert run.parsed is not None
        _no_send_at(run.parsed)
        run.outcome = await self.service.send(run.parsed, client_ip, request_id, run.progress, run.caller)
        sent = success_body(run.parsed, run.outcome.result, run.outcome.message_id, request_id, run.key)
        if self.outbox is not None:
            status_id = await self.outbox.record_sent(run.outcome, raw_key, request_id)
            if status_id is not None:
                sent[0]["id"] = status_id
        return Answer(200, "smtp_partially_sent" if run.outcome.result.refused else "smtp_mail_sent", sent)

    async def _later(self, raw_key: str | None, client_ip: str, request_id: str, run: _Run) -> Answer:
        """Prefer: respond-async (RFC 7240): every check now, then 202 once the message is stored."""
        if self.outbox is None:
            raise ApiError.of("smtp_async_unavailable", "this server keeps no outbox")
        assert run.parsed is not None
        self.outbox.check_send_at(run.parsed.send_at)
        prepared = await self.service.prepare(run.parsed, client_ip, request_id, run.progress, run.caller, plain_only=True)
        # From here the message may be stored: a repeat with the same Idempotency-Key gets this answer.
        run.progress.reached_smtp = True
        accepted = await self.outbox.accept(prepared, raw_key, request_id)
        return Answer(202, "smtp_mail_accepted", accepted_body(prepared, accepted, request_id, run.key))

    async def _dry(self, item: Item, client_ip: str, run: _Run) -> Answer:
        """dry_run: every check a send would pass (the rate limits judged, not charged), then the
        exact message and envelope instead of the SMTP submission."""
        assert run.parsed is not None
        if item.queued:
            if self.outbox is None:
                raise ApiError.of("smtp_async_unavailable", "this server keeps no outbox")
            self.outbox.check_send_at(run.parsed.send_at)
        else:
            _no_send_at(run.parsed)
        prepared = await self.service.prepare(
            run.parsed, client_ip, item.request_id, run.progress, run.caller, plain_only=item.queued
        )
        return Answer(200, "smtp_dry_run", dry_run_body(prepared, item.request_id, run.key))

    @app.route("/api/v1/send/raw", methods=["POST"])
    def send_raw(self, request: IRequest) -> Deferred[bytes]:
        """POST /api/v1/send/raw: send the caller's own RFC 5322 message to an envelope."""
        request_id = getattr(request, "request_id", None) or secrets.token_hex(8)
        return shield(ensureDeferred(self._send(request, request_id, raw=True)))

    @app.route("/api/v1/send/batch", methods=["POST"])
    def send_batch(self, request: IRequest) -> Deferred[bytes]:
        """POST /api/v1/send/batch: up to --max-batch messages, each with its own result."""
        request_id = getattr(request, "request_id", None) or secrets.token_hex(8)
        return shield(ensureDeferred(self._batch(request, request_id)))

    async def _batch(self, request: IRequest, request_id: str) -> bytes:
        setattr(request, "message_logged", True)  # one line per message, or the refusal's
        client_ip = self._client_ip(request)
        request.setHeader("X-Request-Id", request_id)
        raw_key = request.getHeader("x-api-key")
        caller, refusal = await self.authenticated(raw_key, client_ip, request_id, "batch")
        if caller is None:
            assert refusal is not None
            return self._native_answer(request, refusal)
        try:
            items = await self._batch_items(request, request_id)
        except ApiError as err:
            return self._native_answer(request, self.refused(err, client_ip, request_id, "batch", caller))
        dones = await self.messages(items, raw_key, client_ip, caller, "batch")
        results = []
        for index, done in enumerate(dones):
            result = item_result(done)
            results.append(
                {
                    "index": index,
                    "status": result.status,
                    "code": result.code,
                    "message_id": result.message_id,
                    "id": result.status_id,
                    "replayed": done.replayed,
                    "answer": done.answer.body,
                }
            )
        sent = sum(1 for done in dones if done.answer.status in (200, 202))
        request.setHeader("Content-Type", "application/json")
        return _json_bytes({"request_id": request_id, "key": caller.label, "ok": sent, "failed": len(dones) - sent, "results": results})

    async def _batch_items(self, request: IRequest, request_id: str) -> list[Item]:
        """The batch's messages as items: ``{"messages": [...]}``, each a native send object with
        an optional ``idempotency_key`` (or the request's Idempotency-Key with ``:<index>``)."""
        require_json(request)
        body = RequestBody(request.content)
        size = body.size()

        def read() -> Any:
            return parse_json_text(decode_body(body.read()))

        obj = await self.offload(read) if self.offload is not None and size > OFFLOAD_BYTES else read()
        limit = self.service.config.max_batch
        messages = obj.get("messages")
        unknown = sorted(set(obj) - {"messages"})
        if unknown:
            raise ApiError.of("smtp_unknown_field", f"unknown field(s): {', '.join(unknown)}", field=unknown[0])
        if not isinstance(messages, list) or not messages:
            raise ApiError.of("smtp_invalid_field", "'messages' must be a non-empty JSON array of send objects", field="messages")
        if len(messages) > limit:
            raise ApiError.of("smtp_too_many_messages", f"at most {limit} messages per batch (--max-batch)", field="messages")
        header_key = idempotency.parse_key(request.requestHeaders.getRawHeaders(b"idempotency-key"))
        queued = prefers_async(request)
        share = size // len(messages)
        return [
            batch_item(message, index, header_key, queued, f"{request_id}-{index}", share)
            for index, message in enumerate(messages)
        ]

    @app.route("/v3/<string:domain>/messages", methods=["POST"])
    def mailgun_messages(self, request: IRequest, domain: str) -> Deferred[bytes]:
        """Mailgun's POST /v3/{domain}/messages."""
        request_id = getattr(request, "request_id", None) or secrets.token_hex(8)
        return shield(ensureDeferred(Mailgun(self).handle(request, domain, False, request_id)))

    @app.route("/v3/<string:domain>/messages.mime", methods=["POST"])
    def mailgun_mime(self, request: IRequest, domain: str) -> Deferred[bytes]:
        """Mailgun's POST /v3/{domain}/messages.mime."""
        request_id = getattr(request, "request_id", None) or secrets.token_hex(8)
        return shield(ensureDeferred(Mailgun(self).handle(request, domain, True, request_id)))

    @app.route("/email", methods=["POST"])
    def postmark_email(self, request: IRequest) -> Deferred[bytes]:
        """Postmark's POST /email."""
        request_id = getattr(request, "request_id", None) or secrets.token_hex(8)
        return shield(ensureDeferred(Postmark(self).handle(request, False, request_id)))

    @app.route("/email/batch", methods=["POST"])
    def postmark_batch(self, request: IRequest) -> Deferred[bytes]:
        """Postmark's POST /email/batch."""
        request_id = getattr(request, "request_id", None) or secrets.token_hex(8)
        return shield(ensureDeferred(Postmark(self).handle(request, True, request_id)))

    @app.route("/api/v1/send/status/<string:message>", methods=["GET", "DELETE"])
    def message_status(self, request: IRequest, message: str) -> Deferred[bytes]:
        """GET /api/v1/send/status/{id}: what became of a message; DELETE cancels one not yet handed over."""
        request_id = getattr(request, "request_id", None) or secrets.token_hex(8)
        return ensureDeferred(self._status(request, message, request_id))

    async def _status(self, request: IRequest, message: str, request_id: str) -> bytes:
        try:
            caller = await self.service.authenticate(request.getHeader("x-api-key"), self._client_ip(request))
            if self.outbox is None:
                raise ApiError.of("smtp_status_not_found", "this server keeps no status records", field="id")
            raw_key = request.getHeader("x-api-key")
            if request.method == b"DELETE":
                found = await self.outbox.cancel(message, raw_key)
            else:
                found = await self.outbox.status(message, raw_key)
            request.setHeader("Content-Type", "application/json")
            request.setHeader("X-Request-Id", request_id)
            setattr(request, "answer_code", "smtp_status")
            return _json_bytes({**found, "request_id": request_id, "key": caller.label})
        except ApiError as err:
            if err.bare:
                request.setResponseCode(err.status)
                request.setHeader("Content-Type", "application/json")
                setattr(request, "answer_code", err.code)
                return _json_bytes(error_body(err, None, request_id))
            return _route_error(request, err)
        except Exception:
            log.failure("unexpected error in request {request_id}", request_id=request_id)
            return _route_error(request, ApiError.of("smtp_internal_error"))

    def _count(
        self, status: int, code: str, body: Any, started: float, replayed: bool = False, route: str = "send"
    ) -> None:
        """Metrics for one send: request counter, latency, SMTP outcome, auth and database failures.

        A replayed answer counts as a request only: its SMTP outcome was counted when it happened.
        """
        if self.metrics is None:
            return
        self.metrics.requests.labels(route=route, status=str(status), code=code).inc()
        self.metrics.send_seconds.observe(max(0.0, self.clock() - started))
        if replayed:
            return
        detail = body[0].get("detail", {}) if isinstance(body, list) else {}
        if status == 200:
            self.metrics.smtp_replies.labels(outcome="2xx").inc()
        elif "smtp_code" in detail:
            self.metrics.smtp_replies.labels(outcome=f"{int(detail['smtp_code']) // 100}xx").inc()
        elif "kind" in detail:
            self.metrics.smtp_replies.labels(outcome=str(detail["kind"])).inc()
        if isinstance(body, dict) and status in (401, 403):
            self.metrics.auth_failures.labels(kind="api_key").inc()
        elif code in ("smtp_auth_failed",):
            self.metrics.auth_failures.labels(kind="mailbox").inc()
        elif code == "smtp_db_unavailable":
            self.metrics.db_errors.inc()

    async def _parse_off_reactor(self, item: Item, client_ip: str, caller: Caller | None = None) -> SendRequest:
        """Parse the item; a large one (megabytes of base64) is decoded in a worker thread."""
        # The policy's callback reads only immutable configuration, so it may run in a thread.
        policy = ParsePolicy(
            max_recipients=self.service.config.max_recipients,
            max_attachments=self.service.config.max_attachments,
            password_optional=lambda port: self.service.password_optional(port, client_ip, caller),
        )
        if self.offload is not None and item.size > OFFLOAD_BYTES:
            parsed: SendRequest = await self.offload(lambda: item.parse(policy))
            return parsed
        return item.parse(policy)

    def _log_send(
        self,
        request_id: str,
        client_ip: str,
        run: _Run,
        status: int,
        code: str,
        started: float,
        replayed: bool = False,
        route: str = "send",
    ) -> None:
        parsed, outcome = run.parsed, run.outcome
        info_line(
            log,
            _SEND_LINES[route],
            request_id=request_id,
            client_ip=client_ip,
            key=run.key or "-",
            login=parsed.login if parsed else "-",
            sender=parsed.sender.wire if parsed else "-",
            rcpts=len(parsed.recipients()) if parsed else 0,
            status=status,
            code=code,
            queue_id=(outcome.result.queue_id if outcome else None) or "-",
            replayed="yes" if replayed else "no",
            ms=int((self.clock() - started) * 1000),
        )

    @app.route("/healthz", methods=["GET"])
    def healthz(self, request: IRequest) -> bytes:
        """GET /healthz: the process is alive. Cheap, no authentication, no configuration."""
        request.setHeader("Content-Type", "application/json")
        return _json_bytes({"status": "ok"})

    @app.route("/readyz", methods=["GET"])
    async def readyz(self, request: IRequest) -> bytes:
        """GET /readyz: every dependency answers; 503 naming the parts that do not, and why."""
        failing: list[str] = []
        reasons: dict[str, str] = {}
        for name, check in self.ready_checks:
            try:
                await check()
            except Exception as exc:
                failing.append(name)
                reasons[name] = failure_reason(exc)
        request.setHeader("Content-Type", "application/json")
        if failing:
            request.setResponseCode(503)
            return _json_bytes({"status": "unavailable", "failing": failing, "reasons": reasons})
        return _json_bytes({"status": "ok"})

    @app.route("/api/v1/openapi.json", methods=["GET"])
    def openapi(self, request: IRequest) -> bytes:
        """GET /api/v1/openapi.json: the OpenAPI 3.1 document of this API."""
        request.setHeader("Content-Type", "application/json")
        return _json_bytes(openapi_document())

    @app.handle_errors(NotFound)
    def not_found(self, request: IRequest, failure: Failure) -> bytes:
        """Unknown routes answer a coded JSON 404."""
        return _route_error(request, ApiError.of("not_found"))

    @app.handle_errors(MethodNotAllowed)
    def method_not_allowed(self, request: IRequest, failure: Failure) -> bytes:
        """A known route with the wrong method answers a coded JSON 405."""
        allowed = getattr(failure.value, "valid_methods", None) or []
        if allowed:
            request.setHeader("Allow", ", ".join(allowed))
        return _route_error(request, ApiError.of("method_not_allowed"))


def _route_error(request: IRequest, err: ApiError) -> bytes:
    """A coded JSON answer outside the send route, with the request's id."""
    request_id = getattr(request, "request_id", "") or secrets.token_hex(8)
    request.setResponseCode(err.status)
    request.setHeader("Content-Type", "application/json")
    request.setHeader("X-Request-Id", request_id)
    setattr(request, "answer_code", err.code)
    return _json_bytes(error_body(err, None, request_id))
