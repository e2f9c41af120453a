"""mailcow's abuse controls, applied by the sidecar on every path: bans, the SMTP allow list, rate limits.

rspamd applies mailcow's rate limits and per-mailbox SMTP allow lists only to SASL-authenticated
mail, and postfix's port 25 gets none of them (mailcow.md section 7). The sidecar applies them
itself, before it builds or submits anything:

- a client address that netfilter banned (``F2B_ACTIVE_BANS`` / ``F2B_PERM_BANS``) is refused
  before any database or password work;
- a mailbox that mailcow limits to some networks may send only from a caller inside them;
- each message is charged its envelope recipients against mailcow's limit for the login (or, if
  it has none, the sender's domain) and against the send key's own rate, all or none;
- every failed API key, send key or mailbox login is published for netfilter's default rule 1.

The sources are Protocols: mailcow's Redis in production (mailcow/redisio.py), the state database and
in-process buckets without it.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Sequence
from typing import Any, Protocol

import attrs

from .core.errors import ApiError
from .core.ratelimit import Decision, Limit, MemoryBuckets, Policy, exempt, judge
from .core.sendkeys import SendKey

# netfilter-mailcow's default rule 1: 'mailcow UI: Invalid password for .+ by ([0-9a-f\.:]+)'.
F2B_LINE = "mailcow UI: Invalid password for smtp-api:{who} by {ip}"
_SAFE_WHO = re.compile(r"[^A-Za-z0-9@._+-]")


class LimitSource(Protocol):
    """Where mailcow's limits come from: Redis ``RL_VALUE``, or the state database."""

    def limits_for(self, login: str, domain: str) -> Awaitable[tuple[Limit | None, Limit | None]]:
        """The limit of the login and of the domain (None where there is none)."""


class BucketStore(Protocol):
    """Where buckets live: Redis under the sidecar's prefix (shared), or this process."""

    def take(self, policies: Sequence[Policy], recipients: int) -> Awaitable[Decision]:
        """Charge ``recipients`` to every bucket, all or none."""


class AccessList(Protocol):
    """mailcow's per-mailbox SMTP source-IP allow list."""

    def smtp_allowed(self, login: str, ip: str) -> Awaitable[bool]:
        """False when the login may not use SMTP from ``ip``."""


class BanList(Protocol):
    """netfilter's bans."""

    def ban_for(self, ip: str) -> Awaitable[tuple[bool, int | None]]:
        """(banned, seconds left or None for a permanent ban)."""


class FailureReporter(Protocol):
    """Where failed logins are told (netfilter's ``F2B_CHANNEL``)."""

    def publish_failure(self, line: str) -> Any:
        """Publish one line; never raises."""


@attrs.define
class LocalBuckets:
    """``MemoryBuckets`` on a clock, shaped as a ``BucketStore``."""

    clock: Any
    buckets: MemoryBuckets = attrs.Factory(MemoryBuckets)

    async def take(self, policies: Sequence[Policy], recipients: int) -> Decision:
        """Charge the buckets of this process."""
        return self.buckets.take(policies, recipients, self.clock.seconds())


def failure_line(who: str, ip: str) -> str:
    """The fail2ban line for one failed login: the login or key id (never a secret), then the address."""
    safe = _SAFE_WHO.sub("", who)[:80] or "unknown"
    return F2B_LINE.format(who=safe, ip=ip)


def policies_for(
    login: str, sender_domain: str, login_limit: Limit | None, domain_limit: Limit | None, key: SendKey | None
) -> list[Policy]:
    """The buckets a message is charged to: mailcow's (the login's entry first, else the domain's)
    and the send key's own rate."""
    out: list[Policy] = []
    if login_limit is not None:
        out.append(Policy("mailbox", f"mbox:{login.lower()}", login_limit, login.lower()))
    elif domain_limit is not None:
        out.append(Policy("domain", f"domain:{sender_domain.lower()}", domain_limit, sender_domain.lower()))
    if key is not None and key.limit is not None:
        out.append(Policy("key", f"key:{key.key_id}", key.limit, key.key_id))
    return out


def rate_limited(decision: Decision) -> ApiError:
    """The 429 for a message that does not fit its buckets."""
    policy = decision.blocking
    assert policy is not None
    detail = {"policy": policy.name, "limit": policy.limit.text, "subject": policy.subject}
    if decision.too_large:
        return ApiError.of(
            "smtp_rate_limited",
            f"this message has more recipients than the {policy.name} limit {policy.limit.text} of "
            f"{policy.subject} allows at once; split it into smaller messages",
            detail=detail,
        )
    return ApiError.of(
        "smtp_rate_limited",
        f"the {policy.name} limit {policy.limit.text} of {policy.subject} is reached; retry after "
        f"{decision.retry_after} s",
        detail=detail,
        retry_after=decision.retry_after,
    )


@attrs.define
class AbuseControls:
    """The checks of this module over their sources; the parts a deployment lacks are None."""

    limits: LimitSource
    buckets: BucketStore
    access: AccessList | None = None
    bans: BanList | None = None
    reporter: FailureReporter | None = None

    async def refuse_if_banned(self, ip: str) -> None:
        """429 for an address netfilter banned."""
        if self.bans is None:
            return
        banned, seconds = await self.bans.ban_for(ip)
        if banned:
            raise ApiError.of(
                "smtp_too_many_failures",
                "this address is banned by mailcow's fail2ban (netfilter) after too many failed logins",
                retry_after=seconds,
            )

    async def check_access(self, login: str, ip: str) -> None:
        """403 when mailcow limits the login's SMTP use to networks that ``ip`` is not in."""
        if self.access is not None and not await self.access.smtp_allowed(login, ip):
            raise ApiError.of(
                "smtp_access_denied",
                f"{login} may use SMTP only from the networks set in mailcow, and {ip} is not one of them",
                field="from",
            )

    async def admit(
        self, login: str, sender: str, recipients: Sequence[str], key: SendKey | None, charge: bool = True
    ) -> Decision | None:
        """Charge the message's recipients; the decision (None when no limit applies at all).

        ``charge=False`` (a dry run) judges the same buckets without filling them. The caller
        refuses a decision that is not admitted (``rate_limited``).
        """
        mailcow_applies = not exempt(login, recipients)
        domain = sender.rpartition("@")[2]
        login_limit: Limit | None = None
        domain_limit: Limit | None = None
        if mailcow_applies:
            login_limit, domain_limit = await self.limits.limits_for(login, domain)
        policies = policies_for(login, domain, login_limit, domain_limit, key)
        if not policies:
            return None
        if not charge:
            # Taking nothing reads each bucket's level after leaking; the verdict is the one a send would get.
            looked = await self.buckets.take(policies, 0)
            return judge(policies, [state.level for state in looked.buckets], len(recipients))
        return await self.buckets.take(policies, len(recipients))

    def report_failure(self, who: str, ip: str) -> None:
        """Tell netfilter of one failed login (with Redis); a failure to publish is only logged."""
        if self.reporter is not None:
            self.reporter.publish_failure(failure_line(who, ip))


def no_limits() -> AbuseControls:
    """Controls that limit nothing (tests and tools that build a service by hand)."""

    class _None:
        async def limits_for(self, login: str, domain: str) -> tuple[Limit | None, Limit | None]:
            return None, None

    class _Clock:
        @staticmethod
        def seconds() -> float:
            return 0.0

    return AbuseControls(limits=_None(), buckets=LocalBuckets(_Clock()))
