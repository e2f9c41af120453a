"""The HTTP side of the outbox: ``Prefer: respond-async`` (RFC 7240), the 202 answer, status records by key.

A message's status belongs to the key that sent it: records are stored under the key's scope (a
hash of the key as mailcow matches it, never the key) and only that key reads or cancels them.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.web.iweb import IRequest

from ..core.idempotency import scope_of
from ..core.outbox import NewMessage
from ..core.responses import request_log
from ..delivery import Outbox
from ..service import Prepared, SendOutcome

ASYNC = "respond-async"


def prefers_async(request: IRequest) -> bool:
    """True when a ``Prefer`` header asks for ``respond-async`` (tokens separated by commas, parameters after ';')."""
    for value in request.requestHeaders.getRawHeaders(b"prefer") or []:
        for preference in value.decode("latin-1").split(","):
            if preference.split(";", 1)[0].split("=", 1)[0].strip().lower() == ASYNC:
                return True
    return False


def accepted_body(prepared: Prepared, message: NewMessage, request_id: str, key: str) -> list[dict[str, Any]]:
    """The 202 answer, in mailcow's shape: ``msg`` is ``["smtp_mail_accepted", from, "to1, to2"]``."""
    request = prepared.request
    return [
        {
            "type": "success",
            "log": request_log(request, request_id, key),
            "msg": ["smtp_mail_accepted", request.sender.wire, ", ".join(a.wire for a in request.to)],
            "id": message.id,
            "status": message.status.value,
            "message_id": message.message_id,
            "send_at": message.send_at,
        }
    ]


def accepted_id(body: Any) -> str:
    """The message id of a stored 202 answer (also when it is replayed for an Idempotency-Key)."""
    try:
        return str(body[0]["id"])
    except (KeyError, IndexError, TypeError):
        return ""


@attrs.define
class Later:
    """The outbox, addressed by the raw key of the request (turned into its scope here)."""

    outbox: Outbox

    def check_send_at(self, send_at: float | None) -> None:
        """400 smtp_invalid_send_at when ``send_at`` lies in the past or beyond --max-schedule."""
        self.outbox.check_send_at(send_at)

    async def accept(self, prepared: Prepared, raw_key: str | None, request_id: str) -> NewMessage:
        """Store a checked message in the outbox."""
        return await self.outbox.accept_prepared(prepared, scope_of(raw_key), request_id)

    async def record_sent(self, outcome: SendOutcome, raw_key: str | None, request_id: str) -> str | None:
        """The status record of a message sent at once; None when it could not be stored."""
        return await self.outbox.record_sent(outcome, scope_of(raw_key), request_id)

    async def status(self, message: str, raw_key: str | None) -> dict[str, Any]:
        """One message's status, for the key that sent it."""
        return await self.outbox.status(message, scope_of(raw_key))

    async def cancel(self, message: str, raw_key: str | None) -> dict[str, Any]:
        """Cancel a message the key sent that still waits."""
        return await self.outbox.cancel(message, scope_of(raw_key))
