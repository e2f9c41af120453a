"""mailcow's X-API-Key check done in constant time, allow_from parsing, and the client address."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import pytest

from mailcow_smtp_api.core.apikeys import (
    ApiKey,
    authenticate,
    client_address,
    ip_allowed,
    match_key,
    normalise_key,
    parse_allow_from,
)
from mailcow_smtp_api.core.errors import ApiError

KEY = "ABCDEF-012345-6789AB-CDEF01-234567"
OTHER = "111111-222222-333333-444444-555555"


def test_normalise_key_keeps_only_mailcows_characters() -> None:
    """Everything outside [A-Za-z0-9-] is removed, as mailcow's preg_replace does."""
    assert normalise_key(' "abcDEF-01_23!" \r\n') == "abcDEF-0123"
    assert normalise_key("schlüssel-ä") == "schlssel-"
    assert normalise_key(None) == ""


def test_match_key_is_case_insensitive() -> None:
    """A key matches its stored form in any case."""
    rows = [ApiKey(OTHER), ApiKey(KEY)]
    assert match_key(KEY.lower(), rows) == ApiKey(KEY)
    assert match_key(KEY[:-1], rows) is None


def test_match_key_compares_every_candidate() -> None:
    """The loop never stops at the first match, so timing does not reveal which row matched."""
    seen: list[str] = []

    def rows() -> Iterator[ApiKey]:
        for row in (ApiKey(KEY), ApiKey(OTHER), ApiKey("222222-222222-222222-222222-222222")):
            seen.append(row.api_key)
            yield row

    assert match_key(KEY, rows()) == ApiKey(KEY)
    assert len(seen) == 3


def test_match_key_ignores_inactive_and_empty_keys() -> None:
    """An inactive row never matches, and an empty key never matches even an empty stored key."""
    assert match_key(KEY, [ApiKey(KEY, active=False)]) is None
    assert match_key("", [ApiKey("")]) is None


def test_api_key_repr_hides_the_key() -> None:
    """The key never shows up in repr (and so not in logs)."""
    assert KEY not in repr(ApiKey(KEY, allow_from="10.0.0.1"))
    assert ApiKey(KEY).label == "ABCDEF-..."


def test_parse_allow_from_separators_cidrs_and_junk() -> None:
    """Entries split at space, comma, semicolon and newline; junk and bad prefixes are ignored."""
    text = "192.0.2.1, 10.0.0.0/8;2001:db8::/32\n fe80::1 \t,junk; 10.1.2.3/33 ; 300.1.1.1, 172.16.5.4/12,,"
    assert parse_allow_from(text) == (
        ipaddress.ip_network("192.0.2.1/32"),
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("2001:db8::/32"),
        ipaddress.ip_network("fe80::1/128"),
        ipaddress.ip_network("172.16.0.0/12"),
    )
    assert parse_allow_from("") == () and parse_allow_from(None) == ()


def test_parse_allow_from_maps_ipv4_mapped_entries() -> None:
    """IPv4-mapped IPv6 entries become IPv4 (a mapped /104 is an IPv4 /8)."""
    assert parse_allow_from("::ffff:192.0.2.7 ::ffff:10.0.0.0/104") == (
        ipaddress.ip_network("192.0.2.7/32"),
        ipaddress.ip_network("10.0.0.0/8"),
    )


@pytest.mark.parametrize(
    ("ip", "allowed"),
    [
        ("192.0.2.1", True),
        ("192.0.2.2", False),
        ("10.200.3.4", True),
        ("::ffff:10.9.9.9", True),
        ("2001:db8:ffff::1", True),
        ("2001:db9::1", False),
        ("not-an-ip", False),
        ("", False),
    ],
)
def test_ip_allowed(ip: str, allowed: bool) -> None:
    """A client matches an exact address or a network of either family, mapped addresses included."""
    assert ip_allowed(ip, "192.0.2.1,10.0.0.0/8 2001:db8::/32") is allowed


def _error(raw: str | None, ip: str, need_write: bool, rows: list[ApiKey]) -> ApiError:
    with pytest.raises(ApiError) as caught:
        authenticate(raw, ip, need_write, rows)
    return caught.value


def test_authenticate_answers_as_mailcow() -> None:
    """No match -> 401 authentication failed; wrong IP -> 401 naming the IP; ro on write -> 403."""
    rows = [ApiKey(KEY, allow_from="192.0.2.0/24"), ApiKey(OTHER, allow_from="192.0.2.0/24", access="ro")]
    assert authenticate(KEY, "192.0.2.9", True, rows) == rows[0]
    assert authenticate(OTHER, "192.0.2.9", False, rows) == rows[1]
    failed = _error("nope", "192.0.2.9", True, rows)
    assert (failed.status, failed.message, failed.bare) == (401, "authentication failed", True)
    ip_denied = _error(KEY, "198.51.100.1", True, rows)
    assert (ip_denied.status, ip_denied.message) == (401, "api access denied for ip 198.51.100.1")
    read_only = _error(OTHER, "192.0.2.9", True, rows)
    assert (read_only.status, read_only.message) == (403, "API read/write access denied")


def test_authenticate_checks_the_ip_before_the_access_level() -> None:
    """A read-only key from a foreign address is refused for its address first, as in mailcow."""
    rows = [ApiKey(OTHER, allow_from="192.0.2.0/24", access="ro")]
    assert _error(OTHER, "198.51.100.1", True, rows).message == "api access denied for ip 198.51.100.1"


def test_skip_ip_check_admits_any_address() -> None:
    """skip_ip_check ignores allow_from."""
    rows = [ApiKey(KEY, allow_from="", skip_ip_check=True)]
    assert authenticate(KEY, "203.0.113.5", True, rows) == rows[0]


PROXIES = ("10.0.0.0/8", "::1")


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        ("203.0.113.5", "198.51.100.1", "203.0.113.5"),  # an untrusted peer's header is ignored
        ("10.0.0.2", None, "10.0.0.2"),
        ("10.0.0.2", "198.51.100.1", "198.51.100.1"),
        ("10.0.0.2", "1.2.3.4, 198.51.100.1", "198.51.100.1"),  # the client wrote 1.2.3.4 itself
        ("10.0.0.2", "198.51.100.1, 10.0.0.9", "198.51.100.1"),  # a chain of trusted proxies
        ("10.0.0.2", "10.0.0.7, 10.0.0.9", "10.0.0.7"),  # all trusted: the farthest one
        ("10.0.0.2", "198.51.100.1, garbage, 10.0.0.9", "10.0.0.9"),  # junk: the nearest trusted hop
        ("::1", "2001:db8::7", "2001:db8::7"),
        ("::ffff:10.0.0.2", "::ffff:198.51.100.1", "198.51.100.1"),
        ("::ffff:203.0.113.5", None, "203.0.113.5"),
    ],
)
def test_client_address(peer: str, forwarded: str | None, client: str) -> None:
    """X-Forwarded-For is believed only from trusted proxies, read from the right."""
    assert client_address(peer, forwarded, PROXIES) == client


def test_client_address_without_trusted_proxies_is_the_peer() -> None:
    """With no trusted proxies configured, the header never counts."""
    assert client_address("127.0.0.1", "198.51.100.1", ()) == "127.0.0.1"
