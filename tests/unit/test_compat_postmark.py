"""Postmark's JSON -> native objects (checked by the native parser), and native outcomes -> Postmark's answers."""

from __future__ import annotations

import base64
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from mailcow_smtp_api.compat import postmark
from mailcow_smtp_api.core.errors import ApiError
from mailcow_smtp_api.core.model import SendRequest
from mailcow_smtp_api.core.responses import ItemResult
from mailcow_smtp_api.core.validate import ParsePolicy, parse_request

POLICY = ParsePolicy(password_optional=lambda port: True)
BASE: dict[str, Any] = {"From": "Sender <sender@example.org>", "To": "rcpt@example.net", "Subject": "Hello", "TextBody": "Body"}
PNG = base64.b64encode(b"\x89PNG").decode()


def parsed(**extra: Any) -> SendRequest:
    return parse_request(postmark.translate_email({**BASE, **extra}), POLICY)


def refused(**extra: Any) -> ApiError:
    """The error translate_email or the native parser raises; check its field in Postmark's words."""
    with pytest.raises(ApiError) as info:
        parse_request(postmark.translate_email({**BASE, **extra}), POLICY)
    return info.value


def pm_field(err: ApiError) -> str | None:
    return postmark.postmark_field(err.field)


def test_basic_fields_map_to_the_native_request() -> None:
    request = parsed(HtmlBody="<p>Hi</p>", Cc="c@example.net", Bcc="Hidden <h@example.net>", ReplyTo="help@example.org")
    assert request.sender.display_name == "Sender" and request.sender.addr_spec == "sender@example.org"
    assert (request.subject, request.body, request.html_body) == ("Hello", "Body", "<p>Hi</p>")
    assert [a.addr_spec for a in request.cc] == ["c@example.net"] and [a.addr_spec for a in request.bcc] == ["h@example.net"]
    assert request.reply_to is not None and request.reply_to.addr_spec == "help@example.org"


def test_address_lists_are_comma_separated_with_quoted_names() -> None:
    request = parsed(To='"Doe, Jane" <jane@example.net>, bob@example.net,  Cy <cy@example.net>')
    assert [a.addr_spec for a in request.to] == ["jane@example.net", "bob@example.net", "cy@example.net"]
    assert request.to[0].display_name == "Doe, Jane"


def test_headers_map_to_native_headers_and_threading_fields() -> None:
    request = parsed(
        Headers=[
            {"Name": "X-Custom", "Value": "v"},
            {"Name": "Message-ID", "Value": "<m.1@example.org>"},
            {"Name": "In-Reply-To", "Value": "<p@example.org>"},
            {"Name": "References", "Value": "<r@example.org> <p@example.org>"},
        ]
    )
    assert request.headers == (("X-Custom", "v"),)
    assert (request.message_id, request.in_reply_to, request.references) == ("<m.1@example.org>", "<p@example.org>", ("<r@example.org>", "<p@example.org>"))


def test_tag_metadata_and_stream_become_headers() -> None:
    request = parsed(Tag="welcome", Metadata={"user": "ann", "n": 3}, MessageStream="outbound")
    assert dict(request.headers) == {"X-PM-Tag": "welcome", "X-PM-Metadata-user": "ann", "X-PM-Metadata-n": "3", "X-PM-Message-Stream": "outbound"}


@pytest.mark.parametrize("content_id", ["cid:logo.png", "logo.png", "<logo.png>"])
def test_content_id_forms_make_an_inline_part(content_id: str) -> None:
    request = parsed(
        HtmlBody='<img src="cid:logo.png">',
        Attachments=[
            {"Name": "logo.png", "Content": PNG, "ContentType": "image/png", "ContentID": content_id},
            {"Name": "a.pdf", "Content": PNG, "ContentType": "application/pdf", "ContentID": None, "ContentLength": 4},
        ],
    )
    logo, pdf = request.attachments
    assert (logo.filename, logo.content, logo.content_id, logo.disposition) == ("logo.png", b"\x89PNG", "logo.png", "inline")
    assert (pdf.filename, pdf.content_id, pdf.disposition, pdf.content_type) == ("a.pdf", None, "attachment", "application/pdf")


def test_an_inline_part_without_a_name_is_named_after_its_content_id() -> None:
    """django-anymail sends Name "" for an inline image without a file name."""
    request = parsed(HtmlBody="<img src='cid:img1@example.org'>", Attachments=[{"Name": "", "Content": PNG, "ContentType": "image/png", "ContentID": "cid:img1@example.org"}])
    assert request.attachments[0].filename == "img1@example.org"


def test_an_attachment_name_with_a_path_keeps_only_its_last_component() -> None:
    request = parsed(Attachments=[{"Name": "../../etc/passwd", "Content": PNG}, {"Name": "C:\\x\\y.png", "Content": PNG}])
    assert [a.filename for a in request.attachments] == ["passwd", "y.png"]


def test_attachment_errors_name_the_postmark_field() -> None:
    err = refused(Attachments=[{"Name": "a.txt", "Content": "not base64!"}])
    assert pm_field(err) == "Attachments[0].Content"
    err = refused(Attachments=[{"Name": "", "Content": PNG}])
    assert pm_field(err) == "Attachments[0].Name"
    err = refused(Attachments=[{"Name": "a", "Content": PNG, "Bogus": 1}])
    assert err.field == "Attachments[0].Bogus"


def test_tracking_is_accepted_only_when_off() -> None:
    parsed(TrackOpens=False, TrackLinks="None")
    parsed(TrackOpens=None, TrackLinks=None)
    for field, value in (("TrackOpens", True), ("TrackLinks", "HtmlAndText"), ("TrackLinks", "TextOnly")):
        err = refused(**{field: value})
        assert (err.code, err.field) == ("smtp_unknown_field", field)


@pytest.mark.parametrize("name", ["TemplateId", "TemplateModel", "InlineCss", "to", "from", "smtp_user"])
def test_unknown_and_native_names_are_refused_by_name(name: str) -> None:
    err = refused(**{name: "x"})
    assert (err.code, err.field) == ("smtp_unknown_field", name)


def test_null_values_count_as_missing() -> None:
    request = parsed(Cc=None, HtmlBody=None, Headers=None, Attachments=None, TemplateId=None)
    assert request.cc == () and request.html_body == ""


def test_native_checks_name_postmark_fields() -> None:
    assert pm_field(refused(To="not an address")) == "To"
    assert pm_field(refused(From="a@b.c, d@e.f")) == "From"
    assert pm_field(refused(Subject="")) == "Subject"
    assert pm_field(refused(TextBody="", HtmlBody="")) == "TextBody"
    assert pm_field(refused(Headers=[{"Name": "Content-Type", "Value": "x"}])) == "Headers"
    assert pm_field(refused(Metadata={"a b": "c"})) == "Metadata.a b"


@pytest.mark.parametrize(
    "extra, field",
    [
        ({"To": 3}, "To"), ({"Headers": {"a": "b"}}, "Headers"), ({"Headers": [{"Name": "X"}]}, "Headers[0]"),
        ({"Metadata": ["x"]}, "Metadata"), ({"Metadata": {"k": {"x": 1}}}, "Metadata.k"), ({"Tag": 5}, "Tag"),
        ({"Attachments": {"Name": "a"}}, "Attachments"), ({"Attachments": ["x"]}, "Attachments[0]"),
        ({"Headers": [{"Name": "X-A", "Value": "1"}, {"Name": "x-a", "Value": "2"}]}, "Headers[1]"),
    ],
)
def test_wrong_shapes_are_refused_by_postmark_name(extra: dict[str, Any], field: str) -> None:
    assert refused(**extra).field == field


CRLF = "x\r\nBcc: victim@example.net"


@pytest.mark.parametrize(
    "extra, field",
    [
        ({"From": f"a@example.org{CRLF}"}, "From"), ({"To": f"a@example.net{CRLF}"}, "To"), ({"Cc": f"a@example.net{CRLF}"}, "Cc"),
        ({"Bcc": f"a@example.net{CRLF}"}, "Bcc"), ({"ReplyTo": f"a@example.net{CRLF}"}, "ReplyTo"), ({"Subject": CRLF}, "Subject"),
        ({"Tag": CRLF}, "Tag"), ({"MessageStream": CRLF}, "MessageStream"), ({"Metadata": {"k": CRLF}}, "Metadata.k"),
        ({"Metadata": {"k\r\nBcc": "v"}}, "Metadata.k\r\nBcc"), ({"Headers": [{"Name": "X-A", "Value": CRLF}]}, "Headers"),
        ({"Headers": [{"Name": "X-A\r\nBcc", "Value": "v"}]}, "Headers"),
        ({"Attachments": [{"Name": "a\r\nb.txt", "Content": PNG}]}, "Attachments[0].Name"),
        ({"Attachments": [{"Name": "a.txt", "Content": PNG, "ContentType": f"text/plain{CRLF}"}]}, "Attachments[0].ContentType"),
    ],
)
def test_crlf_in_every_field_is_refused(extra: dict[str, Any], field: str) -> None:
    assert pm_field(refused(**extra)) == field


def test_crlf_in_the_bodies_is_a_safe_value() -> None:
    request = parsed(TextBody="a\r\nb", HtmlBody="<p>a\r\nb</p>")
    assert (request.body, request.html_body) == ("a\nb", "<p>a\nb</p>")


# --------------------------------------------------------------------------- batches


def test_batch_slots_hold_objects_or_their_errors() -> None:
    slots = postmark.translate_batch([BASE, {**BASE, "TrackOpens": True}, "nope", {**BASE, "To": "b@example.net"}])
    assert isinstance(slots[0], dict) and isinstance(slots[3], dict) and slots[3]["to"] == ["b@example.net"]
    assert isinstance(slots[1], ApiError) and slots[1].field == "TrackOpens"
    assert isinstance(slots[2], ApiError) and slots[2].code == "smtp_invalid_json"


def test_a_batch_that_is_not_a_list_or_too_long_is_refused_whole() -> None:
    for value in ({"Messages": []}, "x", None):
        with pytest.raises(ApiError) as info:
            postmark.translate_batch(value)
        assert info.value.code == "smtp_invalid_json"
    assert len(postmark.translate_batch([BASE] * 500)) == 500
    with pytest.raises(ApiError) as info:
        postmark.translate_batch([BASE] * 501)
    assert info.value.code == "smtp_too_many_messages"
    assert postmark.error_answer(info.value) == (422, {"ErrorCode": 410, "Message": "at most 500 messages per batch"})


# --------------------------------------------------------------------------- answers

AT = datetime(2026, 12, 2, 1, 15, 54, 123000, tzinfo=timezone(timedelta(hours=-5)))
SENT = ItemResult(status=200, code="smtp_mail_sent", message_id="<abc.1@example.org>", recipients=("a@example.net", "h@example.net"))


def test_success_answer_has_postmark_shape() -> None:
    assert postmark.answer(SENT, AT, to="Ann <a@example.net>") == (
        200,
        {"To": "Ann <a@example.net>", "SubmittedAt": "2026-12-02T01:15:54.123000-05:00", "MessageID": "abc.1@example.org", "ErrorCode": 0, "Message": "OK"},
    )
    assert postmark.answer(SENT, datetime(2026, 1, 1))[1]["To"] == "a@example.net, h@example.net"
    assert postmark.answer(SENT, datetime(2026, 1, 1))[1]["SubmittedAt"] == "2026-01-01T00:00:00+00:00"


def test_queued_partial_and_dry_run_messages() -> None:
    queued = ItemResult(status=202, code="smtp_mail_accepted", message_id="<q@example.org>")
    assert postmark.answer(queued, AT)[1]["Message"] == "Message accepted, but delivery may be delayed."
    partial = ItemResult(status=200, code="smtp_partially_sent", message_id="<p@example.org>", refused=("x@example.net", "y@example.net"))
    status, body = postmark.answer(partial, AT)
    assert status == 200 and body["ErrorCode"] == 0
    assert "inactive addresses: x@example.net, y@example.net. Inactive recipients" in body["Message"]
    dry = {"envelope": {"to": ["a@example.net"]}, "message": "eA=="}
    assert postmark.answer(ItemResult(status=200, code="smtp_dry_run", message_id="<d@x.org>", dry_run=dry), AT)[1]["DryRun"] == dry


@pytest.mark.parametrize(
    "status, code, field, expected",
    [
        (401, "api_authentication_failed", None, (401, 10)),
        (400, "smtp_invalid_recipient", "to[0]", (422, 300)),
        (400, "smtp_invalid_json", "body", (422, 402)),
        (415, "smtp_unsupported_media_type", None, (422, 409)),
        (403, "smtp_unauthorized_sender", "from", (422, 400)),
        (403, "smtp_access_denied", None, (422, 405)),
        (413, "smtp_request_too_large", None, (413, 300)),
        (429, "smtp_rate_limited", None, (429, 429)),
        (429, "smtp_too_many_failures", None, (429, 429)),
        (409, "smtp_idempotency_mismatch", None, (409, 300)),
        (500, "smtp_internal_error", None, (500, 100)),
        (502, "smtp_error", None, (500, 100)),
        (503, "smtp_db_unavailable", None, (503, 100)),
        (504, "smtp_error", None, (500, 100)),
    ],
)
def test_errors_answer_postmark_statuses_and_codes(status: int, code: str, field: str | None, expected: tuple[int, int]) -> None:
    got_status, body = postmark.answer(ItemResult(status=status, code=code, message="what to fix", field=field), AT)
    assert (got_status, body["ErrorCode"]) == expected
    assert body["ErrorCode"] != 0 and set(body) == {"ErrorCode", "Message"}
    prefixed = field is not None and code != "smtp_invalid_json"  # whose "body" is the request body
    assert body["Message"] == (f"{postmark.postmark_field(field)}: what to fix" if prefixed else "what to fix")


def test_batch_answer_is_200_with_one_result_per_message() -> None:
    bad = ItemResult(status=400, code="smtp_empty_subject", message="'subject' must not be empty", field="subject")
    status, body = postmark.batch_answer([SENT, bad, SENT], AT, to=["a@example.net", None, None])
    assert status == 200 and len(body) == 3
    assert body[0]["To"] == "a@example.net" and body[0]["ErrorCode"] == 0
    assert body[1] == {"ErrorCode": 300, "Message": "Subject: 'subject' must not be empty"}
    assert body[2]["MessageID"] == "abc.1@example.org"


@pytest.mark.parametrize(
    "native, expected",
    [
        ("from", "From"), ("to[2]", "To"), ("cc[0]", "Cc"), ("bcc", "Bcc"), ("reply_to", "ReplyTo"), ("body", "TextBody"),
        ("html_body", "HtmlBody"), ("attachments[1].content", "Attachments[1].Content"), ("attachments[0].filename", "Attachments[0].Name"),
        ("attachments", "Attachments"), ("headers.X-PM-Tag", "Tag"), ("headers.X-PM-Message-Stream", "MessageStream"),
        ("headers.X-PM-Metadata-user", "Metadata.user"), ("headers.X-Other", "Headers"), ("message_id", "Headers"), (None, None),
    ],
)
def test_postmark_field_names_native_fields_in_postmark_words(native: str | None, expected: str | None) -> None:
    assert postmark.postmark_field(native) == expected
