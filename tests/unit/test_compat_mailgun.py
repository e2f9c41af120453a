"""Mailgun's form -> native objects (checked by the native parser), and native outcomes -> Mailgun's answers."""

from __future__ import annotations

import json

import pytest

from mailcow_smtp_api.compat import mailgun
from mailcow_smtp_api.compat.mailgun import FormFile, translate
from mailcow_smtp_api.core.errors import ApiError
from mailcow_smtp_api.core.responses import ItemResult
from mailcow_smtp_api.core.model import SendRequest
from mailcow_smtp_api.core.validate import ParsePolicy, parse_request

POLICY = ParsePolicy(max_recipients=2000, password_optional=lambda port: True)
BASE = [("from", "Sender <sender@example.org>"), ("to", "rcpt@example.net"), ("subject", "Hello"), ("text", "Body")]


def parsed(fields: list[tuple[str, str]], files: list[FormFile] | None = None) -> list[SendRequest]:
    """Translate and run every item through the native parser."""
    request = translate("example.org", fields, files or [], mime=False)
    return [parse_request(item, POLICY) for item in request.items]


def refused(fields: list[tuple[str, str]], files: list[FormFile] | None = None, *, mime: bool = False) -> ApiError:
    """The error translate or the native parser raises for the form; its field in Mailgun's words."""
    with pytest.raises(ApiError) as info:
        for item in translate("example.org", fields, files or [], mime=mime).items:
            if not mime:
                parse_request(item, POLICY)
    return info.value


def mg_field(err: ApiError) -> str | None:
    return mailgun.mailgun_field(err.field)


# --------------------------------------------------------------------------- field mappings


def test_basic_fields_map_to_the_native_request() -> None:
    """from, to, subject, text and html arrive in the native fields."""
    (request,) = parsed([*BASE, ("html", "<p>Hi</p>")])
    assert request.sender.addr_spec == "sender@example.org" and request.sender.display_name == "Sender"
    assert [a.addr_spec for a in request.to] == ["rcpt@example.net"]
    assert (request.subject, request.body, request.html_body) == ("Hello", "Body", "<p>Hi</p>")


def test_address_fields_are_repeatable_and_comma_separated_lists() -> None:
    """to, cc and bcc may repeat and hold RFC 5322 lists; a quoted name with a comma stays one address."""
    (request,) = parsed(
        [
            *BASE,
            ("to", '"Doe, Jane" <jane@example.net>, bob@example.net'),
            ("cc", "c1@example.net"), ("cc", "c2@example.net, C3 <c3@example.net>"),
            ("bcc", "hidden@example.net"),
        ]
    )
    assert [a.addr_spec for a in request.to] == ["rcpt@example.net", "jane@example.net", "bob@example.net"]
    assert request.to[1].display_name == "Doe, Jane"
    assert [a.addr_spec for a in request.cc] == ["c1@example.net", "c2@example.net", "c3@example.net"]
    assert [a.addr_spec for a in request.bcc] == ["hidden@example.net"]


def test_an_unquoted_comma_in_a_name_is_refused_by_field() -> None:
    """'Doe, Jane <j@x>' splits into a broken address: refused naming the field."""
    err = refused([*BASE, ("cc", "Doe, Jane <jane@example.net>")])
    assert (err.code, mg_field(err)) == ("smtp_invalid_cc", "cc")


def test_headers_map_to_native_headers_and_threading_fields() -> None:
    """h:Reply-To, h:Message-Id, h:In-Reply-To and h:References fill native fields; others are headers."""
    (request,) = parsed(
        [
            *BASE,
            ("h:X-Custom", "value"),
            ("h:Reply-To", "Help <help@example.org>"),
            ("h:Message-Id", "<id.1@example.org>"),
            ("h:In-Reply-To", "<parent@example.org>"),
            ("h:References", "<root@example.org> <parent@example.org>"),
        ]
    )
    assert request.headers == (("X-Custom", "value"),)
    assert request.reply_to is not None and request.reply_to.addr_spec == "help@example.org"
    assert request.message_id == "<id.1@example.org>"
    assert request.in_reply_to == "<parent@example.org>"
    assert request.references == ("<root@example.org>", "<parent@example.org>")


def test_tags_and_variables_become_mailgun_headers() -> None:
    """o:tag values join in X-Mailgun-Tag; v: variables are one JSON object in X-Mailgun-Variables."""
    (request,) = parsed([*BASE, ("o:tag", "news"), ("o:tag", "weekly"), ("v:email-id", "42"), ("v:user", "ann")])
    headers = dict(request.headers)
    assert headers["X-Mailgun-Tag"] == "news, weekly"
    assert json.loads(headers["X-Mailgun-Variables"]) == {"email-id": "42", "user": "ann"}
    assert translate("example.org", [*BASE, ("o:tag", "a")], [], mime=False).tags == ("a",)


def test_more_than_three_tags_are_refused() -> None:
    """Mailgun takes at most three tags per message."""
    err = refused([*BASE, *[("o:tag", f"t{i}") for i in range(4)]])
    assert mg_field(err) == "o:tag"


def test_delivery_time_and_test_mode() -> None:
    """o:deliverytime (RFC 2822) becomes unix seconds; o:testmode yes/true/1 is on, no/false off."""
    request = translate("example.org", [*BASE, ("o:deliverytime", "Thu, 13 Oct 2011 18:02:00 GMT"), ("o:testmode", "yes")], [], mime=False)
    assert request.send_at == 1318528920.0 and request.test_mode is True
    for value, expected in (("True", True), ("1", True), ("no", False), ("false", False)):
        assert translate("example.org", [*BASE, ("o:testmode", value)], [], mime=False).test_mode is expected
    assert translate("example.org", BASE, [], mime=False).send_at is None


@pytest.mark.parametrize("value", ["tomorrow", "2027-01-01T00:00:00Z", "Thu, 13 Oct 2011 18:02:00 GMT\r\nX: y"])
def test_a_bad_delivery_time_is_refused_by_name(value: str) -> None:
    """A date that is not RFC 2822 is refused naming o:deliverytime."""
    err = refused([*BASE, ("o:deliverytime", value)])
    assert (err.code, err.field) == ("smtp_invalid_send_at", "o:deliverytime")


def test_a_bad_test_mode_value_is_refused() -> None:
    err = refused([*BASE, ("o:testmode", "maybe")])
    assert err.field == "o:testmode"


def test_tracking_options_are_accepted_only_when_off() -> None:
    """o:tracking* 'no' passes (mailgun.js sends booleans as yes/no); 'yes' is refused by name."""
    parsed([*BASE, ("o:tracking", "no"), ("o:tracking-opens", "false"), ("o:tracking-clicks", "no")])
    err = refused([*BASE, ("o:tracking-opens", "yes")])
    assert (err.code, err.field) == ("smtp_unknown_field", "o:tracking-opens")


def test_sender_header_equal_to_from_is_dropped_and_another_refused() -> None:
    """Ghost sends h:Sender equal to from: dropped. A different Sender is refused."""
    (request,) = parsed([*BASE, ("h:Sender", "Sender <SENDER@example.org>")])
    assert all(name.lower() != "sender" for name, _ in request.headers)
    err = refused([*BASE, ("h:Sender", "other@example.org")])
    assert (err.code, err.field) == ("smtp_header_not_allowed", "h:Sender")


def test_owned_headers_are_refused_by_the_native_parser_in_mailgun_words() -> None:
    """h:To or h:Content-Type reach native headers, which refuse them; the field reads h:To."""
    for name in ("h:To", "h:Content-Type", "h:Bcc"):
        err = refused([*BASE, (name, "x@example.net")])
        assert (err.code, mg_field(err)) == ("smtp_header_not_allowed", name)


def test_attachments_and_inline_files() -> None:
    """attachment parts are attachments; inline parts are inline with the file name as Content-ID."""
    files = [
        FormFile("attachment", "report.pdf", "application/pdf", b"%PDF"),
        FormFile("inline", "logo.png", "image/png; name=logo.png", b"\x89PNG"),
    ]
    (request,) = parsed([*BASE, ("html", '<img src="cid:logo.png">')], files)
    report, logo = request.attachments
    assert (report.filename, report.content, report.content_type, report.disposition) == ("report.pdf", b"%PDF", "application/pdf", "attachment")
    assert (logo.filename, logo.content_id, logo.disposition, logo.content_type) == ("logo.png", "logo.png", "inline", "image/png")


def test_a_file_name_with_a_path_keeps_only_its_last_component() -> None:
    """'../../etc/passwd' and 'C:\\x\\y.png' arrive as 'passwd' and 'y.png'."""
    files = [FormFile("attachment", "../../etc/passwd", None, b"x"), FormFile("attachment", "C:\\x\\y.png", "image/png", b"y")]
    (request,) = parsed(BASE, files)
    assert [a.filename for a in request.attachments] == ["passwd", "y.png"]
    assert request.attachments[0].content_type == "application/octet-stream"


@pytest.mark.parametrize("name", ["", None, "dir/", "  "])
def test_an_empty_file_name_is_refused(name: str | None) -> None:
    err = refused(BASE, [FormFile("attachment", name, None, b"x")])
    assert (err.code, err.field) == ("smtp_invalid_attachment", "attachment")


def test_a_bad_file_name_is_judged_by_the_native_parser() -> None:
    """What remains of a file name is checked natively; the field reads 'attachment' or 'inline'."""
    err = refused(BASE, [FormFile("attachment", "a\r\nb.txt", None, b"x")])
    assert (err.code, mg_field(err)) == ("smtp_invalid_attachment", "attachment")
    err = refused([*BASE, ("html", "<img src='cid:a b.png'>")], [FormFile("inline", "a b.png", "image/png", b"x")])
    assert mg_field(err) in ("inline", "html")


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("name", ["from", "subject", "text", "html", "o:testmode", "o:deliverytime", "recipient-variables", "h:X-A", "v:a"])
def test_duplicate_single_valued_fields_are_refused_by_name(name: str) -> None:
    value = {"o:testmode": "no", "o:deliverytime": "Thu, 13 Oct 2011 18:02:00 GMT", "recipient-variables": "{}"}.get(name, "x")
    err = refused([*BASE, (name, value), (name, value)] if name not in dict(BASE) else [*BASE, (name, value)])
    assert err.field == name


def test_header_names_compare_case_insensitively_for_duplicates() -> None:
    err = refused([*BASE, ("h:X-A", "1"), ("h:x-a", "2")])
    assert err.field == "h:x-a"


@pytest.mark.parametrize(
    "name",
    ["template", "amp-html", "t:text", "t:version", "o:dkim", "o:require-tls", "o:skip-verification", "o:sending-ip", "o:sending-ip-pool", "o:archive-to", "bogus"],
)
def test_unsupported_fields_are_refused_by_name(name: str) -> None:
    err = refused([*BASE, (name, "yes")])
    assert (err.code, err.field) == ("smtp_unknown_field", name)
    assert "not supported by this server" in err.message


def test_an_unknown_file_part_is_refused() -> None:
    err = refused(BASE, [FormFile("file", "a.txt", None, b"x")])
    assert (err.code, err.field) == ("smtp_unknown_field", "file")


def test_the_url_domain_must_be_a_dns_name() -> None:
    for domain in ("", "localhost", "exa mple.org", "1.2.3.4", "a\r\nb.org"):
        with pytest.raises(ApiError) as info:
            translate(domain, BASE, [], mime=False)
        assert info.value.field == "domain"


def test_domain_matches_is_case_insensitive_and_idna_normalised() -> None:
    assert mailgun.domain_matches("Example.ORG", "example.org")
    assert mailgun.domain_matches("bücher.example", "xn--bcher-kva.example")
    assert not mailgun.domain_matches("example.org", "mail.example.org")
    assert not mailgun.domain_matches("example.org", "not a domain")


# --------------------------------------------------------------------------- CR/LF in every field


CRLF = "x\r\nBcc: victim@example.net"


@pytest.mark.parametrize(
    "name", ["from", "to", "cc", "bcc", "subject", "h:X-Custom", "h:Reply-To", "h:Message-Id", "h:In-Reply-To", "h:References", "o:tag", "h:List-Unsubscribe"]
)
def test_crlf_in_a_header_field_is_refused(name: str) -> None:
    """A line break in any field that reaches a header ends in a refusal naming that field."""
    fields = [(k, v) for k, v in BASE if k != name] + [(name, f"a@example.net{CRLF}" if name in ("from", "to", "cc", "bcc") else CRLF)]
    err = refused(fields)
    assert mg_field(err) == name


def test_crlf_in_names_and_variables_gives_a_refusal_or_a_safe_value() -> None:
    """CR/LF in an h: name is refused; in a v: name or value it is escaped inside the JSON header."""
    err = refused([*BASE, ("h:X-A\r\nBcc", "v")])
    assert err.code == "smtp_invalid_header"
    (request,) = parsed([*BASE, ("v:a\r\nb", "c\r\nd")])
    value = dict(request.headers)["X-Mailgun-Variables"]
    assert "\r" not in value and "\n" not in value and json.loads(value) == {"a\r\nb": "c\r\nd"}
    (request,) = parsed([("from", "sender@example.org"), ("to", "r@example.net"), ("subject", "s"), ("text", "line1\r\nline2")])
    assert request.body == "line1\nline2"


def test_crlf_substituted_from_recipient_variables_is_refused() -> None:
    """A recipient variable that brings a line break into the subject is refused by the native parser."""
    variables = json.dumps({"rcpt@example.net": {"name": "Ann\r\nBcc: victim@example.net"}})
    err = refused([*[(k, v) for k, v in BASE if k != "subject"], ("subject", "Hi %recipient.name%"), ("recipient-variables", variables)])
    assert mg_field(err) == "subject"


# --------------------------------------------------------------------------- recipient-variables


def batch_fields(to: list[str], variables: dict[str, dict[str, object]]) -> list[tuple[str, str]]:
    return [
        ("from", "sender@example.org"), ("to", ", ".join(to)), ("subject", "Hi %recipient.name%"),
        ("text", "id=%recipient.id% for %recipient% %recipient.missing%!"), ("html", "<p>%recipient.name%</p>"),
        ("h:X-User", "%recipient.id%"), ("v:uid", "%recipient.id%"),
        ("h:List-Unsubscribe", "<%recipient.unsub%>, <%tag_unsubscribe_email%>"),
        ("recipient-variables", json.dumps(variables)),
    ]


def test_recipient_variables_make_one_message_per_recipient_with_substitution() -> None:
    """Each recipient gets a message addressed to them alone with their own values."""
    fields = batch_fields(
        ["Ann <ann@example.net>", "bob@example.net", "cy@example.net"],
        {"ann@example.net": {"name": "Ann", "id": 1, "unsub": "https://u.example/1"}, "BOB@example.net": {"name": "Bob", "id": "b2", "unsub": "https://u.example/2"}},
    )
    ann, bob, cy = parsed(fields)
    assert [[a.addr_spec for a in r.to] for r in (ann, bob, cy)] == [["ann@example.net"], ["bob@example.net"], ["cy@example.net"]]
    assert (ann.subject, ann.body, ann.html_body) == ("Hi Ann", "id=1 for ann@example.net !", "<p>Ann</p>")
    assert (bob.subject, bob.body) == ("Hi Bob", "id=b2 for bob@example.net !")
    assert (cy.subject, cy.body) == ("Hi ", "id= for cy@example.net !")
    assert dict(ann.headers)["X-User"] == "1" and dict(bob.headers)["X-User"] == "b2"
    assert json.loads(dict(bob.headers)["X-Mailgun-Variables"]) == {"uid": "b2"}
    assert dict(ann.headers)["List-Unsubscribe"] == "<https://u.example/1>"
    assert "List-Unsubscribe" not in dict(cy.headers)  # "<>" only: nothing left to offer


def test_without_recipient_variables_one_message_goes_to_everybody() -> None:
    (request,) = parsed([("from", "sender@example.org"), ("to", "a@example.net, b@example.net"), ("subject", "%recipient.x%"), ("text", "t")])
    assert len(request.to) == 2 and request.subject == "%recipient.x%"


def test_cc_and_bcc_get_a_copy_of_each_batch_message() -> None:
    """As Mailgun does: every per-recipient message also goes to cc and bcc."""
    fields = [*batch_fields(["a@example.net", "b@example.net"], {}), ("cc", "c@example.net"), ("bcc", "d@example.net")]
    for request in parsed(fields):
        assert [a.addr_spec for a in request.cc] == ["c@example.net"]
        assert [a.addr_spec for a in request.bcc] == ["d@example.net"]


def test_one_thousand_recipients_pass_and_one_more_is_refused() -> None:
    to = [f"r{i}@example.net" for i in range(1000)]
    request = translate("example.org", batch_fields(to, {}), [], mime=False)
    assert len(request.items) == 1000 and request.items[999]["to"] == ["r999@example.net"]
    err = refused(batch_fields([*to, "r1000@example.net"], {}))
    assert (err.code, err.field) == ("smtp_too_many_recipients", "to")
    variables = {f"v{i}@example.net": {} for i in range(1001)}
    err = refused(batch_fields(["a@example.net"], variables))
    assert (err.code, err.field) == ("smtp_too_many_recipients", "recipient-variables")


@pytest.mark.parametrize("value", ["not json", "[]", '{"a@example.net": 1}', '{"a@example.net": "x"}'])
def test_malformed_recipient_variables_are_refused(value: str) -> None:
    err = refused([*BASE, ("recipient-variables", value)])
    assert (err.code, err.field) == ("smtp_invalid_json", "recipient-variables")


# --------------------------------------------------------------------------- messages.mime


def test_mime_makes_one_raw_object_with_the_envelope() -> None:
    """messages.mime: the message file part and to become the native raw object."""
    raw = b"From: sender@example.org\r\nTo: a@example.net\r\nSubject: s\r\n\r\nbody\r\n"
    request = translate("example.org", [("to", "A <a@example.net>, b@example.net"), ("o:testmode", "yes")], [FormFile("message", "MimeMessage", "message/rfc822", raw)], mime=True)
    assert request.raw and request.test_mode
    assert request.items == ({"message": raw, "envelope": {"to": ["a@example.net", "b@example.net"]}},)


def test_mime_message_may_come_as_a_text_field() -> None:
    """mailgun.js sends a string MIME message as a plain field."""
    request = translate("example.org", [("to", "a@example.net"), ("message", "Subject: s\r\n\r\nb")], [], mime=True)
    assert request.items[0]["message"] == b"Subject: s\r\n\r\nb"


@pytest.mark.parametrize("name", ["text", "html", "subject", "from", "h:X-A", "recipient-variables", "o:tag"])
def test_mime_refuses_message_fields_by_name(name: str) -> None:
    err = refused([("to", "a@example.net"), (name, "x")], [FormFile("message", "m", None, b"x")], mime=True)
    assert (err.code, err.field) == ("smtp_unknown_field", name)


def test_mime_refuses_attachments_and_needs_one_message() -> None:
    err = refused([("to", "a@example.net")], [FormFile("message", "m", None, b"x"), FormFile("attachment", "a", None, b"y")], mime=True)
    assert err.field == "attachment"
    err = refused([("to", "a@example.net")], [], mime=True)
    assert err.field == "message"
    err = refused([("to", "a@example.net"), ("message", "x")], [FormFile("message", "m", None, b"x")], mime=True)
    assert err.field == "message"


# --------------------------------------------------------------------------- field names and answers


@pytest.mark.parametrize(
    "native, expected",
    [
        ("body", "text"), ("html_body", "html"), ("attachments[2].filename", "attachment"), ("attachments[0].content_id", "inline"),
        ("headers.X-Foo", "h:X-Foo"), ("to[3]", "to"), ("cc[0]", "cc"), ("bcc", "bcc"), ("reply_to", "h:Reply-To"),
        ("message_id", "h:Message-Id"), ("references[1]", "h:References"), ("headers.X-Mailgun-Tag", "o:tag"),
        ("headers.X-Mailgun-Variables", "v:"), ("from", "from"), ("subject", "subject"), (None, None),
    ],
)
def test_mailgun_field_names_native_fields_in_mailgun_words(native: str | None, expected: str | None) -> None:
    assert mailgun.mailgun_field(native) == expected


SENT = ItemResult(status=200, code="smtp_mail_sent", message_id="<one@example.org>", recipients=("a@example.net",))


def test_success_answers_queued_with_the_first_id() -> None:
    second = ItemResult(status=202, code="smtp_mail_accepted", message_id="<two@example.org>")
    assert mailgun.answer([SENT, second]) == (200, {"id": "<one@example.org>", "message": "Queued. Thank you."})


def test_test_mode_answers_with_the_dry_run_payloads() -> None:
    dry = {"envelope": {"from": "s@example.org", "to": ["a@example.net"]}, "message": "U3ViamVjdA=="}
    status, body = mailgun.answer([ItemResult(status=200, code="smtp_dry_run", message_id="<d@example.org>", dry_run=dry)])
    assert (status, body["id"], body["message"], body["dry_run"]) == (200, "<d@example.org>", "Queued. Thank you.", [dry])


def test_a_batch_with_refused_items_answers_200_and_lists_them() -> None:
    bad = ItemResult(status=400, code="smtp_invalid_recipient", message="bad address", field="to[0]", recipients=("x@bad",))
    partial = ItemResult(status=200, code="smtp_partially_sent", message_id="<p@example.org>", refused=("gone@example.net",))
    status, body = mailgun.answer([bad, SENT, partial])
    assert status == 200 and body["id"] == "<one@example.org>"
    assert body["message"].startswith("Queued.") and "2 of 3" in body["message"]
    assert body["refused"] == [
        {"code": "smtp_invalid_recipient", "message": "bad address", "recipients": ["x@bad"], "field": "to"},
        {"code": "smtp_partially_sent", "message": "", "recipients": ["gone@example.net"]},
    ]


@pytest.mark.parametrize(
    "status, code",
    [(400, "smtp_invalid_recipient"), (401, "api_authentication_failed"), (403, "smtp_unauthorized_sender"), (413, "smtp_request_too_large"), (429, "smtp_rate_limited"), (502, "smtp_error"), (503, "smtp_error")],
)
def test_errors_answer_the_status_and_a_message(status: int, code: str) -> None:
    result = ItemResult(status=status, code=code, message="what to fix", field="body" if status == 400 else None, retry_after=60 if status == 429 else None)
    got_status, body = mailgun.answer([result])
    assert got_status == status and body["code"] == code
    assert body["message"] == ("text: what to fix" if status == 400 else "what to fix")


def test_error_answer_renders_a_translation_refusal() -> None:
    err = refused([*BASE, ("template", "x")])
    status, body = mailgun.error_answer(err)
    assert status == 400 and body["field"] == "template" and "not supported" in body["message"]


def test_answer_needs_a_result() -> None:
    with pytest.raises(ValueError):
        mailgun.answer([])
