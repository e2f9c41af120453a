"""Request parsing: every field, every error code, and the tricks that must not get through."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailcow_smtp_api.core.errors import ApiError
from mailcow_smtp_api.core.validate import ParsePolicy, parse_address, parse_json, parse_request


def base(**changes: Any) -> dict[str, Any]:
    request: dict[str, Any] = {
        "from": "sender@example.com",
        "to": ["recipient@example.com"],
        "subject": "Test Email",
        "body": "This is a test email.",
        "password": "secret-pw",
    }
    for key, value in changes.items():
        if value is ...:
            request.pop(key, None)
        else:
            request[key] = value
    return request


def error_of(obj: dict[str, Any], policy: ParsePolicy | None = None) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse_request(obj, policy)
    return info.value


def test_minimal_request_parses_with_login_defaulting_to_from() -> None:
    """A request with the four required fields and a password parses; smtp_user defaults to from."""
    request = parse_request(base())
    assert request.sender.wire == "sender@example.com"
    assert [a.wire for a in request.to] == ["recipient@example.com"]
    assert request.login == "sender@example.com"
    assert request.password == "secret-pw"
    assert "secret-pw" not in repr(request)


def test_app_password_is_another_name_for_password() -> None:
    """app_password is accepted in place of password."""
    request = parse_request(base(password=..., app_password="app-secret"))
    assert request.password == "app-secret"


def test_two_different_passwords_are_refused() -> None:
    """password and app_password with different values are ambiguous."""
    err = error_of(base(app_password="other"))
    assert (err.code, err.field) == ("smtp_invalid_field", "app_password")


@pytest.mark.parametrize("value", [..., None, ""])
def test_missing_password_is_auth_required(value: Any) -> None:
    """No password at all answers smtp_auth_required."""
    err = error_of(base(password=value))
    assert (err.code, err.status) == ("smtp_auth_required", 400)


def test_password_may_be_optional_when_policy_says_so() -> None:
    """A policy can allow requests without password (the trusted internal port-25 mode)."""
    policy = ParsePolicy(password_optional=lambda port: port == 25)
    assert parse_request(base(password=..., smtp_port=25), policy).password is None
    assert error_of(base(password=..., smtp_port=587), policy).code == "smtp_auth_required"


def test_unknown_field_is_named() -> None:
    """A typo such as htmlbody is refused and named, not silently dropped."""
    err = error_of(base(htmlbody="<p>x</p>"))
    assert (err.code, err.field, err.status) == ("smtp_unknown_field", "htmlbody", 400)
    assert "htmlbody" in err.message


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [
        ("from", ..., "smtp_invalid_from"),
        ("from", "", "smtp_invalid_from"),
        ("from", "not-an-address", "smtp_invalid_from"),
        ("from", "a@b@example.com", "smtp_invalid_from"),
        ("from", "a@example.com, b@example.com", "smtp_invalid_from"),
        ("from", ["a@example.com"], "smtp_invalid_from"),
        ("from", "a@[127.0.0.1]", "smtp_invalid_from"),
        ("from", '"quoted local"@example.com', "smtp_invalid_from"),
        ("from", "a@localhost", "smtp_invalid_from"),
        ("from", "a@example.com\r\nBcc: x@evil.example", "smtp_invalid_from"),
        ("from", "müller@example.com", "smtp_invalid_from"),
        ("from", "group: a@example.com;", "smtp_invalid_from"),
        ("to", ..., "smtp_missing_recipients"),
        ("to", [], "smtp_missing_recipients"),
        ("to", "recipient@example.com", "smtp_invalid_recipient"),
        ("to", ["bad"], "smtp_invalid_recipient"),
        ("to", [42], "smtp_invalid_recipient"),
        ("to", ["x@example.com\nBcc: y@example.com"], "smtp_invalid_recipient"),
        ("cc", ["bad"], "smtp_invalid_cc"),
        ("cc", "a@example.com", "smtp_invalid_cc"),
        ("bcc", ["bad"], "smtp_invalid_bcc"),
        ("reply_to", "bad", "smtp_invalid_reply_to"),
        ("reply_to", ["a@example.com"], "smtp_invalid_reply_to"),
        ("subject", ..., "smtp_empty_subject"),
        ("subject", "   ", "smtp_empty_subject"),
        ("subject", "a\r\nBcc: x@example.com", "smtp_invalid_subject"),
        ("subject", "a\x00b", "smtp_invalid_subject"),
        ("subject", "a\u2028b", "smtp_invalid_subject"),
        ("subject", 5, "smtp_invalid_field"),
        ("body", 5, "smtp_invalid_field"),
        ("body", "a\x00b", "smtp_invalid_field"),
        ("html_body", ["x"], "smtp_invalid_field"),
        ("smtp_port", "587", "smtp_invalid_field"),
        ("smtp_port", True, "smtp_invalid_field"),
        ("smtp_port", 0, "smtp_invalid_field"),
        ("smtp_port", 65536, "smtp_invalid_field"),
        ("smtp_port", 10**100, "smtp_invalid_field"),
        ("smtp_port", 587.0, "smtp_invalid_field"),
        ("smtp_host", "", "smtp_invalid_field"),
        ("smtp_host", "a b", "smtp_invalid_field"),
        ("smtp_host", 1, "smtp_invalid_field"),
        ("smtp_user", "nobody", "smtp_invalid_smtp_user"),
        ("password", 123, "smtp_invalid_field"),
        ("password", "a\x00b", "smtp_invalid_field"),
        ("attachments", {"filename": "a"}, "smtp_invalid_attachment"),
    ],
)
def test_each_bad_field_has_its_code(field: str, value: Any, code: str) -> None:
    """Every invalid field answers its documented code with HTTP 400 and names the field."""
    err = error_of(base(**{field: value}))
    assert err.code == code
    assert err.status == 400
    assert err.field is not None and err.field.split("[")[0] in (field, "to", "password")


def test_empty_body_and_html_is_refused() -> None:
    """At least one of body / html_body must have content."""
    assert error_of(base(body="  \n")).code == "smtp_empty_body"
    assert error_of(base(body=...)).code == "smtp_empty_body"


def test_html_only_is_enough() -> None:
    """html_body alone satisfies the body requirement."""
    request = parse_request(base(body=..., html_body="<p>Hi</p>"))
    assert (request.body, request.html_body) == ("", "<p>Hi</p>")


def test_line_endings_are_normalised() -> None:
    """CRLF and bare CR in bodies become LF (the message is written with CRLF later)."""
    request = parse_request(base(body="a\r\nb\rc\nd"))
    assert request.body == "a\nb\nc\nd"


def test_display_names_and_idn_domains() -> None:
    """Display names with commas parse as one address; IDN domains get an A-label for the wire."""
    request = parse_request(base(**{"from": '"Doe, Jane" <jane@bücher.example>', "to": ["Zoë <z@EXAMPLE.org>"]}))
    assert request.sender.display_name == "Doe, Jane"
    assert request.sender.wire == "jane@xn--bcher-kva.example"
    assert request.sender.addr_spec == "jane@bücher.example"
    assert request.to[0].display_name == "Zoë"
    assert request.to[0].wire == "z@example.org"


def test_smtp_user_overrides_login_and_is_lowercased() -> None:
    """smtp_user names the mailbox login; logins compare case-insensitively."""
    request = parse_request(base(smtp_user="User1@Example.COM"))
    assert request.login == "user1@example.com"


def test_recipient_limit_counts_all_lists() -> None:
    """to + cc + bcc together are limited."""
    policy = ParsePolicy(max_recipients=3)
    obj = base(to=["a@example.com", "b@example.com"], cc=["c@example.com"], bcc=["d@example.com"])
    err = error_of(obj, policy)
    assert err.code == "smtp_too_many_recipients"


def test_recipients_are_deduplicated_case_insensitively_for_the_envelope() -> None:
    """The same address in to, cc and bcc (any case) is one envelope recipient."""
    request = parse_request(base(to=["A@example.com"], cc=["a@EXAMPLE.com"], bcc=["a@example.com", "b@example.com"]))
    assert [a.wire for a in request.recipients()] == ["A@example.com", "b@example.com"]


def attachment(**changes: Any) -> dict[str, Any]:
    item: dict[str, Any] = {
        "filename": "document.pdf",
        "content": base64.b64encode(b"%PDF-1.4 test").decode(),
        "content_type": "application/pdf",
    }
    for key, value in changes.items():
        if value is ...:
            item.pop(key)
        else:
            item[key] = value
    return item


def test_attachment_decodes() -> None:
    """A valid attachment decodes to its bytes with its MIME type."""
    request = parse_request(base(attachments=[attachment()]))
    assert request.attachments[0].content == b"%PDF-1.4 test"
    assert request.attachments[0].content_type == "application/pdf"


def test_attachment_type_defaults_to_octet_stream() -> None:
    """Without content_type the attachment is application/octet-stream."""
    request = parse_request(base(attachments=[attachment(content_type=...)]))
    assert request.attachments[0].content_type == "application/octet-stream"


@pytest.mark.parametrize(
    "changes",
    [
        {"filename": ...},
        {"filename": ""},
        {"filename": "../etc/passwd"},
        {"filename": "a\\b"},
        {"filename": ".."},
        {"filename": "a\r\nX: y"},
        {"filename": "a\x00.pdf"},
        {"filename": " lead.pdf"},
        {"filename": "x" * 256},
        {"content": "not base64!"},
        {"content": "QUJD\nREVG"},
        {"content": "QUJ"},
        {"content": 5},
        {"content": ...},
        {"content_type": "pdf"},
        {"content_type": "text/plain\r\nX: y"},
        {"content_type": "text/plain; charset=utf-8"},
        {"extra": 1},
    ],
)
def test_bad_attachments_are_refused(changes: dict[str, Any]) -> None:
    """Unsafe file names, non-strict base64, bad MIME types and unknown keys are smtp_invalid_attachment."""
    err = error_of(base(attachments=[attachment(**changes)]))
    assert err.code == "smtp_invalid_attachment"
    assert err.field is not None and err.field.startswith("attachments[0]")


def test_attachment_count_is_limited() -> None:
    """More attachments than allowed are refused before decoding them."""
    err = error_of(base(attachments=[attachment()] * 3), ParsePolicy(max_attachments=2))
    assert err.code == "smtp_too_many_attachments"


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b"[]",
        b'"text"',
        b"42",
        b"null",
        b'{"a": 1, "a": 2}',
        b'{"x": NaN}',
        b'{"x": Infinity}',
        b"\xff\xfe{}",
        b'{"from": "\xc3"}',
        b"[" * 100000,
    ],
)
def test_bad_json_is_refused(raw: bytes) -> None:
    """Anything but one strict JSON object in UTF-8 is smtp_invalid_json."""
    with pytest.raises(ApiError) as info:
        parse_json(raw)
    assert (info.value.code, info.value.status) == ("smtp_invalid_json", 400)


def test_json_object_parses() -> None:
    """A JSON object comes back as a dict."""
    assert parse_json(b'{"a": [1, "\xc3\xa9"]}') == {"a": [1, "é"]}


def test_parse_address_rejects_encoded_word_tricks() -> None:
    """An encoded word cannot smuggle a second address or a line break into an address."""
    with pytest.raises(ApiError):
        parse_address("=?utf-8?q?a=0D=0ABcc:_x@evil.example?= <a@example.com>", "to", "smtp_invalid_recipient")
    parsed = parse_address("=?utf-8?q?Bob?= <bob@example.com>", "to", "smtp_invalid_recipient")
    assert parsed.wire == "bob@example.com"


@pytest.mark.parametrize("value", [":;:", "a:;@a", ":;", "a:b@c;,:;"])
def test_addresses_the_email_parser_chokes_on_are_invalid_not_internal_errors(value: str) -> None:
    """The library's parser raises AttributeError on some group syntax; that is a 400, not a 500."""
    with pytest.raises(ApiError) as caught:
        parse_address(value, "to[0]", "smtp_invalid_recipient")
    assert caught.value.code == "smtp_invalid_recipient"


@settings(max_examples=400, deadline=None)
@given(value=st.text(alphabet=st.sampled_from(list('"<>@.,:;()\\ a=?[]\t\u00e9')), min_size=1, max_size=16))
def test_any_address_string_is_an_address_or_a_coded_refusal(value: str) -> None:
    """Whatever the punctuation, parsing gives an Address or ApiError, never another exception."""
    try:
        parse_address(value, "to[0]", "smtp_invalid_recipient")
    except ApiError as err:
        assert err.code == "smtp_invalid_recipient"
