"""mailcow's X-API-Key check (mailcow.md section 3), done in constant time, and the client address.

mailcow strips the header to ``[A-Za-z0-9-]``, looks the key up among ``active = 1`` rows of ``api``
(case-insensitively, by the collation), checks the client IP against ``allow_from`` unless
``skip_ip_check``, and refuses a read-only key for a write. This module does the same over rows the
database layer fetched, but compares every candidate with ``hmac.compare_digest`` instead of a SQL
equality. Pure core: stdlib and attrs only.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from collections.abc import Iterable, Sequence
from functools import lru_cache

import attrs

from .errors import API_AUTH_FAILED, API_RW_DENIED, ApiError, api_ip_denied

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# mailcow: preg_replace('/[^a-zA-Z0-9-]/', '', $_SERVER['HTTP_X_API_KEY'])
_NOT_KEY_CHAR = re.compile(r"[^A-Za-z0-9-]")
# mailcow: preg_split("/( |,|;|\n)/", allow_from), then trim() of each entry.
_ALLOW_FROM_SEPARATORS = re.compile(r"[ ,;\n]")
_PHP_TRIM = " \t\n\r\0\x0b"


@attrs.frozen
class ApiKey:
    """A row of mailcow's ``api`` table. The key itself never appears in repr or logs."""

    api_key: str = attrs.field(repr=False)
    allow_from: str = ""
    skip_ip_check: bool = False
    access: str = "rw"
    active: bool = True

    @property
    def writable(self) -> bool:
        """True for a read-write key."""
        return self.access == "rw"

    @property
    def label(self) -> str:
        """A harmless name for the key in listings: its first group and a mask."""
        return self.api_key[:6] + "-..." if self.api_key else "(empty)"


def normalise_key(raw: str | None) -> str:
    """The header as mailcow reads it: every character outside ``[A-Za-z0-9-]`` removed."""
    return _NOT_KEY_CHAR.sub("", raw or "")


def match_key(presented: str, candidates: Iterable[ApiKey]) -> ApiKey | None:
    """The active candidate whose key equals ``presented`` case-insensitively, or None.

    Every candidate is compared, with ``hmac.compare_digest`` on the upper-case forms, so the time
    taken does not depend on how much of a key matched nor on which row matched. An empty key never
    matches (mailcow ignores an empty header).
    """
    probe = presented.upper().encode("utf-8")
    found: ApiKey | None = None
    for row in candidates:
        same = hmac.compare_digest(probe, row.api_key.upper().encode("utf-8"))
        if same and row.active and found is None:
            found = row
    return found if probe else None


@lru_cache(maxsize=1024)
def parse_ip(text: str) -> IPAddress | None:
    """An address from text, IPv4-mapped IPv6 turned into IPv4; None for anything else."""
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _parse_entry(entry: str) -> IPNetwork | None:
    """One ``allow_from`` or trusted-proxy entry: an address or a CIDR network; None for junk."""
    if "/" not in entry:
        address = parse_ip(entry)
        return None if address is None else ipaddress.ip_network(address)
    base, _, bits = entry.partition("/")
    address = parse_ip(base)
    if address is None or not bits.isdigit():
        return None
    prefix = int(bits)
    if isinstance(address, ipaddress.IPv4Address) and ":" in base:
        # An IPv4-mapped network (::ffff:a.b.c.d/n): n counts the 96 mapping bits too.
        prefix -= 96
    try:
        return ipaddress.ip_network(f"{address}/{prefix}", strict=False)
    except ValueError:
        return None


def split_allow_from(text: str | None) -> list[str]:
    """The non-empty entries of an ``allow_from`` value, trimmed as mailcow trims them."""
    entries = (entry.strip(_PHP_TRIM) for entry in _ALLOW_FROM_SEPARATORS.split(text or ""))
    return [entry for entry in entries if entry]


@lru_cache(maxsize=256)
def parse_allow_from(text: str | None) -> tuple[IPNetwork, ...]:
    """The networks in an ``allow_from`` value; entries that are not an IP or CIDR are ignored.

    Cached: every request checks its key's value, and keys are few (a changed value is a new entry).
    """
    networks = (_parse_entry(entry) for entry in split_allow_from(text))
    return tuple(network for network in networks if network is not None)


def ip_in(ip: str, networks: Sequence[IPNetwork]) -> bool:
    """True when ``ip`` is an address inside one of ``networks``."""
    address = parse_ip(ip)
    return address is not None and any(address in network for network in networks)


def ip_allowed(ip: str, allow_from: str | None) -> bool:
    """True when ``ip`` matches an entry of ``allow_from`` (exact address or CIDR network)."""
    return ip_in(ip, parse_allow_from(allow_from))


def authenticate(raw_header: str | None, client_ip: str, need_write: bool, candidates: Iterable[ApiKey]) -> ApiKey:
    """mailcow's decision for a presented header: the matching key, or mailcow's own error.

    Raises ``ApiError.mailcow(401, "authentication failed")`` for no match,
    ``ApiError.mailcow(401, "api access denied for ip <ip>")`` when ``allow_from`` excludes the
    client, and ``ApiError.mailcow(403, "API read/write access denied")`` for a read-only key when
    ``need_write``.
    """
    key = match_key(normalise_key(raw_header), candidates)
    if key is None:
        raise ApiError.mailcow(401, API_AUTH_FAILED)
    if not key.skip_ip_check and not ip_allowed(client_ip, key.allow_from):
        raise ApiError.mailcow(401, api_ip_denied(client_ip))
    if need_write and not key.writable:
        raise ApiError.mailcow(403, API_RW_DENIED)
    return key


# --------------------------------------------------------------------------- client address


@lru_cache(maxsize=32)
def parse_networks(entries: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    """Networks from strings such as ``"10.0.0.0/8"`` or ``"::1"``; junk entries are ignored."""
    return tuple(n for n in (_parse_entry(e) for e in entries) if n is not None)


def normalise_ip(text: str) -> str:
    """An address in its canonical text form (IPv4-mapped IPv6 as IPv4); other text unchanged."""
    address = parse_ip(text)
    return text if address is None else str(address)


def client_address(peer_ip: str, x_forwarded_for: str | None, trusted_proxies: Iterable[str]) -> str:
    """The client's address: the direct peer, unless that peer is a trusted proxy.

    Behind trusted proxies, X-Forwarded-For is read from the right (each proxy appends the address it
    saw), skipping trusted proxies; the first other address is the client. Entries further left
    are written by the client and are never believed. When an entry is not an address, the nearest
    trusted hop is answered, as nothing left of it can be believed either.
    """
    networks = parse_networks(tuple(trusted_proxies))
    current = normalise_ip(peer_ip)
    if not x_forwarded_for or not ip_in(current, networks):
        return current
    for entry in reversed(x_forwarded_for.split(",")):
        hop = parse_ip(entry)
        if hop is None:
            return current
        current = str(hop)
        if not ip_in(current, networks):
            return current
    return current
