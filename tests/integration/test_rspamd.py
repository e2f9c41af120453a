"""rspamd, the filter mailcow runs, scores a corpus of messages our MIME generator builds.

Every message the corpus holds is built as the service builds it (``build_message``) and scored
by a real rspamd from Debian's package with its network checks off (tests/rspamd.py). No symbol
may add to the score, except the few that judge what the caller chose to send rather than how
the message was put together; each of those is expected by name, on the one message that earns it.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import pytest

from mailcow_smtp_api.core.mime import build_message, make_message_id
from mailcow_smtp_api.core.validate import parse_request

from ..rspamd import Rspamd, running_rspamd

pytestmark = pytest.mark.integration

DATE = datetime.now(timezone.utc)  # rspamd scores a Date far from its own clock
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d4944415478da63f8cfc0f01f0005000201a5d8e8c40000000049454e44ae426082"
)
PDF = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
TEXT = "Hello,\n\nyour order 1234 has shipped today and will arrive on Friday.\n\nKind regards,\nThe shop\n"
HTML = (
    "<html><body><p>Hello,</p><p>your order 1234 has shipped today and will arrive on Friday.</p>"
    "<p>Kind regards,<br>The shop</p></body></html>"
)
GERMAN = "Hallo Jörg,\n\ndeine Bestellung 1234 ist heute verschickt worden und kommt am Freitag an.\n\nGrüße aus Köln\n"
RUSSIAN = "Здравствуйте! Ваш заказ 1234 отправлен сегодня и прибудет в пятницу. С уважением, магазин.\n" * 20


def attachment(name: str, content: bytes, content_type: str, **extra: Any) -> dict[str, Any]:
    return {"filename": name, "content": base64.b64encode(content).decode(), "content_type": content_type, **extra}


def fits_one_line(spec: str) -> str:
    """A named address of 75 characters: the length the email library folds right after the colon."""
    name = "Customer Service Department of the Example Shop Limited Company"[: 75 - len(spec) - 3].rstrip()
    return f"{name} <{spec}>"


# name -> (request fields, the positive symbols that message is expected to earn)
CORPUS: dict[str, tuple[dict[str, Any], frozenset[str]]] = {
    "plain": ({}, frozenset()),
    # The caller sent no text body: rspamd prefers a text alternative (MIME_HTML_ONLY, 0.2).
    "html only": ({"body": "", "html_body": HTML}, frozenset({"MIME_HTML_ONLY"})),
    "alternative": ({"html_body": HTML}, frozenset()),
    "inline image": (
        {
            "html_body": HTML.replace("</body>", '<img src="cid:logo@shop.example.com" alt="logo"></body>'),
            "attachments": [attachment("logo.png", PNG, "image/png", content_id="logo@shop.example.com")],
        },
        frozenset(),
    ),
    "text attachments": (
        {
            "attachments": [
                attachment("notes.txt", b"first line\nsecond line\n", "text/plain"),
                attachment("orders.csv", b"id,item,amount\n" + b"1234,widget,%s\n" % (b"9" * 100), "text/csv"),
                attachment("readme.txt", "Grüße aus Köln\n".encode(), "text/plain"),
            ]
        },
        frozenset(),
    ),
    "binary attachments": (
        {"attachments": [attachment("invoice.pdf", PDF, "application/pdf"), attachment("logo.png", PNG, "image/png")]},
        frozenset(),
    ),
    # 8-bit text of unknown charset keeps base64: its bytes are not UTF-8 (MIME_BASE64_TEXT, 0.1).
    "latin-1 text attachment": (
        {"attachments": [attachment("alt.txt", "Grüße aus Köln\n".encode("latin-1"), "text/plain")]},
        frozenset({"MIME_BASE64_TEXT"}),
    ),
    "non-ascii names and body": (
        {
            "from": '"Jörg Müller-Lüdenscheidt, Versandabteilung der Firma" <sender@example.com>',
            "to": ["Zoë Ångström-Þórsdóttir <zoe@example.org>"],
            "subject": "Deine Bestellung ist unterwegs – Grüße aus Köln",
            "body": GERMAN,
            "html_body": "<p>" + GERMAN.replace("\n\n", "</p><p>") + "</p>",
            "attachments": [attachment("Übersicht.pdf", PDF, "application/pdf")],
        },
        frozenset(),
    ),
    # Mostly 8-bit text, where base64 is far shorter than quoted-printable (MIME_BASE64_TEXT, 0.1).
    "cyrillic body": ({"subject": "Ваш заказ отправлен", "body": RUSSIAN}, frozenset({"MIME_BASE64_TEXT"})),
    "long display names": (
        {
            "from": fits_one_line("sender@example.com"),
            "to": [fits_one_line("customer@example.org"), '"Doe, Jane" <jane@example.org>'],
            "cc": [fits_one_line("copy@example.org")],
            "reply_to": fits_one_line("replies@example.com"),
        },
        frozenset(),
    ),
    "long quoted display names": (
        {
            "from": '"Shop, Example: Customer Service Department of the Example Shop Limited" <sender@example.com>',
            "to": ['"Doe, Jane Mary Elizabeth Catherine Annabelle Longname" <jane@example.org>'],
            "cc": ['"Roe, Richard (Accounts Payable, Head Office Building Number Two)" <r@example.org>'],
            "reply_to": '"Shop, Example: Replies to the Customer Service Department" <replies@example.com>',
        },
        frozenset(),
    ),
    "headers and threading": (
        {
            "subject": "Re: Your order 1234 has shipped today and will arrive on Friday, as promised",
            "headers": {"X-Order-Id": "1234", "Auto-Submitted": "auto-replied", "X-Campaign": "Spätsommer"},
            "in_reply_to": "<order-1234@shop.example.com>",
            "list_unsubscribe": {"url": "https://example.com/unsubscribe?u=42", "mailto": "unsubscribe@example.com"},
        },
        frozenset(),
    ),
}


def corpus_request(fields: dict[str, Any]) -> Any:
    obj: dict[str, Any] = {
        "from": "Example Shop <sender@example.com>",
        "to": ["Jane Doe <jane@example.org>"],
        "subject": "Your order 1234 has shipped",
        "body": TEXT,
        "password": "pw",
    }
    obj.update(fields)
    return parse_request(obj)


@pytest.fixture(scope="module")
def rspamd() -> Iterator[Rspamd]:
    """One rspamd for this module's tests."""
    with running_rspamd() as daemon:
        yield daemon


# rspamd 3.4's chartable module carries state from one scan to the next: the "text attachments"
# message scores nothing when it is the first one a worker scans, and R_MIXED_CHARSET (+5.0) for
# the same bytes once a message with an image part was scanned before it. It judges the words of
# the text, not how the message is built, and cannot be pinned to one message here.
STATEFUL_CONTENT_SYMBOLS = frozenset({"R_MIXED_CHARSET"})


@pytest.mark.parametrize("case", list(CORPUS))
def test_rspamd_finds_nothing_to_score_in_how_the_message_is_built(rspamd: Rspamd, case: str) -> None:
    """Only the symbols a message is expected to earn for what the caller sent score above zero."""
    fields, expected = CORPUS[case]
    request = corpus_request(fields)
    raw = build_message(
        request, message_id=make_message_id("corpus-1", request.sender), date=DATE, extra_headers=(("X-Request-Id", "0123abcd"),)
    )
    envelope = {"From": request.sender.wire, "Rcpt": ",".join(a.wire for a in request.recipients())}
    verdict = rspamd.check(raw, envelope)
    symbols = verdict["symbols"]
    positive = {
        name: entry["score"]
        for name, entry in symbols.items()
        if entry["score"] > 0 and name not in STATEFUL_CONTENT_SYMBOLS
    }
    assert set(positive) == expected, f"{case}: {positive}\n{raw.decode()[:3000]}"
    assert all(score <= 0.2 for score in positive.values()), positive
    # The verdict is real: rspamd parsed the message's MIME structure.
    assert "MIME_TRACE" in symbols
