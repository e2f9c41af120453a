"""The direct layout of a one-part text/plain message gives the email library's bytes for every request it takes.

``build_message_parts`` writes a message that is only a text body itself; every other message
(HTML, attachments, inline parts) goes through the library. These properties compare both ways
of laying the message out on the same request, byte for byte, and check that the choice follows
the request's shape.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from mailcow_smtp_api.core import mime
from mailcow_smtp_api.core.errors import ApiError
from mailcow_smtp_api.core.validate import parse_request

# Any text a JSON body can carry (no lone surrogates), weighted towards what changes the encoding:
# long lines, trailing white space, CR and LF in every combination, 8-bit characters.
_pieces = st.sampled_from(["a", "Z", " ", "\t", "=", ".", "-", "\n", "\r", "\r\n", "é", "日", "\U0001f600", "x" * 80])
_body = st.one_of(
    st.lists(_pieces, min_size=1, max_size=60).map("".join),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=400),
)


def _request(**fields: Any) -> Any:
    obj: dict[str, Any] = {"from": "sender@example.com", "to": ["r@example.com"], "subject": "s", "password": "pw"}
    obj.update(fields)
    return parse_request(obj)


def _both(req: Any, extra: tuple[tuple[str, str], ...] = ()) -> tuple[bytes, bytes]:
    """The whole message laid out by the library and directly (same id, date and extra headers)."""
    date = mime.datetime(2026, 1, 2, 3, 4, 5)
    direct = mime.build_message(req, message_id="<m@example.com>", date=date, extra_headers=extra)
    real = mime._only_plain_text
    try:
        mime._only_plain_text = lambda request: False  # type: ignore[assignment]
        through_library = mime.build_message(req, message_id="<m@example.com>", date=date, extra_headers=extra)
    finally:
        mime._only_plain_text = real  # type: ignore[assignment]
    return through_library, direct


@settings(max_examples=400, deadline=None)
@given(body=_body)
def test_a_text_body_is_laid_out_as_the_library_does(body: str) -> None:
    """For any text body without HTML or attachments, the direct bytes equal the library's."""
    try:
        req = _request(body=body)
    except ApiError:
        return  # refused input is validation's business
    if not mime._only_plain_text(req):
        return  # a body of white space only: the library path
    library, direct = _both(req)
    assert direct == library


@settings(max_examples=100, deadline=None)
@given(body=_body, subject=st.text(min_size=1, max_size=100), html=st.booleans(), attach=st.booleans())
def test_whole_messages_are_the_same_either_way(body: str, subject: str, html: bool, attach: bool) -> None:
    """Only a text body alone takes the direct path; its whole message, headers and spliced body
    included, is then what the library path gives."""
    fields: dict[str, Any] = {"body": body, "subject": subject}
    if html:
        fields["html_body"] = "<p>hi</p>"
    if attach:
        fields["attachments"] = [{"filename": "a.txt", "content": "aGk=", "content_type": "text/plain"}]
    try:
        req = _request(**fields)
    except ApiError:
        return
    assert mime._only_plain_text(req) == (bool(body.strip()) and not html and not attach)
    if not mime._only_plain_text(req):
        return  # the library path itself (its multipart boundaries are random)
    through_library, built = _both(req)
    assert built == through_library


@settings(max_examples=100, deadline=None)
@given(
    body=_body,
    threaded=st.booleans(),
    unsubscribe=st.booleans(),
    custom=st.dictionaries(st.sampled_from(["X-Campaign", "X-Mailer", "Keywords"]), st.text(min_size=1, max_size=90), max_size=2),
)
def test_identity_and_extra_headers_sit_where_the_library_puts_them(
    body: str, threaded: bool, unsubscribe: bool, custom: dict[str, str]
) -> None:
    """Threading, unsubscribe, the caller's and the service's headers: the same bytes either way."""
    fields: dict[str, Any] = {"body": body, "headers": custom}
    if threaded:
        fields["in_reply_to"] = "<parent@example.com>"
        fields["references"] = ["<root@example.com>", "<parent@example.com>"]
    if unsubscribe:
        fields["list_unsubscribe"] = {"url": "https://example.com/u?id=1", "mailto": "u@example.com"}
    try:
        req = _request(**fields)
    except ApiError:
        return
    if not mime._only_plain_text(req):
        return
    through_library, built = _both(req, (("X-Request-Id", "0123456789abcdef"),))
    assert built == through_library
    assert b"List-Unsubscribe" in built if unsubscribe else b"List-Unsubscribe" not in built
