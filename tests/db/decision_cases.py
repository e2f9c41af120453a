"""Table-driven cases for mailcow's sender rule (mailcow.md section 1), one per clause and quirk.

Every case is a small database state, a login, a sender and the expected decision with its exact
reason. The same table runs against the pure rule, SQLite and MariaDB with identical expectations.
"""

from __future__ import annotations

import attrs

from mailcow_smtp_api.core.senders import (
    Alias,
    AliasDomain,
    DbState,
    Domain,
    Mailbox,
    SenderAcl,
)

U1, U2 = "user1@example.org", "user2@example.org"


def box(username: str, **fields: object) -> tuple[Mailbox, Alias]:
    """A mailbox and the self-alias mailcow creates with it."""
    return Mailbox(username, **fields), Alias(username, username)  # type: ignore[arg-type]


def world(
    *,
    domains: tuple[Domain, ...] = (),
    mailboxes: tuple[tuple[Mailbox, Alias], ...] = (),
    aliases: tuple[Alias, ...] = (),
    alias_domains: tuple[AliasDomain, ...] = (),
    acl: tuple[SenderAcl, ...] = (),
    example_active: int = 1,
) -> DbState:
    """example.org and other.org with user1 and user2, plus the given rows."""
    boxes = (box(U1), box(U2), *mailboxes)
    return DbState(
        domains=(Domain("example.org", example_active), Domain("other.org"), *domains),
        mailboxes=tuple(m for m, _ in boxes),
        aliases=tuple(a for _, a in boxes) + aliases,
        alias_domains=alias_domains,
        sender_acl=acl,
    )


@attrs.frozen
class Case:
    """One row of the table."""

    id: str
    state: DbState
    login: str
    sender: str
    allowed: bool
    reason: str


ALIAS_ORG = AliasDomain("alias.org", "example.org")
CATCH_ALL_U1 = Alias("@example.org", U1)

CASES: tuple[Case, ...] = (
    # --- own mailbox (the self-alias) and case-insensitivity
    Case("own-mailbox", world(), U1, U1, True, "own mailbox"),
    Case("own-mailbox-sender-case", world(), U1, "USER1@Example.ORG", True, "own mailbox"),
    Case("own-mailbox-login-case", world(), "User1@EXAMPLE.org", U1, True, "own mailbox"),
    Case("someone-elses-mailbox", world(), U2, U1, False, f"{U1} is owned by {U1}, not by {U2}"),
    Case("unknown-address", world(), U1, "nobody@example.org", False, "no owner for nobody@example.org"),
    # --- A: the alias table
    Case(
        "alias",
        world(aliases=(Alias("shared@example.org", U1),)),
        U1,
        "shared@example.org",
        True,
        f"alias shared@example.org -> {U1}",
    ),
    Case(
        "alias-multi-goto-comma-space",
        world(aliases=(Alias("shared@example.org", f"{U2}, {U1}"),)),
        U1,
        "shared@example.org",
        True,
        f"alias shared@example.org -> {U2},{U1}",
    ),
    Case(
        "alias-multi-goto-whitespace",
        world(aliases=(Alias("shared@example.org", f"{U2}\t{U1}\n"),)),
        U1,
        "shared@example.org",
        True,
        f"alias shared@example.org -> {U2},{U1}",
    ),
    Case(
        "alias-goto-token-not-substring",
        world(aliases=(Alias("shared@example.org", "x" + U1),)),
        U1,
        "shared@example.org",
        False,
        f"shared@example.org is owned by x{U1}, not by {U1}",
    ),
    Case(
        "alias-goto-case",
        world(aliases=(Alias("Shared@Example.org", "USER1@EXAMPLE.ORG"),)),
        U1,
        "shared@example.org",
        True,
        "alias Shared@Example.org -> USER1@EXAMPLE.ORG",
    ),
    Case(
        "alias-inactive",
        world(aliases=(Alias("shared@example.org", U1, active=0),)),
        U1,
        "shared@example.org",
        False,
        "no owner for shared@example.org",
    ),
    Case(
        "alias-active-2-no-catch-all-fallback",
        world(aliases=(Alias("shared@example.org", U2, active=2), CATCH_ALL_U1)),
        U1,
        "shared@example.org",
        False,
        "no owner for shared@example.org",
    ),
    Case(
        "alias-sender-not-allowed-falls-back-to-catch-all",
        world(aliases=(Alias("shared@example.org", U2, sender_allowed=0), CATCH_ALL_U1)),
        U1,
        "shared@example.org",
        True,
        f"catch-all @example.org -> {U1}",
    ),
    Case(
        "catch-all", world(aliases=(CATCH_ALL_U1,)), U1, "anything@example.org", True, f"catch-all @example.org -> {U1}"
    ),
    Case(
        "catch-all-active-2",
        world(aliases=(Alias("@example.org", U1, active=2),)),
        U1,
        "anything@example.org",
        False,
        "no owner for anything@example.org",
    ),
    Case(
        "catch-all-sender-not-allowed",
        world(aliases=(Alias("@example.org", U1, sender_allowed=0),)),
        U1,
        "anything@example.org",
        False,
        "no owner for anything@example.org",
    ),
    Case(
        "exact-alias-beats-catch-all",
        world(aliases=(Alias("shared@example.org", U2), CATCH_ALL_U1)),
        U1,
        "shared@example.org",
        False,
        f"shared@example.org is owned by {U2}, not by {U1}",
    ),
    Case(
        "alias-domain-column-mismatch",
        world(aliases=(Alias("shared@example.org", U1, domain="other.org"),)),
        U1,
        "shared@example.org",
        False,
        "no owner for shared@example.org",
    ),
    Case(
        "alias-of-inactive-domain",
        world(
            mailboxes=(box("boss@other.org"),),
            aliases=(Alias("shared@example.org", "boss@other.org"),),
            example_active=0,
        ),
        "boss@other.org",
        "shared@example.org",
        False,
        "no owner for shared@example.org",
    ),
    Case(
        "alias-on-active-alias-domain",
        world(aliases=(Alias("sales@alias.org", U1),), alias_domains=(ALIAS_ORG,)),
        U1,
        "sales@alias.org",
        True,
        f"alias sales@alias.org -> {U1}",
    ),
    Case(
        "alias-on-inactive-alias-domain",
        world(aliases=(Alias("sales@alias.org", U1),), alias_domains=(AliasDomain("alias.org", "example.org", 0),)),
        U1,
        "sales@alias.org",
        False,
        "no owner for sales@alias.org",
    ),
    Case(
        "alias-empty-goto-counts-as-not-found-so-tag-retry",
        world(aliases=(Alias("user1+x@example.org", ""),)),
        U1,
        "user1+x@example.org",
        True,
        "own mailbox (as user1@example.org, without the +tag)",
    ),
    Case(
        "alias-goto-only-separators-is-found-but-empty",
        world(aliases=(Alias("user1+x@example.org", ","),)),
        U1,
        "user1+x@example.org",
        False,
        "user1+x@example.org has an empty owner list",
    ),
    # --- B: sender_acl
    Case("acl-exact", world(acl=(SenderAcl(U2, U1),)), U2, U1, True, f"sender_acl {U1}"),
    Case(
        "acl-exact-case", world(acl=(SenderAcl(U2, "USER1@Example.Org"),)), U2, U1, True, "sender_acl USER1@Example.Org"
    ),
    Case(
        "acl-domain-wildcard",
        world(acl=(SenderAcl(U2, "@other.org"),)),
        U2,
        "news@other.org",
        True,
        "sender_acl @other.org",
    ),
    Case("acl-global-wildcard", world(acl=(SenderAcl(U2, "*"),)), U2, "anyone@elsewhere.test", True, "sender_acl *"),
    Case(
        "acl-external-is-an-ordinary-grant",
        world(acl=(SenderAcl(U2, "me@gmail.test", external=1),)),
        U2,
        "me@gmail.test",
        True,
        "sender_acl me@gmail.test",
    ),
    Case(
        "acl-other-login-only",
        world(acl=(SenderAcl(U2, "*"),)),
        U1,
        "anyone@elsewhere.test",
        False,
        f"anyone@elsewhere.test is owned by {U2}, not by {U1}",
    ),
    Case(
        "acl-alias-domain-wildcard",
        world(acl=(SenderAcl(U2, "@example.org"),), alias_domains=(ALIAS_ORG,)),
        U2,
        "x@alias.org",
        True,
        "sender_acl @example.org via alias domain alias.org",
    ),
    Case(
        "acl-alias-domain-wildcard-ignores-alias-domain-active",
        world(acl=(SenderAcl(U2, "@example.org"),), alias_domains=(AliasDomain("alias.org", "example.org", 0),)),
        U2,
        "x@alias.org",
        True,
        "sender_acl @example.org via alias domain alias.org",
    ),
    Case(
        "acl-alias-domain-address",
        world(acl=(SenderAcl(U2, U1),), alias_domains=(ALIAS_ORG,)),
        U2,
        "user1@alias.org",
        True,
        f"sender_acl {U1} via alias domain alias.org",
    ),
    Case(
        "acl-precedence-quirk-excludes-goto-owner",
        world(acl=(SenderAcl(U2, U1),), alias_domains=(ALIAS_ORG,), aliases=(Alias("user1@alias.org", U2, active=0),)),
        U2,
        "user1@alias.org",
        False,
        f"user1@alias.org is owned by {U1}, not by {U2}",
    ),
    Case(
        "acl-precedence-quirk-compares-whole-goto",
        world(
            acl=(SenderAcl(U2, U1),),
            alias_domains=(ALIAS_ORG,),
            aliases=(Alias("user1@alias.org", f"{U2},x@example.org", active=0),),
        ),
        U2,
        "user1@alias.org",
        True,
        f"sender_acl {U1} via alias domain alias.org",
    ),
    Case(
        "acl-precedence-quirk-spares-other-terms",
        world(
            acl=(SenderAcl(U2, "@alias.org"),),
            alias_domains=(ALIAS_ORG,),
            aliases=(Alias("x@alias.org", U2, active=0),),
        ),
        U2,
        "x@alias.org",
        True,
        "sender_acl @alias.org",
    ),
    # --- C: alias domains
    Case(
        "alias-domain-mailbox",
        world(alias_domains=(ALIAS_ORG,)),
        U1,
        "user1@alias.org",
        True,
        f"alias domain alias.org -> {U1}",
    ),
    Case(
        "alias-domain-mailbox-case",
        world(alias_domains=(AliasDomain("Alias.ORG", "EXAMPLE.org"),)),
        U1,
        "USER1@alias.org",
        True,
        f"alias domain Alias.ORG -> {U1}",
    ),
    Case(
        "alias-domain-inactive",
        world(alias_domains=(AliasDomain("alias.org", "example.org", 0),)),
        U1,
        "user1@alias.org",
        False,
        "no owner for user1@alias.org",
    ),
    Case(
        "alias-domain-receive-only-mailbox-owns",
        world(mailboxes=(box("recv@example.org", active=2),), alias_domains=(ALIAS_ORG,)),
        U1,
        "recv@alias.org",
        False,
        f"recv@alias.org is owned by recv@example.org, not by {U1}",
    ),
    Case(
        "alias-domain-inactive-mailbox-owns-nothing",
        world(mailboxes=(box("off@example.org", active=0),), alias_domains=(ALIAS_ORG,)),
        U1,
        "off@alias.org",
        False,
        "no owner for off@alias.org",
    ),
    # --- +tag retry
    Case(
        "tag-retry", world(), U1, "user1+news@example.org", True, "own mailbox (as user1@example.org, without the +tag)"
    ),
    Case(
        "tag-retry-cuts-at-first-plus",
        world(),
        U1,
        "user1+a+b@example.org",
        True,
        "own mailbox (as user1@example.org, without the +tag)",
    ),
    Case(
        "tag-no-retry-when-catch-all-owns-tagged-form",
        world(aliases=(Alias("@example.org", U2),)),
        U1,
        "user1+x@example.org",
        False,
        f"user1+x@example.org is owned by {U2}, not by {U1}",
    ),
    Case(
        "tag-never-cut-at-leading-plus",
        world(aliases=(Alias("+a@example.org", U1),)),
        U1,
        "+a+b@example.org",
        False,
        "no owner for +a+b@example.org",
    ),
    Case(
        "tag-retry-through-acl",
        world(acl=(SenderAcl(U2, U1),)),
        U2,
        "user1+x@example.org",
        True,
        f"sender_acl {U1} (as {U1}, without the +tag)",
    ),
    # --- keys postfix never looks up
    Case("sender-without-at", world(acl=(SenderAcl(U1, "*"),)), U1, "user1", False, "no owner for user1"),
    Case(
        "sender-empty-local-part",
        world(aliases=(CATCH_ALL_U1,), acl=(SenderAcl(U1, "*"),)),
        U1,
        "@example.org",
        False,
        "no owner for @example.org",
    ),
    Case("sender-empty-domain", world(acl=(SenderAcl(U1, "*"),)), U1, "user1@", False, "no owner for user1@"),
    Case(
        "sender-split-at-last-at",
        world(aliases=(CATCH_ALL_U1,)),
        U1,
        "a@b@example.org",
        True,
        f"catch-all @example.org -> {U1}",
    ),
    # --- the login's own validity
    Case(
        "login-not-a-mailbox",
        world(acl=(SenderAcl("ghost@example.org", "*"),)),
        "ghost@example.org",
        "x@other.org",
        False,
        "login ghost@example.org is not a mailbox",
    ),
    Case(
        "login-inactive",
        world(mailboxes=(box("off@example.org", active=0),)),
        "off@example.org",
        "off@example.org",
        False,
        "login off@example.org is inactive",
    ),
    Case(
        "login-receive-only",
        world(mailboxes=(box("recv@example.org", active=2),)),
        "recv@example.org",
        "recv@example.org",
        False,
        "login recv@example.org is receive-only",
    ),
    Case(
        "login-domain-inactive", world(example_active=0), U1, U1, False, f"login {U1}: domain example.org is inactive"
    ),
    Case(
        "login-domain-missing",
        world(mailboxes=(box("lost@gone.org"),)),
        "lost@gone.org",
        "lost@gone.org",
        False,
        "login lost@gone.org: domain gone.org does not exist",
    ),
    Case(
        "login-resource-location",
        world(mailboxes=(box("room@example.org", kind="location"),)),
        "room@example.org",
        "room@example.org",
        False,
        "login room@example.org is a resource (location)",
    ),
    Case(
        "login-resource-group",
        world(mailboxes=(box("team@example.org", kind="group"),)),
        "team@example.org",
        "team@example.org",
        False,
        "login team@example.org is a resource (group)",
    ),
    Case(
        "login-smtp-access-0",
        world(mailboxes=(box("nosmtp@example.org", attributes='{"smtp_access": "0"}'),)),
        "nosmtp@example.org",
        "nosmtp@example.org",
        False,
        "login nosmtp@example.org has no SMTP access",
    ),
    Case(
        "login-smtp-access-missing",
        world(mailboxes=(box("bare@example.org", attributes="{}"),)),
        "bare@example.org",
        "bare@example.org",
        False,
        "login bare@example.org has no SMTP access",
    ),
    Case(
        "login-smtp-access-int",
        world(mailboxes=(box("int@example.org", attributes='{"smtp_access": 1}'),)),
        "int@example.org",
        "int@example.org",
        True,
        "own mailbox",
    ),
)
