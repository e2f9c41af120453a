"""Idempotent sends: the rules, without storage. Pure core: stdlib and attrs only.

A caller may send ``Idempotency-Key: <1-255 printable ASCII>``. The first request with a key claims
it and sends; its answer is stored. A repeat with the same key and the same body gets the stored
answer back without sending again; the same key with another body is refused; a repeat while the
first is still running is refused as in flight. Keys belong to one API key (stored as a hash of it).

A record moves through these states:

    (none) --claim--> in_flight --answer after SMTP--> done | outcome_unknown
                          |                                      ^
                          +--answer before SMTP: row deleted     |
                          +--lease over (the process died)-------+

``outcome_unknown`` is a ``done`` whose answer said the message may have been accepted (no reply
after the final dot): replaying it, instead of sending again, is the point of the key.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from .apikeys import normalise_key
from .errors import ApiError

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
DEFAULT_TTL_SECONDS = 24 * 3600
IN_FLIGHT_RETRY_AFTER = 2
MAX_KEY_CHARS = 255

# Printable ASCII (RFC 20), no leading or trailing space: HTTP strips those anyway (RFC 9110 5.5).
_KEY = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]{0,253}[\x21-\x7e])?")


class State(str, enum.Enum):
    """Where a claimed key stands."""

    IN_FLIGHT = "in_flight"
    DONE = "done"
    OUTCOME_UNKNOWN = "outcome_unknown"


@attrs.frozen
class Answer:
    """An HTTP answer to a send: status, the msg code (for logs and metrics) and the JSON body."""

    status: int
    code: str
    body: Any = attrs.field(eq=False, hash=False)
    retry_after: int | None = None

    def body_bytes(self) -> bytes:
        """The body as sent on the wire (compact UTF-8 JSON)."""
        return json.dumps(self.body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


@attrs.frozen
class Claim:
    """One request's claim on a key: written as an ``in_flight`` row if the key is free."""

    scope: str
    key: str
    fingerprint: str
    token: str
    created_at: float
    lease_until: float
    expires_at: float


@attrs.frozen
class Record:
    """A stored row: the claim that made it, its state and, once settled, the stored answer."""

    scope: str
    key: str
    fingerprint: str
    token: str
    state: State
    created_at: float
    lease_until: float
    expires_at: float
    status: int | None = None
    code: str | None = None
    body: bytes | None = attrs.field(default=None, repr=False)

    def expired(self, now: float) -> bool:
        """True once the record's keep time is over: the key is free again."""
        return now >= self.expires_at

    def answer(self) -> Answer:
        """The stored answer (only for a settled record)."""
        if self.status is None or self.body is None:
            raise ValueError("an in-flight record has no answer yet")
        return Answer(status=self.status, code=self.code or "", body=json.loads(self.body.decode("utf-8")))


class Verdict(str, enum.Enum):
    """What a request does when its key is already taken."""

    REPLAY = "replay"  # same body, settled: answer with the stored response
    MISMATCH = "mismatch"  # another body: 409
    IN_FLIGHT = "in_flight"  # same body, still running: 409, retry shortly
    INTERRUPTED = "interrupted"  # same body, running past its lease: the process died mid-send


def parse_key(values: Sequence[bytes] | None) -> str | None:
    """The ``Idempotency-Key`` header's value, None when absent; one coded error when malformed.

    Several headers are refused rather than joined: a list of keys has no meaning here.
    """
    if not values:
        return None
    if len(values) > 1:
        raise ApiError.of("smtp_invalid_idempotency_key", "give Idempotency-Key once", field=HEADER)
    text = values[0].decode("latin-1").strip(" \t")
    if not _KEY.fullmatch(text):
        raise ApiError.of("smtp_invalid_idempotency_key", field=HEADER)
    return text


def item_key(key: str, index: int) -> str | None:
    """The key of message ``index`` of a request of several that carried Idempotency-Key ``key``:
    ``<key>:<index>``, checked as a key (it may grow past the length limit)."""
    return parse_key([f"{key}:{index}".encode("ascii")])


def scope_of(raw_api_key: str | None) -> str:
    """The API key's identity as stored: SHA-256 of the key as mailcow matches it, never the key.

    mailcow strips the header to ``[A-Za-z0-9-]`` and compares case-insensitively, so every spelling
    that authenticates as one key shares one scope.
    """
    identity = normalise_key(raw_api_key).upper().encode("ascii")
    return hashlib.sha256(b"mailcow-smtp-api idempotency scope\0" + identity).hexdigest()


def fingerprint(raw_body: bytes | Iterable[bytes], raw_api_key: str | None) -> str:
    """SHA-256 over the raw body bytes (given whole or in consecutive chunks), keyed (HMAC) with the API key.

    The body holds the mailbox password: a bare hash of it in a shared store would let a reader
    who knows the rest of the message (a recipient does) test password guesses offline.
    """
    secret = normalise_key(raw_api_key).upper().encode("ascii")
    mac = hmac.new(secret, digestmod=hashlib.sha256)
    for chunk in (raw_body,) if isinstance(raw_body, bytes) else raw_body:
        mac.update(chunk)
    return mac.hexdigest()


def judge(record: Record, claim: Claim, now: float) -> Verdict:
    """The verdict for ``claim`` on a key held by the live (unexpired) ``record``."""
    if not hmac.compare_digest(record.fingerprint, claim.fingerprint):
        return Verdict.MISMATCH
    if record.state is not State.IN_FLIGHT:
        return Verdict.REPLAY
    if now >= record.lease_until:
        return Verdict.INTERRUPTED
    return Verdict.IN_FLIGHT


def settled_state(reached_smtp: bool, answer: Answer, outcome_unknown: bool) -> State | None:
    """How a finished request's answer is kept: None releases the key (nothing stored).

    Kept: every answer given after an SMTP connection was attempted, so a retry replays it - except
    "retry later" answers (503 with Retry-After: connection failed, postfix answered 4xx, dropped
    before the end of DATA), after which postfix certainly holds no copy: the same key may then
    be used again to retry. Released: answers before any connection (validation, API key, sender
    rule, database), which the caller fixes and retries.
    """
    if not reached_smtp:
        return None
    if outcome_unknown:
        return State.OUTCOME_UNKNOWN
    if answer.status == 503 and answer.retry_after is not None:
        return None
    return State.DONE


def lease_seconds(smtp_timeout: float, max_recipients: int) -> float:
    """How long a claim may stay in flight before it counts as interrupted.

    Longer than any real send: every SMTP step (connect, greeting, EHLO twice, STARTTLS, AUTH, MAIL,
    one RCPT per recipient, DATA, the final dot) gets ``smtp_timeout``, plus the database checks.
    """
    return smtp_timeout * (10 + max_recipients) + 120.0


def interrupted_error() -> ApiError:
    """The answer stored for a claim whose request never finished (the process stopped mid-send)."""
    return ApiError.of(
        "smtp_error",
        "an earlier request with this Idempotency-Key stopped before it finished: the message may have been "
        "delivered; check before sending again with a new key",
        status=504,
        detail={"phase": "message", "kind": "interrupted", "reason": "interrupted", "outcome_unknown": True},
    )
