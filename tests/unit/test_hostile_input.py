"""Hostile requests through the HTTP shell in memory (treq's StubTreq, twisted.web's channel).

Every bad input class is answered 4xx with a coded error, nothing reaches the SMTP submitter, and
the shell keeps answering. Accepted input is checked on the bytes the submitter would put on the
wire: headers only from the request's own fields, every line CRLF-terminated and at most 998
octets (RFC 5322 2.1.1), and the DATA payload ends exactly once, at its end (RFC 5321 4.5.2).

The service runs with recording fakes for the database and the submitter; a sender check that
allows everything lets accepted input go all the way to the submitter.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from email import policy as email_policy
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from mailcow_smtp_api.core import validate
from mailcow_smtp_api.core.config import Config, from_options
from mailcow_smtp_api.core.errors import CODES
from mailcow_smtp_api.web.linger import LINGER_SECONDS
from mailcow_smtp_api.service import SendService
from mailcow_smtp_api.smtp.client import data_payload, message_pieces, stuffed_chunks
from mailcow_smtp_api.web.api import ApiSite, LimitedRequest, SmtpApi, channel_factory, request_factory
from tests.twisted.fakes import GOOD_KEY, FakeKeys, FakeSubmitter

URL = "http://sidecar.test/api/v1/send/email"
ALLOWED_PORT = 10587
CONFIG = from_options(
    {
        "smtp-host": "127.0.0.1",
        "smtp-port": str(ALLOWED_PORT),
        "smtp-allow": f"127.0.0.1:{ALLOWED_PORT},127.0.0.1:10465/tls",
        "max-recipients": "100",
        "max-attachments": "20",
    },
    environ={},
)
VALID: dict[str, Any] = {
    "from": "user1@example.org",
    "to": ["recipient@example.com"],
    "subject": "Hello",
    "body": "Hello there.",
    "password": "mailbox-secret-pw",
}
# Header names the service itself writes; anything else in a message is injected (custom headers
# count only when the request named them in "headers").
OWN_HEADERS = {
    "from", "to", "cc", "reply-to", "subject", "date", "message-id", "x-request-id",
    "mime-version", "content-type", "content-transfer-encoding",
    "in-reply-to", "references", "list-unsubscribe", "list-unsubscribe-post",
}
# C0 controls that end or fold a header line, NUL, escape, DEL, C1 NEL and the Unicode separators.
CONTROLS = ["\r", "\n", "\r\n", "\x00", "\x0b", "\x0c", "\x1b", "\x7f", "\x85", "\u2028", "\u2029"]


# --------------------------------------------------------------------------- the shell with fakes


@attrs.define
class Allowed:
    """A sender decision that lets every login send as every address."""

    allowed: bool = True
    reason: str = "test: every sender allowed"


class AllowEverySender:
    """The sender rule answering yes, so accepted input reaches the submitter."""

    def authorize_sender(self, login: str, sender: str) -> Deferred[Any]:
        return succeed(Allowed())

    def sender_has_owner(self, sender: str) -> Deferred[bool]:
        return succeed(True)


class NeverThrottle:
    """No address is ever blocked: every hostile request reaches the parser."""

    def retry_after(self, ip: str) -> int | None:
        return None

    def record_failure(self, ip: str) -> None:
        return None


@attrs.frozen
class Answer:
    """One HTTP answer: status, raw body and the parsed JSON (None when the body is not JSON)."""

    status: int
    raw: bytes
    body: Any

    @property
    def code(self) -> Any:
        """The stable error code (``msg``) of an error list, or the bare object's msg."""
        if isinstance(self.body, list) and self.body:
            return self.body[0].get("msg")
        if isinstance(self.body, dict):
            return self.body.get("msg")
        return None


def _result(d: Deferred[Any]) -> Any:
    """The result of a Deferred that has already fired (the fakes answer synchronously)."""
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the in-memory request did not complete"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


class Shell:
    """The real HTTP shell and send service over fakes; records every submission."""

    def __init__(self, config: Config = CONFIG) -> None:
        self.submitter = FakeSubmitter()
        self.service = SendService(
            config=config,
            keys=FakeKeys(),
            senders=AllowEverySender(),
            submitter=self.submitter,
            throttle=NeverThrottle(),
            now=lambda: datetime(2026, 1, 1, tzinfo=UTC),
            new_token=lambda: "token",
        )
        self.api = SmtpApi(service=self.service)
        self.client = StubTreq(self.api.resource())

    def post(self, body: Any, content_type: str | None = "application/json", key: str = GOOD_KEY) -> Answer:
        """POST ``body`` (bytes as is, anything else as JSON) to the send route."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8")
        headers = {"X-API-Key": key}
        if content_type is not None:
            headers["Content-Type"] = content_type
        response = _result(self.client.request("POST", URL, data=data, headers=headers))
        raw = _result(response.content())
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = None
        return Answer(response.code, raw, parsed)

    @property
    def sent(self) -> list[tuple[Any, ...]]:
        """Every submission so far: (target, credentials, envelope, message)."""
        return self.submitter.sent


@pytest.fixture
def shell() -> Shell:
    """A fresh shell with an empty submission record."""
    return Shell()


def assert_refused(shell: Shell, answer: Answer, status: int, *codes: str) -> None:
    """A coded 4xx, no traceback, and nothing submitted."""
    assert answer.status == status, answer.raw
    assert answer.code in codes, answer.raw
    assert answer.code in CODES
    assert b"Traceback" not in answer.raw
    assert shell.sent == []


def request(**changes: Any) -> dict[str, Any]:
    """The valid request with ``changes`` applied (a value of ``...`` removes the field)."""
    out = dict(VALID)
    for name, value in changes.items():
        if value is ...:
            out.pop(name, None)
        else:
            out[name] = value
    return out


# --------------------------------------------------------------------------- wire checks


def unstuff(payload: bytes) -> tuple[bytes, bytes]:
    """Read a DATA payload as postfix does: lines up to the lone ``.``; (message, what follows).

    RFC 5321 4.5.2: a line starting with ``.`` loses that dot; the line ``.`` alone ends the data.
    Whatever follows the terminator would be read as SMTP commands.
    """
    lines = payload.split(b"\r\n")
    out: list[bytes] = []
    for index, line in enumerate(lines):
        if line == b".":
            rest = b"\r\n".join(lines[index + 1 :])
            return b"".join(part + b"\r\n" for part in out), rest
        out.append(line[1:] if line.startswith(b".") else line)
    raise AssertionError("the payload has no terminating '.' line")


def parse_message(message: bytes) -> EmailMessage:
    """The submitted message parsed as a mail client would."""
    parsed = BytesParser(policy=email_policy.default).parsebytes(message)
    assert isinstance(parsed, EmailMessage)
    return parsed


def assert_wire_safe(message: bytes) -> None:
    """CRLF only, 7-bit, no line over 998 octets, and the payload ends exactly at its end."""
    assert message.isascii()
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", message) is None, "bare CR or LF in the message"
    assert max(len(line) for line in message.split(b"\r\n")) <= 998
    received, rest = unstuff(data_payload(message))
    assert received == message
    assert rest == b""


def requested_headers(body: Any) -> set[str]:
    """The lower-case names of the custom headers a request body asked for."""
    custom = body.get("headers") if isinstance(body, dict) else None
    return {name.lower() for name in custom if isinstance(name, str)} if isinstance(custom, dict) else set()


def assert_only_own_headers(message: bytes, custom: set[str] = frozenset()) -> EmailMessage:  # type: ignore[assignment]
    """The top-level header names are the service's own (or asked for), From/Subject/Date once, no Bcc."""
    parsed = parse_message(message)
    names = [name.lower() for name, _value in parsed.items()]
    assert set(names) <= OWN_HEADERS | custom, names
    assert "bcc" not in names
    for name in custom:
        assert names.count(name) <= 1, names
    for single in ("from", "subject", "date", "message-id"):
        assert names.count(single) == 1, names
    return parsed


def submitted(shell: Shell) -> tuple[Any, bytes]:
    """The one submission's envelope and message."""
    assert len(shell.sent) == 1
    _target, _credentials, envelope, message = shell.sent[0]
    return envelope, message


# --------------------------------------------------------------------------- request shape


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b"nul",
        b"[]",
        b'[{"from": "user1@example.org"}]',
        b'"a string"',
        b"42",
        b"true",
        b"null",
        b'{"from": "user1@example.org"} trailing',
        b'{"subject": "a", "subject": "b"}',
        b'{"from": "user1@example.org", "from": "boss@example.org"}',
        b'{"subject": "\xff\xfe"}',
        b'{"subject": "\xc3"}',
        b'\xef\xbb\xbf{"subject": "bom"}',
        '{"subject": "utf-16"}'.encode("utf-16"),
        b'{"smtp_port": NaN}',
        b'{"smtp_port": Infinity}',
        b'{"smtp_port": -Infinity}',
        b'{"smtp_port": 1' + b"0" * 5000 + b"}",
        b"[" * 100_000,
        b'{"to": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        b'{"to": {"a": {"b": {"c": ' + b"{" * 20_000 + b"}",
        b"\x00\x01\x02",
    ],
    ids=lambda raw: repr(raw[:24]),
)
def test_malformed_bodies_are_invalid_json(shell: Shell, raw: bytes) -> None:
    """Bodies that are not one strict UTF-8 JSON object answer 400 smtp_invalid_json and send nothing."""
    assert_refused(shell, shell.post(raw), 400, "smtp_invalid_json")


@pytest.mark.parametrize(
    "content_type",
    [None, "", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
     "application/jsonx", "json", "text/json", "application/json-patch+json"],
)
def test_missing_or_wrong_content_type_is_415(content_type: str | None) -> None:
    """A request that is not declared application/json answers 415 even with a valid body; form bodies
    are not parsed by the HTTP layer first (a malformed multipart body would be a bare 400)."""
    body = json.dumps(VALID).encode()
    shell, channel, transport = _channel(LIMIT)
    channel.dataReceived(_head(len(body), content_type=content_type) + body)
    assert _status(transport) == 415
    assert _json_of_first(transport)["msg"] == "smtp_unsupported_media_type"
    assert shell.sent == []


def test_json_content_type_with_parameters_is_accepted(shell: Shell) -> None:
    """Parameters and letter case of the media type do not matter (RFC 9110 8.3.1)."""
    answer = shell.post(VALID, content_type="Application/JSON; charset=utf-8")
    assert answer.status == 200, answer.raw
    assert len(shell.sent) == 1


# Wrong values by the kind of field; each list excludes values the field legitimately accepts.
_NOT_A_STRING = [123, -1, 1.5, True, False, [], ["user1@example.org"], {}, {"a": "b"}]
_NOT_AN_ADDRESS_LIST = [123, 1.5, True, "user1@example.org", {}, {"0": "a@example.org"}, [123], [None], [[]], [{}],
                        [["a@example.org"]], [True]]
WRONG_TYPES: dict[str, tuple[list[Any], set[str]]] = {
    "from": (_NOT_A_STRING + [None, ""], {"smtp_invalid_from"}),
    "to": (_NOT_AN_ADDRESS_LIST, {"smtp_invalid_recipient"}),
    "cc": (_NOT_AN_ADDRESS_LIST, {"smtp_invalid_cc"}),
    "bcc": (_NOT_AN_ADDRESS_LIST, {"smtp_invalid_bcc"}),
    "reply_to": (_NOT_A_STRING + [""], {"smtp_invalid_reply_to"}),
    "subject": (_NOT_A_STRING, {"smtp_invalid_field"}),
    "body": (_NOT_A_STRING, {"smtp_invalid_field"}),
    "html_body": (_NOT_A_STRING, {"smtp_invalid_field"}),
    "attachments": ([123, "file", True, {}, {"filename": "a"}, [1], ["x"], [[]], [None], [{"filename": "a.txt"}],
                     [{"filename": 1, "content": "YQ=="}], [{"filename": "a.txt", "content": 1}],
                     [{"filename": "a.txt", "content": "YQ==", "content_type": 1}],
                     [{"filename": "a.txt", "content": ["YQ=="]}],
                     [{"filename": "a.txt", "content": "YQ==", "extra": "x"}]], {"smtp_invalid_attachment"}),
    "smtp_host": (_NOT_A_STRING + [""], {"smtp_invalid_field"}),
    "smtp_port": (["10587", 10587.0, 10587.5, True, False, [], [10587], {}, -1, 0, 65536, 10**30, -(10**30)],
                  {"smtp_invalid_field"}),
    "smtp_user": (_NOT_A_STRING + [""], {"smtp_invalid_smtp_user"}),
    "password": (_NOT_A_STRING, {"smtp_invalid_field"}),
    "app_password": (_NOT_A_STRING, {"smtp_invalid_field"}),
    "headers": ([123, "X-A: 1", True, [], [["X-A", "1"]], {"X-A": 1}, {"X-A": ""}, {"X-A": ["1"]}, {"Bad Name": "v"},
                 {"X-A:": "v"}, {"": "v"}, {"X-\u00e4": "v"}, {"X-A": "a\r\nBcc: x@evil.example"}, {"Bcc": "x@evil.example"},
                 {"Content-Type": "text/html"}, {"X-A": "1", "x-a": "2"}],
                {"smtp_invalid_header", "smtp_header_not_allowed"}),
    "message_id": (_NOT_A_STRING + ["", "abc", "<abc>", "<a@b> <c@d>", "<a@b>\r\nBcc: x@evil.example", "<a b@c>"],
                   {"smtp_invalid_message_id"}),
    "in_reply_to": (_NOT_A_STRING + ["", "abc", "<a@b>\nX-Evil: 1", "<@b>"], {"smtp_invalid_message_id"}),
    "references": ([123, 1.5, True, {}, [123], ["abc"], "abc", "<a@b> junk", ["<a@b>\r\nX: y"], [["<a@b>"]]],
                   {"smtp_invalid_message_id"}),
    "list_unsubscribe": ([123, "https://example.org/u", True, [], {}, {"url": "http://example.org/u"}, {"url": 1},
                          {"url": "https://example.org/u\r\nBcc: x@evil.example"}, {"mailto": "not an address"},
                          {"url": "https://example.org/u", "other": 1}, {"url": "javascript:alert(1)"}],
                         {"smtp_invalid_list_unsubscribe"}),
    # Well-formed times are refused too here: send_at needs Prefer: respond-async.
    "send_at": (_NOT_A_STRING + ["", "tomorrow", "2027-01-31", "2027-01-31T09:00:00", "2027-02-30T09:00:00Z",
                                 "2027-01-31T09:00:00Z\r\nX: y", "2027-01-31T09:00:00Z"], {"smtp_invalid_send_at"}),
    "dry_run": ([1, 0, "true", "yes", None, [], {}, [True], 1.0], {"smtp_invalid_field"}),
}


@pytest.mark.parametrize(
    ("field", "value"),
    [(field, value) for field, (values, _codes) in WRONG_TYPES.items() for value in values],
    ids=lambda item: repr(item)[:30],
)
def test_wrong_type_for_each_field_is_coded_400(shell: Shell, field: str, value: Any) -> None:
    """A wrong JSON type or an out-of-range value in any field answers 400 with that field's code."""
    answer = shell.post(request(**{field: value}))
    assert_refused(shell, answer, 400, *WRONG_TYPES[field][1])


def test_request_fields_cover_every_known_field() -> None:
    """The wrong-type table and the fuzzer name every field the parser knows, so none is left untested."""
    assert set(WRONG_TYPES) == validate.KNOWN_FIELDS
    assert set(FIELD_STRATEGIES) == validate.KNOWN_FIELDS


_PORT_PREFIX = b'{"from": "user1@example.org", "to": ["a@example.org"], "subject": "s", "body": "b", "password": "p", "smtp_port": '


@pytest.mark.parametrize(
    "raw",
    [
        _PORT_PREFIX + b"1" + b"0" * 400 + b"}",
        _PORT_PREFIX + b"1e400}",
        _PORT_PREFIX + b"-1e400}",
        _PORT_PREFIX + b"1.0e1}",
    ],
)
def test_huge_and_float_numbers_are_invalid_ports(shell: Shell, raw: bytes) -> None:
    """Numbers beyond any port, infinities from overflow and floats answer 400 smtp_invalid_field."""
    assert_refused(shell, shell.post(raw), 400, "smtp_invalid_field")


@pytest.mark.parametrize(
    "junk",
    [
        {"unknown": 1},
        {"From": "user1@example.org"},
        {"header": {"Bcc": "x@evil.example"}},
        {"to ": ["a@example.org"]},
        {"": ""},
        {"\u0000": 1},
        {"x" * 10_000: [[[[{}]]]]},
    ],
    ids=lambda junk: repr(junk)[:30],
)
def test_unknown_and_nested_junk_fields_are_refused(shell: Shell, junk: dict[str, Any]) -> None:
    """A field the API does not know, however nested, answers 400 smtp_unknown_field."""
    assert_refused(shell, shell.post({**VALID, **junk}), 400, "smtp_unknown_field")


# --------------------------------------------------------------------------- header injection

ADDRESS_FIELDS = {
    "from": "smtp_invalid_from",
    "to": "smtp_invalid_recipient",
    "cc": "smtp_invalid_cc",
    "bcc": "smtp_invalid_bcc",
    "reply_to": "smtp_invalid_reply_to",
    "smtp_user": "smtp_invalid_smtp_user",
}


def _address_variants(char: str) -> list[str]:
    """``char`` in the display name, local part, domain, and after the address."""
    return [
        f'"Eve{char}Bcc: x@evil.example" <user1@example.org>',
        f"Eve{char}Bcc: x@evil.example <user1@example.org>",
        f"user1{char}@example.org",
        f"user1@example{char}.org",
        f"user1@example.org{char}",
        f"user1@example.org{char}Bcc: x@evil.example",
        f"{char}user1@example.org",
    ]


@pytest.mark.parametrize("field", sorted(ADDRESS_FIELDS))
@pytest.mark.parametrize("char", CONTROLS, ids=lambda c: f"U+{ord(c[0]):04X}{'+LF' if len(c) > 1 else ''}")
def test_control_characters_in_addresses_are_refused(shell: Shell, field: str, char: str) -> None:
    """CR, LF, NUL and other controls anywhere in an address or display name answer 400 for that field."""
    for variant in _address_variants(char):
        value: Any = [variant] if field in ("to", "cc", "bcc") else variant
        answer = shell.post(request(**{field: value}))
        assert_refused(shell, answer, 400, ADDRESS_FIELDS[field])


@pytest.mark.parametrize("char", CONTROLS, ids=lambda c: f"U+{ord(c[0]):04X}{'+LF' if len(c) > 1 else ''}")
def test_control_characters_in_subject_are_refused(shell: Shell, char: str) -> None:
    """A subject with a line break or control character answers 400 smtp_invalid_subject."""
    for subject in (f"Hi{char}Bcc: x@evil.example", f"{char}Hi", f"Hi{char}"):
        assert_refused(shell, shell.post(request(subject=subject)), 400, "smtp_invalid_subject")


@pytest.mark.parametrize("char", CONTROLS, ids=lambda c: f"U+{ord(c[0]):04X}{'+LF' if len(c) > 1 else ''}")
@pytest.mark.parametrize("part", ["filename", "content_type"])
def test_control_characters_in_attachment_headers_are_refused(shell: Shell, char: str, part: str) -> None:
    """A file name or content type with a control character answers 400 smtp_invalid_attachment."""
    attachment = {"filename": "report.pdf", "content": "JVBERg==", "content_type": "application/pdf"}
    attachment[part] = f"{attachment[part][:4]}{char}X-Evil: 1"
    answer = shell.post(request(attachments=[attachment]))
    assert_refused(shell, answer, 400, "smtp_invalid_attachment")


@pytest.mark.parametrize("char", CONTROLS, ids=lambda c: f"U+{ord(c[0]):04X}{'+LF' if len(c) > 1 else ''}")
def test_control_characters_in_custom_headers_and_ids_are_refused(shell: Shell, char: str) -> None:
    """Custom header names and values, message ids and the unsubscribe URL with a control character
    answer 400 with their field's code."""
    cases: list[tuple[dict[str, Any], str]] = [
        ({"headers": {f"X-A{char}Bcc": "1"}}, "smtp_invalid_header"),
        ({"headers": {"X-A": f"1{char}Bcc: x@evil.example"}}, "smtp_invalid_header"),
        ({"message_id": f"<a@example.org>{char}Bcc: x@evil.example"}, "smtp_invalid_message_id"),
        ({"in_reply_to": f"<a{char}@example.org>"}, "smtp_invalid_message_id"),
        ({"references": [f"<a@example.org>{char}"]}, "smtp_invalid_message_id"),
        ({"list_unsubscribe": {"url": f"https://example.org/u{char}Bcc: x@evil.example"}}, "smtp_invalid_list_unsubscribe"),
        ({"list_unsubscribe": {"mailto": f"u@example.org{char}Bcc: x@evil.example"}}, "smtp_invalid_list_unsubscribe"),
    ]
    for changes, code in cases:
        assert_refused(shell, shell.post(request(**changes)), 400, code)


@pytest.mark.parametrize("value", ENCODED_VALUE_INJECTIONS := [
    "=?utf-8?q?1=0D=0ABcc:_x@evil.example?=",
    "=?utf-8?b?MQ0KWC1FdmlsOiAx?=",
    "a =?us-ascii?q?=0AX-Evil:_1?= b",
])
def test_encoded_word_in_custom_header_adds_no_header(shell: Shell, value: str) -> None:
    """An encoded word in a custom header value never becomes a header line of its own."""
    answer = shell.post(request(headers={"X-Campaign": value}))
    if answer.status != 200:
        assert_refused(shell, answer, 400, "smtp_invalid_header")
        return
    _envelope, message = submitted(shell)
    assert_only_own_headers(message, {"x-campaign"})


def test_nul_in_body_or_html_is_refused(shell: Shell) -> None:
    """NUL cannot be carried in a text part (RFC 5322 2.3 forbids it): 400 smtp_invalid_field."""
    for field in ("body", "html_body"):
        assert_refused(shell, shell.post(request(**{field: "a\x00b"})), 400, "smtp_invalid_field")


@pytest.mark.parametrize(
    ("value", "accepted"),
    [
        ("user1@example.org (comment)", True),
        ("(comment) user1@example.org", True),
        ("user1(comment)@example.org", True),
        ("<user1@example.org>", True),
        ('"quoted local"@example.org', False),
        ('"user1"@example.org', None),
        ('"a\\"b"@example.org', False),
        ("user1@[127.0.0.1]", False),
        ("user1@[IPv6:::1]", False),
        ("user1@127.0.0.1", False),
        ("user1@b@example.org", False),
        ("user1@@example.org", False),
        ("@example.org", False),
        ("user1@", False),
        ("user1@localhost", False),
        ("user1@example.org, boss@example.org", False),
        ("user1@example.org; boss@example.org", False),
        ("undisclosed-recipients:;", False),
        ("group: user1@example.org;", False),
        ("user1@example.org <boss@example.org>", False),
        ("<user1@example.org> boss@example.org", False),
        ("user1@exa mple.org", False),
        ("us er1@example.org", False),
        ("j\u00f6rg@example.org", False),
        ("user1@" + "a" * 64 + ".org", False),
        ("u" * 65 + "@example.org", False),
        ("=?utf-8?q?user1=40example.org?=", False),
        ('"=?utf-8?q?Eve=0D=0ABcc:_x@evil.example?=" <user1@example.org>', False),
        ("=?utf-8?q?Eve=0D=0ABcc:_x@evil.example?= <user1@example.org>", False),
        ("=?utf-8?b?RXZlDQpCY2M6IHhAZXZpbC5leGFtcGxl?= <user1@example.org>", False),
    ],
)
def test_address_forms(shell: Shell, value: str, accepted: bool | None) -> None:
    """Comments are dropped; quoted local parts, IP literals, several @ or addresses, and encoded-word
    tricks that decode to line breaks are refused; an accepted form yields only the bare address
    (``None``: either outcome is safe, e.g. a quoted local part that needs no quotes)."""
    answer = shell.post(request(to=[value]))
    if accepted is False or (accepted is None and answer.status != 200):
        assert_refused(shell, answer, 400, "smtp_invalid_recipient")
        return
    assert answer.status == 200, answer.raw
    envelope, message = submitted(shell)
    assert envelope.recipients == ("user1@example.org",)
    parsed = assert_only_own_headers(message)
    assert [a.addr_spec for a in parsed["To"].addresses] == ["user1@example.org"]
    assert b"comment" not in message


def test_encoded_word_display_name_stays_a_name(shell: Shell) -> None:
    """A harmless encoded word in a display name ends up as a display name and adds no header."""
    answer = shell.post(request(to=["=?utf-8?q?J=C3=B6rg?= <user1@example.org>"]))
    assert answer.status == 200, answer.raw
    envelope, message = submitted(shell)
    assert envelope.recipients == ("user1@example.org",)
    parsed = assert_only_own_headers(message)
    assert parsed["To"].addresses[0].display_name == "J\u00f6rg"


ENCODED_INJECTIONS = [
    "=?utf-8?q?Hi=0D=0ABcc:_x@evil.example?=",
    "=?utf-8?b?SGkNCkJjYzogeEBldmlsLmV4YW1wbGU=?=",
    "Hi =?us-ascii?q?=0AX-Evil:_1?= there",
    "=?utf-8?q?=0D=0A=0D=0Abody_takeover?=",
]


@pytest.mark.parametrize("subject", ENCODED_INJECTIONS)
def test_encoded_word_in_subject_adds_no_header(shell: Shell, subject: str) -> None:
    """An encoded word in the subject is text: refused, or sent so that it decodes to exactly what was
    written, and never turns into a header of its own."""
    answer = shell.post(request(subject=subject))
    if answer.status != 200:
        assert_refused(shell, answer, 400, "smtp_invalid_subject")
        return
    _envelope, message = submitted(shell)
    parsed = assert_only_own_headers(message)
    assert parsed["Subject"] == subject


@pytest.mark.parametrize("filename", ["=?utf-8?q?a=0D=0AX-Evil:_1?=", "=?utf-8?b?YQ0KWC1FdmlsOiAx?="])
def test_encoded_word_in_filename_adds_no_header(shell: Shell, filename: str) -> None:
    """An encoded word in a file name never becomes a header line of the attachment's part."""
    answer = shell.post(request(attachments=[{"filename": filename, "content": "YQ=="}]))
    if answer.status != 200:
        assert_refused(shell, answer, 400, "smtp_invalid_attachment")
        return
    _envelope, message = submitted(shell)
    assert b"X-Evil" not in message.split(b"\r\n\r\n", 1)[1].replace(b"X-Evil:_1", b"")
    parts = list(parse_message(message).iter_attachments())
    assert len(parts) == 1
    assert {name.lower() for name, _value in parts[0].items()} <= {
        "content-type", "content-transfer-encoding", "content-disposition", "mime-version"
    }


@pytest.mark.parametrize("field", ["subject", "body", "html_body", "filename", "password"])
def test_lone_surrogates_are_refused(shell: Shell, field: str) -> None:
    """A string with a lone surrogate cannot be encoded as UTF-8: 400, not a 500, and nothing is sent."""
    if field == "filename":
        body = request(attachments=[{"filename": "a\ud800.txt", "content": "YQ=="}])
    else:
        body = request(**{field: "x\ud800y"})
    answer = shell.post(json.dumps(body).encode("ascii"))
    assert 400 <= answer.status < 500, answer.raw
    assert answer.code in CODES
    assert shell.sent == []


# --------------------------------------------------------------------------- body tricks

CHUNK = 16 * 1024  # twisted.mail's transformChunk block, where a lone dot used to end DATA early


def _dot_bodies() -> list[str]:
    """Bodies with a lone ``.`` line starting at every offset around 16 KiB and 64 KiB boundaries."""
    bodies = []
    for boundary in (CHUNK, 2 * CHUNK, 4 * CHUNK):
        for delta in range(-6, 7):
            filler = "f" * 60 + "\n"
            prefix = (filler * (boundary // len(filler) + 1))[: boundary + delta]
            bodies.append(prefix + "\n.\nQUIT\nRCPT TO:<x@evil.example>\n.\n..\n.x\n" + "tail\n")
    return bodies


def _decoded_text(parsed: EmailMessage, subtype: str) -> str:
    part = parsed.get_body(preferencelist=(subtype,))
    assert part is not None
    return str(part.get_content()).replace("\r\n", "\n")


def test_dot_lines_at_every_offset_around_chunk_boundaries_arrive_exactly(shell: Shell) -> None:
    """Lone dots and SMTP command lines in text, HTML and attachment, at every offset around 16 KiB and
    64 KiB, end DATA only at the real end and arrive as written, with no extra recipient."""
    for body in _dot_bodies():
        shell.sent.clear()
        attachment = body.encode("ascii").replace(b"\n", b"\r\n")
        answer = shell.post(
            request(
                body=body,
                html_body=body,
                attachments=[{"filename": "dots.txt", "content": base64.b64encode(attachment).decode()}],
            )
        )
        assert answer.status == 200, answer.raw
        envelope, message = submitted(shell)
        assert envelope.recipients == ("recipient@example.com",)
        assert_wire_safe(message)
        parsed = assert_only_own_headers(message)
        assert _decoded_text(parsed, "plain") == body
        assert _decoded_text(parsed, "html") == body
        (part,) = list(parsed.iter_attachments())
        assert part.get_payload(decode=True) == attachment


def test_dot_stuffing_is_applied_to_the_whole_payload() -> None:
    """Every message line starting with '.' is sent with one more dot, at any offset (RFC 5321 4.5.2)."""
    for offset in range(CHUNK - 4, CHUNK + 5):
        message = b"a" * offset + b"\r\n.\r\n.hidden\r\n"
        payload = data_payload(message)
        assert payload.count(b"\r\n.\r\n") == 1 and payload.endswith(b"\r\n.\r\n")
        assert unstuff(payload) == (message, b"")


def test_long_lines_are_wrapped_and_decode_to_the_original(shell: Shell) -> None:
    """Lines over 998 octets (ASCII and UTF-8) are encoded so no wire line exceeds 998 and decode intact."""
    body = "a" * 5000 + "\n" + "\u00e9\u65e5" * 1500 + "\n" + "." + "b" * 2000 + "\n"
    answer = shell.post(request(body=body, html_body="<p>" + "c" * 4000 + "</p>\n"))
    assert answer.status == 200, answer.raw
    _envelope, message = submitted(shell)
    assert_wire_safe(message)
    parsed = parse_message(message)
    assert _decoded_text(parsed, "plain") == body
    assert _decoded_text(parsed, "html") == "<p>" + "c" * 4000 + "</p>\n"


@pytest.mark.parametrize("text", ["a\rb\r", "a\r\rb", "\r.\r", "x\r\n.\r\ny", "a\r\nb\rc\nd"])
def test_bare_cr_never_reaches_the_wire(shell: Shell, text: str) -> None:
    """A bare CR becomes a line break (RFC 5321 2.3.8 allows CR only before LF); no stray CR is sent."""
    answer = shell.post(request(body=text))
    assert answer.status == 200, answer.raw
    _envelope, message = submitted(shell)
    assert_wire_safe(message)
    expected = text.replace("\r\n", "\n").replace("\r", "\n")
    expected = expected if expected.endswith("\n") else expected + "\n"
    assert _decoded_text(parse_message(message), "plain") == expected


def test_attachment_bytes_with_smtp_terminators_arrive_exactly(shell: Shell) -> None:
    """Binary attachment content holding CR, LF, '.' lines and commands arrives byte for byte."""
    content = b"\r\n.\r\nQUIT\r\n\r.\r\n\n.\n\x00\xff" + bytes(range(256)) * 70
    answer = shell.post(request(attachments=[{"filename": "raw.bin", "content": base64.b64encode(content).decode()}]))
    assert answer.status == 200, answer.raw
    envelope, message = submitted(shell)
    assert envelope.recipients == ("recipient@example.com",)
    assert_wire_safe(message)
    (part,) = list(parse_message(message).iter_attachments())
    assert part.get_payload(decode=True) == content


# --------------------------------------------------------------------------- size


def test_thousands_of_recipients_are_refused(shell: Shell) -> None:
    """More recipients than --max-recipients across to, cc and bcc answer 400 smtp_too_many_recipients."""
    many = [f"r{i}@example.com" for i in range(3000)]
    assert_refused(shell, shell.post(request(to=many)), 400, "smtp_too_many_recipients")
    split = {"to": many[:40], "cc": many[40:80], "bcc": many[80:121]}
    assert_refused(shell, shell.post(request(**split)), 400, "smtp_too_many_recipients")


def test_recipient_limit_is_inclusive(shell: Shell) -> None:
    """Exactly --max-recipients recipients are accepted and each is an envelope recipient."""
    answer = shell.post(request(to=[f"r{i}@example.com" for i in range(100)]))
    assert answer.status == 200, answer.raw
    envelope, _message = submitted(shell)
    assert len(envelope.recipients) == 100


def test_too_many_recipients_are_refused_before_parsing_them(shell: Shell, monkeypatch: pytest.MonkeyPatch) -> None:
    """A flood of recipients is refused by count, without parsing each address (bounded CPU)."""
    calls = []
    real = validate.parse_address

    def counting(value: Any, field: str, code: str) -> Any:
        calls.append(field)
        return real(value, field, code)

    monkeypatch.setattr(validate, "parse_address", counting)
    answer = shell.post(request(to=[f"r{i}@example.com" for i in range(5000)]))
    assert_refused(shell, answer, 400, "smtp_too_many_recipients")
    assert len(calls) <= 1 + CONFIG.max_recipients


def test_thousands_of_attachments_are_refused(shell: Shell, monkeypatch: pytest.MonkeyPatch) -> None:
    """More attachments than --max-attachments answer 400 smtp_too_many_attachments before any is decoded."""
    decoded = []
    real = validate.binascii.a2b_base64

    def counting(data: Any, strict_mode: bool = False) -> bytes:
        decoded.append(1)
        return real(data, strict_mode=strict_mode)

    monkeypatch.setattr(validate.binascii, "a2b_base64", counting)
    attachments = [{"filename": f"f{i}.txt", "content": "YQ=="} for i in range(3000)]
    assert_refused(shell, shell.post(request(attachments=attachments)), 400, "smtp_too_many_attachments")
    assert decoded == []
    assert shell.post(request(attachments=attachments[:2])).status == 200
    assert decoded == [1, 1]  # the counter sees the decoding it is there to catch


def _channel(
    limit: int, deadline: float = LimitedRequest.deadline, clock: Clock | None = None
) -> tuple[Shell, Any, StringTransport]:
    """A twisted.web channel of a Site with the body limit (and --request-timeout), connected to an
    in-memory transport."""
    shell = Shell()
    # The channel's timers go on a clock of their own, never on the global reactor.
    site = ApiSite(shell.api.resource(), reactor=clock or Clock())
    site.requestFactory = request_factory(limit, deadline)
    site.protocol = channel_factory
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    channel.makeConnection(transport)
    return shell, channel, transport


def _head(length: int | None = None, *extra: bytes, content_type: str | None = "application/json") -> bytes:
    """A request head for the send route with the good key, ``Content-Length`` and extra header lines."""
    lines = [b"POST /api/v1/send/email HTTP/1.1", b"Host: sidecar.test", b"X-API-Key: " + GOOD_KEY.encode()]
    if content_type is not None:
        lines.append(b"Content-Type: " + content_type.encode("latin-1"))
    if length is not None:
        lines.append(b"Content-Length: %d" % length)
    return b"\r\n".join([*lines, *extra]) + b"\r\n\r\n"


def _status(transport: StringTransport) -> int:
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", transport.value())
    assert match, transport.value()[:200]
    return int(match.group(1))


def _json_of(transport: StringTransport) -> Any:
    return json.loads(transport.value().split(b"\r\n\r\n", 1)[1])


LIMIT = 4096


def assert_closes_after_lingering(transport: StringTransport, clock: Clock) -> None:
    """After an early answer the connection stays open only while the client may still be sending
    (the lingering close, so that it can read the answer), then closes."""
    assert not transport.disconnecting
    clock.advance(LINGER_SECONDS)
    assert transport.disconnecting


def _deadline_channel(deadline: float) -> tuple[Shell, Any, StringTransport, Clock]:
    """Like ``_channel``, with a --request-timeout and the Site's clock at hand."""
    clock = Clock()
    shell, channel, transport = _channel(LIMIT, deadline, clock)
    return shell, channel, transport, clock


def test_a_body_trickling_in_past_the_deadline_gets_408_and_the_connection_closes() -> None:
    """A byte now and then keeps twisted.web's idle timer happy, but not the whole-request deadline."""
    body = json.dumps(VALID).encode()
    shell, channel, transport, clock = _deadline_channel(30)
    channel.dataReceived(_head(len(body)))
    for index in range(5):  # 5 bytes, one every 5 s: never idle for long
        clock.advance(5)
        channel.dataReceived(body[index : index + 1])
    assert transport.value() == b""
    clock.advance(5.5)
    assert _status(transport) == 408
    assert _json_of(transport)[0]["msg"] == "smtp_request_timeout"
    assert_closes_after_lingering(transport, clock)
    channel.dataReceived(body[5:])  # the rest comes too late: never dispatched
    assert shell.sent == [] and transport.value().count(b"HTTP/1.1") == 1


def test_headers_that_never_end_get_408_too() -> None:
    """The deadline starts at the request line, so slow headers are cut off as well."""
    _shell, channel, transport, clock = _deadline_channel(10)
    channel.dataReceived(b"POST /api/v1/send/email HTTP/1.1\r\nHost: sidecar.test\r\n")
    clock.advance(9)
    channel.dataReceived(b"X-Slow: 1\r\n")
    clock.advance(1.5)
    assert _status(transport) == 408
    assert_closes_after_lingering(transport, clock)


def test_a_request_in_time_is_answered_and_its_deadline_is_gone() -> None:
    """A request that arrives whole is served; passing its deadline later changes nothing."""
    body = json.dumps(VALID).encode()
    shell, channel, transport, clock = _deadline_channel(10)
    channel.dataReceived(_head(len(body)) + body)
    assert _status(transport) == 200
    answered = transport.value()
    clock.advance(11)
    assert transport.value() == answered and len(shell.sent) == 1


def test_declared_length_over_the_limit_is_413_before_any_body() -> None:
    """Content-Length over --max-request-bytes answers 413 at once, without 100 Continue, and closes."""
    clock = Clock()
    shell, channel, transport = _channel(LIMIT, clock=clock)
    channel.dataReceived(_head(LIMIT + 1, b"Expect: 100-continue"))
    assert _status(transport) == 413
    assert b"100 Continue" not in transport.value()
    assert _json_of(transport)[0]["msg"] == "smtp_request_too_large"
    assert_closes_after_lingering(transport, clock)
    assert shell.sent == []


def test_chunked_body_over_the_limit_is_413_while_it_arrives() -> None:
    """A chunked body is counted as it arrives: past the limit it answers 413 and stores nothing more."""
    clock = Clock()
    shell, channel, transport = _channel(LIMIT, clock=clock)
    channel.dataReceived(_head(None, b"Transfer-Encoding: chunked"))
    chunk = b"400\r\n" + b"x" * 0x400 + b"\r\n"
    for _ in range(LIMIT // 0x400):
        channel.dataReceived(chunk)
    assert transport.value() == b""  # exactly at the limit: still reading
    channel.dataReceived(chunk)
    assert _status(transport) == 413
    assert_closes_after_lingering(transport, clock)
    before = len(transport.value())
    for _ in range(50):
        channel.dataReceived(chunk)
    assert len(transport.value()) == before
    assert shell.sent == []


def test_huge_chunk_size_is_refused_once_the_data_passes_the_limit() -> None:
    """A chunk header announcing an absurd size does not make the server buffer past the limit."""
    shell, channel, transport = _channel(LIMIT)
    channel.dataReceived(_head(None, b"Transfer-Encoding: chunked") + b"fffffffffffffff\r\n")
    for _ in range(LIMIT // 512 + 1):
        channel.dataReceived(b"y" * 512)
    assert _status(transport) == 413
    assert shell.sent == []


def test_under_declared_length_never_sends_the_excess() -> None:
    """A Content-Length smaller than the body: only the declared bytes are the body (invalid JSON, 400);
    the excess is never taken as part of a request, and a long excess line closes the connection."""
    shell, channel, transport = _channel(LIMIT)
    body = json.dumps(VALID).encode()
    channel.dataReceived(_head(10) + body + b"x" * 20_000)
    assert _status(transport) == 400
    assert _json_of_first(transport)["msg"] == "smtp_invalid_json"
    assert transport.disconnecting
    assert shell.sent == []


def _json_of_first(transport: StringTransport) -> Any:
    _head, _, rest = transport.value().partition(b"\r\n\r\n")
    size_line, _, chunk = rest.partition(b"\r\n")
    return json.loads(chunk[: int(size_line, 16)])[0]


def test_body_at_the_limit_is_served_and_one_byte_more_is_not() -> None:
    """A body of exactly --max-request-bytes is processed; one byte more answers 413."""
    body = json.dumps(request(body="z")).encode()
    padded = body[:-1] + b" " * (LIMIT - len(body)) + b"}"
    assert len(padded) == LIMIT
    shell, channel, transport = _channel(LIMIT)
    channel.dataReceived(_head(LIMIT) + padded)
    assert _status(transport) == 200
    assert len(shell.sent) == 1
    shell, channel, transport = _channel(LIMIT)
    channel.dataReceived(_head(LIMIT + 1) + padded + b" ")
    assert _status(transport) == 413
    assert shell.sent == []


@pytest.mark.parametrize(
    "framing",
    [
        [b"Content-Length: 10", b"Transfer-Encoding: chunked"],
        [b"Content-Length: 10", b"Content-Length: 20000"],
        [b"Content-Length: -1"],
        [b"Content-Length: 1e9"],
        [b"Content-Length: 0x10"],
        [b"Transfer-Encoding: gzip, chunked, identity"],
    ],
)
def test_ambiguous_framing_is_refused_and_closed(framing: list[bytes]) -> None:
    """Contradictory or malformed framing is refused with 400 by the HTTP layer and the connection
    closes: no request smuggling, nothing reaches the service."""
    clock = Clock()
    shell, channel, transport = _channel(LIMIT, clock=clock)
    channel.dataReceived(_head(None, *framing) + json.dumps(VALID).encode())
    assert _status(transport) == 400
    assert b'"msg":"smtp_bad_http_request"' in transport.value()
    assert_closes_after_lingering(transport, clock)
    assert shell.sent == []


# --------------------------------------------------------------------------- SMTP targets


@pytest.mark.parametrize(
    "target",
    [
        {"smtp_host": "127.0.0.2"},
        {"smtp_host": "127.0.0.2", "smtp_port": ALLOWED_PORT},
        {"smtp_host": "127.1"},
        {"smtp_host": "127.000.000.001"},
        {"smtp_host": "2130706433"},
        {"smtp_host": "0.0.0.0"},
        {"smtp_host": "::1"},
        {"smtp_host": "[::1]"},
        {"smtp_host": "::ffff:127.0.0.1"},
        {"smtp_host": "localhost"},
        {"smtp_host": "postfix-mailcow"},
        {"smtp_host": "127.0.0.1.nip.example"},
        {"smtp_host": "127.0.0.1:10587"},
        {"smtp_host": "127.0.0.1."},
        {"smtp_host": " 127.0.0.1"},
        {"smtp_host": "127.0.0.1\x00"},
        {"smtp_host": "127.0.0.1\r\n"},
        {"smtp_host": "x" * 300},
        {"smtp_port": 0},
        {"smtp_port": -1},
        {"smtp_port": 65536},
        {"smtp_port": 2**31},
        {"smtp_port": 25},
        {"smtp_port": 587},
        {"smtp_port": ALLOWED_PORT + 1},
        {"smtp_host": "127.0.0.1", "smtp_port": 3306},
    ],
    ids=lambda target: repr(target)[:40],
)
def test_targets_outside_the_allow_list_are_refused_before_any_connection(shell: Shell, target: dict[str, Any]) -> None:
    """Other loopback addresses and spellings, host names, port 0 and out-of-range ports are refused
    (403 smtp_host_not_allowed, or 400 for a value that is no host or port) and nothing is submitted."""
    answer = shell.post(request(**target))
    assert answer.status in (400, 403), answer.raw
    assert answer.code in ("smtp_host_not_allowed", "smtp_invalid_field")
    assert shell.sent == []


def test_allowed_target_is_used_exactly(shell: Shell) -> None:
    """The allowed host and port (any letter case of a name) are submitted to as listed."""
    answer = shell.post(request(smtp_host="127.0.0.1", smtp_port=10465))
    assert answer.status == 200, answer.raw
    target = shell.sent[0][0]
    assert (target.host, target.port, target.security.value) == ("127.0.0.1", 10465, "tls")


# --------------------------------------------------------------------------- keeps serving


def test_service_keeps_serving_after_a_barrage(shell: Shell) -> None:
    """After every kind of refused input on one shell, a valid request is still sent exactly once."""
    barrage: list[Any] = [b"{", b"[]", b"\xff", b"[" * 50_000, request(to=["a\r\nb@example.org"]),
                          request(subject="x\ny"), request(smtp_host="127.0.0.2"), request(smtp_port=0),
                          request(attachments=[{"filename": "../../etc/passwd", "content": "YQ=="}]),
                          request(to=[f"r{i}@example.com" for i in range(500)])]
    for body in barrage:
        answer = shell.post(body)
        assert 400 <= answer.status < 500, answer.raw
    assert shell.sent == []
    answer = shell.post(VALID)
    assert answer.status == 200, answer.raw
    assert len(shell.sent) == 1


# --------------------------------------------------------------------------- fuzzing

# Fragments an attacker would try: line ends, dots, separators, quotes, comments, non-ASCII.
_FRAGMENTS = st.sampled_from(
    ["\r", "\n", "\r\n", "\x00", "\x0b", "\x1b", "\x7f", "\x85", "\u2028", "\t", " ", ".", "\r\n.\r\n", "\n.\n",
     "<", ">", "@", '"', ",", ";", ":", "(", ")", "\\", "[", "]", "Bcc: x@evil.example", "\u00e9", "\u65e5",
     "\U0001f600", "RCPT TO:<x@evil.example>", "user1@example.org", "xn--", "-", "+tag"]
)
hostile_text = st.lists(st.one_of(_FRAGMENTS, st.text(max_size=6)), max_size=10).map("".join)
json_junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | hostile_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
_LOCALS = st.sampled_from(["user1", "a.b", "x+tag", "o'neil", "UPPER", "a" * 64, "1"])
_DOMAINS = st.sampled_from(["example.org", "example.com", "b\u00fccher.example", "EXAMPLE.NET", "a-b.example"])
_NAMES = st.one_of(st.just(""), hostile_text, st.sampled_from(["Jane", '"Doe, Jane"', "=?utf-8?q?J=C3=B6rg?="]))


@st.composite
def addresses(draw: Callable[..., Any]) -> str:
    """Valid addresses, sometimes with display names, sometimes with hostile text spliced in."""
    plain = f"{draw(_LOCALS)}@{draw(_DOMAINS)}"
    name = draw(_NAMES)
    value = f"{name} <{plain}>" if name else plain
    if draw(st.booleans()):
        spot = draw(st.integers(0, len(value)))
        value = value[:spot] + draw(hostile_text) + value[spot:]
    return value


_ADDRESS_VALUE = st.one_of(addresses(), addresses(), json_junk)
_ADDRESS_LIST = st.one_of(st.lists(addresses(), min_size=1, max_size=4), json_junk)
_BODY = st.one_of(st.lists(st.one_of(_FRAGMENTS, st.text(max_size=20)), max_size=30).map("".join), json_junk)
_ATTACHMENT = st.fixed_dictionaries(
    {"filename": st.one_of(st.sampled_from(["a.txt", "r\u00e9sum\u00e9.pdf", "x y.bin"]), hostile_text, json_junk),
     "content": st.one_of(st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()), hostile_text, json_junk)},
    optional={"content_type": st.one_of(st.sampled_from(["text/plain", "application/pdf", "image/png"]),
                                        hostile_text, json_junk)},
)
_MSG_IDS = st.sampled_from(["<a.b@example.org>", "<x@y>", "<a@b>\r\nBcc: x@evil.example", "<a@b> <c@d>", "<>"])
FIELD_STRATEGIES: dict[str, Any] = {
    "from": _ADDRESS_VALUE,
    "to": _ADDRESS_LIST,
    "cc": _ADDRESS_LIST,
    "bcc": _ADDRESS_LIST,
    "reply_to": _ADDRESS_VALUE,
    "subject": st.one_of(hostile_text, st.text(max_size=40), json_junk),
    "body": _BODY,
    "html_body": _BODY,
    "attachments": st.one_of(st.lists(_ATTACHMENT, max_size=3), json_junk),
    "smtp_host": st.one_of(st.sampled_from(["127.0.0.1", "127.0.0.2", "localhost", "::1"]), hostile_text, json_junk),
    "smtp_port": st.one_of(st.sampled_from([ALLOWED_PORT, 10465, 0, 25, 65536, -1]), st.integers(), json_junk),
    "smtp_user": _ADDRESS_VALUE,
    "password": st.one_of(st.text(max_size=20), json_junk),
    "app_password": st.one_of(st.text(max_size=20), json_junk),
    "headers": st.one_of(
        st.dictionaries(
            st.one_of(st.sampled_from(["X-Campaign", "X-A", "Bcc", "Content-Type", "List-Id", "x-a", "Resent-To"]),
                      hostile_text),
            st.one_of(hostile_text, st.sampled_from(["1", "=?utf-8?q?a=0D=0AX-Evil:_1?=", "a\tb"]), json_junk),
            max_size=3,
        ),
        json_junk,
    ),
    "message_id": st.one_of(_MSG_IDS, hostile_text, json_junk),
    "in_reply_to": st.one_of(_MSG_IDS, hostile_text, json_junk),
    "references": st.one_of(st.lists(st.one_of(_MSG_IDS, hostile_text), max_size=3), hostile_text, json_junk),
    "list_unsubscribe": st.one_of(
        st.fixed_dictionaries(
            {},
            optional={
                "url": st.one_of(st.sampled_from(["https://example.org/u?id=1", "http://example.org/u"]), hostile_text),
                "mailto": _ADDRESS_VALUE,
            },
        ),
        json_junk,
    ),
    "send_at": st.one_of(st.sampled_from(["2027-01-31T09:00:00Z", "2027-01-31T09:00:00+01:00"]), hostile_text, json_junk),
    "dry_run": st.one_of(st.just(False), hostile_text, json_junk),
}


@st.composite
def mutated_requests(draw: Callable[..., Any]) -> dict[str, Any]:
    """The valid request with some fields replaced by fuzzed values and some removed."""
    out = dict(VALID)
    for name in draw(st.sets(st.sampled_from(sorted(FIELD_STRATEGIES)), max_size=5)):
        if draw(st.integers(0, 9)) == 0:
            out.pop(name, None)
        else:
            out[name] = draw(FIELD_STRATEGIES[name])
    if draw(st.integers(0, 19)) == 0:
        out[draw(st.text(max_size=8))] = draw(json_junk)
    return out


FUZZ = settings(
    max_examples=300, derandomize=True, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def check_answer(shell: Shell, answer: Answer, body: Any = None) -> None:
    """The fuzzing oracle: never 5xx, never a traceback, coded errors, and what is sent is wire-safe."""
    assert answer.status < 500, answer.raw
    assert b"Traceback" not in answer.raw and b"File \"" not in answer.raw
    assert answer.body is not None, answer.raw
    if answer.status != 200:
        assert answer.code in CODES, answer.raw
        assert shell.sent == []
        return
    envelope, message = submitted(shell)
    assert_wire_safe(message)
    assert_only_own_headers(message, requested_headers(body))
    assert 1 <= len(envelope.recipients) <= CONFIG.max_recipients
    for recipient in envelope.recipients:
        assert re.fullmatch(r"[\x21-\x7e]+@[a-z0-9.-]+", recipient), recipient


@FUZZ
@given(body=mutated_requests())
def test_fuzzed_requests_are_coded_and_never_inject(body: dict[str, Any]) -> None:
    """Fuzzed requests near the valid one: coded 4xx with nothing sent, or a wire-safe message with only
    the service's own headers and recipients taken from the request."""
    shell = Shell()
    check_answer(shell, shell.post(body), body)


@FUZZ
@given(body=st.one_of(json_junk, st.dictionaries(st.sampled_from(sorted(FIELD_STRATEGIES)), json_junk)))
def test_fuzzed_json_values_are_coded(body: Any) -> None:
    """Any JSON value at all, including objects with only known keys and junk values: never a 5xx."""
    shell = Shell()
    check_answer(shell, shell.post(body), body)


@FUZZ
@given(raw=st.binary(max_size=200))
def test_fuzzed_bytes_are_coded(raw: bytes) -> None:
    """Arbitrary bytes as the body: a coded 4xx, never a traceback, nothing sent."""
    shell = Shell()
    answer = shell.post(raw)
    assert 400 <= answer.status < 500, answer.raw
    check_answer(shell, answer)



# --------------------------------------------------------------------------- an echoing SMTP server


@pytest.mark.parametrize("phase", ["mail", "rcpt", "data", "message"])
def test_auth_data_quoted_back_by_the_server_never_reaches_an_answer(phase: str) -> None:
    """A server that quotes the AUTH PLAIN line (or the password) in a reply after AUTH: the failure's
    text, its recipient replies and the success text carry '[redacted]' instead."""
    from mailcow_smtp_api.core.errors import SmtpFailure
    from tests.twisted.smtp_kit import CREDENTIALS, PASSWORD, PLAIN_BLOB, Conversation

    quoted = b" you sent AUTH PLAIN " + PLAIN_BLOB + b" = " + PASSWORD.encode("utf-8")
    conversation = Conversation(port=587, credentials=CREDENTIALS)
    conversation.connect()
    conversation.server(b"220 mail.test ESMTP")
    conversation.expect(b"EHLO client.test")
    conversation.server(b"250-mail.test", b"250 STARTTLS")
    conversation.dialogue((b"STARTTLS", b"220 2.0.0 Ready"))
    conversation.handshake(None)
    conversation.expect(b"EHLO client.test")
    conversation.server(b"250-mail.test", b"250 AUTH PLAIN")
    conversation.dialogue((b"AUTH PLAIN " + PLAIN_BLOB, b"235 2.7.0 Ok"))
    conversation.expect(b"MAIL FROM:<user1@example.org>")
    conversation.server(b"451 4.3.0" + quoted if phase == "mail" else b"250 2.1.0 Ok")
    if phase != "mail":
        conversation.expect(b"RCPT TO:<a@example.net>")
        conversation.server((b"550 5.1.1" if phase == "rcpt" else b"250 2.1.5 Ok") + quoted)
        conversation.expect(b"RCPT TO:<b@example.net>")
        conversation.server((b"550 5.1.1" if phase == "rcpt" else b"250 2.1.5 Ok") + quoted)
    if phase in ("data", "message"):
        conversation.expect(b"DATA")
        conversation.server(b"451 4.3.0" + quoted if phase == "data" else b"354 go")
    if phase == "message":
        conversation.sent()
        conversation.server(b"250 2.0.0 Ok: queued as 4AbC" + quoted)
    box: list[Any] = []
    conversation.result.addBoth(box.append)
    assert box
    outcome = box[0].value if isinstance(box[0], Failure) else box[0]
    if phase == "message":
        texts = [outcome.text, *(r.text for r in outcome.recipients)]
    else:
        assert isinstance(outcome, SmtpFailure)
        texts = [outcome.text, *(getattr(r, "text", "") for r in outcome.recipients)]
    assert any("[redacted]" in text for text in texts)
    for text in texts:
        assert PLAIN_BLOB.decode() not in text and PASSWORD not in text


_LINE = st.sampled_from([b"", b".", b"..", b".x", b"x", b"x.", b"\xc3\xa9", b"a" * 70])


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(st.lists(_LINE, min_size=1, max_size=12).map(lambda ls: b"".join(l + b"\r\n" for l in ls)), max_size=6),
    size=st.integers(min_value=1, max_value=40),
)
def test_pieces_are_stuffed_in_chunks_exactly_as_the_whole_message(pieces: list[bytes], size: int) -> None:
    """Pieces of whole lines, cut into chunks of any size: the same bytes as stuffing the joined message."""
    whole = b"".join(pieces)
    chunks = list(stuffed_chunks(message_pieces(tuple(pieces)), size))
    assert b"".join(chunks) == data_payload(whole)
    assert unstuff(b"".join(chunks)) == (whole, b"")
    for chunk in chunks[:-1]:
        assert chunk.endswith(b"\r\n")  # every chunk ends a line, so the next one starts one
        lines = [line[1:] if line.startswith(b".") else line for line in chunk.split(b"\r\n")[:-1]]
        unstuffed = sum(len(line) + 2 for line in lines)
        assert unstuffed <= size or len(lines) == 1  # only a line longer than a chunk makes one longer


@pytest.mark.parametrize(
    "pieces",
    [(b"a\r", b"\nb\r\n"), (b"a\r\n", b".b"), (b"x\n", b".\r\n"), (b"a", b"b\r\n"), (b"\r\n.", b"\r\n")],
)
def test_pieces_with_bare_line_ends_or_open_lines_at_a_seam_are_joined_first(pieces: tuple[bytes, ...]) -> None:
    """A bare CR, LF or an unfinished line at a seam is normalized as if the message came whole."""
    assert data_payload(pieces) == data_payload(b"".join(pieces))
    assert message_pieces(pieces) == (message_pieces(b"".join(pieces))[0],)
