"""The idempotency rules without storage: key syntax, scope, fingerprint, verdicts, what is kept."""

from __future__ import annotations

import hashlib
import json

import pytest

from mailcow_smtp_api.core.config import ConfigError, from_options
from mailcow_smtp_api.core.errors import ApiError
from mailcow_smtp_api.core.idempotency import (
    Answer,
    Claim,
    Record,
    State,
    Verdict,
    fingerprint,
    interrupted_error,
    judge,
    lease_seconds,
    parse_key,
    scope_of,
    settled_state,
)

API_KEY = "ABCDEF-012345-6789AB-CDEF01-234567"
OTHER_KEY = "111111-222222-333333-444444-555555"


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        (b"a", "a"),
        (b"order-1234 confirmation", "order-1234 confirmation"),
        (b"  padded\t", "padded"),
        (b"~" * 255, "~" * 255),
        (b"!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"),
    ],
)
def test_valid_keys_are_accepted(raw: bytes, key: str) -> None:
    """1-255 printable ASCII characters are a key; surrounding blanks are HTTP's, not the key's."""
    assert parse_key([raw]) == key


def test_absent_header_means_no_key() -> None:
    """Without the header the request is not idempotent (None), not an error."""
    assert parse_key(None) is None
    assert parse_key([]) is None


@pytest.mark.parametrize(
    "raw",
    [b"", b"   ", b"x" * 256, b"a\x00b", b"a\x7fb", b"caf\xc3\xa9", b"a\x01", "k\u00e9y".encode("latin-1")],
)
def test_malformed_keys_are_refused(raw: bytes) -> None:
    """Empty, too long, control or non-ASCII characters answer 400 smtp_invalid_idempotency_key."""
    with pytest.raises(ApiError) as info:
        parse_key([raw])
    assert (info.value.code, info.value.status, info.value.field) == ("smtp_invalid_idempotency_key", 400, "Idempotency-Key")


def test_two_headers_are_refused() -> None:
    """Two Idempotency-Key headers are ambiguous and refused, even when equal."""
    with pytest.raises(ApiError) as info:
        parse_key([b"same", b"same"])
    assert info.value.code == "smtp_invalid_idempotency_key"


def test_scope_is_the_key_as_mailcow_matches_it_and_never_the_key() -> None:
    """Spellings mailcow treats as one key share a scope; another key has another; the key is not in it."""
    scope = scope_of(API_KEY)
    assert scope == scope_of(API_KEY.lower()) == scope_of(f' "{API_KEY}"\n')
    assert scope != scope_of(OTHER_KEY)
    assert len(scope) == 64 and API_KEY not in scope and API_KEY.replace("-", "") not in scope
    assert scope != hashlib.sha256(API_KEY.encode()).hexdigest()  # domain-separated, not a bare hash


def test_fingerprint_depends_on_every_byte_and_on_the_api_key() -> None:
    """One changed byte or another API key changes the fingerprint; it is not a bare hash of the body."""
    body = json.dumps({"from": "a@example.com", "password": "hunter2"}).encode()
    print_ = fingerprint(body, API_KEY)
    assert print_ == fingerprint(body, API_KEY.lower())
    assert print_ != fingerprint(body + b" ", API_KEY)
    assert print_ != fingerprint(body, OTHER_KEY)
    assert print_ != hashlib.sha256(body).hexdigest()


def claim(print_: str = "f1", at: float = 1000.0) -> Claim:
    return Claim("scope", "key", print_, "token-new", at, at + 300.0, at + 86400.0)


def record(state: State, print_: str = "f1", lease_until: float = 1300.0) -> Record:
    return Record(
        "scope", "key", print_, "token-old", state, 1000.0, lease_until, 87400.0,
        status=None if state is State.IN_FLIGHT else 200,
        code=None if state is State.IN_FLIGHT else "smtp_mail_sent",
        body=None if state is State.IN_FLIGHT else b'[{"type":"success"}]',
    )


@pytest.mark.parametrize(
    ("state", "print_", "now", "verdict"),
    [
        (State.DONE, "f1", 1100.0, Verdict.REPLAY),
        (State.OUTCOME_UNKNOWN, "f1", 1100.0, Verdict.REPLAY),
        (State.IN_FLIGHT, "f1", 1100.0, Verdict.IN_FLIGHT),
        (State.IN_FLIGHT, "f1", 1300.0, Verdict.INTERRUPTED),
        (State.DONE, "f2", 1100.0, Verdict.MISMATCH),
        (State.IN_FLIGHT, "f2", 1100.0, Verdict.MISMATCH),
        (State.IN_FLIGHT, "f2", 5000.0, Verdict.MISMATCH),
    ],
)
def test_verdicts(state: State, print_: str, now: float, verdict: Verdict) -> None:
    """Another body is a mismatch in every state; the same body replays, waits, or finds an interrupted send."""
    assert judge(record(state, print_), claim("f1"), now) is verdict


def test_expiry_is_inclusive() -> None:
    """A record is live until its expiry time and free from then on."""
    live = record(State.DONE)
    assert not live.expired(87399.9)
    assert live.expired(87400.0)


def test_stored_answer_round_trips() -> None:
    """A settled record gives back the status, code and JSON body that were stored."""
    answer = Answer(502, "smtp_error", [{"type": "error", "msg": "smtp_error", "detail": {"smtp_code": 554}}])
    stored = Record("s", "k", "f", "t", State.DONE, 0.0, 1.0, 2.0, answer.status, answer.code, answer.body_bytes())
    again = stored.answer()
    assert (again.status, again.code, again.body) == (502, "smtp_error", answer.body)
    with pytest.raises(ValueError):
        record(State.IN_FLIGHT).answer()


ANSWER_200 = Answer(200, "smtp_mail_sent", [])
ANSWER_502 = Answer(502, "smtp_error", [])
ANSWER_503_RETRY = Answer(503, "smtp_error", [], retry_after=60)
ANSWER_504 = Answer(504, "smtp_error", [])
ANSWER_400 = Answer(400, "smtp_empty_subject", [])


@pytest.mark.parametrize(
    ("reached", "answer", "unknown", "state"),
    [
        (False, ANSWER_400, False, None),
        (False, Answer(503, "smtp_db_unavailable", [], retry_after=5), False, None),
        (True, ANSWER_200, False, State.DONE),
        (True, ANSWER_502, False, State.DONE),
        (True, Answer(403, "smtp_auth_failed", []), False, State.DONE),
        (True, ANSWER_504, False, State.DONE),
        (True, ANSWER_504, True, State.OUTCOME_UNKNOWN),
        (True, ANSWER_503_RETRY, False, None),
        (True, Answer(500, "smtp_internal_error", []), False, State.DONE),
    ],
)
def test_what_is_kept(reached: bool, answer: Answer, unknown: bool, state: State | None) -> None:
    """Kept after SMTP began (outcome-unknown marked as such); released before it and for retry-later 503s."""
    assert settled_state(reached, answer, unknown) is state


def test_lease_outlasts_the_longest_send() -> None:
    """The lease covers a step timeout per SMTP step and per recipient, plus slack for the database."""
    assert lease_seconds(30.0, 100) > 30.0 * (8 + 100)
    assert lease_seconds(1.0, 1) < lease_seconds(1.0, 2) < lease_seconds(2.0, 2)


def test_interrupted_answer_says_the_outcome_is_unknown() -> None:
    """A send that never finished is answered as a 504 whose detail says it may have been delivered."""
    err = interrupted_error()
    assert (err.code, err.status) == ("smtp_error", 504)
    assert err.detail is not None and err.detail["outcome_unknown"] is True


def test_state_db_and_ttl_options() -> None:
    """--state-db defaults to its own SQLite file, reads SMTPAPI_STATE_DB; the ttl is seconds within bounds."""
    default = from_options({}, environ={})
    assert (default.state_db, default.idempotency_ttl) == ("sqlite:smtpapi-state.sqlite", 86400.0)
    env = {"SMTPAPI_STATE_DB": "mysql://s:p@db:3306/smtpapi_state", "SMTPAPI_IDEMPOTENCY_TTL": "600"}
    configured = from_options({}, environ=env)
    assert (configured.state_db, configured.idempotency_ttl) == ("mysql://s:p@db:3306/smtpapi_state", 600.0)
    for options in ({"state-db": "postgres://x"}, {"idempotency-ttl": "10"}, {"idempotency-ttl": "forever"},
                    {"db": "sqlite:same.sqlite", "state-db": "sqlite:same.sqlite"}):
        with pytest.raises(ConfigError):
            from_options(options, environ={})
