"""``SendRequest`` -> message bytes and envelope. Bcc recipients are in the envelope only.

The message is 7-bit clean (postfix may relay it to servers without 8BITMIME, and the SMTP client
announces no BODY=8BITMIME), uses CRLF line endings only, and keeps every line under 998 octets
(RFC 5322 2.1.1). Pure core.
"""

from __future__ import annotations

import re
from datetime import datetime
from email import policy as email_policy
from email.headerregistry import Address as HeaderAddress
from email.message import EmailMessage
from email.utils import format_datetime

from .model import Address, Envelope, SendRequest

# Generate with CRLF and re-encode anything 8-bit; header folding per RFC 5322 with RFC 2047 words.
_POLICY = email_policy.SMTP.clone(cte_type="7bit", max_line_length=78)
_LINE_LIMIT = 998


def envelope_for(request: SendRequest) -> Envelope:
    """MAIL FROM is the authorized ``from``; RCPT TO is every to/cc/bcc address once."""
    return Envelope(sender=request.sender.wire, recipients=tuple(a.wire for a in request.recipients()))


def _header_address(address: Address) -> HeaderAddress:
    # Headers carry the A-label domain: without SMTPUTF8 a raw UTF-8 domain is not allowed there.
    return HeaderAddress(display_name=address.display_name, username=address.local, domain=address.domain_ascii)


def _text_cte(text: str) -> str:
    """7bit when the text is ASCII with short lines, else quoted-printable (readable, line-safe)."""
    if text.isascii() and all(len(line) <= 78 for line in text.split("\n")):
        return "7bit"
    return "quoted-printable"


def _ensure_final_newline(text: str) -> str:
    return text if text.endswith("\n") else text + "\n"


def _fill_body(message: EmailMessage, request: SendRequest) -> None:
    """Text and HTML as multipart/alternative; attachments turn it into multipart/mixed."""
    if request.body.strip():
        body = _ensure_final_newline(request.body)
        message.set_content(body, subtype="plain", charset="utf-8", cte=_text_cte(body))
        if request.html_body.strip():
            html = _ensure_final_newline(request.html_body)
            message.add_alternative(html, subtype="html", charset="utf-8", cte=_text_cte(html))
    else:
        html = _ensure_final_newline(request.html_body)
        message.set_content(html, subtype="html", charset="utf-8", cte=_text_cte(html))
    for attachment in request.attachments:
        maintype, subtype = attachment.content_type.split("/", 1)
        # Filenames go out as RFC 2231 parameters when they are not ASCII (the policy does this).
        message.add_attachment(
            attachment.content,
            maintype=maintype,
            subtype=subtype,
            filename=attachment.filename,
            cte="base64",
        )


def build_message(
    request: SendRequest,
    *,
    message_id: str,
    date: datetime,
    extra_headers: tuple[tuple[str, str], ...] = (),
) -> bytes:
    """The complete RFC 5322 message with CRLF line endings, not dot-stuffed.

    ``message_id`` is the full ``<...>`` value. ``extra_headers`` are trusted (set by the service).
    """
    message = EmailMessage(policy=email_policy.default)
    message["From"] = _header_address(request.sender)
    message["To"] = [_header_address(a) for a in request.to]
    if request.cc:
        message["Cc"] = [_header_address(a) for a in request.cc]
    if request.reply_to is not None:
        message["Reply-To"] = _header_address(request.reply_to)
    message["Subject"] = request.subject
    message["Date"] = format_datetime(date)
    message["Message-ID"] = message_id
    for name, value in extra_headers:
        message[name] = value
    _fill_body(message, request)
    data = message.as_bytes(policy=_POLICY)
    return normalise_crlf(data)


_ANY_EOL = re.compile(rb"\r\n|\r|\n")


def normalise_crlf(data: bytes) -> bytes:
    """Every line ending becomes CRLF, and the message ends with one."""
    data = _ANY_EOL.sub(b"\r\n", data)
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def longest_line(data: bytes) -> int:
    """Length in octets of the longest line (without its CRLF); used by tests and sanity checks."""
    return max((len(line) for line in data.split(b"\r\n")), default=0)


def make_message_id(token: str, sender: Address) -> str:
    """A Message-ID whose right-hand side is the sender's domain (so it is unique per domain)."""
    return f"<{token}@{sender.domain_ascii}>"


LINE_LIMIT = _LINE_LIMIT
