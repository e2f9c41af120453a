"""Who may send as whom: database states and the answer mailcow's postfix gives (mailcow.md section 1).

Each entry of ``CASES`` is a plain dict:

``name``
    a unique identifier (usable as a pytest id);
``rows``
    table name -> list of rows, each row a dict column -> value, for the five tables the rule reads:
    ``domain``, ``mailbox``, ``alias``, ``alias_domain``, ``sender_acl`` (every key present, lists
    may be empty). Rows name every column the rule or a login reads; ``alias.id`` and
    ``sender_acl.id`` are left to AUTO_INCREMENT;
``login``
    the SASL login (a mailbox username) that sends;
``sender``
    the envelope sender (MAIL FROM) it asks for;
``expected``
    True when the login owns the sender (postfix answers 250 at RCPT TO), False when postfix refuses
    it (553 5.7.1 "not owned by user" at RCPT TO);
``why``
    one line naming the clause of the rule the case exercises.

tests/integration/test_postfix_sender_rule.py checks every case against the real postfix on the test
bed (its mysql map, and a real submission where the login can authenticate). The same cases serve
the service's own SQL and pure rule: all three must agree with ``expected``.

Every mailbox row has the password ``PASSWORD`` stored as ``{PLAIN}``, so that a case's login can
authenticate when its mailbox and domain are active.
"""

from __future__ import annotations

from typing import Any

PASSWORD = "sender-case-pw"

Row = dict[str, Any]
Case = dict[str, Any]

TABLES = ("domain", "mailbox", "alias", "alias_domain", "sender_acl")

ORG = "example.org"  # the mailcow domain of most cases
ALIAS = "alias.test"  # an alias domain of example.org where a case needs one
A, B, C = "a@example.org", "b@example.org", "c@example.org"


def domain(name: str, active: int = 1) -> Row:
    """A ``domain`` row."""
    return {"domain": name, "active": active}


def mailbox(username: str, active: int = 1) -> Row:
    """A ``mailbox`` row of an ordinary mailbox that may use SMTP (mailcow's shape)."""
    local_part, _, domain_name = username.rpartition("@")
    return {
        "username": username,
        "password": "{PLAIN}" + PASSWORD,
        "local_part": local_part,
        "domain": domain_name,
        "kind": "",
        "attributes": '{"smtp_access": "1"}',
        "authsource": "mailcow",
        "active": active,
    }


def alias(address: str, goto: str, *, domain: str | None = None, active: int = 1, sender_allowed: int = 1) -> Row:
    """An ``alias`` row; ``domain`` defaults to the address's domain (also for '@domain' catch-alls)."""
    return {
        "address": address,
        "goto": goto,
        "domain": domain if domain is not None else address.rpartition("@")[2],
        "active": active,
        "sender_allowed": sender_allowed,
    }


def alias_domain(name: str, target: str, active: int = 1) -> Row:
    """An ``alias_domain`` row: ``name`` is an alias of ``target``."""
    return {"alias_domain": name, "target_domain": target, "active": active}


def acl(logged_in_as: str, send_as: str, external: int = 0) -> Row:
    """A ``sender_acl`` row."""
    return {"logged_in_as": logged_in_as, "send_as": send_as, "external": external}


def world(*extra: tuple[str, Row], mailboxes: tuple[str, ...] = (A, B, C)) -> dict[str, list[Row]]:
    """Domain example.org with mailboxes a, b and c (each with its self-alias), plus ``extra`` rows.

    ``extra`` holds (table, row) pairs; a mailbox row in ``extra`` replaces the default one of the
    same username (to make it inactive, for instance).
    """
    replaced = {row["username"] for table, row in extra if table == "mailbox"}
    rows: dict[str, list[Row]] = {table: [] for table in TABLES}
    rows["domain"].append(domain(ORG))
    for username in mailboxes:
        if username not in replaced:
            rows["mailbox"].append(mailbox(username))
        rows["alias"].append(alias(username, username))
    for table, row in extra:
        rows[table].append(row)
    return rows


def case(name: str, rows: dict[str, list[Row]], login: str, sender: str, expected: bool, why: str) -> Case:
    """One entry of ``CASES``."""
    return {"name": name, "rows": rows, "login": login, "sender": sender, "expected": expected, "why": why}


CASES: list[Case] = [
    # --- A. the alias table: own address, shared aliases, catch-alls
    case("own_address", world(), A, A, True, "A: the mailbox's self-alias address = goto = login"),
    case("other_mailbox", world(), A, B, False, "A: b's self-alias names only b"),
    case("unknown_address_in_own_domain", world(), A, "nobody@example.org", False, "no alias, no catch-all: no owners"),
    case("foreign_domain", world(), A, "a@elsewhere.test", False, "no row anywhere: no owners"),
    case(
        "shared_alias",
        world(("alias", alias("team@example.org", f"{B},{A}"))),
        A,
        "team@example.org",
        True,
        "A: goto is a comma-separated list of owners",
    ),
    case(
        "shared_alias_with_spaces",
        world(("alias", alias("team@example.org", f"{B}, {A}"))),
        A,
        "team@example.org",
        True,
        "owners are split on commas and white space",
    ),
    case(
        "goto_upper_case",
        world(("alias", alias("team@example.org", "A@EXAMPLE.ORG"))),
        A,
        "team@example.org",
        True,
        "the login matches an owner case-insensitively",
    ),
    case("sender_mixed_case", world(), A, "A@Example.ORG", True, "utf8mb4_general_ci: lookups ignore case"),
    case("login_mixed_case", world(), "A@Example.ORG", A, True, "the login matches an owner case-insensitively"),
    case(
        "catch_all",
        world(("alias", alias("@example.org", A))),
        A,
        "nobody@example.org",
        True,
        "A: without an exact row the catch-all '@domain' row is picked",
    ),
    case(
        "exact_alias_hides_catch_all",
        world(("alias", alias("x@example.org", B)), ("alias", alias("@example.org", A))),
        A,
        "x@example.org",
        False,
        "A: only one row is picked, the exact one first",
    ),
    case(
        "exact_alias_receive_only",
        world(("alias", alias("x@example.org", A, active=2))),
        A,
        "x@example.org",
        False,
        "A: a picked row with active = 2 grants nothing",
    ),
    case(
        "receive_only_alias_hides_catch_all",
        world(("alias", alias("x@example.org", C, active=2)), ("alias", alias("@example.org", A))),
        A,
        "x@example.org",
        False,
        "A: an active = 2 exact row is still picked, so there is no fallback to the catch-all",
    ),
    case(
        "inactive_alias_falls_back_to_catch_all",
        world(("alias", alias("x@example.org", B, active=0)), ("alias", alias("@example.org", A))),
        A,
        "x@example.org",
        True,
        "A: an active = 0 row is not picked; the catch-all is",
    ),
    case(
        "sender_not_allowed_falls_back_to_catch_all",
        world(("alias", alias("x@example.org", B, sender_allowed=0)), ("alias", alias("@example.org", A))),
        A,
        "x@example.org",
        True,
        "A: a row with sender_allowed = 0 is not picked; the catch-all is",
    ),
    case(
        "sender_not_allowed",
        world(("alias", alias("x@example.org", A, sender_allowed=0))),
        A,
        "x@example.org",
        False,
        "A: sender_allowed = 0 and no catch-all: no owners",
    ),
    case(
        "catch_all_receive_only",
        world(("alias", alias("@example.org", A, active=2))),
        A,
        "nobody@example.org",
        False,
        "A: a catch-all with active = 2 grants nothing",
    ),
    case(
        "catch_all_sender_not_allowed",
        world(("alias", alias("@example.org", A, sender_allowed=0))),
        A,
        "nobody@example.org",
        False,
        "A: a catch-all with sender_allowed = 0 is not picked",
    ),
    case(
        "alias_in_inactive_domain",
        world(("domain", domain("off.test", active=0)), ("alias", alias("x@off.test", A))),
        A,
        "x@off.test",
        False,
        "A: the alias's domain must be an active domain",
    ),
    case(
        "alias_domain_column_differs",
        world(("domain", domain("other.test")), ("alias", alias("x@example.org", A, domain="other.test"))),
        A,
        "x@example.org",
        False,
        "A: the row's domain column must equal the sender's domain",
    ),
    case(
        "alias_on_alias_domain",
        world(("alias_domain", alias_domain(ALIAS, ORG)), ("alias", alias("x@alias.test", A))),
        A,
        "x@alias.test",
        True,
        "A: an alias whose domain is an active alias domain counts",
    ),
    case(
        "alias_on_inactive_alias_domain",
        world(("alias_domain", alias_domain(ALIAS, ORG, active=0)), ("alias", alias("x@alias.test", A))),
        A,
        "x@alias.test",
        False,
        "A: the alias domain must be active",
    ),
    # --- B. sender_acl grants
    case("acl_exact", world(("sender_acl", acl(A, B))), A, B, True, "B: send_as = the sender"),
    case(
        "acl_exact_upper_case",
        world(("sender_acl", acl(A, "B@EXAMPLE.ORG"))),
        A,
        B,
        True,
        "B: send_as compares case-insensitively",
    ),
    case("acl_domain", world(("sender_acl", acl(A, "@example.org"))), A, B, True, "B: send_as = '@' + domain"),
    case(
        "acl_domain_other_domain",
        world(("sender_acl", acl(A, "@example.org"))),
        A,
        "b@elsewhere.test",
        False,
        "B: a domain grant covers that domain only",
    ),
    case("acl_global", world(("sender_acl", acl(A, "*"))), A, "anyone@elsewhere.test", True, "B: send_as = '*'"),
    case("acl_for_other_login", world(("sender_acl", acl(C, B))), A, B, False, "B: only logged_in_as is an owner"),
    case(
        "acl_external",
        world(("sender_acl", acl(A, "ext@elsewhere.test", external=1))),
        A,
        "ext@elsewhere.test",
        True,
        "B: external sender aliases are ordinary grants",
    ),
    case(
        "acl_target_domain_via_alias_domain",
        world(("alias_domain", alias_domain(ALIAS, ORG)), ("sender_acl", acl(A, "@example.org"))),
        A,
        "z@alias.test",
        True,
        "B: '@' + target domain of the sender's alias domain",
    ),
    case(
        "acl_target_domain_via_inactive_alias_domain",
        world(("alias_domain", alias_domain(ALIAS, ORG, active=0)), ("sender_acl", acl(A, "@example.org"))),
        A,
        "z@alias.test",
        True,
        "B: the alias domain's active flag is not checked here",
    ),
    case(
        "acl_user_at_target_domain",
        world(("alias_domain", alias_domain(ALIAS, ORG)), ("sender_acl", acl(A, B))),
        A,
        "b@alias.test",
        True,
        "B: local part + '@' + target domain",
    ),
    case(
        "acl_user_at_target_domain_precedence_quirk",
        world(
            ("alias_domain", alias_domain(ALIAS, ORG)),
            ("sender_acl", acl(A, B)),
            ("alias", alias("b@alias.test", A, active=0)),
        ),
        A,
        "b@alias.test",
        False,
        "B: the user@target term is ANDed with 'login is not the goto of the sender's alias row'",
    ),
    case(
        "acl_user_at_target_domain_quirk_compares_whole_goto",
        world(
            ("alias_domain", alias_domain(ALIAS, ORG)),
            ("sender_acl", acl(A, B)),
            ("alias", alias("b@alias.test", f"{A},{C}", active=0)),
        ),
        A,
        "b@alias.test",
        True,
        "B: the quirk compares the login with the whole goto string, not its entries",
    ),
    case(
        "acl_exact_untouched_by_quirk",
        world(
            ("alias_domain", alias_domain(ALIAS, ORG)),
            ("sender_acl", acl(A, "b@alias.test")),
            ("alias", alias("b@alias.test", A, active=0)),
        ),
        A,
        "b@alias.test",
        True,
        "B: the goto exclusion binds to the last term only, not to the exact grant",
    ),
    # --- C. mailboxes own their addresses in alias domains
    case(
        "mailbox_via_alias_domain",
        world(("alias_domain", alias_domain(ALIAS, ORG))),
        A,
        "a@alias.test",
        True,
        "C: mailbox user@target owns user@alias-domain",
    ),
    case(
        "mailbox_via_inactive_alias_domain",
        world(("alias_domain", alias_domain(ALIAS, ORG, active=0))),
        A,
        "a@alias.test",
        False,
        "C: only while the alias domain is active",
    ),
    case(
        "receive_only_mailbox_via_alias_domain",
        world(("alias_domain", alias_domain(ALIAS, ORG)), ("mailbox", mailbox(C, active=2))),
        C,
        "c@alias.test",
        True,
        "C: a mailbox with active = 2 still owns (it cannot log in, though)",
    ),
    case(
        "disabled_mailbox_via_alias_domain",
        world(("alias_domain", alias_domain(ALIAS, ORG)), ("mailbox", mailbox(C, active=0))),
        C,
        "c@alias.test",
        False,
        "C: a mailbox with active = 0 owns nothing through alias domains",
    ),
    case(
        "other_mailbox_via_alias_domain",
        world(("alias_domain", alias_domain(ALIAS, ORG))),
        A,
        "b@alias.test",
        False,
        "C: b@alias.test belongs to b only",
    ),
    # --- +tag: one retry without the extension, only when the full address has no owners
    case("plus_tag", world(), A, "a+news@example.org", True, "retry with the local part cut at '+'"),
    case("plus_tag_first_plus", world(), A, "a+x+y@example.org", True, "the cut is at the first '+'"),
    case(
        "plus_tag_no_retry_after_catch_all",
        world(("alias", alias("@example.org", C))),
        A,
        "a+news@example.org",
        False,
        "the catch-all gives the full address owners (c), so there is no retry",
    ),
    case(
        "plus_tag_exact_alias",
        world(("alias", alias("a+news@example.org", B))),
        A,
        "a+news@example.org",
        False,
        "the full address has an owner (b), so there is no retry",
    ),
    case("plus_tag_empty_base", world(), A, "+news@example.org", False, "no retry that would leave the local part empty"),
    case(
        "plus_tag_retry_via_alias_domain",
        world(("alias_domain", alias_domain(ALIAS, ORG))),
        A,
        "a+x@alias.test",
        True,
        "the retry sees every source, here C",
    ),
    case(
        "plus_tag_retry_via_acl",
        world(("sender_acl", acl(A, B))),
        A,
        "b+x@example.org",
        True,
        "the retry sees every source, here B",
    ),
    # --- keys that cannot have owners
    case("no_at_sign", world(), A, "a", False, "a key without '@' has no owners"),
]
