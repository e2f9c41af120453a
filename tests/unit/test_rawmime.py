"""A caller's own message: normalised, Bcc removed, refused when it could not be sent as written."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailcow_smtp_api.core.errors import ApiError
from mailcow_smtp_api.core.rawmime import parse_raw_message, parse_raw_request, raw_message_data
from mailcow_smtp_api.core.validate import ParsePolicy

DATE = datetime(2026, 12, 2, 9, 0, tzinfo=timezone.utc)


def test_every_line_end_becomes_crlf_and_bcc_goes_with_its_continuation() -> None:
    raw = parse_raw_message(b"From: a@example.org\rBcc: x@example.net,\n y@example.net\r\nSubject: s\n\nbody\rend")
    assert raw.data == b"From: a@example.org\r\nSubject: s\r\n\r\nbody\r\nend\r\n"
    assert raw.header_from.wire == "a@example.org"
    assert (raw.subject, raw.message_id, raw.has_date) == ("s", None, False)


def test_a_message_without_body_is_a_header_alone() -> None:
    raw = parse_raw_message(b"From: a@example.org\r\nDate: Tue, 1 Dec 2026 10:00:00 +0000\r\n")
    assert raw.data == b"From: a@example.org\r\nDate: Tue, 1 Dec 2026 10:00:00 +0000\r\n"
    assert raw.has_date


def test_the_service_writes_only_missing_fields_above_the_callers_header() -> None:
    raw = parse_raw_message(b"From: a@example.org\r\n\r\nx\r\n")
    data = b"".join(raw_message_data(raw, message_id="<id@example.org>", date=DATE, extra_headers=(("X-Request-Id", "r1"),)))
    assert data == (
        b"Message-ID: <id@example.org>\r\nDate: Wed, 02 Dec 2026 09:00:00 +0000\r\nX-Request-Id: r1\r\n"
        b"From: a@example.org\r\n\r\nx\r\n"
    )
    own = parse_raw_message(b"Message-ID: <m@example.org>\r\nDate: x\r\nFrom: a@example.org\r\n\r\nx\r\n")
    assert b"".join(raw_message_data(own, message_id="<other@x>", date=DATE)) == own.data


@pytest.mark.parametrize(
    "message",
    [
        b" continuation first\r\nFrom: a@example.org\r\n\r\nx",
        b"From a@example.org Mon Dec  1 00:00:00 2026\r\nFrom: a@example.org\r\n\r\nx",
        b"From: a@example.org\r\nno colon here\r\n\r\nx",
        b"From: a@example.org\r\nSubject: \xe2\x82\xac\r\n\r\nx",
        b"From: a@example.org\r\n\r\nnul \x00 byte",
        b"From: a@example.org\r\nSubject: a\r\nsubject: b\r\n\r\nx",
        b"From: a@example.org\r\nMessage-ID: not an id\r\n\r\nx",
        b"To: b@example.org\r\n\r\nx",
        b"From: a@example.org\r\n\r\n" + b"y" * 999,
    ],
)
def test_what_cannot_go_out_as_written_is_refused(message: bytes) -> None:
    with pytest.raises(ApiError) as caught:
        parse_raw_message(message)
    assert caught.value.code in ("smtp_invalid_raw_message", "smtp_invalid_message_id")
    assert caught.value.status == 400


def test_a_998_octet_line_is_fine() -> None:
    assert parse_raw_message(b"From: a@example.org\r\n\r\n" + b"y" * 998).data.endswith(b"y" * 998 + b"\r\n")


@given(st.binary(max_size=400))
def test_anything_accepted_is_clean_crlf_lines_of_at_most_998_octets_without_bcc(body: bytes) -> None:
    message = b"From: a@example.org\r\nBcc: x@example.net\r\n\r\n" + body
    try:
        raw = parse_raw_message(message)
    except ApiError:
        assert b"\x00" in body or any(len(line) > 998 for line in body.splitlines())
        return
    assert raw.data.endswith(b"\r\n")
    lines = raw.data[:-2].split(b"\r\n")
    assert all(b"\r" not in line and b"\n" not in line and len(line) <= 998 for line in lines)
    assert not any(line.lower().startswith(b"bcc:") for line in lines[: lines.index(b"")])


def test_the_raw_request_takes_the_envelope_and_the_header_from() -> None:
    import base64

    message = base64.b64encode(b"From: Boss <boss@example.org>\r\n\r\nx").decode()
    request = parse_raw_request({"message": message, "envelope": {"to": ["r@example.com"]}, "password": "pw"})
    assert (request.sender.wire, request.login, [a.wire for a in request.to]) == ("boss@example.org", "boss@example.org", ["r@example.com"])
    request = parse_raw_request(
        {"message": message, "envelope": {"from": "bounce@example.org", "to": ["r@example.com"]}, "password": "pw"}
    )
    assert (request.sender.wire, request.raw.header_from.wire if request.raw else "") == ("bounce@example.org", "boss@example.org")
    with pytest.raises(ApiError) as caught:
        parse_raw_request({"message": message, "envelope": {"to": ["r@example.com"] * 3}, "password": "pw"}, ParsePolicy(max_recipients=2))
    assert (caught.value.code, caught.value.field) == ("smtp_too_many_recipients", "envelope.to")
    with pytest.raises(ApiError) as caught:
        parse_raw_request({"message": message, "envelope": {"to": ["r@example.com"], "cc": []}, "password": "pw"})
    assert (caught.value.code, caught.value.field) == ("smtp_unknown_field", "envelope.cc")
    with pytest.raises(ApiError) as caught:
        parse_raw_request({"message": message, "envelope": {"to": ["r@example.com"]}})
    assert (caught.value.code, caught.value.field) == ("smtp_auth_required", "password")
