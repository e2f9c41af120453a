"""mailcow's rate limits as values: parsing, exemptions, the leaky bucket and the RateLimit headers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailcow_smtp_api.core.ratelimit import (
    Limit,
    MemoryBuckets,
    Policy,
    admitted_as,
    exempt,
    judge,
    leaked,
    parse_limit,
    policy_header,
    ratelimit_header,
)


@pytest.mark.parametrize(
    ("text", "limit"),
    [
        ("100 / 1h", Limit(100, 3600)),
        ("100/1h", Limit(100, 3600)),
        ("5 / 1s", Limit(5, 1)),
        ("7 / 1m", Limit(7, 60)),
        ("1000 / 1d", Limit(1000, 86400)),
        ("10 / 2m", Limit(10, 120)),
        ("3 / h", Limit(3, 3600)),
        (" 4 / 1H ", Limit(4, 3600)),
    ],
)
def test_mailcow_limits_parse(text: str, limit: Limit) -> None:
    """mailcow's "N / 1<unit>" values become N recipients per window in seconds."""
    assert parse_limit(text) == limit


@pytest.mark.parametrize("text", [None, "", "0 / 1h", "100", "100 / 1w", "-1 / 1h", "a / 1h", "10 / 0h", "1 / 1h x"])
def test_unusable_limits_are_no_limit(text: str | None) -> None:
    """Empty, zero and malformed values give no limit."""
    assert parse_limit(text) is None


@pytest.mark.parametrize(("limit", "text"), [(Limit(100, 3600), "100 / 1h"), (Limit(5, 90), "5 / 90s"), (Limit(9, 172800), "9 / 2d")])
def test_limit_text_is_mailcows_form(limit: Limit, text: str) -> None:
    """A limit writes itself back the way mailcow stores it, and parses to itself."""
    assert limit.text == text
    assert parse_limit(limit.text) == limit


def test_self_only_and_postmaster_mail_is_exempt() -> None:
    """Only-to-the-login and only-to-postmaster/mailer-daemon mail is never limited; anything else is."""
    assert exempt("User@Example.org", ["user@example.org"])
    assert exempt("user@example.org", ["postmaster@example.net", "MAILER-DAEMON@example.org"])
    assert not exempt("user@example.org", ["user@example.org", "other@example.org"])
    assert not exempt("user@example.org", ["postmaster@example.net", "other@example.org"])
    assert not exempt("user@example.org", ["someone@example.org"])


def policy(count: int = 5, window: int = 10, name: str = "mailbox") -> Policy:
    return Policy(name, f"{name}:x", Limit(count, window), "x")


def test_bucket_fills_to_the_limit_exactly_then_refuses() -> None:
    """Recipients add up to N exactly; one more is refused with the wait until it fits."""
    buckets = MemoryBuckets()
    first = buckets.take([policy()], 3, now=0.0)
    second = buckets.take([policy()], 2, now=0.0)
    third = buckets.take([policy()], 1, now=0.0)
    assert first.admitted and second.admitted and not third.admitted
    assert second.buckets[0].remaining == 0
    # 5 recipients per 10 s leak 0.5 per second: one more fits after 2 s.
    assert third.retry_after == 2
    assert third.blocking == policy()


def test_bucket_leaks_back() -> None:
    """A full bucket admits again once enough has leaked out."""
    buckets = MemoryBuckets()
    assert buckets.take([policy()], 5, now=0.0).admitted
    assert not buckets.take([policy()], 1, now=1.9).admitted
    assert buckets.take([policy()], 1, now=2.0).admitted
    assert not buckets.take([policy()], 1, now=2.0).admitted


def test_refused_message_charges_nothing() -> None:
    """A refusal leaves every bucket as it was."""
    buckets = MemoryBuckets()
    buckets.take([policy()], 4, now=0.0)
    assert not buckets.take([policy()], 2, now=0.0).admitted
    assert buckets.take([policy()], 1, now=0.0).admitted


def test_all_buckets_or_none() -> None:
    """A message is charged to every bucket or to none: a full key bucket keeps the mailbox one untouched."""
    buckets = MemoryBuckets()
    mailbox, key = policy(10, 10, "mailbox"), policy(2, 10, "key")
    assert buckets.take([mailbox, key], 2, now=0.0).admitted
    refused = buckets.take([mailbox, key], 1, now=0.0)
    assert not refused.admitted and refused.blocking == key
    # The mailbox bucket holds 2, not 3: eight more fit there alone.
    assert buckets.take([mailbox], 8, now=0.0).admitted


def test_more_recipients_than_the_limit_never_fit() -> None:
    """A message larger than a bucket is refused without a Retry-After, even on an empty bucket."""
    decision = MemoryBuckets().take([policy(5, 10)], 6, now=0.0)
    assert (decision.admitted, decision.too_large, decision.retry_after) == (False, True, None)


def test_headers_follow_the_draft_syntax() -> None:
    """RateLimit-Policy names quota and window; RateLimit the recipients left and seconds to empty."""
    decision = MemoryBuckets().take([policy(100, 3600), policy(10, 60, "key")], 4, now=0.0)
    assert policy_header(decision.buckets) == '"mailbox";q=100;w=3600, "key";q=10;w=60'
    # 4 of 100 per hour leak in 144 s; 4 of 10 per minute in 24 s.
    assert ratelimit_header(decision.buckets) == '"mailbox";r=96;t=144, "key";r=6;t=24'


def test_admitted_as_turns_a_decision_around() -> None:
    """A store's verdict at a bucket's edge wins, with levels to match."""
    admitted = judge([policy()], [1.0], 2)
    refused = admitted_as(admitted, False, 2)
    assert (refused.admitted, refused.buckets[0].level, refused.retry_after) == (False, 1.0, 1)
    back = admitted_as(refused, True, 2)
    assert (back.admitted, back.buckets[0].level) == (True, 3.0)


@given(
    count=st.integers(1, 50),
    window=st.integers(1, 3600),
    sends=st.lists(st.tuples(st.integers(1, 60), st.floats(0, 10)), max_size=40),
)
def test_never_more_than_the_bucket_allows(count: int, window: int, sends: list[tuple[int, float]]) -> None:
    """Over any sequence of sends, admitted recipients never exceed N plus what leaked meanwhile."""
    buckets = MemoryBuckets()
    limit = Limit(count, window)
    now, admitted = 0.0, 0
    for recipients, pause in sends:
        now += pause
        if buckets.take([Policy("mailbox", "k", limit, "s")], recipients, now).admitted:
            admitted += recipients
        assert admitted <= count + now * limit.per_second + 1e-6


def test_leaking_never_goes_below_empty() -> None:
    """An old bucket is empty, not negative; time running backwards leaks nothing."""
    assert leaked(3.0, 0.0, 1000.0, Limit(5, 10)) == 0.0
    assert leaked(3.0, 10.0, 5.0, Limit(5, 10)) == 3.0


def test_memory_buckets_are_bounded() -> None:
    """At most max_buckets subjects are remembered."""
    buckets = MemoryBuckets(max_buckets=3)
    for n in range(10):
        buckets.take([Policy("mailbox", f"k{n}", Limit(5, 10), "s")], 1, now=0.0)
    assert len(buckets._levels) == 3
