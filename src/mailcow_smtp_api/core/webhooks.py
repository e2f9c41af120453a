"""Webhook events: their values, the JSON body, the Standard Webhooks signature and the retry schedule.

An event tells the operator's receiver (``--webhook-url``) what became of a message: ``submitted``,
``delivered``, ``deferred``, ``bounced`` or ``failed``. The body is the message's status JSON, the
same object ``GET /api/v1/send/status/{id}`` answers, wrapped with the event's id, type and time.

Signatures follow Standard Webhooks (https://www.standardwebhooks.com/, spec 1.0): three headers,

    webhook-id:        the event id, the same on every attempt (receivers de-duplicate on it)
    webhook-timestamp: the attempt's time, integer unix seconds
    webhook-signature: "v1," + base64(HMAC-SHA256(key, f"{id}.{timestamp}.{body}"))

The HMAC key is derived from ``--webhook-secret`` by ``signing_key``: a secret in the Standard
Webhooks form ``whsec_<base64>`` stands for the bytes the base64 decodes to (so the official
libraries verify it as given); any other secret is the key as its UTF-8 bytes.

Pure: no clock, no randomness of its own, no I/O.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, Protocol

import attrs

EVENT_TYPES = ("submitted", "delivered", "deferred", "bounced", "failed")

SECRET_PREFIX = "whsec_"
MIN_KEY_BYTES = 16  # --webhook-secret's floor, also for the decoded key of a whsec_ secret

# Printable ASCII without spaces or separators: the id goes into a header and a key column as is.
_EVENT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_TOKEN = re.compile(r"[A-Za-z0-9_-]{8,60}")

# The first retry after 10 s, then 20 s, 40 s, ... never more than an hour apart.
FIRST_DELAY = 10.0
MAX_DELAY = 3600.0
MIN_DELAY = 1.0


def _event_id(instance: Any, attribute: Any, value: str) -> None:
    if not _EVENT_ID.fullmatch(value):
        raise ValueError(f"event_id must be 1-64 letters, digits, '_' or '-': {value!r}")


@attrs.frozen
class WebhookEvent:
    """One event about one message; ``message`` is that message's status JSON."""

    event_id: str = attrs.field(validator=_event_id)
    type: str = attrs.field(validator=attrs.validators.in_(EVENT_TYPES))
    created_at: float
    message: Mapping[str, Any]


def new_event(type: str, message: Mapping[str, Any], now: float, token: str) -> WebhookEvent:
    """An event of ``type`` about ``message`` at ``now``, identified as ``evt_`` + ``token``.

    ``token`` is random (or derived from what makes the event unique, so that the same event
    reported twice keeps one id): 8 to 60 letters, digits, ``_`` or ``-``.
    """
    if not _TOKEN.fullmatch(token):
        raise ValueError("token must be 8-60 letters, digits, '_' or '-'")
    return WebhookEvent(event_id=f"evt_{token}", type=type, created_at=now, message=message)


def rfc3339(when: float) -> str:
    """A unix time as RFC 3339 UTC with milliseconds: ``2027-01-15T08:00:00.000Z``."""
    stamp = datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def payload(event: WebhookEvent) -> bytes:
    """The request body: compact JSON ``{"id", "type", "created_at", "message"}``, ASCII only.

    ASCII (non-ASCII as ``\\u`` escapes) keeps the signed bytes the same whatever a receiver's
    framework does with charsets; no NaN or infinity, which JSON does not have.
    """
    document = {
        "id": event.event_id,
        "type": event.type,
        "created_at": rfc3339(event.created_at),
        "message": dict(event.message),
    }
    return json.dumps(document, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


_PAYLOAD_TYPE = re.compile(rb'\{"id":"[A-Za-z0-9_-]{1,64}","type":"([a-z]{1,16})"')


def payload_type(body: bytes) -> str:
    """The event type of a body made by ``payload`` (read from its start, without parsing it all)."""
    match = _PAYLOAD_TYPE.match(body)
    return match.group(1).decode("ascii") if match else "unknown"


def signing_key(secret: str) -> bytes:
    """The HMAC-SHA256 key for ``--webhook-secret``; ``ValueError`` when it cannot be one.

    ``whsec_<base64>`` (Standard Webhooks' form, padding optional) is the decoded bytes; anything
    else is the secret's UTF-8 bytes. Either must come to at least 16 bytes.
    """
    if secret.startswith(SECRET_PREFIX):
        text = secret[len(SECRET_PREFIX) :].rstrip("=")
        try:
            key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("a whsec_ webhook secret must be base64 after the prefix") from None
    else:
        key = secret.encode("utf-8")
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"the webhook secret must come to at least {MIN_KEY_BYTES} bytes of key")
    return key


def sign(secret: str, event_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The Standard Webhooks headers for one attempt to deliver ``body``."""
    signed = f"{event_id}.{timestamp}.".encode("utf-8") + body
    digest = hmac.new(signing_key(secret), signed, hashlib.sha256).digest()
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(int(timestamp)),
        "webhook-signature": "v1," + base64.b64encode(digest).decode("ascii"),
    }


class Random(Protocol):
    """What ``retry_delay`` needs of a random number generator (``random.Random`` has it)."""

    def random(self) -> float:
        """A float in [0, 1)."""
        ...


def retry_delay(attempt: int, rng: Random) -> float:
    """Seconds to wait after the ``attempt``-th failed attempt (1 for the first).

    Exponential backoff, 10 s doubling up to an hour, with "equal jitter": a random point in the
    upper half of that step, so that receivers that came back are not hit by every sidecar's
    retries at once. Never less than a second.
    """
    step = min(MAX_DELAY, FIRST_DELAY * 2.0 ** (min(max(attempt, 1), 32) - 1))
    return max(MIN_DELAY, step * (0.5 + 0.5 * rng.random()))
