"""Postmark's ``POST /email`` and ``POST /email/batch``: JSON messages -> native request objects, and
native outcomes -> Postmark's answers.

Pure: stdlib, attrs and the core. The route parses the body with ``validate.parse_json_text`` (or
the batch's list), calls ``translate_email`` / ``translate_batch``, runs each native object
through the pipeline and renders with ``answer`` / ``batch_answer``. Every check of a value is
the native parser's; this module refuses only what has no native shape.

Decisions (documented in docs/postmark.md as well):

- Only Postmark's own names, case as Postmark writes them: ``From``, ``To``, ``Cc``, ``Bcc``
  (comma-separated RFC 5322 address lists), ``Subject``, ``TextBody``, ``HtmlBody``, ``ReplyTo``,
  ``Headers`` (``[{"Name", "Value"}]``; ``Message-ID``, ``In-Reply-To``, ``References`` fill
  the native fields), ``Attachments`` (``Name``, ``Content`` base64, ``ContentType``,
  ``ContentID``; postmark.js also sends ``ContentLength``, ignored, and ``Disposition``),
  ``Tag`` (header ``X-PM-Tag``), ``Metadata`` (headers ``X-PM-Metadata-<key>``),
  ``MessageStream`` (any stream name, carried as ``X-PM-Message-Stream``; every stream is
  delivered alike), ``TrackOpens`` (only false) and ``TrackLinks`` (only ``"None"``). A ``null``
  value is the same as a missing key. Anything else is refused by name.
- ``ContentID`` ``"cid:logo.png"``, ``"logo.png"`` and ``"<logo.png>"`` all make an inline part
  with Content-ID ``logo.png``; an inline part without ``Name`` (django-anymail sends ``""``
  for an image without a file name) is named after its Content-ID.
- ``MessageID`` in answers is our ``Message-ID`` without the angle brackets.
- ``smtp_mail_accepted`` (queued in the outbox) answers ``"Message accepted, but delivery may be
  delayed."``, the words django-anymail reads as "queued"; a partial send answers Postmark's
  inactive-recipient wording, which django-anymail reads as "rejected" for those addresses.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from ..core.errors import ApiError
from ..core.responses import ItemResult
from .common import file_name, item_from_error, put_header, split_addresses

MAX_BATCH = 500
FIELDS = frozenset(
    {
        "From", "To", "Cc", "Bcc", "Subject", "TextBody", "HtmlBody", "ReplyTo", "Headers", "Attachments",
        "Tag", "Metadata", "MessageStream", "TrackOpens", "TrackLinks",
    }
)
ATTACHMENT_FIELDS = frozenset({"Name", "Content", "ContentType", "ContentID", "ContentLength", "Disposition"})
_ADDRESS_CODES = {"To": "smtp_invalid_recipient", "Cc": "smtp_invalid_cc", "Bcc": "smtp_invalid_bcc"}


def _refuse(code: str, field: str, message: str | None = None) -> ApiError:
    return ApiError.of(code, message, field=field)


def _present(obj: dict[str, Any], name: str) -> bool:
    return obj.get(name) is not None


def _string(obj: dict[str, Any], name: str, code: str = "smtp_invalid_field") -> str:
    value = obj[name]
    if not isinstance(value, str):
        raise _refuse(code, name, f"'{name}' must be a string")
    return value


def _addresses(obj: dict[str, Any], name: str) -> list[str]:
    return split_addresses(_string(obj, name, _ADDRESS_CODES[name]), name, _ADDRESS_CODES[name])


def _tracking(obj: dict[str, Any]) -> None:
    if obj.get("TrackOpens") not in (None, False):
        raise _refuse("smtp_unknown_field", "TrackOpens", "open tracking is not supported by this server: the sidecar never rewrites a message; send false or leave it out")
    if obj.get("TrackLinks") not in (None, "None"):
        raise _refuse("smtp_unknown_field", "TrackLinks", "link tracking is not supported by this server; send \"None\" or leave it out")


def _headers(obj: dict[str, Any], native: dict[str, Any]) -> None:
    value = obj["Headers"]
    if not isinstance(value, list):
        raise _refuse("smtp_invalid_header", "Headers", "'Headers' must be a list of {\"Name\", \"Value\"} objects")
    for index, entry in enumerate(value):
        where = f"Headers[{index}]"
        if not isinstance(entry, dict) or set(entry) - {"Name", "Value"} or not isinstance(entry.get("Name"), str):
            raise _refuse("smtp_invalid_header", where, f"'{where}' must be an object with a string 'Name' and 'Value'")
        name, text = entry["Name"], entry.get("Value")
        if not isinstance(text, str):
            raise _refuse("smtp_invalid_header", where, f"'{where}.Value' must be a string")
        if name.lower() == "reply-to" and "reply_to" not in native:
            native["reply_to"] = text
        else:
            put_header(native, name, text, where)


def _metadata(obj: dict[str, Any], native: dict[str, Any]) -> None:
    value = obj["Metadata"]
    if not isinstance(value, dict):
        raise _refuse("smtp_invalid_field", "Metadata", "'Metadata' must be an object of names and string values")
    for key, text in value.items():
        if isinstance(text, bool) or not isinstance(text, (str, int, float)):
            raise _refuse("smtp_invalid_field", f"Metadata.{key[:80]}", "each 'Metadata' value must be a string or a number")
        put_header(native, f"X-PM-Metadata-{key}", str(text), f"Metadata.{key[:80]}")


def _content_id(value: Any) -> Any:
    """``cid:logo.png`` and ``logo.png`` -> ``logo.png``; anything else goes on to the native parser."""
    if isinstance(value, str) and value[:4].lower() == "cid:":
        return value[4:]
    return value


def _attachment(value: Any, index: int) -> dict[str, Any]:
    where = f"Attachments[{index}]"
    if not isinstance(value, dict):
        raise _refuse("smtp_invalid_attachment", where, f"'{where}' must be an object")
    unknown = sorted(set(value) - ATTACHMENT_FIELDS)
    if unknown:
        raise _refuse("smtp_invalid_attachment", f"{where}.{unknown[0][:80]}", f"unknown attachment field(s): {', '.join(unknown)[:200]}")
    entry: dict[str, Any] = {"content": value.get("Content")}
    if _present(value, "ContentID") and value["ContentID"] != "":
        entry["content_id"] = _content_id(value["ContentID"])
    name = value.get("Name")
    if (name is None or name == "") and isinstance(entry.get("content_id"), str):
        name = entry["content_id"].strip("<>")
    entry["filename"] = file_name(name) if isinstance(name, str) else name
    if _present(value, "ContentType"):
        entry["content_type"] = value["ContentType"]
    if _present(value, "Disposition"):
        entry["disposition"] = value["Disposition"]
    return entry


def translate_email(obj: Any) -> dict[str, Any]:
    """One Postmark message -> one native object, or the ``ApiError`` naming the Postmark field."""
    if not isinstance(obj, dict):
        raise ApiError.of("smtp_invalid_json", "a message must be a JSON object")
    unknown = sorted(k for k in set(obj) - FIELDS if obj[k] is not None)
    if unknown:
        raise _refuse("smtp_unknown_field", unknown[0][:80], f"'{unknown[0][:80]}' is not supported by this server (see docs/postmark.md)")
    _tracking(obj)
    native: dict[str, Any] = {}
    if _present(obj, "From"):
        native["from"] = obj["From"]
    for name in ("To", "Cc", "Bcc"):
        if _present(obj, name):
            native[name.lower()] = _addresses(obj, name)
    for name, target in (("Subject", "subject"), ("TextBody", "body"), ("HtmlBody", "html_body"), ("ReplyTo", "reply_to")):
        if _present(obj, name):
            native[target] = obj[name]
    if _present(obj, "Headers"):
        _headers(obj, native)
    if _present(obj, "Tag"):
        put_header(native, "X-PM-Tag", _string(obj, "Tag"), "Tag")
    if _present(obj, "Metadata"):
        _metadata(obj, native)
    if _present(obj, "MessageStream"):
        put_header(native, "X-PM-Message-Stream", _string(obj, "MessageStream"), "MessageStream")
    if _present(obj, "Attachments"):
        attachments = obj["Attachments"]
        if not isinstance(attachments, list):
            raise _refuse("smtp_invalid_attachment", "Attachments", "'Attachments' must be a list")
        native["attachments"] = [_attachment(a, i) for i, a in enumerate(attachments)]
    if not native.get("headers"):
        native.pop("headers", None)
    return native


def translate_batch(value: Any, max_messages: int = MAX_BATCH) -> list[dict[str, Any] | ApiError]:
    """A batch: one native object per message, or that message's ``ApiError`` in its slot.

    Not a list, or more than ``max_messages``: the whole request is refused.
    """
    if not isinstance(value, list):
        raise ApiError.of("smtp_invalid_json", "the batch body must be a JSON array of messages")
    if len(value) > max_messages:
        raise ApiError.of("smtp_too_many_messages", f"at most {max_messages} messages per batch")
    out: list[dict[str, Any] | ApiError] = []
    for message in value:
        try:
            out.append(translate_email(message))
        except ApiError as err:
            out.append(err)
    return out


# --------------------------------------------------------------------------- errors and answers

_NATIVE_NAMES = {
    "from": "From", "to": "To", "cc": "Cc", "bcc": "Bcc", "reply_to": "ReplyTo", "subject": "Subject",
    "body": "TextBody", "html_body": "HtmlBody", "message_id": "Headers", "in_reply_to": "Headers",
    "references": "Headers", "headers": "Headers", "attachments": "Attachments",
}
_ATTACHMENT_KEYS = {"filename": "Name", "content": "Content", "content_type": "ContentType", "content_id": "ContentID", "disposition": "Disposition"}
_ATTACHMENT = re.compile(r"attachments\[(\d+)\](?:\.(\w+))?")


def postmark_field(native_field: str | None) -> str | None:
    """A native error field in Postmark's words: ``body`` -> ``TextBody``, ``to[2]`` -> ``To``,
    ``attachments[1].content`` -> ``Attachments[1].Content``, ``headers.X-PM-Tag`` -> ``Tag``."""
    if native_field is None:
        return None
    if native_field.startswith("headers."):
        name = native_field[len("headers."):]
        if name.lower() == "x-pm-tag":
            return "Tag"
        if name.lower() == "x-pm-message-stream":
            return "MessageStream"
        if name.lower().startswith("x-pm-metadata-"):
            return f"Metadata.{name[len('x-pm-metadata-'):]}"
        return "Headers"
    attachment = _ATTACHMENT.fullmatch(native_field)
    if attachment:
        index, key = attachment.groups()
        return f"Attachments[{index}]" + (f".{_ATTACHMENT_KEYS.get(key, key)}" if key else "")
    base = re.split(r"[\[.]", native_field, maxsplit=1)[0]
    return _NATIVE_NAMES.get(base, native_field)


# Postmark's error codes (ErrorCode) and the HTTP status it answers them with.
BAD_TOKEN, SERVER_ERROR, INVALID_REQUEST = 10, 100, 300
SENDER_NOT_FOUND, INVALID_JSON, NOT_ALLOWED, JSON_REQUIRED, TOO_MANY_MESSAGES, RATE_LIMITED = 400, 402, 405, 409, 410, 429

_BY_CODE: dict[str, tuple[int, int]] = {
    "smtp_unauthorized_sender": (422, SENDER_NOT_FOUND),
    "smtp_invalid_json": (422, INVALID_JSON),
    "smtp_unsupported_media_type": (422, JSON_REQUIRED),
    "smtp_too_many_messages": (422, TOO_MANY_MESSAGES),
    "smtp_request_too_large": (413, INVALID_REQUEST),
}


def _status_and_code(result: ItemResult) -> tuple[int, int]:
    if result.code in _BY_CODE:
        return _BY_CODE[result.code]
    if result.status == 401:
        return 401, BAD_TOKEN
    if result.status == 429:
        return 429, RATE_LIMITED
    if result.status == 503:
        return 503, SERVER_ERROR
    if result.status >= 500:
        return 500, SERVER_ERROR
    if result.status == 403:
        return 422, NOT_ALLOWED
    if result.status in (400, 422):
        return 422, INVALID_REQUEST
    return result.status, INVALID_REQUEST  # 408, 409: kept, so that clients retry as they do for those


def _submitted(moment: datetime) -> str:
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).isoformat()


def _error_body(result: ItemResult) -> tuple[int, dict[str, Any]]:
    status, error_code = _status_and_code(result)
    # smtp_invalid_json's "body" is the request body, not the text body.
    field = None if result.code == "smtp_invalid_json" else postmark_field(result.field)
    message = result.message or result.code
    return status, {"ErrorCode": error_code, "Message": f"{field}: {message}" if field else message}


def _body(result: ItemResult, submitted_at: datetime, to: str | None) -> tuple[int, dict[str, Any]]:
    if not result.ok:
        return _error_body(result)
    message = "OK"
    if result.code == "smtp_mail_accepted":
        message = "Message accepted, but delivery may be delayed."
    elif result.code == "smtp_dry_run":
        message = "Test job accepted"
    elif result.refused:
        message = (
            f"Message OK, but will not deliver to these inactive addresses: {', '.join(result.refused)}. "
            "Inactive recipients are ones the mail server refused."
        )
    body: dict[str, Any] = {
        "To": to if to is not None else ", ".join(result.recipients),
        "SubmittedAt": _submitted(submitted_at),
        "MessageID": (result.message_id or "").strip("<>"),
        "ErrorCode": 0,
        "Message": message,
    }
    if result.dry_run is not None:
        body["DryRun"] = result.dry_run
    return 200, body


def answer(result: ItemResult, submitted_at: datetime, to: str | None = None) -> tuple[int, dict[str, Any]]:
    """Postmark's answer for ``POST /email``.

    Sent, queued or built: 200 ``{"To", "SubmittedAt", "MessageID", "ErrorCode": 0, "Message"}``;
    ``To`` is ``to`` (the request's ``To``) when given, else the envelope recipients. Refused:
    Postmark's status and ``{"ErrorCode", "Message"}`` (401/10 key, 422/300 invalid request,
    422/400 sender, 422/405 not allowed, 413, 429/429, 500 or 503 with 100). ``Retry-After`` is
    the route's to set from ``result.retry_after``.
    """
    return _body(result, submitted_at, to)


def error_answer(err: ApiError) -> tuple[int, dict[str, Any]]:
    """A refused request (bad key, bad JSON, too many messages) in Postmark's shape."""
    return _error_body(item_from_error(err))


def batch_answer(
    results: Sequence[ItemResult], submitted_at: datetime, to: Sequence[str | None] | None = None
) -> tuple[int, list[dict[str, Any]]]:
    """Postmark's answer for ``POST /email/batch``: HTTP 200 and one result per message, in order."""
    tos = list(to) if to is not None else [None] * len(results)
    return 200, [_body(result, submitted_at, tos[i])[1] for i, result in enumerate(results)]
