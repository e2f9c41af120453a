"""Failure counting per address: a sliding window, a ban, expiry, exemptions and bounded memory."""

from __future__ import annotations

import attrs
import pytest

from mailcow_smtp_api.core.throttle import Throttle

CLIENT = "198.51.100.7"


@attrs.define
class FakeClock:
    """A clock the test moves by hand."""

    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def fail(throttle: Throttle, clock: FakeClock, times: int, every: float = 0.0, ip: str = CLIENT) -> None:
    """Record ``times`` failures of ``ip``, ``every`` seconds apart."""
    for _ in range(times):
        throttle.record_failure(ip)
        clock.advance(every)


def test_ten_failures_in_the_window_ban_for_1800_seconds() -> None:
    """Nine failures leave the address free; the tenth within 600 s bans it for 1800 s."""
    clock = FakeClock()
    throttle = Throttle(clock)
    fail(throttle, clock, 9, every=60)
    assert throttle.retry_after(CLIENT) is None
    assert throttle.failures(CLIENT) == 9
    throttle.record_failure(CLIENT)
    assert throttle.retry_after(CLIENT) == 1800


def test_the_ban_expires() -> None:
    """retry_after counts down, rounded up, and is None once the ban is over."""
    clock = FakeClock()
    throttle = Throttle(clock)
    fail(throttle, clock, 10)
    clock.advance(1799.5)
    assert throttle.retry_after(CLIENT) == 1
    clock.advance(0.5)
    assert throttle.retry_after(CLIENT) is None
    throttle.record_failure(CLIENT)
    assert throttle.retry_after(CLIENT) is None  # counting starts again after a ban


def test_the_window_slides() -> None:
    """Failures older than the window no longer count."""
    clock = FakeClock()
    throttle = Throttle(clock)
    fail(throttle, clock, 9)
    clock.advance(600)
    fail(throttle, clock, 9)
    assert throttle.retry_after(CLIENT) is None
    assert throttle.failures(CLIENT) == 9
    throttle.record_failure(CLIENT)
    assert throttle.retry_after(CLIENT) == 1800


def test_failures_during_a_ban_do_not_extend_it() -> None:
    """A banned address failing again keeps its original ban end."""
    clock = FakeClock()
    throttle = Throttle(clock)
    fail(throttle, clock, 10)
    clock.advance(100)
    fail(throttle, clock, 20)
    assert throttle.retry_after(CLIENT) == 1700


@pytest.mark.parametrize("ip", ["127.0.0.1", "127.3.4.5", "::1", "::ffff:127.0.0.1"])
def test_loopback_is_never_banned_by_default(ip: str) -> None:
    """Loopback is exempt unless configured otherwise."""
    clock = FakeClock()
    throttle = Throttle(clock)
    fail(throttle, clock, 50, ip=ip)
    assert throttle.retry_after(ip) is None
    assert len(throttle) == 0


def test_exemptions_are_configurable() -> None:
    """With no exemptions loopback is banned too; other networks can be exempted."""
    clock = FakeClock()
    strict = Throttle(clock, exempt=())
    fail(strict, clock, 10, ip="127.0.0.1")
    assert strict.retry_after("127.0.0.1") == 1800
    office = Throttle(clock, exempt=("192.0.2.0/24",))
    fail(office, clock, 10, ip="192.0.2.99")
    assert office.retry_after("192.0.2.99") is None


def test_custom_limits() -> None:
    """The count, window and ban length are parameters."""
    clock = FakeClock()
    throttle = Throttle(clock, max_failures=3, window=10, ban=30)
    fail(throttle, clock, 2, every=6)
    throttle.record_failure(CLIENT)  # 3 failures within 12 s: the first one is outside 10 s
    assert throttle.retry_after(CLIENT) is None
    throttle.record_failure(CLIENT)
    assert throttle.retry_after(CLIENT) == 30


def test_ipv4_mapped_addresses_share_the_ipv4_record() -> None:
    """::ffff:a.b.c.d and a.b.c.d count as one address."""
    clock = FakeClock()
    throttle = Throttle(clock)
    fail(throttle, clock, 5, ip="::ffff:198.51.100.7")
    fail(throttle, clock, 5, ip=CLIENT)
    assert throttle.retry_after("::ffff:198.51.100.7") == 1800


def test_memory_is_bounded_oldest_forgotten_first() -> None:
    """At most max_tracked addresses are remembered; the least recently active goes first."""
    clock = FakeClock()
    throttle = Throttle(clock, max_failures=1, max_tracked=3)
    for i in range(5):
        throttle.record_failure(f"192.0.2.{i}")
    assert len(throttle) == 3
    assert throttle.retry_after("192.0.2.0") is None and throttle.retry_after("192.0.2.1") is None
    assert throttle.retry_after("192.0.2.4") == 1800


def test_forget_expired_drops_idle_addresses() -> None:
    """Addresses without a ban or a recent failure are dropped; banned ones stay."""
    clock = FakeClock()
    throttle = Throttle(clock)
    fail(throttle, clock, 1, ip="192.0.2.1")
    fail(throttle, clock, 10, ip="192.0.2.2")
    clock.advance(601)
    throttle.forget_expired()
    assert len(throttle) == 1
    assert throttle.retry_after("192.0.2.2") is not None


def test_bad_limits_are_refused() -> None:
    """Zero or negative limits are configuration errors."""
    with pytest.raises(ValueError):
        Throttle(FakeClock(), max_failures=0)
