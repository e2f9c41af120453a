"""Mailgun's ``POST /v3/{domain}/messages`` and ``messages.mime``: form fields -> native request objects,
and native outcomes -> Mailgun's answers.

Pure: stdlib, attrs and the core. The route decodes the form (urlencoded or multipart) into
``(name, value)`` pairs and file parts, calls ``translate``, runs each native object through the
pipeline (``validate.parse_request`` and the rest) and renders the outcomes with ``answer``. Every
check of a value (addresses, sizes, header names and values, file names, ``cid:`` references)
is the native parser's; this module refuses only what has no native shape.

Decisions (documented in docs/mailgun.md as well):

- Accepted fields: ``from``, ``to``, ``cc``, ``bcc`` (repeatable, each an RFC 5322 address list),
  ``subject``, ``text``, ``html``, ``h:<Name>``, ``v:<name>``, ``o:tag`` (up to 3),
  ``o:deliverytime``, ``o:testmode``, ``o:tracking``/``o:tracking-opens``/``o:tracking-clicks``
  only when off (``no``/``false``: the sidecar never rewrites a message), ``recipient-variables``;
  file parts ``attachment`` and ``inline``. ``messages.mime`` takes ``to``, ``message`` (a file part
  or, as mailgun.js sends a string, a text field), ``o:deliverytime``, ``o:testmode`` and the
  tracking options when off. Anything else is refused by name (``smtp_unknown_field``).
- ``h:Reply-To``, ``h:Message-Id``, ``h:In-Reply-To`` and ``h:References`` fill the native fields;
  ``h:Sender`` (Ghost sends it equal to ``from``) is dropped when it names the ``from`` mailbox and
  refused otherwise: the sidecar writes no Sender header. Other ``h:`` headers go to native
  ``headers`` (which refuses the ones the service writes itself).
- ``o:tag`` values become one ``X-Mailgun-Tag`` header, comma-separated; ``v:`` variables one
  ``X-Mailgun-Variables`` header holding a JSON object, as Mailgun writes them.
- ``recipient-variables``: one native object per ``to`` recipient, addressed to that recipient
  alone. ``%recipient.NAME%`` is replaced in subject, text, html and every ``h:``/``v:`` value
  (a missing recipient or name gives the empty string, as Mailgun does); ``%recipient%`` is the
  recipient's address. A header left empty by the substitution is left out. As Mailgun does, ``cc`` and ``bcc`` get a copy of each message: 10 ``to``
  and 3 ``cc`` are 40 deliveries. In ``h:List-Unsubscribe``, entries that still hold a
  ``%...%`` variable after the substitution (Mailgun's own ``%tag_unsubscribe_email%``, which
  this server does not have) or are left empty (``<>``) are dropped.
- ``o:deliverytime`` becomes ``MailgunRequest.send_at`` (unix seconds); the route schedules it.
  A date without a zone is taken as UTC.
- An inline file's Content-ID is its file name, so the HTML refers to it as ``cid:<filename>``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from email.utils import parsedate_to_datetime
from datetime import timezone
from typing import Any

import attrs

from ..core.errors import ApiError
from ..core.responses import ItemResult
from ..core.validate import parse_address
from .common import addr_spec, file_name, item_from_error, mime_type, put_header, split_addresses

MAX_TAGS = 3
QUEUED = "Queued. Thank you."

SINGLE_FIELDS = frozenset(
    {"from", "subject", "text", "html", "o:deliverytime", "o:testmode", "recipient-variables", *("o:tracking", "o:tracking-opens", "o:tracking-clicks")}
)
LIST_FIELDS = frozenset({"to", "cc", "bcc", "o:tag"})
TRACKING_FIELDS = frozenset({"o:tracking", "o:tracking-opens", "o:tracking-clicks"})
MIME_FIELDS = frozenset({"to", "message", "o:deliverytime", "o:testmode", *TRACKING_FIELDS})
FILE_FIELDS = frozenset({"attachment", "inline"})
_TRUE = frozenset({"yes", "true", "1"})
_FALSE = frozenset({"no", "false", "0"})
_ADDRESS_CODES = {"to": "smtp_invalid_recipient", "cc": "smtp_invalid_cc", "bcc": "smtp_invalid_bcc"}
_RECIPIENT_VARIABLE = re.compile(r"%recipient(?:\.([^%]+))?%")
_LEFTOVER_VARIABLE = re.compile(r"%[^%\s]+%")


@attrs.frozen
class FormFile:
    """One file part of the form: ``field`` is ``attachment``, ``inline`` or ``message``;
    ``filename`` as the client sent it."""

    field: str
    filename: str | None
    content_type: str | None
    data: bytes = attrs.field(repr=False)


@attrs.frozen
class MailgunRequest:
    """The native objects for one Mailgun call: one per message (a ``recipient-variables`` batch
    has one per ``to`` recipient), or one raw object for ``messages.mime`` (``raw``)."""

    items: tuple[dict[str, Any], ...]
    raw: bool = False
    send_at: float | None = None
    test_mode: bool = False
    tags: tuple[str, ...] = ()


def _refuse(code: str, field: str, message: str | None = None) -> ApiError:
    return ApiError.of(code, message, field=field)


def _printable(name: str) -> str:
    """A field name fit to quote in a message: control characters escaped, at most 80 characters."""
    return name.encode("unicode_escape").decode("ascii")[:80]


def _unsupported(name: str) -> ApiError:
    shown = _printable(name)
    return _refuse("smtp_unknown_field", shown, f"'{shown}' is not supported by this server (see docs/mailgun.md)")


def _check_domain(domain: str) -> None:
    try:
        parse_address(f"postmaster@{domain}", "domain", "smtp_invalid_field")
    except ApiError:
        raise _refuse("smtp_invalid_field", "domain", "the {domain} of the URL must be a DNS domain name such as example.org") from None


def domain_matches(domain: str, sender_domain: str) -> bool:
    """True when the URL's ``{domain}`` names the sender's domain (case-insensitive, IDNA-normalised)."""
    try:
        left = parse_address(f"postmaster@{domain}", "domain", "smtp_invalid_field").domain_ascii
        right = parse_address(f"postmaster@{sender_domain}", "domain", "smtp_invalid_field").domain_ascii
    except ApiError:
        return False
    return left == right


def _yes_no(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise _refuse("smtp_invalid_field", name, f"'{name}' must be yes or no")


def _delivery_time(value: str) -> float:
    try:
        if not value.isprintable():
            raise ValueError("control characters")  # the parser would skip a line break and what follows
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        raise _refuse("smtp_invalid_send_at", "o:deliverytime", "'o:deliverytime' must be an RFC 2822 date such as Thu, 13 Oct 2011 18:02:00 +0000") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


@attrs.define
class _Form:
    """The form's fields sorted by kind; duplicates and unknown names refused on the way in."""

    single: dict[str, str] = attrs.Factory(dict)
    lists: dict[str, list[str]] = attrs.Factory(dict)
    headers: list[tuple[str, str]] = attrs.Factory(list)
    variables: dict[str, str] = attrs.Factory(dict)

    @classmethod
    def collect(cls, fields: Sequence[tuple[str, str]], mime: bool) -> _Form:
        form = cls()
        seen_headers: set[str] = set()
        for name, value in fields:
            if mime and name not in MIME_FIELDS:
                shown = _printable(name)
                raise _refuse("smtp_unknown_field", shown, f"'{shown}' is not accepted by messages.mime; the MIME message carries it")
            if name in LIST_FIELDS:
                form.lists.setdefault(name, []).append(value)
            elif name in SINGLE_FIELDS or name == "message":
                if name in form.single:
                    raise _refuse("smtp_invalid_field", name, f"'{name}' is given twice")
                form.single[name] = value
            elif name.startswith("h:") and len(name) > 2:
                if name[2:].lower() in seen_headers:
                    raise _refuse("smtp_invalid_header", _printable(name), f"'{_printable(name)}' is given twice")
                seen_headers.add(name[2:].lower())
                form.headers.append((name[2:], value))
            elif name.startswith("v:") and len(name) > 2:
                if name[2:] in form.variables:
                    raise _refuse("smtp_invalid_field", _printable(name), f"'{_printable(name)}' is given twice")
                form.variables[name[2:]] = value
            else:
                raise _unsupported(name)
        for name in TRACKING_FIELDS & form.single.keys():
            if _yes_no(name, form.single[name]):
                raise _refuse("smtp_unknown_field", name, f"'{name}' (tracking) is not supported by this server: the sidecar never rewrites a message; send 'no' or leave it out")
        return form

    def addresses(self, name: str) -> list[str]:
        entries: list[str] = []
        for value in self.lists.get(name, []):
            entries.extend(split_addresses(value, name, _ADDRESS_CODES[name]))
        return entries


def _recipient_variables(raw: str | None, limit: int) -> dict[str, dict[str, Any]] | None:
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        raise _refuse("smtp_invalid_json", "recipient-variables", "'recipient-variables' is not valid JSON") from None
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise _refuse("smtp_invalid_json", "recipient-variables", "'recipient-variables' must be a JSON object of recipient address -> object of variables")
    if len(value) > limit:
        raise _refuse("smtp_too_many_recipients", "recipient-variables", f"at most {limit} recipients per batch")
    return {str(k).strip().lower(): v for k, v in value.items()}


def _substituter(address: str, variables: dict[str, Any]) -> Any:
    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:
            return address
        value = variables.get(name)
        if value is None:
            return ""
        return value if isinstance(value, str) else json.dumps(value)

    return lambda text: _RECIPIENT_VARIABLE.sub(one, text)


def _list_unsubscribe(value: str) -> str:
    """``h:List-Unsubscribe`` without the entries a variable of Mailgun's own still holds, or that a
    variable without a value left empty (``<>``)."""
    entries = [entry.strip() for entry in value.split(",")]
    return ", ".join(e for e in entries if e.strip("<> ") and not _LEFTOVER_VARIABLE.search(e))


def _attachments(files: Sequence[FormFile]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for part in files:
        if part.field not in FILE_FIELDS:
            raise _unsupported(part.field)
        name = file_name(part.filename)
        if not name.strip():
            raise _refuse("smtp_invalid_attachment", part.field, f"every '{part.field}' file part needs a file name")
        entry: dict[str, Any] = {"filename": name, "content": part.data}
        content_type = mime_type(part.content_type)
        if content_type is not None:
            entry["content_type"] = content_type
        if part.field == "inline":
            entry["content_id"] = name
            entry["disposition"] = "inline"
        out.append(entry)
    return out


def _sender_header(value: str, sender: str | None) -> None:
    """``h:Sender``: dropped when it names the ``from`` mailbox, refused otherwise."""
    if sender is not None and addr_spec(value) == addr_spec(sender):
        return
    raise _refuse("smtp_header_not_allowed", "h:Sender", "'h:Sender' must name the 'from' mailbox; this server writes no Sender header")


def _message(form: _Form, to: list[str], cc: list[str], bcc: list[str], attachments: list[dict[str, Any]], subst: Any) -> dict[str, Any]:
    """One native object; ``subst`` replaces recipient variables in the texts and headers."""
    single = form.single
    obj: dict[str, Any] = {"to": to}
    if "from" in single:
        obj["from"] = single["from"]
    if cc:
        obj["cc"] = cc
    if bcc:
        obj["bcc"] = bcc
    for name, native in (("subject", "subject"), ("text", "body"), ("html", "html_body")):
        if name in single:
            obj[native] = subst(single[name])
    if attachments:
        obj["attachments"] = [dict(a) for a in attachments]
    for name, given in form.headers:
        value = subst(given)
        if given.strip() and not value.strip():
            continue  # only variables that had no value for this recipient: no empty header
        lowered = name.lower()
        if lowered == "reply-to":
            obj["reply_to"] = value
        elif lowered == "sender":
            _sender_header(value, single.get("from"))
        elif lowered == "list-unsubscribe":
            kept = _list_unsubscribe(value)
            if kept:
                put_header(obj, name, kept, f"h:{name}")
        else:
            put_header(obj, name, value, f"h:{_printable(name)}")
    tags = form.lists.get("o:tag", [])
    if tags:
        put_header(obj, "X-Mailgun-Tag", ", ".join(tags), "o:tag")
    if form.variables:
        values = {k: subst(v) for k, v in form.variables.items()}
        put_header(obj, "X-Mailgun-Variables", json.dumps(values, separators=(",", ":")), "v:")
    if not obj.get("headers"):
        obj.pop("headers", None)
    return obj


def _raw(form: _Form, files: Sequence[FormFile]) -> dict[str, Any]:
    parts = [f for f in files if f.field == "message"]
    others = [f for f in files if f.field != "message"]
    if others:
        raise _refuse("smtp_unknown_field", _printable(others[0].field), f"'{_printable(others[0].field)}' is not accepted by messages.mime; the MIME message carries it")
    if len(parts) + ("message" in form.single) != 1:
        raise _refuse("smtp_invalid_field", "message", "messages.mime takes exactly one 'message' (the MIME message)")
    data = parts[0].data if parts else form.single["message"].encode("utf-8", "surrogateescape")
    to = [addr_spec(entry) for entry in form.addresses("to")]
    return {"message": data, "envelope": {"to": to}}


def translate(
    domain: str,
    fields: Sequence[tuple[str, str]],
    files: Sequence[FormFile],
    *,
    mime: bool,
    max_recipient_variables: int = 1000,
) -> MailgunRequest:
    """Mailgun's form -> the native objects, or the ``ApiError`` naming the Mailgun field."""
    _check_domain(domain)
    form = _Form.collect(fields, mime)
    tags = tuple(form.lists.get("o:tag", []))
    if len(tags) > MAX_TAGS:
        raise _refuse("smtp_invalid_field", "o:tag", f"at most {MAX_TAGS} 'o:tag' values per message")
    send_at = _delivery_time(form.single["o:deliverytime"]) if "o:deliverytime" in form.single else None
    test_mode = _yes_no("o:testmode", form.single["o:testmode"]) if "o:testmode" in form.single else False
    if mime:
        return MailgunRequest(items=(_raw(form, files),), raw=True, send_at=send_at, test_mode=test_mode, tags=tags)
    attachments = _attachments(files)
    to, cc, bcc = form.addresses("to"), form.addresses("cc"), form.addresses("bcc")
    variables = _recipient_variables(form.single.get("recipient-variables"), max_recipient_variables)
    if variables is None:
        items: tuple[dict[str, Any], ...] = (_message(form, to, cc, bcc, attachments, lambda text: text),)
    else:
        if len(to) > max_recipient_variables:
            raise _refuse("smtp_too_many_recipients", "to", f"at most {max_recipient_variables} 'to' recipients per batch")
        items = tuple(
            _message(form, [entry], cc, bcc, attachments, _substituter(addr_spec(entry), variables.get(addr_spec(entry), {})))
            for entry in to
        ) or (_message(form, [], cc, bcc, attachments, lambda text: text),)
    return MailgunRequest(items=items, raw=False, send_at=send_at, test_mode=test_mode, tags=tags)


# --------------------------------------------------------------------------- errors and answers

_ATTACHMENT = re.compile(r"attachments\[\d+\](\.(\w+))?")
_NATIVE_NAMES = {
    "from": "from", "subject": "subject", "body": "text", "html_body": "html", "reply_to": "h:Reply-To",
    "message_id": "h:Message-Id", "in_reply_to": "h:In-Reply-To", "references": "h:References",
    "headers": "h:", "attachments": "attachment", "send_at": "o:deliverytime", "smtp_user": "api key",
    "password": "api key", "message": "message", "envelope": "to",
}


def mailgun_field(native_field: str | None) -> str | None:
    """A native error field in Mailgun's words: ``body`` -> ``text``, ``to[3]`` -> ``to``,
    ``headers.X-Foo`` -> ``h:X-Foo``, ``attachments[2].content_id`` -> ``inline``."""
    if native_field is None:
        return None
    if native_field.startswith("headers."):
        name = native_field[len("headers."):]
        special = {"x-mailgun-tag": "o:tag", "x-mailgun-variables": "v:"}
        return special.get(name.lower(), f"h:{name}")
    attachment = _ATTACHMENT.fullmatch(native_field)
    if attachment:
        return "inline" if attachment.group(2) == "content_id" else "attachment"
    base = re.split(r"[\[.]", native_field, maxsplit=1)[0]
    if base in ("to", "cc", "bcc"):
        return base
    if base.startswith("references"):
        return "h:References"
    return _NATIVE_NAMES.get(base, native_field)


def _failure(result: ItemResult) -> dict[str, Any]:
    row: dict[str, Any] = {"code": result.code, "message": result.message, "recipients": list(result.recipients)}
    field = mailgun_field(result.field)
    if field is not None:
        row["field"] = field
    return row


def error_answer(err: ApiError) -> tuple[int, dict[str, Any]]:
    """A refused request in Mailgun's shape: the native status and ``{"message": ...}``."""
    return answer([item_from_error(err)])


def answer(results: Sequence[ItemResult]) -> tuple[int, dict[str, Any]]:
    """Mailgun's answer for the outcomes of one call's messages.

    All sent or queued: 200 ``{"id", "message": "Queued. Thank you."}`` with the first message's
    id (plus ``dry_run``, one payload per message, in test mode). Some refused: still 200 with the
    id of the first message that went, the message saying how many were refused, and
    ``refused``: one row per refused message or recipient (``code``, ``message``, ``field``,
    ``recipients``). All refused: the first refusal's native status (400, 401, 403, 413, 429,
    5xx) and ``{"message", "code", "field"}``. ``Retry-After`` is the route's to set, from
    ``retry_after`` of the results.
    """
    if not results:
        raise ValueError("answer() needs at least one result")
    sent = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    if not sent:
        first = failed[0]
        body: dict[str, Any] = {"message": first.message or first.code, "code": first.code}
        field = mailgun_field(first.field)
        if field is not None:
            body["field"] = field
            body["message"] = f"{field}: {body['message']}"
        if len(results) > 1:
            body["refused"] = [_failure(r) for r in failed]
        return first.status, body
    body = {"id": sent[0].message_id or "", "message": QUEUED}
    refused = [_failure(r) for r in failed]
    for result in sent:
        if result.refused:
            refused.append({"code": result.code, "message": result.message, "recipients": list(result.refused)})
    if refused:
        body["message"] = f"{QUEUED} {len(sent)} of {len(results)} messages went; what was refused is in 'refused'."
        body["refused"] = refused
    dry = [r.dry_run for r in sent if r.dry_run is not None]
    if dry:
        body["dry_run"] = dry
    return 200, body
