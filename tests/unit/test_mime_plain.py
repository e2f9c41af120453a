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


def _both(req: Any) -> tuple[bytes, bytes]:
    """The library's layout and the direct one, with placeholders of the same token."""
    library, direct = mime._Placeholders(), mime._Placeholders()
    direct._token = library._token
    return mime._library_layout(req, library), mime._plain_text_layout(req, direct)


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
    built = mime.build_message(req, message_id="<m@example.com>", date=mime.datetime(2026, 1, 2, 3, 4, 5))
    real = mime._only_plain_text
    try:
        mime._only_plain_text = lambda request: False  # type: ignore[assignment]
        through_library = mime.build_message(req, message_id="<m@example.com>", date=mime.datetime(2026, 1, 2, 3, 4, 5))
    finally:
        mime._only_plain_text = real  # type: ignore[assignment]
    assert built == through_library
