"""``SendRequest`` -> message bytes and envelope. Bcc recipients are in the envelope only.

The message is 7-bit clean (postfix may relay it to servers without 8BITMIME, and the SMTP client
announces no BODY=8BITMIME), uses CRLF line endings only, and keeps every line under 998 octets
(RFC 5322 2.1.1). Pure core.

Its structure, from the outside in (each level only when needed):

    multipart/mixed                 when there are ordinary attachments
      multipart/alternative         when there is both a text and an HTML body
        text/plain
        multipart/related           when the HTML shows inline parts (RFC 2387)
          text/html
          inline parts, each with its Content-ID (RFC 2392)
      attachments
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
import secrets
from collections.abc import Callable, Sequence
from datetime import datetime
from email import policy as email_policy
from email.header import Header
from email.headerregistry import Address as HeaderAddress
from email.headerregistry import BaseHeader, HeaderRegistry
from email.message import EmailMessage, MIMEPart
from email.utils import format_datetime

from .model import Address, Attachment, CleanPieces, Envelope, SendRequest

class ReusingHeaderRegistry(HeaderRegistry):
    """The library's header registry, keeping the class it makes for each header name, and the
    parsed MIME headers (Content-Type and its kin) for each value.

    ``HeaderRegistry`` creates a new class on every lookup (a ``type()`` call per header set or
    folded: about a quarter of the time a small message took to build). The classes hold no
    state, so one per name serves every message; a race between threads only makes one twice.
    """

    def __init__(self) -> None:
        super().__init__()
        self._classes: dict[str, type[BaseHeader]] = {}

    def __getitem__(self, name: str) -> type[BaseHeader]:
        key = name.lower()
        made = self._classes.get(key)
        if made is None:
            made = self._classes[key] = super().__getitem__(name)
        return made

    def __call__(self, name: str, value: str) -> BaseHeader:
        if name.lower() in _PARSED_ONCE:
            return self._parsed(name, value)
        return super().__call__(name, value)

    @functools.lru_cache(maxsize=256)  # one registry lives as long as the process
    def _parsed(self, name: str, value: str) -> BaseHeader:
        """A MIME header parsed once per value: the generator reads Content-Type two or three
        times per part, parsing it each time. Header objects are never changed in place."""
        return super().__call__(name, value)


_PARSED_ONCE = frozenset({"content-type", "content-transfer-encoding", "content-disposition", "mime-version"})


HEADER_REGISTRY = ReusingHeaderRegistry()
_BUILD_POLICY = email_policy.default.clone(header_factory=HEADER_REGISTRY)
# Generate with CRLF and re-encode anything 8-bit; header folding per RFC 5322 with RFC 2047 words.
_POLICY = email_policy.SMTP.clone(cte_type="7bit", max_line_length=78, header_factory=HEADER_REGISTRY)
_LINE_LIMIT = 998


def envelope_for(request: SendRequest) -> Envelope:
    """MAIL FROM is the authorized ``from``; RCPT TO is every to/cc/bcc address once."""
    return Envelope(sender=request.sender.wire, recipients=tuple(a.wire for a in request.recipients()))


def _header_address(address: Address) -> HeaderAddress:
    # Headers carry the A-label domain: without SMTPUTF8 a raw UTF-8 domain is not allowed there.
    return HeaderAddress(display_name=address.display_name, username=address.local, domain=address.domain_ascii)


def _set_addresses(message: EmailMessage, name: str, addresses: list[HeaderAddress]) -> None:
    """An address header. ASCII display names are written as the library formats them (quoted
    where needed) without a parse per message; a line too long is folded by the library when the
    message is generated. Others go through the library's header classes, which encode them."""
    if all(address.display_name.isascii() for address in addresses):
        message.set_raw(name, ", ".join(str(address) for address in addresses))
    else:
        message[name] = addresses if len(addresses) > 1 else addresses[0]


def _set_text(part: MIMEPart, marker: str, cte: str, subtype: str, top: bool = True) -> None:
    """Make ``part`` a UTF-8 text part holding ``marker``, the way the library's set_content would.

    Its headers are stored as written (the library would parse each one it sets, and parse
    Content-Type again to add the charset); the top-level message also gets its MIME-Version.
    """
    part.set_raw("Content-Type", f'text/{subtype}; charset="utf-8"')
    part.set_raw("Content-Transfer-Encoding", cte)
    part.set_payload(marker)
    if top:
        part.set_raw("MIME-Version", "1.0")


# A line of more than 78 characters after a line break; a search only tries where a "\n" is.
_LONG_LINE = re.compile(r"\n[^\n]{79}")


def _text_cte(text: str) -> str:
    """7bit when the text is ASCII with short lines, else quoted-printable (readable, line-safe)."""
    first = text.find("\n")
    short = (first if first >= 0 else len(text)) <= 78 and _LONG_LINE.search(text) is None
    return "7bit" if short and text.isascii() else "quoted-printable"


def _ensure_final_newline(text: str) -> str:
    return text if text.endswith("\n") else text + "\n"


class _Placeholders:
    """Stand-ins for the parts' bodies while the email library lays out the structure.

    The library encodes bodies slowly (line by line in Python) and holds several copies of each
    at once; a part of megabytes made both visible. So each part is laid out around a short
    marker line, and ``splice`` puts the body, encoded here in C (binascii), in that line's place.
    The markers carry a random token, so no caller's text can contain one.
    """

    def __init__(self) -> None:
        self._token = secrets.token_hex(16)
        self._bodies: list[tuple[bytes, Callable[[], list[bytes]]]] = []

    def _marker(self, kind: str) -> str:
        return f"smtpapi-{kind}-{len(self._bodies)}-{self._token}"

    def text(self, text: str, cte: str) -> str:
        """A stand-in for ``text``, to be sent as ``cte`` (7bit or quoted-printable)."""
        marker = self._marker("text")
        # An ASCII word needs no transfer encoding: the library writes the marker as it is.
        self._bodies.append((marker.encode("ascii"), lambda: [encode_text(text, cte)]))
        return marker + "\n"

    def binary(self, content: bytes) -> bytes:
        """A stand-in for ``content``, to be sent as base64."""
        marker = self._marker("part").encode("ascii")
        # Under 57 bytes, the library writes the marker's base64 on one line.
        self._bodies.append((base64.b64encode(marker), lambda: base64_blocks(content)))
        return marker

    def splice(self, data: bytes) -> CleanPieces:
        """``data`` cut at each marker's line, with the encoded body in its place."""
        found: list[tuple[int, int, Callable[[], list[bytes]]]] = []
        for marker, encode in self._bodies:
            line = b"\r\n" + marker + b"\r\n"
            at = data.find(line)
            if at < 0 or data.find(line, at + 1) >= 0:
                raise RuntimeError("a part's marker is missing or repeated in the generated message")
            found.append((at + 2, at + len(line), encode))
        pieces: list[bytes] = []
        offset = 0
        for start, stop, encode in sorted(found, key=lambda item: item[0]):
            pieces.append(data[offset:start])
            pieces.extend(encode())
            offset = stop
        pieces.append(data[offset:])
        return CleanPieces(piece for piece in pieces if piece)


def _fill_body(message: EmailMessage, request: SendRequest, holes: _Placeholders) -> None:
    """Text and HTML as multipart/alternative, inline parts beside the HTML, attachments in mixed."""

    def text(value: str) -> tuple[str, str]:
        value = _ensure_final_newline(value)
        cte = _text_cte(value)
        return holes.text(value, cte), cte

    if request.body.strip():
        _set_text(message, *text(request.body), "plain")
        if request.html_body.strip():
            message.make_alternative()
            html_part = EmailMessage(policy=message.policy)
            _set_text(html_part, *text(request.html_body), "html", top=False)
            message.attach(html_part)
            _add_inline_parts(html_part, request.attachments, holes)
    else:
        _set_text(message, *text(request.html_body), "html")
        _add_inline_parts(message, request.attachments, holes)
    for attachment in request.attachments:
        if attachment.inline:
            continue
        maintype, subtype = attachment.content_type.split("/", 1)
        # Filenames go out as RFC 2231 parameters when they are not ASCII (the policy does this).
        message.add_attachment(
            holes.binary(attachment.content),
            maintype=maintype,
            subtype=subtype,
            filename=attachment.filename,
            cte="base64",
        )


def _add_inline_parts(html_part: MIMEPart, attachments: tuple[Attachment, ...], holes: _Placeholders) -> None:
    """Turn the HTML part into multipart/related holding the HTML first, then each inline part."""
    inline = [a for a in attachments if a.inline]
    for attachment in inline:
        maintype, subtype = attachment.content_type.split("/", 1)
        html_part.add_related(
            holes.binary(attachment.content),
            maintype=maintype,
            subtype=subtype,
            cid=f"<{attachment.content_id}>",
            filename=attachment.filename,
            disposition="inline",
            cte="base64",
        )
    if inline:
        # RFC 2387 3.1: the type parameter names the root part's type, and is required.
        html_part.set_param("type", "text/html")


def build_message(
    request: SendRequest,
    *,
    message_id: str,
    date: datetime,
    extra_headers: tuple[tuple[str, str], ...] = (),
) -> bytes:
    """The complete RFC 5322 message with CRLF line endings, not dot-stuffed.

    ``message_id`` is the full ``<...>`` value. The caller's ``headers`` follow the service's own;
    ``extra_headers`` are trusted (set by the service) and come last.
    """
    return b"".join(build_message_parts(request, message_id=message_id, date=date, extra_headers=extra_headers))


def build_message_parts(
    request: SendRequest,
    *,
    message_id: str,
    date: datetime,
    extra_headers: tuple[tuple[str, str], ...] = (),
) -> CleanPieces:
    """``build_message`` as consecutive pieces, each ending with CRLF, without joining them.

    An attachment's base64 text is its own run of pieces (about 78 KB each), so the message never
    exists as one more copy of itself: its size in memory is the sum of the pieces.
    """
    holes = _Placeholders()
    message = EmailMessage(policy=_BUILD_POLICY)
    for name, group in (
        ("From", (request.sender,)),
        ("To", request.to),
        ("Cc", request.cc),
        ("Reply-To", (request.reply_to,) if request.reply_to is not None else ()),
    ):
        if group:
            _set_addresses(message, name, [_header_address(a) for a in group])
    message.set_raw("Date", format_datetime(date))
    # Free text. ASCII values are folded by the library; non-ASCII ones are encoded here, because
    # the library's folding can drop the space between two encoded words ("a b" read back as "ab").
    encoded: list[bytes] = []
    for name, value in (("Subject", request.subject), *request.headers, *extra_headers):
        if value.isascii():
            # Stored as given: the generator writes a value that fits on its line unchanged and has
            # the library fold one that does not (policy refold_source "long").
            message.set_raw(name, value)
        else:
            encoded.append(encode_text_header(name, value))
    _fill_body(message, request, holes)
    data = normalise_crlf(message.as_bytes(policy=_POLICY))
    return holes.splice(_insert_headers(data, identity_headers(request, message_id), encoded))


_BASE64_BLOCK = 57 * 1024  # input bytes per block: 1,024 lines of 76 characters (RFC 2045 6.8)


def base64_blocks(content: bytes) -> list[bytes]:
    """``content`` as base64 in CRLF-terminated lines of 76 characters, in blocks of 1,024 lines."""
    view = memoryview(content)
    return [
        base64.encodebytes(view[start : start + _BASE64_BLOCK]).replace(b"\n", b"\r\n")
        for start in range(0, len(content), _BASE64_BLOCK)
    ]


def encode_text(text: str, cte: str) -> bytes:
    """A text part's body as sent: UTF-8, as 7bit or quoted-printable, CRLF line ends, a final CRLF.

    Any line end (CRLF, CR or LF) becomes one CRLF, as the email library does for text parts.
    Quoted-printable lines stay under 77 octets with soft breaks (RFC 2045 6.7).
    """
    data = text.encode("utf-8")
    if b"\r" in data:
        data = _ANY_EOL.sub(b"\n", data)
    if cte == "quoted-printable":
        data = binascii.b2a_qp(data, istext=True)
    data = data.replace(b"\n", b"\r\n")
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def encode_text_header(name: str, value: str) -> bytes:
    """``Name: value`` as RFC 2047 encoded words, folded under 78 columns, CRLF-terminated.

    White space between words is encoded inside the words, so every reader gets ``value`` back.
    """
    words = Header(value, "utf-8", header_name=name, maxlinelen=78).encode(linesep="\r\n")
    return f"{name}: {words}\r\n".encode("ascii")


def identity_headers(request: SendRequest, message_id: str) -> list[tuple[str, tuple[str, ...], str]]:
    """Message-ID, threading and unsubscribe headers as (name, items, separator).

    These hold angle-bracketed ids and URLs, which must reach the reader byte for byte.
    """
    headers: list[tuple[str, tuple[str, ...], str]] = [("Message-ID", (message_id,), " ")]
    if request.in_reply_to is not None:
        headers.append(("In-Reply-To", (request.in_reply_to,), " "))
    # RFC 5322 3.6.4: References is the parent's References plus the parent's id. Without the
    # former, the parent's id alone still lets clients that thread by References find the parent.
    references = request.references or ((request.in_reply_to,) if request.in_reply_to else ())
    if references:
        headers.append(("References", references, " "))
    unsubscribe = request.list_unsubscribe
    if unsubscribe is not None:
        targets = []
        if unsubscribe.url is not None:
            targets.append(f"<{unsubscribe.url}>")
        if unsubscribe.mailto is not None:
            targets.append(f"<mailto:{unsubscribe.mailto}>")
        headers.append(("List-Unsubscribe", tuple(targets), ", "))
        if unsubscribe.url is not None:
            # RFC 8058 3.1: this exact value tells the receiver to POST to the https URL.
            headers.append(("List-Unsubscribe-Post", ("List-Unsubscribe=One-Click",), " "))
    return headers


def fold_items(name: str, items: tuple[str, ...], separator: str, width: int = 78) -> bytes:
    """``Name: item1 item2`` folded only between items, each line CRLF-terminated.

    The email library would turn an unbreakable item longer than a line into RFC 2047 encoded
    words, which breaks ids and URLs (RFC 2047 5: no encoded words in structured fields). Items
    are validated ASCII without white space, so folding between them is always safe; one long
    item keeps its line (at most 998 octets, checked by validation's length limits).
    """
    lines = [f"{name}:"]
    for index, item in enumerate(items):
        piece = item + (separator.rstrip() if index < len(items) - 1 else "")
        if len(lines[-1]) + 1 + len(piece) > width and lines[-1] != f"{name}:":
            lines.append(" " + piece)
        else:
            lines[-1] += " " + piece
    return "\r\n".join(lines).encode("ascii") + b"\r\n"


def _insert_headers(
    data: bytes, headers: list[tuple[str, tuple[str, ...], str]], encoded: Sequence[bytes] = ()
) -> bytes:
    """Add pre-folded header lines (and already encoded ones) at the end of the top-level header block."""
    end = data.index(b"\r\n\r\n") + 2
    block = b"".join(encoded) + b"".join(fold_items(name, items, separator) for name, items, separator in headers)
    return data[:end] + block + data[end:]


_ANY_EOL = re.compile(rb"\r\n|\r|\n")


def crlf_only(data: bytes) -> bool:
    """True when every CR and LF in ``data`` is part of a CRLF pair (counted without copying)."""
    pairs = data.count(b"\r\n")
    return data.count(b"\n") == pairs and data.count(b"\r") == pairs


def normalise_crlf(data: bytes) -> bytes:
    """Every line ending becomes CRLF, and the message ends with one."""
    # The generator already writes CRLF; re-substituting megabytes would only cost memory.
    if not crlf_only(data):
        data = _ANY_EOL.sub(b"\r\n", data)
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def longest_line(data: bytes) -> int:
    """Length in octets of the longest line (without its CRLF); used by tests and sanity checks."""
    return max((len(line) for line in data.split(b"\r\n")), default=0)


def make_message_id(token: str, sender: Address) -> str:
    """A Message-ID whose right-hand side is the sender's domain (so it is unique per domain)."""
    return f"<{token}@{sender.domain_ascii}>"


LINE_LIMIT = _LINE_LIMIT
