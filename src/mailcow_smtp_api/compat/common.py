"""Pieces both provider front ends share: address lists, threading headers, file names.

Pure: stdlib, attrs and the core. Nothing here checks a value the native parser checks; each helper
only changes a shape (a comma-separated list into entries, a header into a native field).
"""

from __future__ import annotations

import re
from typing import Any

from ..core.errors import ApiError
from ..core.mime import HEADER_REGISTRY
from ..core.responses import ItemResult

# C0 and C1 controls and the Unicode line separators, as the native parser refuses them. A value
# holding one is handed over unsplit, so that the native parser refuses it by name.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")

# Headers that have a native field of their own, by lower-case name.
THREADING_HEADERS = {"message-id": "message_id", "in-reply-to": "in_reply_to", "references": "references"}


def split_addresses(value: str, field: str, code: str) -> list[str]:
    """An RFC 5322 address list (``"Doe, Jane" <j@x>, b@y``) as one native entry per mailbox.

    Each entry keeps its display name, quoted where RFC 5322 needs it. A list the email library
    cannot split without defects (an unquoted comma in a name) is refused naming ``field``; a value
    with control characters is returned whole, for the native parser to refuse.
    """
    if _CONTROL.search(value):
        return [value]
    try:
        header = HEADER_REGISTRY("to", value)
        addresses = header.addresses  # type: ignore[attr-defined]  # an AddressHeader for "to"
        clean = not header.defects
    except Exception:  # the library's parser raises more than HeaderParseError on odd input
        clean, addresses = False, ()
    if not clean:
        raise ApiError.of(
            code,
            f"'{field}' is not an RFC 5322 address list (quote display names that hold a comma: \"Doe, Jane\" <jane@example.org>)",
            field=field,
        )
    return [str(address) for address in addresses]


def addr_spec(entry: str) -> str:
    """The bare ``local@domain`` of one native entry (``Name <a@b>`` -> ``a@b``), lower case."""
    try:
        addresses = HEADER_REGISTRY("to", entry).addresses  # type: ignore[attr-defined]
    except Exception:
        return entry.strip().lower()
    return str(addresses[0].addr_spec).lower() if len(addresses) == 1 else entry.strip().lower()


def file_name(raw: str | None) -> str:
    """The last path component of a client's file name (``C:\\x\\y.png`` -> ``y.png``), as browsers send it.

    Whether what is left is a safe file name is the native parser's decision; an empty one stays empty.
    """
    return re.split(r"[/\\]", raw or "")[-1]


def mime_type(raw: str | None) -> str | None:
    """``type/subtype`` of a part's Content-Type, without parameters (``text/plain; charset=x``)."""
    if raw is None:
        return None
    return raw.split(";", 1)[0].strip() or None


def put_header(obj: dict[str, Any], name: str, value: str, field: str) -> None:
    """Add header ``name`` to the native object: a threading header to its native field, any other
    to ``headers``. A name given twice (case-insensitively) is refused naming ``field``."""
    target = THREADING_HEADERS.get(name.lower())
    headers: dict[str, str] = obj.setdefault("headers", {})
    taken = target in obj if target else any(n.lower() == name.lower() for n in headers)
    if taken:
        raise ApiError.of("smtp_invalid_header", f"{name} is given twice (header names compare case-insensitively)", field=field)
    if target:
        obj[target] = value
    else:
        headers[name] = value


def item_from_error(err: ApiError, recipients: tuple[str, ...] = ()) -> ItemResult:
    """A refused message's outcome, for a batch slot the translator or the pipeline refused."""
    return ItemResult(
        status=err.status, code=err.code, message=err.message, field=err.field,
        recipients=recipients, retry_after=err.retry_after,
    )
