"""The outbox as pure values: a message's states, its attempts, retries and what postfix's log says.

A message accepted with ``Prefer: respond-async`` is stored whole (message bytes and envelope, never
a password) and handed to postfix when postfix can take it. Its life:

    scheduled --(send_at)--> queued --(claimed)--> sending --(250 after DATA)--> submitted
        submitted --(postfix's log)--> delivered | deferred | bounced
    sending --(unreachable, 4xx, rate limited)--> queued again, after a backoff   ... until the
        lifetime ends --> failed
    sending --(5xx for every recipient)--> failed
    sending --(no answer after the final dot, or the process died)--> unknown, unless postfix's log
        proves it did not take the message (then queued again)
    scheduled | queued --(DELETE)--> canceled

Pure core: the clock and the random source are passed in.
"""

from __future__ import annotations

import enum
import json
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs


class Status(str, enum.Enum):
    """Where a message stands."""

    SCHEDULED = "scheduled"
    QUEUED = "queued"
    SENDING = "sending"
    SUBMITTED = "submitted"
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    BOUNCED = "bounced"
    FAILED = "failed"
    CANCELED = "canceled"
    UNKNOWN = "unknown"

    @property
    def waiting(self) -> bool:
        """Not yet handed to postfix: it can still be canceled."""
        return self in (Status.SCHEDULED, Status.QUEUED)

    @property
    def with_postfix(self) -> bool:
        """postfix took it: its log tells the rest."""
        return self in (Status.SUBMITTED, Status.DEFERRED)


# What postfix's delivery status of a recipient means for the message, strongest last.
_RECIPIENT_ORDER = {"sent": 0, "deferred": 1, "bounced": 2, "expired": 2, "undeliverable": 2}


@attrs.frozen
class Attempt:
    """One try to hand the message to postfix."""

    at: float
    outcome: str  # submitted, retry, failed, unknown, proven_not_taken
    code: int | None = None
    text: str = ""
    queue_id: str | None = None

    def as_json(self) -> dict[str, Any]:
        """The attempt as the status answer shows it."""
        return {"at": self.at, "outcome": self.outcome, "smtp_code": self.code, "smtp_text": self.text, "queue_id": self.queue_id}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Attempt:
        """The inverse of ``as_json``."""
        return cls(float(obj["at"]), str(obj["outcome"]), obj.get("smtp_code"), str(obj.get("smtp_text") or ""), obj.get("queue_id"))


@attrs.frozen
class RecipientFate:
    """postfix's last word on one recipient."""

    status: str  # sent, deferred, bounced, expired, undeliverable, or "refused" at submission
    dsn: str = ""
    relay: str = ""
    text: str = ""
    time: float | None = None

    def as_json(self) -> dict[str, Any]:
        """The recipient's result as the status answer shows it."""
        return {"status": self.status, "dsn": self.dsn, "relay": self.relay, "text": self.text, "time": self.time}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> RecipientFate:
        """The inverse of ``as_json``."""
        return cls(str(obj["status"]), str(obj.get("dsn") or ""), str(obj.get("relay") or ""), str(obj.get("text") or ""), obj.get("time"))


def status_from_recipients(fates: Mapping[str, RecipientFate], recipients: Sequence[str]) -> Status:
    """The message's state from its recipients' fates: delivered when every one was sent; bounced
    when one bounced and none is still deferred or pending; deferred while one waits in postfix's
    queue; submitted while postfix has said nothing yet of some."""
    known = [fates.get(r.lower()) for r in recipients]
    if any(f is not None and f.status == "deferred" for f in known):
        return Status.DEFERRED
    if any(f is None for f in known):
        return Status.SUBMITTED
    if all(f is not None and f.status == "sent" for f in known):
        return Status.DELIVERED
    return Status.BOUNCED


def merged_fate(old: RecipientFate | None, new: RecipientFate) -> RecipientFate:
    """A later log line wins, except that a final result is never undone by a late 'deferred'."""
    if old is None:
        return new
    if _RECIPIENT_ORDER.get(old.status, 0) >= 2 or old.status == "sent":
        return old if new.status == "deferred" else new
    return new


def backoff(attempt: int, rng: Callable[[], float] = random.random, base: float = 15.0, cap: float = 1800.0) -> float:
    """Seconds before try ``attempt + 1`` (``attempt`` counts from 1): exponential with full jitter,
    at least a second, so that many senders retrying after one postfix restart spread out."""
    ceiling = min(cap, base * (2 ** max(0, attempt - 1)))
    return max(1.0, ceiling * rng())


@attrs.frozen
class Limits:
    """The operator's bounds on the outbox."""

    max_messages: int = 10_000
    max_bytes: int = 1024 * 1024 * 1024
    lifetime: float = 24 * 3600.0
    max_schedule: float = 7 * 24 * 3600.0
    status_ttl: float = 7 * 24 * 3600.0


def outbox_lease(smtp_timeout: float) -> float:
    """How long a worker holds a message: a whole plain handover (connect, greeting, EHLO, the
    pipelined envelope, the data and the final dot, each within ``smtp_timeout``) and a margin."""
    return smtp_timeout * 8 + 10.0


@attrs.frozen
class Row:
    """One message of the outbox (without its body, which is read only to send it)."""

    id: str
    scope: str
    status: Status
    message_id: str
    sender: str
    recipients: tuple[str, ...]
    login: str
    target: str
    size: int
    created_at: float
    send_at: float | None
    not_before: float
    expires_at: float
    lease_token: str | None
    lease_until: float | None
    handover_at: float | None
    attempts: tuple[Attempt, ...]
    queue_id: str | None
    fates: Mapping[str, RecipientFate]
    updated_at: float
    keep_until: float
    request_id: str

    def settled(self, outcome: Outcome) -> Row:
        """This row once ``outcome`` is recorded: its attempt added, its fates merged, its claim released."""
        return attrs.evolve(
            self,
            status=outcome.status,
            attempts=(*self.attempts, *([outcome.attempt] if outcome.attempt else [])),
            not_before=outcome.not_before if outcome.not_before is not None else self.not_before,
            queue_id=outcome.queue_id if outcome.queue_id is not None else self.queue_id,
            fates={**self.fates, **(outcome.fates or {})},
            updated_at=outcome.now,
            keep_until=outcome.keep_until,
            lease_token=None,
            lease_until=None,
        )

    def as_json(self) -> dict[str, Any]:
        """The status answer: every field a caller may read (nothing of the message itself)."""
        return {
            "id": self.id,
            "status": self.status.value,
            "message_id": self.message_id,
            "from": self.sender,
            "queue_id": self.queue_id,
            "created_at": self.created_at,
            "send_at": self.send_at,
            "updated_at": self.updated_at,
            "recipients": [
                {"address": r, **(self.fates[r.lower()].as_json() if r.lower() in self.fates else {"status": "pending"})}
                for r in self.recipients
            ],
            "attempts": [a.as_json() for a in self.attempts],
        }


def row_from_values(values: Sequence[Any]) -> Row:
    """A Row from the columns of ``state/outbox.py``'s SELECT, in their order."""
    (id_, scope, status, message_id, sender, recipients, login, target, size, created, send_at, not_before,
     expires, token, lease, handover, attempts, queue_id, fates, updated, keep, request_id) = values
    return Row(
        id=str(id_),
        scope=str(scope),
        status=Status(str(status)),
        message_id=str(message_id),
        sender=str(sender),
        recipients=tuple(json.loads(recipients)),
        login=str(login),
        target=str(target),
        size=int(size),
        created_at=float(created),
        send_at=None if send_at is None else float(send_at),
        not_before=float(not_before),
        expires_at=float(expires),
        lease_token=None if token is None else str(token),
        lease_until=None if lease is None else float(lease),
        handover_at=None if handover is None else float(handover),
        attempts=tuple(Attempt.from_json(a) for a in json.loads(attempts)),
        queue_id=None if queue_id is None else str(queue_id),
        fates={k: RecipientFate.from_json(v) for k, v in json.loads(fates).items()},
        updated_at=float(updated),
        keep_until=float(keep),
        request_id=str(request_id),
    )


@attrs.frozen
class NewMessage:
    """What acceptance (or a synchronous submission) stores."""

    id: str
    scope: str
    status: Status
    message_id: str
    sender: str
    recipients: tuple[str, ...]
    login: str
    target: str
    body: bytes | None
    size: int
    created_at: float
    send_at: float | None
    not_before: float
    expires_at: float
    keep_until: float
    request_id: str
    queue_id: str | None = None
    attempts: tuple[Attempt, ...] = ()
    fates: Mapping[str, RecipientFate] = attrs.Factory(dict)

    def as_row(self) -> Row:
        """The row this message becomes once stored (before anyone claims it)."""
        return Row(
            id=self.id, scope=self.scope, status=self.status, message_id=self.message_id, sender=self.sender,
            recipients=self.recipients, login=self.login, target=self.target, size=self.size,
            created_at=self.created_at, send_at=self.send_at, not_before=self.not_before,
            expires_at=self.expires_at, lease_token=None, lease_until=None, handover_at=None,
            attempts=self.attempts, queue_id=self.queue_id, fates=self.fates, updated_at=self.created_at,
            keep_until=self.keep_until, request_id=self.request_id,
        )


@attrs.frozen
class Outcome:
    """What became of a claimed message: its new state and what to record."""

    status: Status
    now: float
    keep_until: float
    attempt: Attempt | None = None
    not_before: float | None = None
    queue_id: str | None = None
    fates: Mapping[str, RecipientFate] | None = None
    drop_body: bool = False


def fates_of(results: Iterable[tuple[str, int, str]]) -> dict[str, RecipientFate]:
    """Per-recipient fates of a submission: refused recipients (4xx/5xx at RCPT) as ``refused``."""
    return {
        address.lower(): RecipientFate("refused", text=f"{code} {text}".strip())
        for address, code, text in results
        if not 200 <= code < 300
    }
