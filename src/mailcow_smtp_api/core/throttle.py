"""Per-address failure counting with a sliding window and a ban, like mailcow's fail2ban settings.

mailcow publishes failed logins to its netfilter container, which bans an address for 1800 s after
10 failures within 600 s. The sidecar does the same in memory: ``record_failure`` after each failed
API-key or mailbox authentication, ``retry_after`` before doing any work for an address. Loopback
is exempt unless configured otherwise. Memory is bounded: at most ``max_tracked`` addresses are
remembered, the least recently active forgotten first. Pure core: the clock is passed in.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable

import attrs

from .apikeys import IPNetwork, ip_in, normalise_ip, parse_networks

DEFAULT_EXEMPT = ("127.0.0.0/8", "::1/128")


@attrs.define
class _Record:
    """Failure times inside the window (newest last) and the end of a ban, if any."""

    failures: deque[float]
    banned_until: float = 0.0


class Throttle:
    """Counts failures per client address and bans an address that fails too often."""

    def __init__(
        self,
        clock: Callable[[], float],
        max_failures: int = 10,
        window: float = 600.0,
        ban: float = 1800.0,
        exempt: Iterable[str] = DEFAULT_EXEMPT,
        max_tracked: int = 100_000,
    ) -> None:
        if max_failures < 1 or window <= 0 or ban <= 0 or max_tracked < 1:
            raise ValueError("max_failures, window, ban and max_tracked must be positive")
        self._clock = clock
        self.max_failures = max_failures
        self.window = window
        self.ban = ban
        self.exempt: tuple[IPNetwork, ...] = parse_networks(tuple(exempt))
        self.max_tracked = max_tracked
        self._records: OrderedDict[str, _Record] = OrderedDict()

    def is_exempt(self, ip: str) -> bool:
        """True for addresses that are never counted nor banned (loopback by default)."""
        return ip_in(ip, self.exempt)

    def record_failure(self, ip: str) -> None:
        """Count one failed authentication from ``ip``; ban it at ``max_failures`` within ``window``."""
        if self.is_exempt(ip):
            return
        key = normalise_ip(ip)
        now = self._clock()
        record = self._records.get(key)
        if record is None:
            record = _Record(failures=deque(maxlen=self.max_failures))
            self._records[key] = record
        self._records.move_to_end(key)
        if record.banned_until > now:
            return
        record.failures.append(now)
        # The deque holds the last max_failures times; all of them inside the window means a ban.
        if len(record.failures) == self.max_failures and now - record.failures[0] < self.window:
            record.banned_until = now + self.ban
            record.failures.clear()
        self._evict()

    def retry_after(self, ip: str) -> int | None:
        """Whole seconds until ``ip`` may try again (for a Retry-After header), or None when not banned."""
        record = self._records.get(normalise_ip(ip))
        if record is None:
            return None
        remaining = record.banned_until - self._clock()
        if remaining <= 0:
            return None
        return max(1, math.ceil(remaining))

    def failures(self, ip: str) -> int:
        """How many failures of ``ip`` are still inside the window."""
        record = self._records.get(normalise_ip(ip))
        if record is None:
            return 0
        horizon = self._clock() - self.window
        return sum(1 for at in record.failures if at > horizon)

    def forget_expired(self) -> None:
        """Drop addresses with no ban and no failure inside the window (call it from time to time)."""
        now = self._clock()
        stale = [
            key
            for key, record in self._records.items()
            if record.banned_until <= now and all(at <= now - self.window for at in record.failures)
        ]
        for key in stale:
            del self._records[key]

    def __len__(self) -> int:
        return len(self._records)

    def _evict(self) -> None:
        while len(self._records) > self.max_tracked:
            self._records.popitem(last=False)
