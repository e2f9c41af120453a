"""MIME building: re-parse what we wrote with the stdlib parser and check every promise."""

from __future__ import annotations

import base64
from datetime import datetime, timezone
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailcow_smtp_api.core.errors import ApiError
from mailcow_smtp_api.core.mime import (
    LINE_LIMIT,
    build_message,
    build_message_parts,
    crlf_only,
    envelope_for,
    longest_line,
    make_message_id,
)
from mailcow_smtp_api.core.model import CleanPieces
from mailcow_smtp_api.core.validate import parse_request

DATE = datetime(2026, 11, 23, 12, 0, 0, tzinfo=timezone.utc)


def request(**fields: Any) -> Any:
    obj: dict[str, Any] = {
        "from": "sender@example.com",
        "to": ["recipient@example.com"],
        "subject": "Test Email",
        "body": "This is a test email.",
        "password": "pw",
    }
    obj.update(fields)
    return parse_request(obj)


def build(req: Any) -> tuple[bytes, EmailMessage]:
    data = build_message(req, message_id=make_message_id("tok123", req.sender), date=DATE)
    # Parse as a mail client would after the transport's CRLF became local line endings.
    parsed = message_from_bytes(data.replace(b"\r\n", b"\n"), policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    return data, parsed


def assert_wire_clean(data: bytes) -> None:
    """ASCII only, CRLF only, no line over 998 octets."""
    assert data.isascii()
    assert b"\r\n" in data
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert b"\r" not in data.replace(b"\r\n", b"")
    assert longest_line(data) <= LINE_LIMIT


def test_plain_message_has_every_header() -> None:
    """A plain message carries From, To, Subject, Date, Message-ID, MIME-Version and the text."""
    data, msg = build(request())
    assert_wire_clean(data)
    assert msg["From"] == "sender@example.com"
    assert msg["To"] == "recipient@example.com"
    assert msg["Subject"] == "Test Email"
    assert msg["Date"] == "Mon, 23 Nov 2026 12:00:00 +0000"
    assert msg["Message-ID"] == "<tok123@example.com>"
    assert msg["MIME-Version"] == "1.0"
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content() == "This is a test email.\n"


def test_bcc_never_appears_in_headers_but_is_in_the_envelope() -> None:
    """Bcc recipients are in RCPT TO only."""
    req = request(cc=["cc@example.com"], bcc=["hidden@example.net"])
    data, msg = build(req)
    assert b"hidden" not in data
    assert msg["Bcc"] is None
    assert msg["Cc"] == "cc@example.com"
    env = envelope_for(req)
    assert env.sender == "sender@example.com"
    assert env.recipients == ("recipient@example.com", "cc@example.com", "hidden@example.net")


def test_html_and_text_form_multipart_alternative() -> None:
    """body + html_body become multipart/alternative with text first."""
    _, msg = build(request(html_body="<h1>Hello!</h1>"))
    assert msg.get_content_type() == "multipart/alternative"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert parts[1].get_content() == "<h1>Hello!</h1>\n"


def test_html_only_message_is_text_html() -> None:
    """Only html_body gives a single text/html part."""
    _, msg = build(request(body="", html_body="<p>x</p>"))
    assert msg.get_content_type() == "text/html"


def test_attachments_make_multipart_mixed_with_exact_bytes() -> None:
    """Attachments sit in multipart/mixed and decode to the exact bytes sent."""
    payload = bytes(range(256)) * 40
    req = request(
        html_body="<p>x</p>",
        attachments=[
            {"filename": "résumé.pdf", "content": base64.b64encode(payload).decode(), "content_type": "application/pdf"},
            {"filename": "b.txt", "content": base64.b64encode(b"plain").decode()},
        ],
    )
    data, msg = build(req)
    assert_wire_clean(data)
    assert msg.get_content_type() == "multipart/mixed"
    body, first, second = msg.iter_parts()
    assert body.get_content_type() == "multipart/alternative"
    assert first.get_filename() == "résumé.pdf"
    assert first.get_content_type() == "application/pdf"
    assert first.get_payload(decode=True) == payload
    # RFC 2231 parameter on the wire (the parser above already decoded it back).
    assert b"filename*=utf-8''r%C3%A9sum%C3%A9.pdf" in data
    assert second.get_content_type() == "application/octet-stream"
    assert second.get_payload(decode=True) == b"plain"


def test_non_ascii_subject_and_names_are_encoded_words() -> None:
    """Non-ASCII subject and display names go out as RFC 2047 and decode back."""
    req = request(**{"from": '"Doe, Jäne" <jane@example.com>', "subject": "Grüße aus Köln"})
    data, msg = build(req)
    assert_wire_clean(data)
    assert b"=?utf-8?" in data
    assert msg["Subject"] == "Grüße aus Köln"
    assert msg["From"].addresses[0].display_name == "Doe, Jäne"


def test_idn_domains_use_a_labels_in_headers() -> None:
    """A Unicode domain is written as its A-label (no SMTPUTF8)."""
    data, msg = build(request(to=["kunde@bücher.example"]))
    assert b"kunde@xn--bcher-kva.example" in data
    assert msg["To"].addresses[0].domain == "xn--bcher-kva.example"


def test_long_and_unicode_lines_stay_under_the_limit() -> None:
    """A 3000-character line and non-ASCII text are quoted-printable and re-assemble exactly."""
    text = "ä" * 1500 + "\n" + "x" * 3000 + "\n.\n.leading dot\n"
    data, msg = build(request(body=text, html_body="<p>" + "y" * 4000 + "</p>"))
    assert_wire_clean(data)
    parts = list(msg.iter_parts())
    assert parts[0].get_content() == text
    assert parts[0]["Content-Transfer-Encoding"] == "quoted-printable"


def test_reply_to_is_written() -> None:
    """reply_to becomes a Reply-To header."""
    _, msg = build(request(reply_to="Help Desk <help@example.com>"))
    assert msg["Reply-To"] == "Help Desk <help@example.com>"


def test_extra_headers_are_added() -> None:
    """Service-set headers (such as X-Request-Id) appear once."""
    req = request()
    data = build_message(req, message_id="<a@example.com>", date=DATE, extra_headers=(("X-Request-Id", "abc123"),))
    assert message_from_bytes(data, policy=policy.default).get_all("X-Request-Id") == ["abc123"]


_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=300)


@settings(max_examples=150, deadline=None)
@given(subject=_text.filter(lambda s: s.strip()), body=_text.filter(lambda s: s.strip()), name=_text)
def test_no_user_input_adds_or_splits_a_header(subject: str, body: str, name: str) -> None:
    """Whatever subject, body and display name parse, the message has exactly the headers we set."""
    sender = f'"{name}" <s@example.com>' if '"' not in name and "\\" not in name else "s@example.com"
    try:
        req = request(subject=subject, body=body, **{"from": sender})
    except ApiError:
        return  # refused input is test_validate's business
    data, msg = build(req)
    assert_wire_clean(data)
    assert sorted(k.lower() for k in msg.keys()) == sorted(
        ["from", "to", "subject", "date", "message-id", "mime-version", "content-type", "content-transfer-encoding"]
    )
    # Folding may turn runs of white space into one space; the words survive unchanged.
    assert msg["Subject"].split() == subject.split()


@pytest.mark.parametrize("dots", ["\n.\n", "\n..\n", ".\n", "\n.", "\r\n.\r\n"])
def test_lines_of_dots_are_kept_in_the_message(dots: str) -> None:
    """Dot lines stay in the built message (dot-stuffing is the SMTP client's job, on the wire)."""
    req = request(body="a" + dots + "b")
    data, msg = build(req)
    assert msg.get_content() == ("a" + dots + "b").replace("\r\n", "\n") + ("" if (dots + "b").endswith("\n") else "\n")


@pytest.mark.parametrize("name", ["Subject", "0000", "X-T", "X-A-Rather-Long-Header-Name"])
@pytest.mark.parametrize("value", ["0" + "\u0800" * 14 + " \u00a1", "Grüße  aus\tKöln " * 9 + "日本 語", "é " * 60])
def test_spaces_between_encoded_words_survive(name: str, value: str) -> None:
    """Non-ASCII free text keeps every word boundary after RFC 2047 encoding and folding."""
    fields: dict[str, Any] = {"subject": value} if name == "Subject" else {"headers": {name: value}}
    data, msg = build(request(**fields))
    assert_wire_clean(data)
    assert msg[name].split() == value.split()
    assert len(msg.get_all(name)) == 1


# --------------------------------------------------------------------------- attachments in pieces

BLOCK = 57 * 1024  # input bytes per base64 block of 1,024 lines


@pytest.mark.parametrize("size", [0, 1, 2, 3, 56, 57, 58, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5])
def test_attachment_pieces_hold_exact_bytes_in_76_column_lines(size: int) -> None:
    """Every size decodes back to its bytes; every base64 line is 76 columns but the last of a part."""
    content = bytes((i * 7 + size) % 256 for i in range(size))
    req = request(attachments=[{"filename": "a.bin", "content": base64.b64encode(content).decode()}])
    parts = build_message_parts(req, message_id="<m@example.com>", date=DATE)
    # The CleanPieces promise the SMTP client relies on: whole CRLF lines, no bare CR or LF.
    assert isinstance(parts, CleanPieces)
    assert all(piece.endswith(b"\r\n") and crlf_only(piece) for piece in parts)
    data = b"".join(parts)
    assert_wire_clean(data)
    parsed = message_from_bytes(data.replace(b"\r\n", b"\n"), policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    (attachment,) = list(parsed.iter_attachments())
    assert attachment.get_content() == content
    lines = attachment.get_payload().splitlines()
    assert all(len(line) == 76 for line in lines[:-1])
    assert not lines or 0 < len(lines[-1]) <= 76
    assert b"smtpapi-part-" not in data and b"c210cGFwaS1wYXJ0" not in data  # no marker left


def test_pieces_equal_build_message_and_inline_parts_keep_their_place() -> None:
    """An inline image and two attachments: each part gets its own bytes, in document order."""
    image, first, second = b"\x89PNG" * 5000, b"first" * 30000, b"second"
    req = request(
        html_body='<p><img src="cid:logo"></p>',
        attachments=[
            {"filename": "one.txt", "content": base64.b64encode(first).decode(), "content_type": "text/plain"},
            {"filename": "logo.png", "content": base64.b64encode(image).decode(), "content_type": "image/png", "content_id": "logo"},
            {"filename": "two.txt", "content": base64.b64encode(second).decode(), "content_type": "text/plain"},
        ],
    )
    parts = build_message_parts(req, message_id="<m@example.com>", date=DATE)
    assert len(parts) > 4  # the large attachment is cut into blocks, not joined
    data = b"".join(parts)
    parsed = message_from_bytes(data.replace(b"\r\n", b"\n"), policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    related = next(p for p in parsed.walk() if p.get_content_type() == "multipart/related")
    inline = [p for p in related.iter_parts() if p.get_content_type() == "image/png"]
    assert [p.get_content() for p in inline] == [image]
    assert [(a.get_filename(), a.get_content()) for a in parsed.iter_attachments()] == [
        ("one.txt", first.decode()),
        ("two.txt", second.decode()),
    ]


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(
        alphabet=st.sampled_from(["a", " ", "\t", "=", ".", "\u00e9", "\u65e5", "\U0001f600", "\n", "\r", "-"]),
        min_size=1,
        max_size=1200,
    ).filter(lambda t: t.strip()),
    html=st.booleans(),
)
def test_text_bodies_round_trip_in_their_transfer_encoding(text: str, html: bool) -> None:
    """Whatever the text, the reader decodes it back (line ends as LF) and no wire line is over 78."""
    req = request(body="", html_body=text) if html else request(body=text)
    parts = build_message_parts(req, message_id="<m@example.com>", date=DATE)
    assert all(piece.endswith(b"\r\n") and crlf_only(piece) for piece in parts)  # the CleanPieces promise
    data, msg = build(req)
    assert_wire_clean(data)
    assert max(len(line) for line in data.split(b"\r\n")) <= 78
    part = msg.get_body(("html",) if html else ("plain",))
    assert part is not None
    expected = text.replace("\r\n", "\n").replace("\r", "\n")
    # base64 carries text in its canonical form (CRLF, RFC 2045 6.8), which readers turn into LF.
    assert part.get_content().replace("\r\n", "\n") == (expected if expected.endswith("\n") else expected + "\n")


@pytest.mark.parametrize(
    ("text", "cte"),
    [
        ("a" * 78 + "\n", "7bit"),
        ("a" * 79 + "\n", "quoted-printable"),
        ("short\n" + "b" * 78 + "\nend\n", "7bit"),
        ("short\n" + "b" * 79 + "\nend\n", "quoted-printable"),
        ("short\n" + "c" * 79, "quoted-printable"),
        ("x\n" * 3, "7bit"),
        ("caf\u00e9\n", "quoted-printable"),
    ],
)
def test_text_goes_7bit_only_when_ascii_with_lines_of_at_most_78(text: str, cte: str) -> None:
    """The transfer encoding of a text part follows its longest line, first and last lines included."""
    _data, msg = build(request(body=text))
    assert msg["Content-Transfer-Encoding"] == cte
