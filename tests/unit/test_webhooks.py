"""Webhook events in the pure core: ids, the JSON body, the Standard Webhooks signature, the backoff."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import pytest

from mailcow_smtp_api.core import webhooks
from mailcow_smtp_api.core.webhooks import WebhookEvent, new_event, payload, retry_delay, sign, signing_key

NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z
MESSAGE = {"id": "msg_1", "state": "delivered"}
BODY = (
    b'{"id":"evt_0123456789abcdef","type":"delivered","created_at":"2027-01-15T08:00:00.000Z",'
    b'"message":{"id":"msg_1","state":"delivered"}}'
)
SECRET = "correct horse battery staple"
# The key bytes behind a Standard Webhooks secret, and that secret.
RAW_KEY = b"sixteen-byte-key!!-and-more"
WHSEC = "whsec_c2l4dGVlbi1ieXRlLWtleSEhLWFuZC1tb3Jl"


class FixedRandom:
    """A random source that always answers ``value``."""

    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


def event() -> WebhookEvent:
    return new_event("delivered", MESSAGE, NOW, "0123456789abcdef")


def test_a_new_event_is_named_after_its_token() -> None:
    """The event id is ``evt_`` + the token; type, time and message are kept as given."""
    made = event()
    assert made == WebhookEvent("evt_0123456789abcdef", "delivered", NOW, MESSAGE)


@pytest.mark.parametrize("token", ["", "short", "has space!", "x" * 61, "line\nbreak-12345", "dots.are.out"])
def test_a_token_that_cannot_be_a_header_value_is_refused(token: str) -> None:
    """Tokens are 8-60 letters, digits, '_' or '-': the id goes into a header and a key column unquoted."""
    with pytest.raises(ValueError):
        new_event("delivered", MESSAGE, NOW, token)


def test_only_the_five_event_types_exist() -> None:
    """submitted, delivered, deferred, bounced and failed are events; anything else is refused."""
    for kind in ("submitted", "delivered", "deferred", "bounced", "failed"):
        assert new_event(kind, MESSAGE, NOW, "tok-12345").type == kind
    with pytest.raises(ValueError):
        new_event("opened", MESSAGE, NOW, "tok-12345")
    with pytest.raises(ValueError):
        WebhookEvent("evt bad", "delivered", NOW, MESSAGE)


def test_the_payload_is_compact_json_with_an_rfc3339_time() -> None:
    """The body is exactly id, type, created_at (RFC 3339 UTC, milliseconds) and message, without spaces."""
    assert payload(event()) == BODY
    assert payload(new_event("failed", {}, NOW + 0.25, "a" * 8)).startswith(
        b'{"id":"evt_aaaaaaaa","type":"failed","created_at":"2027-01-15T08:00:00.250Z"'
    )


def test_the_payload_is_ascii_and_reads_back_unchanged() -> None:
    """Non-ASCII text becomes \\u escapes; parsing the body gives back the message as built."""
    message = {"recipients": [{"address": "jörg@example.org", "smtp_text": "2.0.0 Ok ✓"}], "attempts": 2}
    body = payload(new_event("deferred", message, NOW, "tok-12345"))
    body.decode("ascii")
    assert json.loads(body)["message"] == message


def test_the_payload_refuses_values_json_does_not_have() -> None:
    """NaN is not JSON: the event is refused rather than sent as something receivers cannot parse."""
    with pytest.raises(ValueError):
        payload(new_event("failed", {"score": float("nan")}, NOW, "tok-12345"))


def test_the_event_type_is_read_from_the_start_of_a_payload() -> None:
    """payload_type finds the type of one of our bodies, and says unknown for anything else."""
    assert webhooks.payload_type(BODY) == "delivered"
    assert webhooks.payload_type(b'{"type":"delivered"}') == "unknown"
    assert webhooks.payload_type(b"") == "unknown"


def test_the_signature_of_a_fixed_input_is_exactly_hmac_sha256_over_id_timestamp_and_body() -> None:
    """Standard Webhooks' three headers; the signature is HMAC-SHA256 of "id.timestamp.body" with the
    secret's UTF-8 bytes, checked against hmac here and against a value computed with openssl."""
    headers = sign(SECRET, "evt_0123456789abcdef", 1_800_000_000, BODY)
    expected = base64.b64encode(
        hmac.new(SECRET.encode("utf-8"), b"evt_0123456789abcdef.1800000000." + BODY, hashlib.sha256).digest()
    ).decode("ascii")
    assert headers == {
        "webhook-id": "evt_0123456789abcdef",
        "webhook-timestamp": "1800000000",
        "webhook-signature": "v1," + expected,
    }
    # printf '%s' "evt_0123456789abcdef.1800000000.$BODY" | openssl dgst -sha256 -hmac "$SECRET" -binary | base64
    assert expected == "tl7JJZGRAlcpgRS6GSpIUtZZ/JZ4LDAyT0S5BDwHflA="


def test_a_whsec_secret_signs_with_its_decoded_bytes() -> None:
    """``whsec_<base64>`` is Standard Webhooks' form: the key is what the base64 decodes to."""
    assert signing_key(WHSEC) == RAW_KEY
    headers = sign(WHSEC, "evt_0123456789abcdef", 1_800_000_000, BODY)
    # the same openssl command with -mac HMAC -macopt hexkey:<hex of RAW_KEY>
    assert headers["webhook-signature"] == "v1,Rvg59wC3XNLypwNAwhyW52noc6B6GJqyL4Zy124CkqQ="


def test_a_whsec_secret_may_leave_out_its_padding() -> None:
    """Unpadded base64 decodes to the same key, as the official libraries accept it."""
    padded = "whsec_" + base64.b64encode(b"k" * 17).decode()
    assert padded.endswith("=")
    assert signing_key(padded.rstrip("=")) == signing_key(padded) == b"k" * 17


@pytest.mark.parametrize(
    "secret", ["whsec_not base64 at all!!", "whsec_" + base64.b64encode(b"fifteen bytes..").decode(), "fifteen chars.."]
)
def test_a_secret_that_makes_no_good_key_is_refused(secret: str) -> None:
    """Bad base64 after whsec_, or fewer than 16 bytes of key, is a ValueError (found at start-up)."""
    with pytest.raises(ValueError) as info:
        signing_key(secret)
    assert secret not in str(info.value)


def test_a_secret_is_utf8_bytes_when_not_in_whsec_form() -> None:
    """Any other secret is its UTF-8 bytes, non-ASCII included."""
    assert signing_key("pässwörd-sixteen") == "pässwörd-sixteen".encode("utf-8")


@pytest.mark.parametrize("secret", [SECRET, WHSEC])
def test_the_standardwebhooks_library_verifies_our_signature(secret: str) -> None:
    """The reference Python library (PyPI standardwebhooks) accepts our headers and body as they are."""
    library = pytest.importorskip("standardwebhooks")
    stamp = int(time.time())  # the library checks the timestamp against its own clock
    headers = sign(secret, "evt_0123456789abcdef", stamp, BODY)
    # The library decodes every str secret as base64; a plain secret is given as its key bytes.
    verifier = library.Webhook(secret if secret.startswith("whsec_") else secret.encode("utf-8"))
    assert verifier.verify(BODY, headers) == json.loads(BODY)
    tampered = BODY.replace(b"delivered", b"bounced")
    with pytest.raises(library.WebhookVerificationError):
        verifier.verify(tampered, headers)


def test_retries_start_at_ten_seconds_and_double_with_jitter_in_the_upper_half() -> None:
    """The n-th retry waits between half and all of 10 s * 2**(n-1)."""
    low, high = FixedRandom(0.0), FixedRandom(0.999999)
    for attempt, step in [(1, 10.0), (2, 20.0), (3, 40.0), (6, 320.0)]:
        assert retry_delay(attempt, low) == step / 2
        assert step * 0.999 < retry_delay(attempt, high) <= step


def test_retries_are_at_most_an_hour_apart_and_at_least_a_second() -> None:
    """The cap holds for any attempt count (no overflow); nonsense counts count as the first attempt."""
    for attempt in (10, 13, 100, 10**9):
        assert 1800.0 <= retry_delay(attempt, FixedRandom(0.0)) <= retry_delay(attempt, FixedRandom(0.999)) <= 3600.0
    assert retry_delay(0, FixedRandom(0.0)) == retry_delay(-5, FixedRandom(0.0)) == 5.0
    assert all(retry_delay(a, FixedRandom(r)) >= 1.0 for a in range(1, 40) for r in (0.0, 0.5, 0.99))
