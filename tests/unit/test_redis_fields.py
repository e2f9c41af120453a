"""What the sidecar asks mailcow's Redis: allow-list fields as rspamd asks them, and netfilter's bans."""

from __future__ import annotations

from mailcow_smtp_api.abuse import failure_line
from mailcow_smtp_api.mailcow.redisio import _ban_networks, allow_list_fields


def test_allow_list_fields_are_the_address_and_every_mask() -> None:
    """IPv4: the address, then /32 down to /8; IPv6: the address, then /128 down to /32."""
    fields = allow_list_fields("192.0.2.77")
    assert fields[:3] == ["192.0.2.77", "192.0.2.77/32", "192.0.2.76/31"]
    assert "192.0.2.0/24" in fields and fields[-1] == "192.0.0.0/8" and len(fields) == 1 + 25
    six = allow_list_fields("2001:db8::1")
    assert six[0] == "2001:db8::1" and six[1] == "2001:db8::1/128" and six[-1] == "2001:db8::/32" and len(six) == 1 + 97
    assert allow_list_fields("::ffff:192.0.2.77")[0] == "192.0.2.77"
    assert allow_list_fields("not an ip") == []


def test_ban_fields_in_force() -> None:
    """Active bans count until their expiry; permanent ones always; junk fields are ignored."""
    active = {b"192.0.2.0/24": b"2000", b"198.51.100.7": b"500", b"junk": b"9999", b"2001:db8::/64": b"x"}
    networks = [(str(net), until) for net, until in _ban_networks(active, now=1000.0, permanent=False)]
    assert networks == [("192.0.2.0/24", 2000.0), ("2001:db8::/64", None)]
    assert [str(n) for n, _ in _ban_networks({"203.0.113.9/32": "1"}, 1000.0, True)] == ["203.0.113.9/32"]


def test_failure_line_holds_no_caller_chosen_text() -> None:
    """The fail2ban line keeps only address characters of the login: no spaces, no second 'by'."""
    line = failure_line("evil by 8.8.8.8 x@example.org", "203.0.113.4")
    assert line == "mailcow UI: Invalid password for smtp-api:evilby8.8.8.8x@example.org by 203.0.113.4"
    assert failure_line("", "::1") == "mailcow UI: Invalid password for smtp-api:unknown by ::1"
