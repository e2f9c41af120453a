"""Inline images, custom headers, message ids and List-Unsubscribe: parsed, refused, and built."""

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
from mailcow_smtp_api.core.mime import LINE_LIMIT, build_message, fold_items, longest_line
from mailcow_smtp_api.core.validate import OWNED_HEADERS, cid_references, header_owned

from .test_mime import request

DATE = datetime(2026, 11, 23, 12, 0, 0, tzinfo=timezone.utc)
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
PDF = b"%PDF-1.4\n" + b"x" * 100


def refused(**fields: Any) -> ApiError:
    with pytest.raises(ApiError) as info:
        request(**fields)
    assert info.value.status == 400
    return info.value


def image(cid: str | None = "logo@example.com", **changes: Any) -> dict[str, Any]:
    item: dict[str, Any] = {"filename": "logo.png", "content": base64.b64encode(PNG).decode(), "content_type": "image/png"}
    if cid is not None:
        item["content_id"] = cid
    item.update(changes)
    return item


def pdf() -> dict[str, Any]:
    return {"filename": "a.pdf", "content": base64.b64encode(PDF).decode(), "content_type": "application/pdf"}


def build(req: Any, message_id: str = "<generated@example.com>") -> tuple[bytes, EmailMessage]:
    data = build_message(req, message_id=message_id, date=DATE, extra_headers=(("X-Request-Id", "rid1"),))
    parsed = message_from_bytes(data, policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    assert data.isascii() and longest_line(data) <= LINE_LIMIT
    assert b"\n" not in data.replace(b"\r\n", b"") and b"\r" not in data.replace(b"\r\n", b"")
    return data, parsed


# --------------------------------------------------------------------------- inline images


def test_inline_image_sits_in_related_with_the_html_inside_alternative() -> None:
    """Text + HTML + inline image + attachment: mixed(alternative(text, related(html, image)), pdf)."""
    req = request(html_body='<p>Hi</p><img src="cid:logo@example.com">', attachments=[image(), pdf()])
    data, msg = build(req)
    assert msg.get_content_type() == "multipart/mixed"
    alternative, attachment = msg.iter_parts()
    assert alternative.get_content_type() == "multipart/alternative"
    text, related = alternative.iter_parts()
    assert text.get_content_type() == "text/plain"
    assert related.get_content_type() == "multipart/related"
    assert related.get_param("type") == "text/html"
    html, logo = related.iter_parts()
    assert html.get_content_type() == "text/html" and "cid:logo@example.com" in html.get_content()
    assert logo["Content-ID"] == "<logo@example.com>"
    assert logo.get_content_disposition() == "inline"
    assert logo.get_filename() == "logo.png"
    assert logo.get_payload(decode=True) == PNG
    assert attachment.get_content_type() == "application/pdf"
    assert attachment.get_content_disposition() == "attachment"
    assert b"Content-ID" not in data.split(b"application/pdf", 1)[1]


def test_html_only_with_inline_image_is_related_at_the_top() -> None:
    """Without a text body and attachments, the message itself is the multipart/related."""
    _, msg = build(request(body="", html_body="<img src='cid:a.png'>", attachments=[image("a.png")]))
    assert msg.get_content_type() == "multipart/related"
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/html", "image/png"]


def test_several_inline_parts_keep_their_order() -> None:
    """Two inline images follow the HTML in the order given."""
    html = '<img src="cid:one"><div style="background:url(cid:two)"></div>'
    _, msg = build(request(html_body=html, attachments=[image("one"), image("two", filename="two.png")]))
    related = list(msg.iter_parts())[1]
    assert [p["Content-ID"] for p in list(related.iter_parts())[1:]] == ["<one>", "<two>"]


def test_without_inline_parts_the_structure_is_unchanged() -> None:
    """No content_id: text + HTML stay a plain multipart/alternative (no related level)."""
    _, msg = build(request(html_body="<p>x</p>"))
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]


def test_angle_brackets_in_content_id_are_dropped_and_disposition_defaults_to_inline() -> None:
    """content_id "<x@y>" is stored as x@y; disposition defaults to inline with a content_id."""
    req = request(html_body='<img src="cid:x@y.example">', attachments=[image("<x@y.example>")])
    assert (req.attachments[0].content_id, req.attachments[0].disposition) == ("x@y.example", "inline")
    plain = request(attachments=[pdf()])
    assert (plain.attachments[0].content_id, plain.attachments[0].disposition) == (None, "attachment")


def test_cid_references_are_found_and_percent_decoded() -> None:
    """cid: URLs in attributes, CSS and entities are found once each; %40 decodes to @."""
    html = (
        '<img src="cid:a%40example.com"><img SRC=\'CID:b\'>'
        "<td background=cid:c><p style=\"background:url(&quot;cid:d&quot;)\">x</p><img src=\"cid:b\">"
    )
    assert cid_references(html) == ["a@example.com", "b", "c", "d"]


def test_a_cid_without_a_part_is_refused() -> None:
    """html_body naming cid:missing with no such content_id answers smtp_missing_inline_part."""
    err = refused(html_body='<img src="cid:missing@example.com">', attachments=[pdf()])
    assert (err.code, err.field) == ("smtp_missing_inline_part", "html_body")
    assert "missing@example.com" in err.message


def test_a_part_without_a_cid_is_refused() -> None:
    """An inline part the HTML never references answers smtp_unused_inline_part, naming it."""
    err = refused(html_body="<p>no image</p>", attachments=[pdf(), image("logo@example.com")])
    assert (err.code, err.field) == ("smtp_unused_inline_part", "attachments[1].content_id")
    err = refused(attachments=[image("logo@example.com")])  # no HTML at all
    assert err.code == "smtp_unused_inline_part"


def test_cid_matching_is_exact() -> None:
    """cid:Logo does not match content_id logo: mail clients compare Content-IDs exactly."""
    assert refused(html_body='<img src="cid:Logo">', attachments=[image("logo")]).code == "smtp_missing_inline_part"


@pytest.mark.parametrize(
    "changes",
    [
        {"content_id": ""},
        {"content_id": "a b"},
        {"content_id": "a@b@c"},
        {"content_id": "a>b"},
        {"content_id": "x" * 101},
        {"content_id": 5},
        {"disposition": "attachment"},
        {"disposition": "sideways"},
        {"disposition": 1},
    ],
)
def test_bad_inline_fields_are_invalid_attachments(changes: dict[str, Any]) -> None:
    """Bad content ids and contradictory dispositions answer smtp_invalid_attachment for that field."""
    item = image("ok")
    item.update(changes)
    err = refused(html_body='<img src="cid:ok">', attachments=[item])
    assert err.code == "smtp_invalid_attachment"
    assert err.field is not None and err.field.startswith("attachments[0].")


def test_inline_disposition_needs_a_content_id() -> None:
    """disposition inline without content_id is refused: nothing could show it."""
    err = refused(attachments=[{**pdf(), "disposition": "inline"}])
    assert (err.code, err.field) == ("smtp_invalid_attachment", "attachments[0].disposition")


def test_duplicate_content_ids_are_refused() -> None:
    """Two parts with one content_id (any case) are ambiguous."""
    err = refused(html_body='<img src="cid:a">', attachments=[image("a"), image("A")])
    assert (err.code, err.field) == ("smtp_invalid_attachment", "attachments[1].content_id")


# --------------------------------------------------------------------------- custom headers


def test_custom_headers_arrive_once_and_in_order() -> None:
    """Each custom header is written once with its value; non-ASCII goes out as an encoded word."""
    req = request(headers={"X-Campaign": "spring-2026", "Auto-Submitted": "auto-generated", "X-Note": "Grüße aus Köln"})
    data, msg = build(req)
    assert msg.get_all("X-Campaign") == ["spring-2026"]
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["X-Note"] == "Grüße aus Köln"
    assert b"=?utf-8?" in data
    assert [name for name in msg if name in ("X-Campaign", "Auto-Submitted", "X-Note")] == [
        "X-Campaign",
        "Auto-Submitted",
        "X-Note",
    ]


def test_long_header_value_is_folded_not_truncated() -> None:
    """A 998-character value is folded to short lines and reads back whole."""
    value = " ".join(["word"] * 199)[:998]
    data, msg = build(request(headers={"X-Long": value}))
    assert msg["X-Long"] == value
    assert max(len(line) for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")) <= 78


@pytest.mark.parametrize(
    "name",
    sorted(OWNED_HEADERS)
    + ["FROM", "bcc", "Content-Type", "content-transfer-encoding", "Content-Disposition", "Resent-From",
       "ARC-Seal", "X-Spam-Flag", "X-Rspamd-Score", "X-Request-ID", "Dkim-Signature"],
)
def test_owned_headers_are_refused(name: str) -> None:
    """Headers the service writes, MIME structure, trace and filter headers answer smtp_header_not_allowed."""
    err = refused(headers={name: "x"})
    assert (err.code, err.field) == ("smtp_header_not_allowed", f"headers.{name}")


def test_list_unsubscribe_header_is_free_without_the_helper_and_owned_with_it() -> None:
    """List-Unsubscribe may be given as a header unless the list_unsubscribe field writes it."""
    _, msg = build(request(headers={"List-Unsubscribe": "<mailto:u@example.com>"}))
    assert msg["List-Unsubscribe"] == "<mailto:u@example.com>"
    for name in ("List-Unsubscribe", "list-unsubscribe-post"):
        err = refused(headers={name: "x"}, list_unsubscribe={"mailto": "u@example.com"})
        assert err.code == "smtp_header_not_allowed"
    assert header_owned("List-Unsubscribe", True) and not header_owned("List-Unsubscribe", False)


@pytest.mark.parametrize(
    ("headers", "field"),
    [
        ({"X-A": "line\r\nBcc: x@evil.example"}, "headers.X-A"),
        ({"X-A": "line\nX-B: 1"}, "headers.X-A"),
        ({"X-A": "nul\x00"}, "headers.X-A"),
        ({"X-A": "=?utf-8?q?a=0D=0AX-Evil:_1?="}, "headers.X-A"),
        ({"X-A": "=?utf-8?b?YQ0KWC1FdmlsOiAx?="}, "headers.X-A"),
        ({"X-A": "sep\u2028x"}, "headers.X-A"),
        ({"X-A": ""}, "headers.X-A"),
        ({"X-A": "   "}, "headers.X-A"),
        ({"X-A": 5}, "headers.X-A"),
        ({"X-A": ["list"]}, "headers.X-A"),
        ({"X-A": "v" * 999}, "headers.X-A"),
        ({"X A": "v"}, "headers.X A"),
        ({"X:A": "v"}, "headers.X:A"),
        ({"": "v"}, "headers."),
        ({"X-Ä": "v"}, "headers.X-Ä"),
        ({"X" * 77: "v"}, "headers." + "X" * 77),
        ({"X-A": "1", "x-a": "2"}, "headers.x-a"),
        ({f"X-{i}": "v" for i in range(51)}, "headers"),
        (["X-A", "v"], "headers"),
        ("X-A: v", "headers"),
    ],
)
def test_bad_custom_headers_are_refused(headers: Any, field: str) -> None:
    """Bad names, multi-line or empty values, encoded line breaks, duplicates and too many are smtp_invalid_header."""
    err = refused(headers=headers)
    assert (err.code, err.field) == ("smtp_invalid_header", field)


def test_encoded_line_break_in_subject_is_refused() -> None:
    """An encoded word that decodes to CR LF cannot add a header through the subject either."""
    assert refused(subject="=?utf-8?q?Hi=0D=0ABcc:_x@evil.example?=").code == "smtp_invalid_subject"
    ok = request(subject="=?utf-8?q?Gr=C3=BC=C3=9Fe?=")
    assert ok.subject == "=?utf-8?q?Gr=C3=BC=C3=9Fe?="


_header_names = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126, blacklist_characters=":"), min_size=1, max_size=20)
_values = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=200)


@settings(max_examples=200, deadline=None)
@given(headers=st.dictionaries(_header_names, _values, max_size=5))
def test_no_custom_header_adds_another_header(headers: dict[str, str]) -> None:
    """Whatever header names and values parse, the message has exactly our headers plus those names."""
    try:
        req = request(headers=headers)
    except ApiError:
        return
    _, msg = build(req)
    own = ["from", "to", "subject", "date", "message-id", "mime-version", "content-type", "content-transfer-encoding", "x-request-id"]
    assert sorted(k.lower() for k in msg) == sorted(own + [name.lower() for name in headers])
    for name, value in headers.items():
        assert msg[name].split() == value.split()


# --------------------------------------------------------------------------- message ids


def test_message_id_and_threading_headers_are_written_verbatim() -> None:
    """message_id, in_reply_to and references reach the message byte for byte."""
    long_id = "<" + "a" * 200 + "@example.com>"
    req = request(
        message_id="<invoice-42@example.com>",
        in_reply_to=long_id,
        references=["<first@example.com>", long_id],
    )
    data, msg = build(req, message_id=req.message_id)
    assert msg["Message-ID"] == "<invoice-42@example.com>"
    assert f"In-Reply-To: {long_id}\r\n".encode() in data
    assert msg["References"].split() == ["<first@example.com>", long_id]
    assert b"=?" not in data.split(b"\r\n\r\n", 1)[0]


def test_in_reply_to_alone_is_also_the_references() -> None:
    """Without references, the parent's id is written as References too (clients thread by it)."""
    _, msg = build(request(in_reply_to="<parent@example.com>"))
    assert (msg["In-Reply-To"], msg["References"]) == ("<parent@example.com>", "<parent@example.com>")


def test_references_may_be_one_string() -> None:
    """references as a space-separated string is split into ids."""
    req = request(references="<a@example.com>  <b@example.com>")
    assert req.references == ("<a@example.com>", "<b@example.com>")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("message_id", "no-brackets@example.com"),
        ("message_id", "<no-at>"),
        ("message_id", "<a b@example.com>"),
        ("message_id", "<a@b@example.com>"),
        ("message_id", "<ä@example.com>"),
        ("message_id", "<a@example.com>\r\nBcc: x@evil.example"),
        ("message_id", "<.a@example.com>"),
        ("message_id", "<a@[127.0.0.1]>"),
        ("message_id", "<" + "a" * 240 + "@example.com>"),
        ("message_id", 5),
        ("in_reply_to", "<>"),
        ("references", ["<ok@example.com>", "bad"]),
        ("references", 5),
        ("references", ["<a@example.com>"] * 101),
    ],
)
def test_bad_message_ids_are_refused(field: str, value: Any) -> None:
    """Anything but one ASCII <left@right> id answers smtp_invalid_message_id naming the field."""
    err = refused(**{field: value})
    assert err.code == "smtp_invalid_message_id"
    assert err.field is not None and err.field.startswith(field)


def test_fold_items_breaks_only_between_items() -> None:
    """Folding puts each id whole on a line; a single long id keeps its (long) line."""
    items = tuple(f"<{'r' * 60}{i}@example.com>" for i in range(3))
    folded = fold_items("References", items, " ")
    lines = folded.split(b"\r\n")[:-1]
    assert lines[0].startswith(b"References: <") and all(line.startswith(b" <") for line in lines[1:])
    assert b"".join(line.strip() for line in lines).replace(b"References: ", b"") == "".join(items).encode()
    assert fold_items("Message-ID", ("<" + "a" * 200 + "@x.example>",), " ").count(b"\r\n") == 1


# --------------------------------------------------------------------------- List-Unsubscribe


def test_one_click_unsubscribe_writes_both_headers() -> None:
    """An https url and a mailto give List-Unsubscribe with both, and the RFC 8058 POST header."""
    url = "https://example.com/unsubscribe?u=42&t=" + "0f3a9c" * 30
    req = request(list_unsubscribe={"url": url, "mailto": "mailto:unsubscribe@example.com"})
    data, msg = build(req)
    assert msg["List-Unsubscribe"].split() == [f"<{url}>,", "<mailto:unsubscribe@example.com>"]
    assert f"<{url}>".encode() in data
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_mailto_only_has_no_post_header() -> None:
    """Without an https url there is no one-click POST header."""
    _, msg = build(request(list_unsubscribe={"mailto": "u@example.com"}))
    assert msg["List-Unsubscribe"] == "<mailto:u@example.com>"
    assert msg["List-Unsubscribe-Post"] is None


@pytest.mark.parametrize(
    "value",
    [
        {},
        {"url": None, "mailto": None},
        {"url": "http://example.com/u"},
        {"url": "ftp://example.com/u"},
        {"url": "https:///path-only"},
        {"url": "https://example.com/a b"},
        {"url": "https://example.com/a,b"},
        {"url": "https://example.com/<x>"},
        {"url": "https://example.com/ü"},
        {"url": "https://example.com/\r\nX: y"},
        {"url": "https://example.com/" + "a" * 900},
        {"mailto": "not-an-address"},
        {"mailto": "a@example.com\r\nBcc: x@evil.example"},
        {"other": "x"},
        "https://example.com/u",
        ["https://example.com/u"],
    ],
)
def test_bad_list_unsubscribe_is_refused(value: Any) -> None:
    """Only an https URL without separators and a valid address are accepted."""
    assert refused(list_unsubscribe=value).code == "smtp_invalid_list_unsubscribe"
