"""Untrusted request body -> ``SendRequest``, or one ``ApiError`` naming the field.

Parse, don't validate: everything downstream trusts what this module returns. Pure core.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Mapping
from email.errors import HeaderParseError
from email.headerregistry import HeaderRegistry
from typing import Any, NoReturn

import attrs
import idna

from .errors import ApiError
from .model import Address, Attachment, SendRequest


@attrs.frozen
class ParsePolicy:
    """Limits and defaults the parser applies (from the operator's configuration)."""

    max_recipients: int = 100
    max_attachments: int = 50
    max_subject_chars: int = 998
    password_optional: Callable[[int | None], bool] = attrs.field(default=lambda port: False, eq=False)


KNOWN_FIELDS = frozenset(
    {
        "from", "to", "cc", "bcc", "reply_to", "subject", "body", "html_body", "attachments",
        "smtp_host", "smtp_port", "smtp_user", "password", "app_password",
    }
)
ATTACHMENT_FIELDS = frozenset({"filename", "content", "content_type"})

# RFC 5322 dot-atom local part. Quoted local parts are refused: they are legal but are a classic
# source of parser disagreement between us, postfix and mail clients.
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
# C0 controls, DEL, C1 controls, and Unicode line/paragraph separators: none may reach a header.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# RFC 2045 token characters for type and subtype.
_MIME_TYPE = re.compile(r"[A-Za-z0-9!#$&^_.+-]{1,64}/[A-Za-z0-9!#$&^_.+-]{1,64}")
_HEADERS = HeaderRegistry()


def _fail(code: str, field: str, message: str | None = None) -> NoReturn:
    raise ApiError.of(code, message, field=field)


# --------------------------------------------------------------------------- JSON


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constants(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def parse_json(raw: bytes) -> dict[str, Any]:
    """Decode a request body: strict UTF-8, strict JSON, no duplicate keys, an object at the top."""
    try:
        text = raw.decode("utf-8")
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except UnicodeDecodeError:
        _fail("smtp_invalid_json", "body", "the request body is not valid UTF-8")
    except (ValueError, RecursionError) as exc:
        reason = str(exc).split(":")[0] if isinstance(exc, ValueError) else "nested too deeply"
        _fail("smtp_invalid_json", "body", f"the request body is not valid JSON ({reason})")
    if not isinstance(value, dict):
        _fail("smtp_invalid_json", "body", "the request body must be a JSON object")
    return value


# --------------------------------------------------------------------------- addresses


def _domain_ascii(domain: str) -> str | None:
    """The IDNA A-label form of ``domain``, or None when it is not a valid host name."""
    if not domain or domain.startswith("[") or len(domain) > 253:
        return None
    try:
        ascii_form = idna.encode(domain, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError, ValueError):
        return None
    labels = ascii_form.split(".")
    if len(labels) < 2 or labels[-1].isdigit():
        return None  # a single label or a dotted IP address is not a mail domain here
    return ascii_form.lower()


def parse_address(value: Any, field: str, code: str) -> Address:
    """One address, optionally with a display name (``"Doe, Jane" <jane@example.org>``)."""
    if not isinstance(value, str) or not value.strip():
        _fail(code, field, f"'{field}' must be a non-empty string holding one email address")
    if len(value) > 512 or _CONTROL.search(value):
        _fail(code, field, f"'{field}' has control characters or is too long")
    try:
        header = _HEADERS("to", value)
        groups = header.groups
    except (HeaderParseError, IndexError, ValueError, TypeError):
        _fail(code, field, f"'{field}' is not a valid email address: {value!r}")
    if header.defects or len(groups) != 1 or groups[0].display_name is not None or len(groups[0].addresses) != 1:
        _fail(code, field, f"'{field}' must hold exactly one valid email address: {value!r}")
    parsed = groups[0].addresses[0]
    local, domain = parsed.username, parsed.domain
    if not local or len(local) > 64 or not _DOT_ATOM.fullmatch(local):
        _fail(code, field, f"'{field}' has an unsupported local part (ASCII dot-atom only): {value!r}")
    domain_ascii = _domain_ascii(domain)
    if domain_ascii is None or len(local) + 1 + len(domain_ascii) > 254:
        _fail(code, field, f"'{field}' has an invalid domain: {value!r}")
    display = parsed.display_name or ""
    if _CONTROL.search(display):
        _fail(code, field, f"'{field}' display name has control characters")
    return Address(local=local, domain=domain.lower(), domain_ascii=domain_ascii, display_name=display)


def _address_list(obj: Mapping[str, Any], field: str, code: str, required: bool) -> tuple[Address, ...]:
    value = obj.get(field)
    if value is None or value == []:
        if required:
            _fail("smtp_missing_recipients", field)
        return ()
    if not isinstance(value, list):
        _fail(code, field, f"'{field}' must be a JSON array of email addresses")
    return tuple(parse_address(item, f"{field}[{i}]", code) for i, item in enumerate(value))


# --------------------------------------------------------------------------- scalars


def _optional_str(obj: Mapping[str, Any], field: str) -> str | None:
    value = obj.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        _fail("smtp_invalid_field", field, f"'{field}' must be a string")
    return value


def _text(obj: Mapping[str, Any], field: str) -> str:
    """A body: NUL refused, line endings normalised to LF (CRLF and bare CR alike)."""
    value = _optional_str(obj, field) or ""
    if "\x00" in value:
        _fail("smtp_invalid_field", field, f"'{field}' must not contain NUL characters")
    return value.replace("\r\n", "\n").replace("\r", "\n")


def _subject(obj: Mapping[str, Any], policy: ParsePolicy) -> str:
    value = obj.get("subject")
    if value is None or (isinstance(value, str) and not value.strip()):
        _fail("smtp_empty_subject", "subject")
    if not isinstance(value, str):
        _fail("smtp_invalid_field", "subject", "'subject' must be a string")
    if _CONTROL.search(value.replace("\t", " ")):
        _fail("smtp_invalid_subject", "subject")
    if len(value) > policy.max_subject_chars:
        _fail("smtp_invalid_subject", "subject", f"'subject' is longer than {policy.max_subject_chars} characters")
    return value


def _port(obj: Mapping[str, Any]) -> int | None:
    value = obj.get("smtp_port")
    if value is None:
        return None
    # bool is an int in Python; JSON true is not a port.
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        _fail("smtp_invalid_field", "smtp_port", "'smtp_port' must be an integer from 1 to 65535")
    return value


def _host(obj: Mapping[str, Any]) -> str | None:
    value = _optional_str(obj, "smtp_host")
    if value is None:
        return None
    if not value or len(value) > 253 or _CONTROL.search(value) or " " in value:
        _fail("smtp_invalid_field", "smtp_host", "'smtp_host' must be a host name")
    return value.lower()


# --------------------------------------------------------------------------- attachments


def _filename(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        _fail("smtp_invalid_attachment", field, "an attachment needs a non-empty 'filename'")
    if (
        len(value) > 255
        or _CONTROL.search(value)
        or "/" in value
        or "\\" in value
        or value.strip() in (".", "..")
        or value != value.strip()
    ):
        _fail("smtp_invalid_attachment", field, "an attachment 'filename' must be a plain file name without paths or control characters")
    return value


def _attachment(value: Any, index: int) -> Attachment:
    where = f"attachments[{index}]"
    if not isinstance(value, dict):
        _fail("smtp_invalid_attachment", where, "each attachment must be an object")
    unknown = sorted(set(value) - ATTACHMENT_FIELDS)
    if unknown:
        _fail("smtp_invalid_attachment", f"{where}.{unknown[0]}", f"unknown attachment field(s): {', '.join(unknown)}")
    filename = _filename(value.get("filename"), f"{where}.filename")
    content = value.get("content")
    if not isinstance(content, str):
        _fail("smtp_invalid_attachment", f"{where}.content", "attachment 'content' must be a base64 string")
    try:
        data = base64.b64decode(content, validate=True)
    except (binascii.Error, ValueError):
        _fail("smtp_invalid_attachment", f"{where}.content", "attachment 'content' is not strict base64 (no line breaks; try base64 -w 0)")
    content_type = value.get("content_type")
    if content_type is None or content_type == "":
        content_type = "application/octet-stream"
    if not isinstance(content_type, str) or not _MIME_TYPE.fullmatch(content_type):
        _fail("smtp_invalid_attachment", f"{where}.content_type", "attachment 'content_type' must be a MIME type such as application/pdf")
    return Attachment(filename=filename, content=data, content_type=content_type.lower())


def _attachments(obj: Mapping[str, Any], policy: ParsePolicy) -> tuple[Attachment, ...]:
    value = obj.get("attachments")
    if value is None:
        return ()
    if not isinstance(value, list):
        _fail("smtp_invalid_attachment", "attachments", "'attachments' must be a JSON array")
    if len(value) > policy.max_attachments:
        _fail("smtp_too_many_attachments", "attachments", f"at most {policy.max_attachments} attachments per request")
    return tuple(_attachment(item, i) for i, item in enumerate(value))


# --------------------------------------------------------------------------- the request


def _password(obj: Mapping[str, Any], port: int | None, policy: ParsePolicy) -> str | None:
    password = _optional_str(obj, "password")
    app_password = _optional_str(obj, "app_password")
    if password and app_password and password != app_password:
        _fail("smtp_invalid_field", "app_password", "give either 'password' or 'app_password', not two different ones")
    secret = password or app_password
    if secret and "\x00" in secret:
        # SASL PLAIN separates its fields with NUL: such a password can never log in.
        _fail("smtp_invalid_field", "password" if password else "app_password", "the password must not contain NUL characters")
    if not secret:
        if policy.password_optional(port):
            return None
        _fail("smtp_auth_required", "password")
    return secret


def parse_request(obj: dict[str, Any], policy: ParsePolicy | None = None) -> SendRequest:
    """Turn a decoded JSON object into a ``SendRequest`` or raise the ``ApiError`` for the first bad field."""
    policy = policy or ParsePolicy()
    unknown = sorted(set(obj) - KNOWN_FIELDS)
    if unknown:
        _fail("smtp_unknown_field", unknown[0], f"unknown field(s): {', '.join(unknown)}")
    sender = parse_address(obj.get("from"), "from", "smtp_invalid_from")
    to = _address_list(obj, "to", "smtp_invalid_recipient", required=True)
    cc = _address_list(obj, "cc", "smtp_invalid_cc", required=False)
    bcc = _address_list(obj, "bcc", "smtp_invalid_bcc", required=False)
    if len(to) + len(cc) + len(bcc) > policy.max_recipients:
        _fail("smtp_too_many_recipients", "to", f"at most {policy.max_recipients} recipients (to, cc and bcc together) per request")
    reply_to = None
    if obj.get("reply_to") is not None:
        reply_to = parse_address(obj["reply_to"], "reply_to", "smtp_invalid_reply_to")
    subject = _subject(obj, policy)
    body, html_body = _text(obj, "body"), _text(obj, "html_body")
    if not body.strip() and not html_body.strip():
        _fail("smtp_empty_body", "body")
    attachments = _attachments(obj, policy)
    port = _port(obj)
    host = _host(obj)
    login = sender.wire
    if obj.get("smtp_user") is not None:
        login = parse_address(obj["smtp_user"], "smtp_user", "smtp_invalid_smtp_user").wire
    return SendRequest(
        sender=sender,
        to=to,
        cc=cc,
        bcc=bcc,
        reply_to=reply_to,
        subject=subject,
        body=body,
        html_body=html_body,
        attachments=attachments,
        smtp_host=host,
        smtp_port=port,
        login=login.lower(),
        password=_password(obj, port, policy),
    )
