"""The HTTP side of the Mailgun and Postmark front ends: credentials, body decoding, answers.

Each route reads the provider's request, lets ``compat`` translate it into native request
objects, and runs every message through ``SmtpApi``'s one pipeline (key, idempotency, parse,
sender rule, limits, send or queue); nothing is checked here. The answers come back in the
provider's shape, from each message's native outcome.

- Mailgun: HTTP Basic ``api:<key>``; a form (urlencoded or multipart) decoded by werkzeug's form
  parser with the request's limits. Mailgun answers "Queued": with an outbox and a plain target
  the messages are queued there (and ``o:deliverytime`` schedules them); without, they are sent
  at once. ``{domain}`` must be the domain of ``from`` or of the key's login.
- Postmark: ``X-Postmark-Server-Token: <key>``; JSON. Sent at once, as Postmark answers after
  accepting a message; ``Prefer: respond-async`` queues in the outbox instead.
- Both: an ``Idempotency-Key`` header keys a request of one message; message ``i`` of several
  gets ``<key>:<i>``.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from twisted.web.iweb import IRequest
from werkzeug.datastructures import FileStorage
from werkzeug.exceptions import HTTPException
from werkzeug.formparser import FormDataParser
from werkzeug.http import parse_options_header

from ..compat import mailgun, postmark
from ..compat.mailgun import FormFile, MailgunRequest
from ..core import idempotency
from ..core.errors import ApiError
from ..core.model import SendRequest
from ..core.rawmime import parse_raw_request
from ..core.responses import ItemResult
from ..core.validate import ParsePolicy, decode_body, parse_json_text, parse_request
from .later import prefers_async

if TYPE_CHECKING:
    from .api import Done, Item, SmtpApi

FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
# Form parts in one request: 1,000 recipients given one per field, the files, the rest.
MAX_FORM_PARTS = 3000


def basic_key(request: IRequest) -> str | None:
    """The send key of HTTP Basic ``api:<key>`` (Mailgun's credentials); None for any other user."""
    user = request.getUser()
    password = request.getPassword()
    if user != b"api" or not password:
        return None
    return password.decode("latin-1")


def _form(content: Any, content_type: str, max_bytes: int) -> tuple[list[tuple[str, str]], list[FormFile]]:
    """A form body as (name, value) pairs and file parts, decoded by werkzeug within ``max_bytes``."""
    mimetype, options = parse_options_header(content_type)
    if mimetype not in FORM_TYPES:
        raise ApiError.of(
            "smtp_unsupported_media_type",
            "send the form as multipart/form-data or application/x-www-form-urlencoded",
            field="Content-Type",
        )
    stream = content if content is not None else io.BytesIO()
    size = stream.seek(0, io.SEEK_END)
    stream.seek(0)
    parser = FormDataParser(
        max_form_memory_size=max_bytes, max_content_length=max_bytes, silent=False, max_form_parts=MAX_FORM_PARTS
    )
    try:
        _, form, files = parser.parse(stream, mimetype, size, options)
    except HTTPException as exc:
        # 413: more than MAX_FORM_PARTS parts, or a part past the request's limit.
        code = "smtp_request_too_large" if exc.code == 413 else "smtp_invalid_field"
        raise ApiError.of(code, f"the form could not be read: {exc.description}") from None
    except ValueError:
        raise ApiError.of("smtp_invalid_field", "the form body is malformed") from None
    fields = [(name, value) for name, value in form.items(multi=True)]
    parts = [_file(name, storage) for name, storage in files.items(multi=True)]
    return fields, parts


def _file(name: str, storage: FileStorage) -> FormFile:
    return FormFile(field=name, filename=storage.filename, content_type=storage.content_type, data=storage.read())


def _keys(request: IRequest, count: int) -> list[str | None]:
    """Each message's Idempotency-Key: the header's for one message, ``<key>:<i>`` for several."""
    key = idempotency.parse_key(request.requestHeaders.getRawHeaders(b"idempotency-key"))
    if key is None:
        return [None] * count
    if count == 1:
        return [key]
    return [idempotency.item_key(key, index) for index in range(count)]


def _fingerprint(body: Any, index: int) -> Any:
    """What a repeat of message ``index`` must match: the request's bytes and the index, read lazily."""
    return itertools.chain(body.chunks(), (b"#%d" % index,))


def _render(request: IRequest, status: int, body: Any, results: Sequence[ItemResult] = ()) -> bytes:
    from .api import _json_bytes

    request.setResponseCode(status)
    request.setHeader("Content-Type", "application/json")
    waits = [r.retry_after for r in results if not r.ok and r.retry_after is not None]
    if waits and status in (409, 429, 503):
        request.setHeader("Retry-After", str(max(waits)))
    return _json_bytes(body)


def _request_ids(request_id: str, count: int) -> list[str]:
    return [request_id] if count == 1 else [f"{request_id}-{index}" for index in range(count)]


class Mailgun:
    """``POST /v3/{domain}/messages`` and ``/v3/{domain}/messages.mime``."""

    def __init__(self, api: SmtpApi) -> None:
        self.api = api

    async def handle(self, request: IRequest, domain: str, mime: bool, request_id: str) -> bytes:
        """Mailgun's call, answered in Mailgun's shape."""
        from .api import RequestBody, item_result

        api = self.api
        setattr(request, "message_logged", True)  # one line per message, or the refusal's
        client_ip = api.client_ip(request)
        raw_key = basic_key(request)
        caller, refusal = await api.authenticated(raw_key, client_ip, request_id, "mailgun")
        if caller is None:
            assert refusal is not None
            return _render(request, *mailgun.answer([item_result(refusal)]))
        body = RequestBody(request.content)
        try:
            content_type = request.getHeader("content-type") or ""
            max_bytes = api.service.config.max_request_bytes
            size = body.size()

            def read() -> tuple[list[tuple[str, str]], list[FormFile]]:
                return _form(request.content, content_type, max_bytes)

            fields, files = await api.off_reactor(read, size)
            translated = mailgun.translate(domain, fields, files, mime=mime)
            keys = _keys(request, len(translated.items))
        except ApiError as err:
            api.refused(err, client_ip, request_id, "mailgun", caller)
            return _render(request, *mailgun.error_answer(err))
        queued = api.can_queue() or translated.send_at is not None
        ids = _request_ids(request_id, len(translated.items))
        share = size // len(translated.items)
        items = [
            self._item(obj, translated, domain, keys[i], _fingerprint(body, i), queued, ids[i], share)
            for i, obj in enumerate(translated.items)
        ]
        dones = await api.messages(items, raw_key, client_ip, caller, "mailgun")
        results = [item_result(done) for done in dones]
        status, answer = mailgun.answer(results)
        return _render(request, status, answer, results)

    def _item(
        self,
        obj: dict[str, Any],
        translated: MailgunRequest,
        domain: str,
        key: str | None,
        fingerprint: Any,
        queued: bool,
        request_id: str,
        size: int,
    ) -> Item:
        from .api import Item

        native = dict(obj)
        if translated.send_at is not None:
            native["send_at"] = datetime.fromtimestamp(translated.send_at, timezone.utc).isoformat()
        if translated.test_mode:
            native["dry_run"] = True
        parse: Callable[[dict[str, Any], ParsePolicy], SendRequest] = parse_raw_request if translated.raw else parse_request

        def parsed(policy: ParsePolicy) -> SendRequest:
            request = parse(native, policy)
            owners = (request.sender.domain_ascii, request.sender.domain, request.login.rpartition("@")[2])
            if not any(mailgun.domain_matches(domain, owner) for owner in owners):
                raise ApiError.of(
                    "smtp_unauthorized_sender",
                    f"the URL's domain {domain} is not the domain of from ({request.sender.wire}): use "
                    f"/v3/{request.sender.domain_ascii}/messages",
                    field="domain",
                )
            return request

        return Item(parse=parsed, size=size, idempotency_key=key, fingerprint=fingerprint, queued=queued, request_id=request_id)


class Postmark:
    """``POST /email`` and ``POST /email/batch``."""

    def __init__(self, api: SmtpApi) -> None:
        self.api = api

    async def handle(self, request: IRequest, batch: bool, request_id: str) -> bytes:
        """Postmark's call, answered in Postmark's shape."""
        from .api import Item, RequestBody, item_result, require_json

        api = self.api
        setattr(request, "message_logged", True)  # one line per message, or the refusal's
        client_ip = api.client_ip(request)
        raw_key = request.getHeader("x-postmark-server-token")
        route = "postmark"
        caller, refusal = await api.authenticated(raw_key, client_ip, request_id, route)
        if caller is None:
            assert refusal is not None
            return _render(request, *postmark.answer(item_result(refusal), api.service.now()))
        body = RequestBody(request.content)
        try:
            require_json(request)
            size = body.size()

            def read() -> Any:
                return parse_json_text(decode_body(body.read()), array=batch)

            value = await api.off_reactor(read, size)
            slots: list[dict[str, Any] | ApiError] = postmark.translate_batch(value) if batch else [postmark.translate_email(value)]
            keys = _keys(request, len(slots))
        except ApiError as err:
            api.refused(err, client_ip, request_id, route, caller)
            return _render(request, *postmark.error_answer(err))
        ids = _request_ids(request_id, len(slots))
        share = size // max(1, len(slots))
        queued = prefers_async(request)
        items = [
            Item(
                parse=_slot_parser(slot),
                size=share,
                idempotency_key=keys[i],
                fingerprint=_fingerprint(body, i),
                queued=queued,
                request_id=ids[i],
            )
            for i, slot in enumerate(slots)
        ]
        dones: list[Done] = await api.messages(items, raw_key, client_ip, caller, route)
        results = [item_result(done) for done in dones]
        tos = [_to_of(original) for original in _originals(value, batch)]
        now = api.service.now()
        if batch:
            status, answer = postmark.batch_answer(results, now, tos)
            return _render(request, status, answer)
        status, single = postmark.answer(results[0], now, tos[0])
        return _render(request, status, single, results)


def _originals(value: Any, batch: bool) -> list[Any]:
    """The provider's message objects as sent (for the answer's ``To``)."""
    return list(value) if batch else [value]


def _to_of(original: Any) -> str | None:
    """A Postmark message's ``To`` as the caller wrote it, when it is a string."""
    to = original.get("To") if isinstance(original, dict) else None
    return to if isinstance(to, str) else None


def _slot_parser(slot: dict[str, Any] | ApiError) -> Callable[[ParsePolicy], SendRequest]:
    """A message's parse: the native parser, or the translator's refusal of this message alone."""

    def parse(policy: ParsePolicy) -> SendRequest:
        if isinstance(slot, ApiError):
            raise slot
        return parse_request(slot, policy)

    return parse
