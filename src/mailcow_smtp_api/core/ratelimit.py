"""mailcow's rate limits as pure values: the limit text, the leaky bucket, and what a caller is told.

mailcow keeps a limit per mailbox or per domain as ``"<N> / 1<s|m|h|d>"`` (Redis hash ``RL_VALUE``,
mailcow.md section 7). rspamd turns it into a leaky bucket of size N that leaks N per frame; every
message adds its number of envelope recipients. The login's own entry wins; only without one does
the domain of the envelope sender apply. Mail whose only recipient is the login itself, and mail
only to ``postmaster`` / ``mailer-daemon``, is not limited.

The sidecar keeps its own buckets (never rspamd's ``RL*`` keys, or mail that also passes rspamd
would count twice) and admits a message only when it fits whole: the level plus its recipients
must stay within N. Several buckets (mailcow's limit, a send key's own rate) are charged all or
none. Pure core: the clock is passed in.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import attrs

_FRAMES = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# mailcow writes "100 / 1h"; rspamd also reads the number of frames and no spaces.
_LIMIT = re.compile(r"\s*(\d{1,9})\s*/\s*(\d{0,6})\s*([smhd])\s*", re.IGNORECASE)
# rspamd's whitelisted_rcpts in mailcow's ratelimit.conf.
UNLIMITED_LOCAL_PARTS = frozenset({"postmaster", "mailer-daemon"})


@attrs.frozen
class Limit:
    """N recipients per ``window`` seconds: a bucket of size N leaking N per window."""

    count: int
    window: int

    @property
    def text(self) -> str:
        """The limit as mailcow writes it, e.g. ``100 / 1h``."""
        for unit, seconds in (("d", 86400), ("h", 3600), ("m", 60)):
            if self.window % seconds == 0:
                return f"{self.count} / {self.window // seconds}{unit}"
        return f"{self.count} / {self.window}s"

    @property
    def per_second(self) -> float:
        """How many recipients leak out of the bucket per second."""
        return self.count / self.window


def parse_limit(text: str | None) -> Limit | None:
    """``"100 / 1h"`` -> Limit(100, 3600); None for an empty, zero or malformed value."""
    if not text:
        return None
    match = _LIMIT.fullmatch(text)
    if match is None:
        return None
    count = int(match.group(1))
    frames = int(match.group(2) or "1")
    window = frames * _FRAMES[match.group(3).lower()]
    if count <= 0 or window <= 0:
        return None
    return Limit(count, window)


def exempt(login: str, recipients: Sequence[str]) -> bool:
    """True for mail that mailcow never limits: only to the login itself, or only to postmaster /
    mailer-daemon addresses."""
    lowered = [r.lower() for r in recipients]
    if not lowered:
        return True
    if all(r == login.lower() for r in lowered):
        return True
    return all(r.rpartition("@")[0] in UNLIMITED_LOCAL_PARTS for r in lowered)


@attrs.frozen
class Policy:
    """One bucket a message is charged to: a stable name for headers, its store key and its limit."""

    name: str  # "mailbox", "domain" or "key"
    key: str  # the bucket's key in its store (the sidecar's own prefix, never rspamd's)
    limit: Limit
    subject: str  # the mailbox, domain or send key id the limit belongs to


@attrs.frozen
class BucketState:
    """A bucket after the decision: how full it is (in recipients)."""

    policy: Policy
    level: float

    @property
    def remaining(self) -> int:
        """Recipients that would still fit now."""
        return max(0, math.floor(self.policy.limit.count - self.level + 1e-9))

    @property
    def reset(self) -> int:
        """Whole seconds until the bucket is empty again."""
        return max(0, math.ceil(self.level / self.policy.limit.per_second - 1e-9))


@attrs.frozen
class Decision:
    """Whether a message was admitted, and the state of every bucket it was checked against.

    ``retry_after`` is the wait until it would fit; None when admitted, or when it never can
    (``too_large``: more recipients than the ``blocking`` bucket holds).
    """

    admitted: bool
    buckets: tuple[BucketState, ...] = ()
    retry_after: int | None = None
    blocking: Policy | None = None
    too_large: bool = False


def judge(policies: Sequence[Policy], levels: Sequence[float], recipients: int) -> Decision:
    """The decision for ``recipients`` more, given each bucket's level after leaking.

    Admitted only if every bucket has room for all of them; then each level grows by ``recipients``.
    Otherwise ``blocking`` names the bucket that makes the message wait longest.
    """
    states = tuple(BucketState(p, lv) for p, lv in zip(policies, levels, strict=True))
    for policy in policies:
        if recipients > policy.limit.count:
            return Decision(False, states, None, blocking=policy, too_large=True)
    wait, blocking = 0.0, None
    for policy, level in zip(policies, levels):
        if level + recipients > policy.limit.count + 1e-9:
            seconds = (level + recipients - policy.limit.count) / policy.limit.per_second
            if blocking is None or seconds > wait:
                wait, blocking = seconds, policy
    if blocking is not None:
        return Decision(False, states, max(1, math.ceil(wait)), blocking=blocking)
    return Decision(True, tuple(BucketState(p, lv + recipients) for p, lv in zip(policies, levels)))


def admitted_as(decision: Decision, admitted: bool, recipients: int) -> Decision:
    """``decision`` turned the other way by a store that decided at a bucket's very edge."""
    if admitted:
        states = tuple(BucketState(b.policy, b.level + recipients) for b in decision.buckets)
        return Decision(True, states)
    states = tuple(BucketState(b.policy, b.level - recipients) for b in decision.buckets)
    return Decision(False, states, 1, blocking=states[0].policy if states else None)


def leaked(level: float, last: float, now: float, limit: Limit) -> float:
    """A bucket's level at ``now`` after leaking since ``last``."""
    if now <= last:
        return level
    return max(0.0, level - (now - last) * limit.per_second)


class MemoryBuckets:
    """Buckets in this process only: what the sidecar uses without Redis (replicas do not share them).

    At most ``max_buckets`` are kept; the least recently charged is forgotten first and starts
    empty again if it comes back.
    """

    def __init__(self, max_buckets: int = 100_000) -> None:
        self.max_buckets = max_buckets
        self._levels: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, policies: Sequence[Policy], recipients: int, now: float) -> Decision:
        """Charge ``recipients`` to every bucket of ``policies``, all or none."""
        levels = []
        for policy in policies:
            level, last = self._levels.get(policy.key, (0.0, now))
            levels.append(leaked(level, last, now, policy.limit))
        decision = judge(policies, levels, recipients)
        if decision.admitted:
            for state in decision.buckets:
                self._levels[state.policy.key] = (state.level, now)
                self._levels.move_to_end(state.policy.key)
            while len(self._levels) > self.max_buckets:
                self._levels.popitem(last=False)
        return decision


# --------------------------------------------------------------------------- HTTP headers


def _name(policy: Policy) -> str:
    return f'"{policy.name}"'


def policy_header(buckets: Iterable[BucketState]) -> str:
    """``RateLimit-Policy`` (draft-ietf-httpapi-ratelimit-headers): quota ``q`` per window ``w`` seconds."""
    return ", ".join(f"{_name(b.policy)};q={b.policy.limit.count};w={b.policy.limit.window}" for b in buckets)


def ratelimit_header(buckets: Iterable[BucketState]) -> str:
    """``RateLimit``: recipients remaining ``r`` and seconds ``t`` until the bucket is empty again."""
    return ", ".join(f"{_name(b.policy)};r={b.remaining};t={b.reset}" for b in buckets)
