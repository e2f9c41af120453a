"""How the message is put together, where spam filters look: header folding, transfer encodings,
MIME-Version. Each rule here is one that rspamd (mailcow's filter) scores when it is broken;
tests/integration/test_rspamd.py asks rspamd itself about a corpus of such messages."""

from __future__ import annotations

import base64
import re
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from email.header import decode_header, make_header
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailcow_smtp_api.core.errors import ApiError
from mailcow_smtp_api.core.mime import attachment_encoding, blank, date_header, transfer_encoding
from mailcow_smtp_api.core.validate import parse_address

from .test_mime import build, request

LONG_NAME = "A Rather Long Display Name For The Sender Of This Very Message"


def one_line_address(spec: str, quoted: bool = False) -> str:
    """A named address of about 75 characters: too long for the header's first line, short enough
    for a line of its own, which is where the email library folds it (right after the colon)."""
    room = 75 - len(spec) - 3 - (2 if quoted else 0)
    name = "Long Display Name For Replies To Go To Somewhere Far Away From Here"[:room].rstrip()
    return f'"{name}" <{spec}>' if quoted else f"{name} <{spec}>"


def header_blocks(data: bytes) -> list[list[bytes]]:
    """The header block of the message and of every MIME part, as lists of physical lines."""
    blocks = []
    top, _, _ = data.partition(b"\r\n\r\n")
    blocks.append(top.split(b"\r\n"))
    for boundary in re.findall(rb'boundary="([^"]+)"', top + data):
        for part in data.split(b"--" + boundary + b"\r\n")[1:]:
            blocks.append(part.partition(b"\r\n\r\n")[0].split(b"\r\n"))
    return blocks


def empty_first_lines(data: bytes) -> list[bytes]:
    """Header fields whose first line holds nothing after the colon (``Name:`` CRLF SP value)."""
    found = []
    for lines in header_blocks(data):
        for line in lines:
            name, colon, rest = line.partition(b":")
            if colon and not line[:1].isspace() and not rest.strip():
                found.append(name)
    return found


def display_name(data: bytes, name: str) -> str:
    """The display name of the one address in header ``name``, decoded as RFC 2047 6.2 says:
    white space between two adjacent encoded words is dropped (Python's address parser keeps it)."""
    head = data.partition(b"\r\n\r\n")[0].decode("ascii").replace("\r\n ", " ")
    value = re.search(rf"^{name}: (.*)$", head, re.MULTILINE)
    assert value is not None
    text = str(make_header(decode_header(value.group(1))))
    phrase = text.rpartition(" <")[0]
    if phrase.startswith('"') and phrase.endswith('"'):
        phrase = re.sub(r"\\(.)", r"\1", phrase[1:-1])
    return phrase


# --------------------------------------------------------------------------- folding


@pytest.mark.parametrize(
    "field",
    [
        {"from": one_line_address("sender@example.com")},
        {"to": [one_line_address("r@example.org", quoted=True)]},
        {"cc": [one_line_address("c@example.org")]},
        {"reply_to": one_line_address("replies@example.com")},
        {"from": f'"{LONG_NAME}" <sender@example.com>'},
        {"from": f"{LONG_NAME} <sender@example.com>"},
        {"to": [f'"Doe, {LONG_NAME}" <r@example.org>']},
        {"cc": [f"{LONG_NAME} <c@example.org>", f"{LONG_NAME} Again <d@example.org>"]},
        {"reply_to": f'"{LONG_NAME}" <replies@example.com>'},
        {"reply_to": "Jörg Müller-Lüdenscheidt aus der Abteilung für sehr lange Namen <r@example.com>"},
        {"from": '"Zoë Ångström-Þórsdóttir, Leiterin der Abteilung für Namen" <sender@example.com>'},
        {"subject": "x" * 90},
        {"subject": "Averyveryverylongwordthatgoesonandonandonforever " * 3},
        {"headers": {"X-" + "N" * 70: "value " * 20}},
        {"headers": {"X-" + "N" * 70: "Wörter " * 20}},
    ],
)
def test_no_header_is_folded_right_after_its_colon(field: dict[str, Any]) -> None:
    """A header too long for one line is folded inside its value, never before the first word:
    rspamd scores an empty first line (HEADER_FROM_EMPTY_DELIMITER and its kin, 1.0 each)."""
    data, msg = build(request(**field))
    assert empty_first_lines(data) == []
    assert data.isascii()
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    key = next(iter(field))
    name = {"from": "From", "to": "To", "cc": "Cc", "reply_to": "Reply-To", "subject": "Subject"}.get(key)
    if name in ("From", "To", "Cc", "Reply-To"):
        given_names = field[key] if isinstance(field[key], list) else [field[key]]
        wanted = [parse_address(value, key, "smtp_invalid_from").display_name for value in given_names]
        assert [a.display_name.split() for a in msg[name].addresses] == [w.split() for w in wanted]
        if len(wanted) == 1:
            assert display_name(data, name) == wanted[0]


@settings(max_examples=150, deadline=None)
@given(
    name=st.text(
        alphabet=st.sampled_from(["a", "B", " ", ",", ".", "'", "-", "\u00e9", "\u65e5", "(", "@", "x"]), min_size=1, max_size=120
    ),
    subject=st.text(alphabet=st.sampled_from(["s", " ", "\u00fc", "-", "="]), min_size=1, max_size=200),
)
def test_display_names_and_subjects_keep_their_text_and_a_first_word(name: str, subject: str) -> None:
    """Whatever the display name and subject, each header keeps its first word on its own line and
    reads back as written (folding may only merge runs of spaces)."""
    try:
        req = request(subject=subject, **{"from": f'"{name}" <sender@example.com>', "cc": [f'"{name}" <c@example.org>']})
    except ApiError:
        return  # refused input is test_validate's business
    data, msg = build(req)
    assert empty_first_lines(data) == []
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    assert display_name(data, "From") == req.sender.display_name
    assert display_name(data, "Cc") == req.cc[0].display_name
    assert msg["Subject"].split() == req.subject.split()


def test_ascii_text_is_never_sent_as_encoded_words() -> None:
    """A long ASCII word stays as it is: rspamd scores needless encoding (SUBJ_EXCESS_QP, 1.2)."""
    data, msg = build(request(subject="x" * 90 + " and more", **{"from": f'"{LONG_NAME}, Esq." <sender@example.com>'}))
    assert b"=?" not in data
    assert msg["Subject"] == "x" * 90 + " and more"


# --------------------------------------------------------------------------- transfer encodings


def attachment(content: bytes, content_type: str = "text/plain", name: str = "notes.txt") -> dict[str, Any]:
    return {"filename": name, "content": base64.b64encode(content).decode(), "content_type": content_type}


@pytest.mark.parametrize(
    ("content", "content_type", "cte", "charset"),
    [
        (b"line one\nline two\n", "text/plain", "7bit", None),
        (b"line one\r\nline two", "text/csv", "7bit", None),
        (b"a,b\n" + b"x" * 200 + b"\n", "text/csv", "quoted-printable", None),
        (b"trailing space \nnext\n", "text/plain", "quoted-printable", None),
        ("Grüße aus Köln\n".encode(), "text/plain", "quoted-printable", "utf-8"),
        ("Привет, мир! ".encode() * 200, "text/plain", "base64", "utf-8"),
        ("caf\u00e9\n".encode("latin-1"), "text/plain", "base64", None),  # 8-bit, charset unknown
        (b"nul\x00byte\n", "text/plain", "base64", None),
        (b"lone\rcr\n", "text/plain", "base64", None),
        (b"\x89PNG\r\n\x1a\n", "image/png", "base64", None),
        (b"plain ascii", "application/pdf", "base64", None),
    ],
)
def test_attachments_are_base64_only_when_their_bytes_need_it(
    content: bytes, content_type: str, cte: str, charset: str | None
) -> None:
    """Text attachments go 7bit or quoted-printable when their content allows it (rspamd scores ASCII
    text in base64 as MIME_BASE64_TEXT_BOGUS, 1.0); binary data and text that needs it stay base64.
    Each reads back byte for byte (text in its canonical CRLF form)."""
    assert attachment_encoding(content_type, content) == (cte, charset)
    data, msg = build(request(attachments=[attachment(content, content_type)]))
    (part,) = list(msg.iter_attachments())
    assert part["Content-Transfer-Encoding"] == cte
    assert part.get_content_charset() == charset
    decoded = part.get_payload(decode=True)
    assert isinstance(decoded, bytes)
    if cte == "base64":
        assert decoded == content
    else:
        assert decoded.replace(b"\r\n", b"\n") == content.replace(b"\r\n", b"\n")
    assert max(len(line) for line in data.split(b"\r\n")) <= 78


@settings(max_examples=200, deadline=None)
@given(content=st.binary(max_size=300) | st.text(max_size=300).map(lambda t: t.encode("utf-8")))
def test_text_attachments_read_back_as_sent(content: bytes) -> None:
    """Any bytes as a text/plain attachment read back exactly (line ends as the reader keeps them)."""
    data, msg = build(request(attachments=[attachment(content)]))
    (part,) = list(msg.iter_attachments())
    decoded = part.get_payload(decode=True)
    assert isinstance(decoded, bytes)
    if part["Content-Transfer-Encoding"] == "base64":
        assert decoded == content
    else:
        assert decoded.replace(b"\r\n", b"\n") == content.replace(b"\r\n", b"\n")
    assert data.isascii()
    assert max(len(line) for line in data.split(b"\r\n")) <= 998


@pytest.mark.parametrize(
    ("text", "cte"),
    [
        ("Grüße aus München, schöne Grüße!\n" * 40, "quoted-printable"),  # mostly ASCII
        ("Привет!\n", "quoted-printable"),  # base64 is shorter, but by a few bytes only
        ("Привет, как дела? Это тестовое сообщение.\n" * 40, "base64"),  # mostly 8-bit, a third shorter
        ("日本語のテキスト。" * 200, "base64"),
        ("plain ascii\n" * 200, "7bit"),
    ],
)
def test_text_bodies_use_quoted_printable_unless_base64_is_clearly_shorter(text: str, cte: str) -> None:
    """A non-ASCII body is quoted-printable unless it is mostly 8-bit and base64 is clearly shorter."""
    assert transfer_encoding(text.encode("utf-8")) == cte
    _data, msg = build(request(body=text))
    assert msg["Content-Transfer-Encoding"] == cte
    assert msg.get_content().replace("\r\n", "\n") == (text if text.endswith("\n") else text + "\n")


# --------------------------------------------------------------------------- MIME-Version


@pytest.mark.parametrize(
    "fields",
    [
        {"attachments": [attachment(b"\x00\x01", "application/octet-stream", "a.bin")]},
        {"html_body": "<p>Hi</p>", "attachments": [attachment(b"hello\n")]},
        {
            "html_body": '<p><img src="cid:logo"></p>',
            "attachments": [{**attachment(b"\x89PNG", "image/png", "logo.png"), "content_id": "logo"}],
        },
    ],
)
def test_only_the_message_itself_carries_mime_version(fields: dict[str, Any]) -> None:
    """RFC 2045 4: MIME-Version is a header of the message, never of one of its parts."""
    data, msg = build(request(**fields))
    assert msg["MIME-Version"] == "1.0"
    assert data.count(b"MIME-Version:") == 1
    assert all("MIME-Version" not in part for part in msg.walk() if part is not msg)


_OLD_LONG_LINE = re.compile(rb"\n[^\n]{79}")
_OLD_TRAILING_SPACE = re.compile(rb"[ \t](?:\n|\Z)")


def _fits_7bit_by_patterns(data: bytes) -> bool:
    """What a 7bit body must be, written as regular expressions over the whole body."""
    lines_short = re.match(rb"[^\n]{0,78}(?:\n|\Z)", data) is not None and _OLD_LONG_LINE.search(data) is None
    return lines_short and b"\r" not in data and b"\0" not in data and _OLD_TRAILING_SPACE.search(data) is None


@given(st.lists(st.sampled_from([b"a", b" ", b"\t", b"\n", b"\r", b"\0", b"x" * 38, b"x" * 39, b"x" * 40, b"\xc3\xa9"]), max_size=60))
def test_the_7bit_decision_is_the_one_the_patterns_give(pieces: list[bytes]) -> None:
    """Short lines, no CR or NUL, no white space at any line's end (or the end): 7bit; the fast
    checks decide as the regular expressions over the whole body would."""
    data = b"".join(pieces)
    assert (transfer_encoding(data) == "7bit") == (data.isascii() and _fits_7bit_by_patterns(data)), data


@pytest.mark.parametrize(
    ("data", "seven_bit"),
    [
        (b"", True),
        (b"x" * 78, True),
        (b"x" * 79, False),
        (b"x" * 78 + b"\n", True),
        (b"x" * 79 + b"\n", False),
        (b"ok\n" + b"x" * 78 + b"\nok\n", True),
        (b"ok\n" + b"x" * 79 + b"\nok\n", False),
        (b"ok\n" + b"x" * 79, False),
        (b"x" * 77 + b" \nok\n", False),
        (b"ok\n" + b"x" * 77 + b"\t\nok\n", False),
        (b"ok\n" + b"x" * 77 + b" ", False),
        (b"ok \n", False),
        (b" ok\n", True),
        (b"\n\n\n", True),
        (b"\n \n", False),
        (b"ok\t", False),
        (b"ok\n\t", False),
        (b"ok\r\n", False),
        (b"ok\n\0\n", False),
    ],
)
def test_the_7bit_decision_at_its_edges(data: bytes, seven_bit: bool) -> None:
    """Lines of 78 and 79 bytes, white space at the end of the first, a middle and the last line."""
    assert (transfer_encoding(data) == "7bit") is seven_bit
    assert _fits_7bit_by_patterns(data) is seven_bit


@given(st.text(alphabet=st.sampled_from(["a", " ", "\t", "\n", "\r", "\u2003", "\u00a0", "\x1c", "\u200b"]), max_size=12))
def test_blank_is_not_strip(text: str) -> None:
    """``blank`` answers as ``not text.strip()`` does, Unicode white space included."""
    assert blank(text) == (not text.strip())


# --------------------------------------------------------------------------- Date


@given(
    st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1)),
    st.one_of(st.none(), st.integers(min_value=-14 * 60, max_value=14 * 60).map(lambda m: timezone(timedelta(minutes=m)))),
)
def test_the_date_header_is_the_librarys_text(moment: datetime, zone: timezone | None) -> None:
    """Kept for the second it names, the text is still the library's for every date and zone."""
    date = moment.replace(tzinfo=zone)
    assert date_header(date) == f"Date: {format_datetime(date)}\r\n".encode("ascii")


def test_one_instant_in_two_zones_keeps_both_texts() -> None:
    """Equal instants compare equal; a zone's text never answers for another zone's."""
    utc = datetime(2026, 12, 2, 14, 0, 0, 250_000, tzinfo=timezone.utc)
    berlin = utc.astimezone(timezone(timedelta(hours=1)))
    assert utc == berlin
    assert date_header(utc) == b"Date: Wed, 02 Dec 2026 14:00:00 +0000\r\n"
    assert date_header(berlin) == b"Date: Wed, 02 Dec 2026 15:00:00 +0100\r\n"
    assert date_header(utc.replace(microsecond=999_999)) == b"Date: Wed, 02 Dec 2026 14:00:00 +0000\r\n"
