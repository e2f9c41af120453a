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


# RFC 5322 3.2.3: what an atom may hold; a display name of such words needs no quotes.
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")
# A single space between two other characters: where a header may be folded (RFC 5322 2.2.3)
# and unfolded to the same text. A run of spaces stays inside one word.
_FOLD_POINT = re.compile(r"(?<! ) (?! )")
# RFC 2047 5 (3): the characters a 'Q' encoded word in a phrase carries as they are.
_Q_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!*+-/")
_ENCODED_LINE = 76  # RFC 2047 2: a line holding encoded words is at most 76 characters
_WORD_LIMIT = 75  # RFC 2047 2: an encoded word is at most 75 characters
_WORD_OVERHEAD = len("=?utf-8?q??=")


def _q_char(char: str) -> str:
    return "".join("_" if b == 0x20 else chr(b) if b in _Q_SAFE else f"={b:02X}" for b in char.encode("utf-8"))


def encoded_words(text: str, first: int, rest: int = _WORD_LIMIT) -> list[str]:
    """``text`` as RFC 2047 encoded words in UTF-8: 'Q' when that is shorter, else 'B'.

    The first word is at most ``first`` characters long (it shares its line with the header's
    name; at least one character goes into it), the others at most ``rest``. A character is never
    split between two words (RFC 2047 5). White space is encoded inside the words, and a word
    ends after a space where it can: readers that wrongly keep the folding white space between
    two encoded words (Python's address parser does) then only double a space.
    """
    use_q = sum(len(_q_char(char)) for char in text) <= (len(text.encode("utf-8")) + 2) // 3 * 4

    def size(chars: list[str]) -> int:
        if use_q:
            return sum(len(_q_char(char)) for char in chars)
        return (len("".join(chars).encode("utf-8")) + 2) // 3 * 4

    words: list[list[str]] = []
    room = first - _WORD_OVERHEAD
    current: list[str] = []
    for char in text:
        while current and size([*current, char]) > room:
            space = max((i for i, c in enumerate(current) if c == " "), default=-1)
            cut = space + 1 if 0 < space + 1 < len(current) else len(current)
            words.append(current[:cut])
            current, room = current[cut:], rest - _WORD_OVERHEAD
        current.append(char)
    words.append(current)
    if use_q:
        return ["=?utf-8?q?" + "".join(map(_q_char, word)) + "?=" for word in words]
    return ["=?utf-8?b?" + base64.b64encode("".join(word).encode("utf-8")).decode("ascii") + "?=" for word in words]


def _phrase(display_name: str, first: int) -> list[str]:
    """A display name as the words of an RFC 5322 phrase: atoms as they are, else one quoted
    string (cut at its single spaces, where folding keeps it intact), else encoded words."""
    if not display_name.isascii():
        return encoded_words(display_name, first)
    words = display_name.split(" ")
    if all(_ATOM.fullmatch(word) for word in words):
        return words
    quoted = '"' + display_name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return _FOLD_POINT.split(quoted)


def address_header(name: str, addresses: Sequence[Address]) -> bytes:
    """``Name: addr, addr`` folded between words at 76 columns, each line CRLF-terminated.

    The first word is always on the header's own line: folding right after the colon leaves the
    first line empty, which rspamd scores (HEADER_FROM_EMPTY_DELIMITER and its kin, 1.0 each).
    Headers carry the A-label domain: without SMTPUTF8 a raw UTF-8 domain is not allowed there.
    """
    words: list[str] = []
    for index, address in enumerate(addresses):
        spec = f"{address.local}@{address.domain_ascii}"
        first = _ENCODED_LINE - len(name) - 2 if index == 0 else _WORD_LIMIT
        part = [*_phrase(address.display_name, first), f"<{spec}>"] if address.display_name else [spec]
        if index < len(addresses) - 1:
            part[-1] += ","
        words.extend(part)
    return fold_items(name, tuple(words), " ", width=_ENCODED_LINE)


def date_header(date: datetime) -> bytes:
    """``Date: Wed, 02 Dec 2026 14:21:11 +0000`` and CRLF, as the email library formats ``date``."""
    return f"Date: {_formatted_date(date.replace(microsecond=0), date.tzinfo)}\r\n".encode("ascii")


@functools.lru_cache(maxsize=4)
def _formatted_date(second: datetime, zone: object) -> str:
    # Messages built in the same second share the text (the library takes about 10 us to make it).
    # The zone is part of the key: equal instants in two zones compare equal but read differently.
    return format_datetime(second)


def text_header(name: str, value: str) -> bytes:
    """Free text ``Name: value`` (RFC 5322 unstructured), folded, never with an empty first line.

    ASCII is folded at its spaces and never encoded (rspamd scores needless encoded words,
    SUBJ_EXCESS_QP and SUBJ_EXCESS_BASE64); only a word too long for any line, or non-ASCII
    text, goes out as RFC 2047 encoded words.
    """
    if value.isascii():
        folded = fold_items(name, tuple(word for word in _FOLD_POINT.split(value) if word), " ")
        if longest_line(folded) <= _LINE_LIMIT:
            return folded
    return encode_text_header(name, value)


def _text_headers(cte: str, subtype: str, top: bool) -> list[tuple[str, str]]:
    """The MIME headers of a UTF-8 text part, in order; the top-level message also has MIME-Version."""
    headers = [("Content-Type", f'text/{subtype}; charset="utf-8"'), ("Content-Transfer-Encoding", cte)]
    return [*headers, ("MIME-Version", "1.0")] if top else headers


def _set_text(part: MIMEPart, marker: str, cte: str, subtype: str, top: bool = True) -> None:
    """Make ``part`` a UTF-8 text part holding ``marker``, the way the library's set_content would.

    Its headers are stored as written (the library would parse each one it sets, and parse
    Content-Type again to add the charset); the top-level message also gets its MIME-Version.
    """
    for name, value in _text_headers(cte, subtype, top):
        part.set_raw(name, value)
    part.set_payload(marker)


def _text_body(value: str, holes: _Placeholders) -> tuple[str, str]:
    """A body text's stand-in (with a final line end) and its transfer encoding."""
    data, cte = _body_text(value)
    return holes.text(data, cte), cte


def _only_plain_text(request: SendRequest) -> bool:
    """The message is one text/plain part: a text body, no HTML, no attachments of any kind."""
    return not blank(request.body) and blank(request.html_body) and not request.attachments


def blank(text: str) -> bool:
    """True for an empty or all-white-space text: ``not text.strip()`` without a copy of a body."""
    return not text or text.isspace()


def _plain_text_message(top: bytes, request: SendRequest, message_id: str) -> CleanPieces:
    """What the email library generates for a message that is one text/plain part, written directly.

    The library stores the part's headers as given (``set_raw``) and, as each is shorter than a
    line, writes each as ``Name: value`` and CRLF; the identity headers follow them, then the
    empty line and the encoded body (no stand-in to splice: the body is the last piece). Only
    used where ``_only_plain_text`` holds; tests compare its bytes with the library path's for
    any such request.
    """
    data, cte = _body_text(request.body)
    head = "".join(f"{name}: {value}\r\n" for name, value in _text_headers(cte, "plain", True)).encode("ascii")
    identity = _folded_headers(identity_headers(request, message_id))
    return CleanPieces((top + head + identity + b"\r\n", encode_text(data, cte)))


def _library_layout(request: SendRequest, holes: _Placeholders) -> bytes:
    """The MIME structure and its headers as the email library lays them out, CRLF line ends."""
    message = EmailMessage(policy=_BUILD_POLICY)
    _fill_body(message, request, holes)
    _drop_inner_mime_version(message)
    return normalise_crlf(message.as_bytes(policy=_POLICY))


# A line after a line end that is too long (79 bytes or more) or ends in white space, in one scan
# of each line (a search only tries where a "\n" is): up to 78 bytes taken without giving any
# back, then one more byte (too long) or, at the line's end, a space or tab just before it.
_LONG_OR_BLANK_ENDED_LINE = re.compile(rb"\n[^\n]{0,78}+(?:[^\n]|(?<=[ \t]))")
_HIGH_BYTES = bytes(range(128, 256))
BASE64_SAVING = 1024


def transfer_encoding(data: bytes) -> str:
    """How a text part is sent whose bytes (LF line ends) are ``data``: 7bit, quoted-printable or base64.

    7bit when it is ASCII with lines of at most 78 characters and no white space at a line's
    end; else quoted-printable, which keeps it readable with short lines. base64 only when the
    content is mostly non-ASCII and base64 is clearly shorter than quoted-printable (by a third,
    and by at least ``BASE64_SAVING`` bytes): rspamd scores any base64 text part
    (MIME_BASE64_TEXT, and MIME_BASE64_TEXT_BOGUS when it is ASCII), so base64 is the
    exception, taken where it saves much of the message's size.
    """
    if data.isascii():
        return "7bit" if _fits_7bit(data) else "quoted-printable"
    high = len(data) - len(data.translate(None, _HIGH_BYTES))
    if high * 2 > len(data):
        quoted = len(data) + 2 * high  # every 8-bit byte becomes =XX
        encoded = (len(data) + 2) // 3 * 4 * 78 // 76  # 76 columns and a CRLF per line
        if encoded * 3 <= quoted * 2 and quoted - encoded >= BASE64_SAVING:
            return "base64"
    return "quoted-printable"


def _fits_7bit(data: bytes) -> bool:
    """ASCII ``data`` can go as it is: short lines, no CR, no NUL, nothing a transport would strip."""
    if b"\r" in data or b"\0" in data:
        return False
    first = data.find(b"\n")
    first = len(data) if first < 0 else first
    # The first line here, every later one (the last included) in the pattern's single pass:
    # a substring search for " \n" would cost as much as that whole pass again.
    if first > 78 or data[first - 1 : first] in (b" ", b"\t"):
        return False
    return _LONG_OR_BLANK_ENDED_LINE.search(data) is None


def _body_text(text: str) -> tuple[bytes, str]:
    """A body text's bytes (``_lf_utf8``, with a final line end) and its transfer encoding."""
    data = _lf_utf8(_ensure_final_newline(text))
    return data, transfer_encoding(data)


def _lf_utf8(text: str) -> bytes:
    """``text`` in UTF-8 with every line end (CRLF, CR or LF) one LF, as the email library reads a text part."""
    data = text.encode("utf-8")
    return _ANY_EOL.sub(b"\n", data) if b"\r" in data else data


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

    def text(self, data: bytes, cte: str) -> str:
        """A stand-in for a body text's ``data`` (``_lf_utf8``), to be sent as ``cte`` (see ``encode_text``)."""
        marker = self._marker("text")
        # An ASCII word needs no transfer encoding: the library writes the marker as it is.
        self._bodies.append((marker.encode("ascii"), lambda: [encode_text(data, cte)]))
        return marker + "\n"

    def text_bytes(self, content: bytes, cte: str) -> bytes:
        """A stand-in for a text attachment's ``content``, to be sent as ``cte`` (7bit or quoted-printable)."""
        marker = self._marker("textpart")
        # The library writes an ASCII word under either encoding as it is.
        self._bodies.append((marker.encode("ascii"), lambda: encode_text_bytes(content, cte)))
        return marker.encode("ascii")

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

    if not blank(request.body):
        _set_text(message, *_text_body(request.body, holes), "plain")
        if not blank(request.html_body):
            message.make_alternative()
            html_part = EmailMessage(policy=message.policy)
            _set_text(html_part, *_text_body(request.html_body, holes), "html", top=False)
            message.attach(html_part)
            _add_inline_parts(html_part, request.attachments, holes)
    else:
        _set_text(message, *_text_body(request.html_body, holes), "html")
        _add_inline_parts(message, request.attachments, holes)
    for attachment in request.attachments:
        if attachment.inline:
            continue
        maintype, subtype = attachment.content_type.split("/", 1)
        content, cte, params = _attachment_body(attachment, holes)
        # Filenames go out as RFC 2231 parameters when they are not ASCII (the policy does this).
        message.add_attachment(
            content,
            maintype=maintype,
            subtype=subtype,
            filename=attachment.filename,
            cte=cte,
            params=params,
        )


def _attachment_body(attachment: Attachment, holes: _Placeholders) -> tuple[bytes, str, dict[str, str]]:
    """The stand-in, transfer encoding and Content-Type parameters of an attachment's part."""
    cte, charset = attachment_encoding(attachment.content_type, attachment.content)
    params = {"charset": charset} if charset else {}
    if cte == "base64":
        return holes.binary(attachment.content), cte, params
    return holes.text_bytes(attachment.content, cte), cte, params


def _add_inline_parts(html_part: MIMEPart, attachments: tuple[Attachment, ...], holes: _Placeholders) -> None:
    """Turn the HTML part into multipart/related holding the HTML first, then each inline part."""
    inline = [a for a in attachments if a.inline]
    for attachment in inline:
        maintype, subtype = attachment.content_type.split("/", 1)
        content, cte, params = _attachment_body(attachment, holes)
        html_part.add_related(
            content,
            maintype=maintype,
            subtype=subtype,
            cid=f"<{attachment.content_id}>",
            filename=attachment.filename,
            disposition="inline",
            cte=cte,
            params=params,
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
    top: list[bytes] = []
    for name, group in (
        ("From", (request.sender,)),
        ("To", request.to),
        ("Cc", request.cc),
        ("Reply-To", (request.reply_to,) if request.reply_to is not None else ()),
    ):
        if group:
            top.append(address_header(name, group))
    top.append(date_header(date))
    # The caller's headers follow the service's own; the trusted extra headers come last.
    for name, value in (("Subject", request.subject), *request.headers, *extra_headers):
        top.append(text_header(name, value))
    # The email library lays out the MIME structure and its headers; the fields above are
    # written here, where none of them is folded right after its colon. A message of one
    # text/plain part gets the library's bytes without the library (a third of its build time).
    if _only_plain_text(request):
        return _plain_text_message(b"".join(top), request, message_id)
    holes = _Placeholders()
    data = b"".join(top) + _library_layout(request, holes)
    return holes.splice(_insert_headers(data, identity_headers(request, message_id)))


def _drop_inner_mime_version(message: EmailMessage) -> None:
    """RFC 2045 4: MIME-Version belongs to the message's header only. The library writes one on
    every part it makes with ``add_attachment`` and its kin."""
    for part in message.walk():
        if part is not message and "MIME-Version" in part:
            del part["MIME-Version"]


_BASE64_BLOCK = 57 * 1024  # input bytes per block: 1,024 lines of 76 characters (RFC 2045 6.8)


def base64_blocks(content: bytes) -> list[bytes]:
    """``content`` as base64 in CRLF-terminated lines of 76 characters, in blocks of 1,024 lines."""
    view = memoryview(content)
    return [
        base64.encodebytes(view[start : start + _BASE64_BLOCK]).replace(b"\n", b"\r\n")
        for start in range(0, len(content), _BASE64_BLOCK)
    ]


def encode_text(data: bytes, cte: str) -> bytes:
    """A text part's body as sent: ``data`` (``_lf_utf8``: UTF-8, LF line ends) as 7bit,
    quoted-printable or base64, CRLF line ends, a final CRLF.

    Each line end becomes one CRLF, as the email library does for text parts. Quoted-printable
    lines stay under 77 octets with soft breaks (RFC 2045 6.7).
    """
    if cte == "base64":
        # RFC 2045 6.8: text is encoded in its canonical form, with CRLF line ends.
        return b"".join(base64_blocks(data.replace(b"\n", b"\r\n")))
    if cte == "quoted-printable":
        data = binascii.b2a_qp(data, istext=True)
    data = data.replace(b"\n", b"\r\n")
    return data if data.endswith(b"\r\n") else data + b"\r\n"


_TEXT_BLOCK = 64 * 1024


def encode_text_bytes(content: bytes, cte: str) -> list[bytes]:
    """A text attachment as sent: 7bit or quoted-printable, CRLF line ends, in blocks of whole lines.

    ``content`` has LF or CRLF line ends and no other CR (see ``attachment_encoding``). Each
    block ends with CRLF; that of the last block is the boundary's own line break, so content
    without a final line end reads back without one.
    """
    data = content.replace(b"\r\n", b"\n") if b"\r" in content else content
    blocks: list[bytes] = []
    start = 0
    while start < len(data):
        cut = data.find(b"\n", start + _TEXT_BLOCK)
        stop = len(data) if cut < 0 else cut + 1
        block = data[start:stop]
        if cte == "quoted-printable":
            block = binascii.b2a_qp(block, istext=True)
        blocks.append(block.replace(b"\n", b"\r\n"))
        start = stop
    # Every piece is whole lines: a last line without its line end takes the boundary's.
    if blocks and not blocks[-1].endswith(b"\r\n"):
        blocks[-1] += b"\r\n"
    else:
        blocks.append(b"\r\n")
    return blocks


def attachment_encoding(content_type: str, content: bytes) -> tuple[str, str | None]:
    """The transfer encoding and charset of an attachment (or inline part).

    Binary types stay base64. Text goes as 7bit or quoted-printable when its bytes allow it
    (see ``transfer_encoding``): ASCII needs no charset, UTF-8 is labelled as such. Text with
    NUL bytes, a lone CR, or 8-bit bytes that are not UTF-8 (whose charset is unknown) needs
    base64 to arrive byte for byte.
    """
    if not content_type.startswith("text/") or b"\0" in content:
        return "base64", None
    lf_only = content.replace(b"\r\n", b"\n") if b"\r" in content else content
    if b"\r" in lf_only:
        return "base64", None
    charset = None
    if not lf_only.isascii():
        try:
            lf_only.decode("utf-8")
        except UnicodeDecodeError:
            return "base64", None
        charset = "utf-8"
    return transfer_encoding(lf_only), charset


def encode_text_header(name: str, value: str) -> bytes:
    """``Name: value`` as RFC 2047 encoded words, folded under 76 columns, CRLF-terminated.

    White space between words is encoded inside the words, so every reader gets ``value`` back.
    """
    words = encoded_words(value, _ENCODED_LINE - len(name) - 2)
    return fold_items(name, tuple(words), " ", width=_ENCODED_LINE)


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


def _folded_headers(headers: list[tuple[str, tuple[str, ...], str]]) -> bytes:
    """(name, items, separator) headers as their folded lines (``fold_items``), one after another."""
    return b"".join(fold_items(name, items, separator) for name, items, separator in headers)


def _insert_headers(data: bytes, headers: list[tuple[str, tuple[str, ...], str]]) -> bytes:
    """Add folded header lines at the end of the top-level header block."""
    end = data.index(b"\r\n\r\n") + 2
    return data[:end] + _folded_headers(headers) + data[end:]


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
