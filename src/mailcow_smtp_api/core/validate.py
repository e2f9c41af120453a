"""Untrusted request body -> ``SendRequest``, or one ``ApiError`` naming the field.

Parse, don't validate: everything downstream trusts what this module returns. Pure core.
"""

from __future__ import annotations

import binascii
import functools
import json
import re
from datetime import datetime
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn
from urllib.parse import unquote, urlsplit

import attrs
import idna

from .errors import ApiError
from .mime import HEADER_REGISTRY, blank
from .model import Address, Attachment, ListUnsubscribe, SendRequest


@attrs.frozen
class ParsePolicy:
    """Limits and defaults the parser applies (from the operator's configuration)."""

    max_recipients: int = 100
    max_attachments: int = 50
    max_subject_chars: int = 998
    password_optional: Callable[[int | None], bool] = attrs.field(default=lambda port: False, eq=False)


_RFC3339 = re.compile(r"\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:\d\d(\.\d{1,9})?([Zz]|[+-]\d\d:\d\d)")

KNOWN_FIELDS = frozenset(
    {
        "from", "to", "cc", "bcc", "reply_to", "subject", "body", "html_body", "attachments",
        "smtp_host", "smtp_port", "smtp_user", "password", "app_password",
        "headers", "message_id", "in_reply_to", "references", "list_unsubscribe", "send_at", "dry_run",
    }
)
ATTACHMENT_FIELDS = frozenset({"filename", "content", "content_type", "content_id", "disposition"})
LIST_UNSUBSCRIBE_FIELDS = frozenset({"url", "mailto"})
MAX_CUSTOM_HEADERS = 50
MAX_HEADER_VALUE_CHARS = 998
MAX_REFERENCES = 100

# RFC 5322 dot-atom local part. Quoted local parts are refused: they are legal but are a classic
# source of parser disagreement between us, postfix and mail clients.
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
# C0 controls, DEL, C1 controls, and Unicode line/paragraph separators: none may reach a header.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# RFC 2045 token characters for type and subtype.
_MIME_TYPE = re.compile(r"[A-Za-z0-9!#$&^_.+-]{1,64}/[A-Za-z0-9!#$&^_.+-]{1,64}")
_HEADERS = HEADER_REGISTRY
# RFC 5322 2.2 field name: printable US-ASCII except the colon (ftext). Kept short enough that
# "Name: " still leaves room on a 78-character line.
_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]{1,76}")
# RFC 5322 3.6.4 msg-id with dot-atom-text on both sides (the obsolete forms and domain literals
# are refused); ASCII, no white space.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_MSG_ID = re.compile(rf"<{_ATEXT}(\.{_ATEXT})*@{_ATEXT}(\.{_ATEXT})*>")
_MAX_MSG_ID = 250
# A Content-ID for an inline part, written without its angle brackets. Narrower than RFC 2392
# allows: characters that need no percent-encoding in a cid: URL, and at most one "@".
_CONTENT_ID = re.compile(r"[A-Za-z0-9._+-]{1,100}(@[A-Za-z0-9._+-]{1,100})?")
# A cid: URL in HTML (src="cid:...", url(cid:...)); it ends at a quote, bracket, white space or
# an HTML entity, and may percent-encode its characters (RFC 2392 2).
_CID_URL = re.compile(r"\bcid:([^\s\"'<>()\\&;,]+)", re.IGNORECASE)
# Headers the service writes itself, or that belong to the servers on the path; compared in lower
# case. RFC 5322 3.6 allows one of most of these, and a second one would contradict ours.
OWNED_HEADERS = frozenset(
    {
        "from", "sender", "to", "cc", "bcc", "reply-to", "subject", "date", "message-id",
        "in-reply-to", "references", "mime-version", "received", "return-path", "delivered-to",
        "x-original-to", "dkim-signature", "domainkey-signature", "authentication-results",
        "received-spf", "x-request-id",
    }
)
# Whole families: MIME structure (RFC 2045), resent blocks (RFC 5322 3.6.6), ARC seals (RFC 8617),
# and the verdicts of mailcow's rspamd, which a receiver might otherwise believe.
OWNED_HEADER_PREFIXES = ("content-", "resent-", "arc-", "x-spam", "x-rspamd")
LIST_UNSUBSCRIBE_HEADERS = frozenset({"list-unsubscribe", "list-unsubscribe-post"})


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


# A \u escape in the surrogate range; only then is the (costly) full re-encoding check needed.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def parse_json(raw: bytes) -> dict[str, Any]:
    """Decode a request body: strict UTF-8, strict JSON, no duplicate keys, an object at the top."""
    return parse_json_text(decode_body(raw))


def decode_body(raw: bytes) -> str:
    """The body as text; only strict UTF-8 is accepted (RFC 8259 8.1)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        _fail("smtp_invalid_json", "body", "the request body is not valid UTF-8")


def parse_json_text(text: str, array: bool = False) -> Any:
    """Strict JSON, no duplicate keys, an object at the top (an array with ``array``); ``text``
    is the decoded body.

    Kept apart from ``decode_body`` so that a caller can let go of the body's bytes before the
    parser makes its own copy of every string in it (megabytes of base64).
    """
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except (ValueError, RecursionError) as exc:
        reason = str(exc).split(":")[0] if isinstance(exc, ValueError) else "nested too deeply"
        _fail("smtp_invalid_json", "body", f"the request body is not valid JSON ({reason})")
    if array and not isinstance(value, list):
        _fail("smtp_invalid_json", "body", "the request body must be a JSON array")
    if not array and not isinstance(value, dict):
        _fail("smtp_invalid_json", "body", "the request body must be a JSON object")
    if _SURROGATE_ESCAPE.search(text) and not _encodes(value):
        # "\ud800" escapes decode to lone surrogates, which no later step can encode as UTF-8.
        _fail("smtp_invalid_json", "body", "the request body holds a \\u escape of a lone UTF-16 surrogate")
    return value


def _encodes(value: Any) -> bool:
    """True when every string in the decoded JSON value encodes to UTF-8 (valid surrogate pairs do)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# --------------------------------------------------------------------------- addresses


@functools.lru_cache(maxsize=4096)
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
    parsed = _mailbox(value)
    if isinstance(parsed, Address):
        return parsed
    reasons = {
        "syntax": f"'{field}' is not a valid email address: {value!r}",
        "count": f"'{field}' must hold exactly one valid email address: {value!r}",
        "local": f"'{field}' has an unsupported local part (ASCII dot-atom only): {value!r}",
        "domain": f"'{field}' has an invalid domain: {value!r}",
        "display": f"'{field}' display name has control characters",
    }
    _fail(code, field, reasons[parsed])


@functools.lru_cache(maxsize=4096)
def _mailbox(value: str) -> Address | str:
    """``value`` as one address, or why not ("syntax", "count", "local", "domain", "display").

    Cached: the same few senders and recipients come back request after request, and the email
    library's RFC 5322 parser is the costliest step of parsing a request.
    """
    try:
        header = _HEADERS("to", value)
        groups = header.groups  # type: ignore[attr-defined]  # an AddressHeader for "to"
        if header.defects or len(groups) != 1 or groups[0].display_name is not None or len(groups[0].addresses) != 1:
            return "count"
        parsed = groups[0].addresses[0]
        local, domain, display = parsed.username, parsed.domain, parsed.display_name or ""
    except Exception:
        # The library's RFC 5322 parser raises more than HeaderParseError on some malformed input
        # (":;:" gives an AttributeError from deep inside it): all of it is a malformed address.
        return "syntax"
    if not local or len(local) > 64 or not _DOT_ATOM.fullmatch(local):
        return "local"
    domain_ascii = _domain_ascii(domain)
    if domain_ascii is None or len(local) + 1 + len(domain_ascii) > 254:
        return "domain"
    if _CONTROL.search(display):
        return "display"
    return Address(local=local, domain=domain.lower(), domain_ascii=domain_ascii, display_name=display)


def parse_address_list(
    obj: Mapping[str, Any], field: str, code: str, required: bool, where: str | None = None
) -> tuple[Address, ...]:
    """``obj[field]``: a JSON array of addresses; errors name ``where`` (default: ``field``)."""
    where = where or field
    value = obj.get(field)
    if value is None or value == []:
        if required:
            _fail("smtp_missing_recipients", where)
        return ()
    if not isinstance(value, list):
        _fail(code, where, f"'{where}' must be a JSON array of email addresses")
    return tuple(parse_address(item, f"{where}[{i}]", code) for i, item in enumerate(value))


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
    return value.replace("\r\n", "\n").replace("\r", "\n") if "\r" in value else value


def _subject(obj: Mapping[str, Any], policy: ParsePolicy) -> str:
    value = obj.get("subject")
    if value is None or (isinstance(value, str) and not value.strip()):
        _fail("smtp_empty_subject", "subject")
    if not isinstance(value, str):
        _fail("smtp_invalid_field", "subject", "'subject' must be a string")
    if _CONTROL.search(value.replace("\t", " ")) or _decoded_control(value):
        _fail("smtp_invalid_subject", "subject")
    if len(value) > policy.max_subject_chars:
        _fail("smtp_invalid_subject", "subject", f"'subject' is longer than {policy.max_subject_chars} characters")
    return value


def _decoded_control(value: str) -> bool:
    """True when RFC 2047 encoded words in ``value`` decode to a control character.

    The email library decodes encoded words when a header is set and folds the decoded text, so
    ``=?utf-8?q?a=0D=0AX:_y?=`` would reach the wire as a second header line.
    """
    if "=?" not in value:
        return False
    try:
        decoded = str(_HEADERS("x-check", value))
    except Exception:  # as in _mailbox: any failure of the library's parser
        return True
    return bool(_CONTROL.search(decoded.replace("\t", " ")))


def smtp_port_of(obj: Mapping[str, Any]) -> int | None:
    value = obj.get("smtp_port")
    if value is None:
        return None
    # bool is an int in Python; JSON true is not a port.
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        _fail("smtp_invalid_field", "smtp_port", "'smtp_port' must be an integer from 1 to 65535")
    return value


def smtp_host_of(obj: Mapping[str, Any]) -> str | None:
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
        # The email library decodes RFC 2047 encoded words inside MIME parameters, so one could
        # write a line break into the part's headers; a real file name never holds "=?".
        or "=?" in value
    ):
        _fail("smtp_invalid_attachment", field, "an attachment 'filename' must be a plain file name without paths, control characters or '=?'")
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
    if isinstance(content, bytes):
        # Already decoded: a compatibility front end's file part. JSON never yields bytes.
        data = content
    elif not isinstance(content, str):
        _fail("smtp_invalid_attachment", f"{where}.content", "attachment 'content' must be a base64 string")
    else:
        try:
            # Strict mode refuses anything but the alphabet and well-placed padding. Given the str, the
            # decoder reads its ASCII buffer directly: no bytes copy of megabytes of base64.
            data = binascii.a2b_base64(content, strict_mode=True)
        except (binascii.Error, ValueError):
            _fail("smtp_invalid_attachment", f"{where}.content", "attachment 'content' is not strict base64 (no line breaks; try base64 -w 0)")
    content_type = value.get("content_type")
    if content_type is None or content_type == "":
        content_type = "application/octet-stream"
    if not isinstance(content_type, str) or not _MIME_TYPE.fullmatch(content_type):
        _fail("smtp_invalid_attachment", f"{where}.content_type", "attachment 'content_type' must be a MIME type such as application/pdf")
    content_id = _content_id(value.get("content_id"), f"{where}.content_id")
    disposition = _disposition(value.get("disposition"), content_id, f"{where}.disposition")
    return Attachment(
        filename=filename,
        content=data,
        content_type=content_type.lower(),
        content_id=content_id,
        disposition=disposition,
    )


def _content_id(value: Any, field: str) -> str | None:
    """An inline part's Content-ID without angle brackets (they are accepted and dropped)."""
    if value is None:
        return None
    if isinstance(value, str) and value.startswith("<") and value.endswith(">"):
        value = value[1:-1]
    if not isinstance(value, str) or not _CONTENT_ID.fullmatch(value):
        _fail(
            "smtp_invalid_attachment",
            field,
            "'content_id' must be letters, digits and . _ + - with an optional @domain (e.g. logo@example.com)",
        )
    return value


def _disposition(value: Any, content_id: str | None, field: str) -> str:
    """``inline`` for a part with a content_id, ``attachment`` otherwise; a contradiction is refused."""
    if value is None or value == "":
        return "inline" if content_id is not None else "attachment"
    if not isinstance(value, str) or value.lower() not in ("inline", "attachment"):
        _fail("smtp_invalid_attachment", field, "'disposition' must be \"inline\" or \"attachment\"")
    disposition = value.lower()
    if disposition == "inline" and content_id is None:
        _fail("smtp_invalid_attachment", field, "an inline attachment needs a 'content_id' that the HTML references as cid:")
    if disposition == "attachment" and content_id is not None:
        _fail("smtp_invalid_attachment", field, "a part with a 'content_id' is shown inline; leave 'disposition' out or set \"inline\"")
    return disposition


def _attachments(obj: Mapping[str, Any], policy: ParsePolicy) -> tuple[Attachment, ...]:
    value = obj.get("attachments")
    if value is None:
        return ()
    if not isinstance(value, list):
        _fail("smtp_invalid_attachment", "attachments", "'attachments' must be a JSON array")
    if len(value) > policy.max_attachments:
        _fail("smtp_too_many_attachments", "attachments", f"at most {policy.max_attachments} attachments per request")
    attachments = tuple(_attachment(item, i) for i, item in enumerate(value))
    seen: set[str] = set()
    for index, item in enumerate(attachments):
        if item.content_id is None:
            continue
        if item.content_id.lower() in seen:
            _fail("smtp_invalid_attachment", f"attachments[{index}].content_id", f"content_id {item.content_id!r} is used twice")
        seen.add(item.content_id.lower())
    return attachments


def cid_references(html: str) -> list[str]:
    """The Content-IDs the HTML refers to through ``cid:`` URLs, percent-decoded, in order, once each."""
    found: list[str] = []
    for match in _CID_URL.finditer(html):
        cid = unquote(match.group(1))
        if cid not in found:
            found.append(cid)
    return found


def _check_inline_parts(html: str, attachments: Sequence[Attachment]) -> None:
    """Every cid: in the HTML has an inline part, and every inline part is referenced (exact match).

    Mail clients resolve cid: URLs against the Content-ID headers of the multipart/related parts
    (RFC 2387, RFC 2392); a reference without a part shows a broken image, and a part nobody
    references shows up as a stray attachment.
    """
    references = cid_references(html)
    provided = {a.content_id for a in attachments if a.content_id is not None}
    for cid in references:
        if cid not in provided:
            _fail("smtp_missing_inline_part", "html_body", f"the HTML refers to cid:{cid[:200]} but no attachment has that content_id")
    for index, item in enumerate(attachments):
        if item.content_id is not None and item.content_id not in references:
            _fail(
                "smtp_unused_inline_part",
                f"attachments[{index}].content_id",
                f"content_id {item.content_id!r} is not referenced as cid:{item.content_id} in html_body",
            )


# --------------------------------------------------------------------------- headers and ids


def message_id_value(value: Any, field: str) -> str:
    if not isinstance(value, str) or len(value) > _MAX_MSG_ID or not _MSG_ID.fullmatch(value):
        _fail("smtp_invalid_message_id", field, f"'{field}' must be one message id such as <unique.part@example.com>")
    return value


def _optional_message_id(obj: Mapping[str, Any], field: str) -> str | None:
    value = obj.get(field)
    return None if value is None else message_id_value(value, field)


def _references(obj: Mapping[str, Any]) -> tuple[str, ...]:
    """``references``: an array of message ids, or one string of ids separated by white space."""
    value = obj.get("references")
    if value is None:
        return ()
    items = value.split() if isinstance(value, str) else value
    if not isinstance(items, list) or len(items) > MAX_REFERENCES:
        _fail("smtp_invalid_message_id", "references", f"'references' must be an array of at most {MAX_REFERENCES} message ids")
    return tuple(message_id_value(item, f"references[{i}]") for i, item in enumerate(items))


def header_owned(name: str, list_unsubscribe: bool = False) -> bool:
    """True when the service writes header ``name`` itself (or the servers on the path do)."""
    lowered = name.lower()
    if lowered in OWNED_HEADERS or lowered.startswith(OWNED_HEADER_PREFIXES):
        return True
    return list_unsubscribe and lowered in LIST_UNSUBSCRIBE_HEADERS


def _header_value(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        _fail("smtp_invalid_header", field, f"'{field}' must be a non-empty string")
    if len(value) > MAX_HEADER_VALUE_CHARS:
        _fail("smtp_invalid_header", field, f"'{field}' is longer than {MAX_HEADER_VALUE_CHARS} characters")
    # CR, LF and NUL would end the header or the message (RFC 5322 2.2); other controls are
    # refused as in the subject, also where RFC 2047 encoded words would decode to them.
    if _CONTROL.search(value.replace("\t", " ")) or _decoded_control(value):
        _fail("smtp_invalid_header", field, f"'{field}' must be one line without control characters")
    return value


def _custom_headers(obj: Mapping[str, Any], list_unsubscribe: bool) -> tuple[tuple[str, str], ...]:
    """``headers``: an object of extra header fields; names checked, values single-line."""
    value = obj.get("headers")
    if value is None:
        return ()
    if not isinstance(value, dict):
        _fail("smtp_invalid_header", "headers", "'headers' must be a JSON object of header names and string values")
    if len(value) > MAX_CUSTOM_HEADERS:
        _fail("smtp_invalid_header", "headers", f"at most {MAX_CUSTOM_HEADERS} custom headers per request")
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for name, text in value.items():
        field = f"headers.{name[:80]}"
        if not _FIELD_NAME.fullmatch(name):
            _fail("smtp_invalid_header", field, "a header name is 1-76 printable ASCII characters without ':' or spaces")
        if header_owned(name, list_unsubscribe):
            _fail("smtp_header_not_allowed", field, f"{name} is written by the service; it cannot be set in 'headers'")
        if name.lower() in seen:
            _fail("smtp_invalid_header", field, f"{name} is given twice (header names compare case-insensitively)")
        seen.add(name.lower())
        out.append((name, _header_value(text, field)))
    return tuple(out)


_URL_FORBIDDEN = re.compile(r"[\s<>,\"\\]")
MAX_UNSUBSCRIBE_URL = 900


def _unsubscribe_url(value: Any) -> str:
    field = "list_unsubscribe.url"
    # RFC 2369 3.1 puts each URL in <...> separated by commas; RFC 8058 3.1 wants HTTPS.
    if not isinstance(value, str) or not value.isascii() or len(value) > MAX_UNSUBSCRIBE_URL:
        _fail("smtp_invalid_list_unsubscribe", field, f"'{field}' must be an ASCII https URL of at most {MAX_UNSUBSCRIBE_URL} characters")
    if _URL_FORBIDDEN.search(value) or _CONTROL.search(value):
        _fail("smtp_invalid_list_unsubscribe", field, f"'{field}' must not contain spaces, quotes, commas or angle brackets (percent-encode them)")
    try:
        parts = urlsplit(value)
    except ValueError:
        _fail("smtp_invalid_list_unsubscribe", field, f"'{field}' is not a valid URL")
    if parts.scheme.lower() != "https" or not parts.hostname:
        _fail("smtp_invalid_list_unsubscribe", field, f"'{field}' must be an https:// URL (RFC 8058 one-click)")
    return value


def _list_unsubscribe(obj: Mapping[str, Any]) -> ListUnsubscribe | None:
    value = obj.get("list_unsubscribe")
    if value is None:
        return None
    if not isinstance(value, dict):
        _fail("smtp_invalid_list_unsubscribe", "list_unsubscribe", "'list_unsubscribe' must be an object with 'url' and/or 'mailto'")
    unknown = sorted(set(value) - LIST_UNSUBSCRIBE_FIELDS)
    if unknown:
        _fail("smtp_invalid_list_unsubscribe", f"list_unsubscribe.{unknown[0]}", f"unknown list_unsubscribe field(s): {', '.join(unknown)}")
    url = None if value.get("url") is None else _unsubscribe_url(value["url"])
    mailto = None
    if value.get("mailto") is not None:
        raw = value["mailto"]
        if isinstance(raw, str) and raw.lower().startswith("mailto:"):
            raw = raw[len("mailto:") :]
        mailto = parse_address(raw, "list_unsubscribe.mailto", "smtp_invalid_list_unsubscribe").wire
    if url is None and mailto is None:
        _fail("smtp_invalid_list_unsubscribe", "list_unsubscribe", "'list_unsubscribe' needs 'url' (https) and/or 'mailto'")
    return ListUnsubscribe(url=url, mailto=mailto)


# --------------------------------------------------------------------------- the request


def password_of(obj: Mapping[str, Any], port: int | None, policy: ParsePolicy) -> str | None:
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


def send_at_of(obj: Mapping[str, Any]) -> float | None:
    """``send_at``: an RFC 3339 time with its zone (``2027-01-31T09:00:00Z``), as unix seconds.

    Whether it lies in the allowed window depends on the clock: the outbox checks that.
    """
    value = obj.get("send_at")
    if value is None:
        return None
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        _fail("smtp_invalid_send_at", "send_at", "send_at must be an RFC 3339 time with a zone, e.g. 2027-01-31T09:00:00Z")
    try:
        moment = datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    except ValueError:
        _fail("smtp_invalid_send_at", "send_at", "send_at is not a valid time")
    return moment.timestamp()


def smtp_login_of(obj: Mapping[str, Any], sender: Address) -> str:
    """The SMTP login: ``smtp_user`` when given, else ``from``; lower case."""
    login = sender.wire
    if obj.get("smtp_user") is not None:
        login = parse_address(obj["smtp_user"], "smtp_user", "smtp_invalid_smtp_user").wire
    return login.lower()


def dry_run_of(obj: Mapping[str, Any]) -> bool:
    """``dry_run``: true runs every check and answers with the message, without sending it."""
    value = obj.get("dry_run", False)
    if not isinstance(value, bool):
        _fail("smtp_invalid_field", "dry_run", "'dry_run' must be true or false")
    return value


def parse_request(obj: dict[str, Any], policy: ParsePolicy | None = None) -> SendRequest:
    """Turn a decoded JSON object into a ``SendRequest`` or raise the ``ApiError`` for the first bad field."""
    policy = policy or ParsePolicy()
    unknown = sorted(set(obj) - KNOWN_FIELDS)
    if unknown:
        _fail("smtp_unknown_field", unknown[0], f"unknown field(s): {', '.join(unknown)}")
    sender = parse_address(obj.get("from"), "from", "smtp_invalid_from")
    # Counted before any entry is parsed: parsing costs tens of microseconds per address.
    count = sum(len(obj[field]) for field in ("to", "cc", "bcc") if isinstance(obj.get(field), list))
    if count > policy.max_recipients:
        _fail("smtp_too_many_recipients", "to", f"at most {policy.max_recipients} recipients (to, cc and bcc together) per request")
    to = parse_address_list(obj, "to", "smtp_invalid_recipient", required=True)
    cc = parse_address_list(obj, "cc", "smtp_invalid_cc", required=False)
    bcc = parse_address_list(obj, "bcc", "smtp_invalid_bcc", required=False)
    reply_to = None
    if obj.get("reply_to") is not None:
        reply_to = parse_address(obj["reply_to"], "reply_to", "smtp_invalid_reply_to")
    subject = _subject(obj, policy)
    body, html_body = _text(obj, "body"), _text(obj, "html_body")
    if blank(body) and blank(html_body):
        _fail("smtp_empty_body", "body")
    attachments = _attachments(obj, policy)
    _check_inline_parts(html_body, attachments)
    list_unsubscribe = _list_unsubscribe(obj)
    headers = _custom_headers(obj, list_unsubscribe is not None)
    port = smtp_port_of(obj)
    host = smtp_host_of(obj)
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
        login=smtp_login_of(obj, sender),
        password=password_of(obj, port, policy),
        headers=headers,
        message_id=_optional_message_id(obj, "message_id"),
        in_reply_to=_optional_message_id(obj, "in_reply_to"),
        references=_references(obj),
        list_unsubscribe=list_unsubscribe,
        send_at=send_at_of(obj),
        dry_run=dry_run_of(obj),
    )
