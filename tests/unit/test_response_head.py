"""The API's HTTP channel writes a response's status line and headers as twisted.web does, byte for byte.

``CodedHTTPChannel.writeHeaders`` hands the transport one string instead of twisted.web's piece per
name, separator and value; what reaches the wire, header injection attempts included, must not change.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.testing import StringTransport
from twisted.web import http
from twisted.web.http_headers import Headers

from mailcow_smtp_api.web.api import CodedHTTPChannel

names = st.from_regex(rb"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,30}", fullmatch=True)  # tokens: Headers refuses others
values = st.one_of(st.binary(min_size=1, max_size=40), st.sampled_from([b"a\r\nSet-Cookie: x=1", b"b\rc", b"d\ne", b" padded "]))


def wire(channel: http.HTTPChannel, headers: object) -> bytes:
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.writeHeaders(b"HTTP/1.1", b"200", b"OK", headers)
    return bytes(transport.value())


fields = st.tuples(st.sampled_from([b"Content-Type", b"x-request-id", b"X-A"]) | names, st.lists(values, min_size=1, max_size=3))


@settings(max_examples=200, deadline=None)
@given(st.lists(fields, max_size=6))
def test_the_head_is_byte_for_byte_twisted_webs(pairs: list[tuple[bytes, list[bytes]]]) -> None:
    """Any names and values, with CR and LF in them or not, give the same bytes as twisted.web's channel."""
    headers = Headers()
    for name, given_values in pairs:
        headers.setRawHeaders(name, given_values)
    ours = wire(CodedHTTPChannel(), headers)
    assert ours == wire(http.HTTPChannel(), headers)
    assert ours.startswith(b"HTTP/1.1 200 OK\r\n") and ours.endswith(b"\r\n\r\n")
    assert b"\nSet-Cookie" not in ours  # injected lines stay inside their value


def test_pairs_instead_of_headers_are_sanitized_as_twisted_web_does() -> None:
    """The old form, an iterable of name and value pairs, still goes through twisted.web's own path."""
    pairs = [(b"X-One", b"1\r\nInjected: yes"), (b"X-Two", b"2")]
    ours = wire(CodedHTTPChannel(), pairs)
    assert ours == wire(http.HTTPChannel(), pairs)
    assert b"\r\nInjected" not in ours
