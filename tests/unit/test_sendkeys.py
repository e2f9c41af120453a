"""Send keys: their format, the stored hash, the constant-time check and what a key may do."""

from __future__ import annotations

import attrs
import pytest

from mailcow_smtp_api.core.errors import ApiError
from mailcow_smtp_api.core.sendkeys import (
    SendKey,
    check_key,
    key_id_of,
    looks_like_send_key,
    new_key,
    normalise_senders,
    parse_token,
    secret_matches,
)


def stored(**changes: object) -> tuple[str, SendKey]:
    fresh = new_key()
    key = SendKey(key_id=fresh.key_id, login="user@example.org", salt=fresh.salt, digest=fresh.digest)
    return fresh.token, attrs.evolve(key, **changes)


def test_a_new_key_parses_and_only_its_hash_is_kept() -> None:
    """The token is smtpapi-<12 hex>-<64 hex>; the row holds an HMAC of the secret, not the secret."""
    fresh = new_key()
    parsed = parse_token(fresh.token)
    assert parsed is not None
    key_id, secret = parsed
    assert key_id == fresh.key_id and len(secret) == 64
    assert secret not in (fresh.digest, fresh.salt) and secret not in repr(fresh)
    assert fresh.token not in repr(fresh)


def test_two_keys_differ_in_id_secret_and_salt() -> None:
    """Every key is drawn afresh."""
    one, two = new_key(), new_key()
    assert len({one.key_id, two.key_id}) == 2 and len({one.salt, two.salt}) == 2 and one.token != two.token


def test_the_right_secret_matches_and_any_other_does_not() -> None:
    """Only the key's own secret matches its stored hash; no key matches nothing."""
    token, key = stored()
    _, secret = parse_token(token)  # type: ignore[misc]
    assert secret_matches(key, secret)
    assert not secret_matches(key, "0" * 64)
    assert not secret_matches(key, secret[:-1] + ("0" if secret[-1] != "0" else "1"))
    assert not secret_matches(None, secret)


@pytest.mark.parametrize(
    "raw",
    ["", "smtpapi-", "smtpapi-abc-def", "smtpapi-" + "g" * 12 + "-" + "0" * 64, "smtpapi-" + "0" * 12 + "-" + "0" * 63, "XXXXXX-XXXXXX"],
)
def test_malformed_tokens_do_not_parse(raw: str) -> None:
    """Anything but the exact shape is not a send key token."""
    assert parse_token(raw) is None


def test_tokens_are_read_case_insensitively_and_trimmed() -> None:
    """Upper-case hex and surrounding spaces still name the same key."""
    token, _ = stored()
    assert parse_token(f"  {token.upper()} ") == parse_token(token)
    assert looks_like_send_key(" SMTPAPI-x") and not looks_like_send_key("AAAAAA-BBBBBB") and not looks_like_send_key(None)


def test_key_id_of_never_shows_caller_text() -> None:
    """Logs and fail2ban lines get the key id, or 'invalid': never the secret nor free text."""
    token, key = stored()
    assert key_id_of(token) == key.key_id
    assert key_id_of("smtpapi-x by 203.0.113.9") == "invalid"
    assert key_id_of(None) == "invalid"


def test_check_key_refuses_disabled_expired_and_foreign_networks() -> None:
    """Wrong secret, disabled, expired: 401 authentication failed; outside allow_from: mailcow's ip message."""
    token, key = stored(allow_from="192.0.2.0/24", expires_at=1000.0)
    _, secret = parse_token(token)  # type: ignore[misc]
    assert check_key(key, secret, "192.0.2.7", now=999.0) == key
    cases = [
        (key, "f" * 64, "192.0.2.7", 999.0, "authentication failed"),
        (attrs.evolve(key, disabled=True), secret, "192.0.2.7", 999.0, "authentication failed"),
        (key, secret, "192.0.2.7", 1000.0, "authentication failed"),
        (key, secret, "198.51.100.1", 999.0, "api access denied for ip 198.51.100.1"),
        (None, secret, "192.0.2.7", 999.0, "authentication failed"),
    ]
    for row, presented, ip, now, message in cases:
        with pytest.raises(ApiError) as caught:
            check_key(row, presented, ip, now)
        assert (caught.value.status, caught.value.message, caught.value.bare) == (401, message, True)


def test_sender_list_limits_senders_case_insensitively() -> None:
    """A key with a sender list sends only as those; without one, as any sender the login owns."""
    _, key = stored(senders=normalise_senders(["Shop@Example.org", "shop@example.org", " news@example.org"]))
    assert key.senders == ("shop@example.org", "news@example.org")
    assert key.may_send_as("SHOP@example.org") and not key.may_send_as("user@example.org")
    _, open_key = stored()
    assert open_key.may_send_as("anything@example.org")


def test_rate_is_parsed_from_the_stored_text() -> None:
    """The key's own rate is mailcow's limit syntax."""
    _, key = stored(rate="10 / 1m")
    assert key.limit is not None and (key.limit.count, key.limit.window) == (10, 60)
    _, none = stored()
    assert none.limit is None
