"""A caller's own RFC 5322 message (``POST /api/v1/send/raw``, Mailgun's ``messages.mime``).

The message is taken as it is, with four changes and nothing else: line ends become CRLF, every
``Bcc`` field is removed (its addresses stay in the envelope only), and a ``Message-ID`` and a
``Date`` are written above the caller's header when it has none, with the service's own trusted
fields (``X-Request-Id``). Nothing the caller wrote is ever spliced into a header line of ours,
so no header can be injected: the caller's header section is checked field by field and kept.

Refused, naming the field ``message``: a NUL byte; a line over 998 octets (RFC 5322 2.1.1); a
header line that is neither ``Name: value`` nor a continuation; 8-bit bytes in the header (this
server offers no SMTPUTF8); no ``From``, or a field of RFC 5322 3.6's once-only kind given twice
(two ``From`` headers, two ``Subject``...); a ``From`` that is not exactly one mailbox; a malformed
``Message-ID``. Pure core.
"""

from __future__ import annotations

import binascii
import re
from datetime import datetime
from typing import Any, NoReturn

from .errors import ApiError
from .mime import date_header, text_header
from .model import Address, CleanPieces, RawMessage, SendRequest
from .validate import (
    ParsePolicy,
    dry_run_of,
    message_id_value,
    parse_address,
    parse_address_list,
    password_of,
    send_at_of,
    smtp_host_of,
    smtp_login_of,
    smtp_port_of,
)

FIELD = "message"
CODE = "smtp_invalid_raw_message"
MAX_LINE = 998
RAW_FIELDS = frozenset(
    {"message", "envelope", "smtp_host", "smtp_port", "smtp_user", "password", "app_password", "send_at", "dry_run"}
)
ENVELOPE_FIELDS = frozenset({"from", "to"})
# RFC 5322 3.6: fields a message holds at most once.
ONCE = ("from", "sender", "reply-to", "to", "cc", "bcc", "subject", "date", "message-id", "in-reply-to", "references")
_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")
_EOL = re.compile(rb"\r\n|\r|\n")


def _fail(message: str, field: str = FIELD) -> NoReturn:
    raise ApiError.of(CODE, message, field=field)


def _lines(data: bytes) -> list[bytes]:
    """The message's lines without their ends; any of CRLF, CR and LF ends a line."""
    if b"\x00" in data:
        _fail("the message holds a NUL byte")
    lines = _EOL.split(data)
    if lines and lines[-1] == b"":
        lines.pop()
    for number, line in enumerate(lines, 1):
        if len(line) > MAX_LINE:
            _fail(f"line {number} of the message is {len(line)} octets long; at most {MAX_LINE} (RFC 5322 2.1.1)")
    return lines


def _fields(header: list[bytes]) -> list[tuple[str, list[bytes]]]:
    """The header section as (lower-case name, its lines), a continuation line kept with its field."""
    fields: list[tuple[str, list[bytes]]] = []
    for number, line in enumerate(header, 1):
        if line[:1] in (b" ", b"\t"):
            if not fields:
                _fail("the message starts with a continuation line; it must start with a header field")
            fields[-1][1].append(line)
            continue
        name, colon, _ = line.partition(b":")
        if not colon or not _NAME.fullmatch(name):
            _fail(f"header line {number} is not a 'Name: value' field; a message starts with its header fields")
        fields.append((name.decode("ascii").lower(), [line]))
    if any(max(line) > 0x7E for _, lines in fields for line in lines if line):
        _fail("the message header holds 8-bit bytes; encode non-ASCII text as RFC 2047 encoded words")
    return fields


def _value(lines: list[bytes]) -> str:
    """A field's value, unfolded (RFC 5322 2.2.3), without the name and its colon."""
    return b"".join(lines).decode("ascii").partition(":")[2].strip()


def parse_raw_message(data: bytes) -> RawMessage:
    """Check and normalise a raw message; the ``RawMessage`` to send, or ``ApiError`` naming ``message``."""
    lines = _lines(data)
    end = lines.index(b"") if b"" in lines else len(lines)
    fields = _fields(lines[:end])
    for name in ONCE:
        count = sum(1 for field, _ in fields if field == name)
        if count > 1:
            _fail(f"the message has {count} {name.title()} header fields; RFC 5322 allows one")
    found = {name: field_lines for name, field_lines in fields}
    if "from" not in found:
        _fail("the message has no From header field")
    header_from = parse_address(_value(found["from"]), "message.From", CODE)
    message_id = None
    if "message-id" in found:
        message_id = message_id_value(_value(found["message-id"]), "message.Message-ID")
    kept = [line for name, field_lines in fields if name != "bcc" for line in field_lines]
    text = b"\r\n".join([*kept, *lines[end:]]) + b"\r\n"
    return RawMessage(
        header_from=header_from,
        data=text,
        message_id=message_id,
        has_date="date" in found,
        subject=_value(found["subject"])[:200] if "subject" in found else "",
    )


def raw_message_data(
    raw: RawMessage, *, message_id: str, date: datetime, extra_headers: tuple[tuple[str, str], ...] = ()
) -> CleanPieces:
    """The message as sent: the service's own fields (those the caller left out, then the trusted
    extra ones), then the caller's message as checked."""
    top: list[bytes] = []
    if raw.message_id is None:
        top.append(f"Message-ID: {message_id}\r\n".encode("ascii"))
    if not raw.has_date:
        top.append(date_header(date))
    top.extend(text_header(name, value) for name, value in extra_headers)
    return CleanPieces((b"".join(top), raw.data) if top else (raw.data,))


def _decoded(value: Any) -> bytes:
    """``message``: bytes from a front end's file part, or a strict base64 string from JSON."""
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str) or not value:
        _fail("'message' must be the RFC 5322 message as a base64 string")
    try:
        return binascii.a2b_base64(value, strict_mode=True)
    except (binascii.Error, ValueError):
        _fail("'message' is not strict base64 (no line breaks; try base64 -w 0)")


def parse_raw_request(obj: dict[str, Any], policy: ParsePolicy | None = None) -> SendRequest:
    """A raw send request -> ``SendRequest`` with ``raw`` set; the first bad field as ``ApiError``.

    ``envelope.to`` lists the recipients (the header's To/Cc/Bcc are not read for it);
    ``envelope.from`` is MAIL FROM, the header's From when left out. The sender rule applies to
    both (see ``SendService.prepare``).
    """
    policy = policy or ParsePolicy()
    unknown = sorted(set(obj) - RAW_FIELDS)
    if unknown:
        raise ApiError.of("smtp_unknown_field", f"unknown field(s): {', '.join(unknown)}", field=unknown[0])
    envelope = obj.get("envelope")
    if not isinstance(envelope, dict):
        raise ApiError.of(
            "smtp_invalid_field", "'envelope' must be an object with 'to' (and optionally 'from')", field="envelope"
        )
    unknown = sorted(set(envelope) - ENVELOPE_FIELDS)
    if unknown:
        raise ApiError.of("smtp_unknown_field", f"unknown envelope field(s): {', '.join(unknown)}", field=f"envelope.{unknown[0]}")
    to = envelope.get("to")
    if isinstance(to, list) and len(to) > policy.max_recipients:
        raise ApiError.of("smtp_too_many_recipients", f"at most {policy.max_recipients} recipients per request", field="envelope.to")
    recipients = parse_address_list(envelope, "to", "smtp_invalid_recipient", required=True, where="envelope.to")
    raw = parse_raw_message(_decoded(obj.get("message")))
    sender: Address = raw.header_from
    if envelope.get("from") is not None:
        sender = parse_address(envelope["from"], "envelope.from", "smtp_invalid_from")
    port = smtp_port_of(obj)
    login = smtp_login_of(obj, sender)
    return SendRequest(
        sender=sender,
        to=recipients,
        subject=raw.subject,
        body="",
        smtp_host=smtp_host_of(obj),
        smtp_port=port,
        login=login,
        password=password_of(obj, port, policy),
        send_at=send_at_of(obj),
        dry_run=dry_run_of(obj),
        raw=raw,
    )
