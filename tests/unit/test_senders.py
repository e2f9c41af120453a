"""The pure sender rule's building blocks: keys, +tag retry, owner splitting, login validity, reasons.

The full table of mailcow's clauses and quirks runs in tests/db/test_sender_table.py against the
pure rule and both databases.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from mailcow_smtp_api.core.senders import (
    Alias,
    DbState,
    Domain,
    Grant,
    LookupKey,
    Mailbox,
    OwnerLookup,
    SenderDecision,
    Source,
    authorize,
    decide,
    find_login,
    fold,
    grants_from_rows,
    login_problem,
    lookup_key,
    resolve_owners,
    smtp_access_granted,
    split_owners,
    strip_extension,
)


def test_fold_changes_ascii_letters_only() -> None:
    """Folding lowers A-Z and leaves other characters alone, like SQLite NOCASE and strcasecmp."""
    assert fold("User+Tag@Example.ORG") == "user+tag@example.org"
    assert fold("ÄÖÜ") == "ÄÖÜ"


@pytest.mark.parametrize(
    ("sender", "expected"),
    [
        ("User1@Example.org", LookupKey("user1@example.org", "user1", "example.org")),
        ("a@b@example.org", LookupKey("a@b@example.org", "a@b", "example.org")),
        ("user1", None),
        ("@example.org", None),
        ("user1@", None),
        ("", None),
    ],
)
def test_lookup_key(sender: str, expected: LookupKey | None) -> None:
    """The key is lowercased and split at the last @; postfix skips keys without local part or domain."""
    assert lookup_key(sender) == expected


@pytest.mark.parametrize(
    ("local", "bare"),
    [("user+tag", "user"), ("user+a+b", "user"), ("+tag", None), ("+a+b", None), ("user", None), ("user+", "user")],
)
def test_strip_extension(local: str, bare: str | None) -> None:
    """The +tag is cut at the first +, never leaving an empty local part."""
    key = LookupKey(f"{local}@example.org", local, "example.org")
    stripped = strip_extension(key)
    if bare is None:
        assert stripped is None
    else:
        assert stripped == LookupKey(f"{bare}@example.org", bare, "example.org")


def test_split_owners_at_commas_and_white_space() -> None:
    """Owners are split at commas, spaces, tabs and line breaks; empty pieces vanish."""
    assert split_owners(" a@x.org,b@x.org\tc@x.org\r\nd@x.org, ,") == ("a@x.org", "b@x.org", "c@x.org", "d@x.org")
    assert split_owners(", \n") == ()


def test_grants_from_rows_drops_empty_values() -> None:
    """Empty map values are skipped, as postfix's SQL tables skip them."""
    rows = [("alias", "", "a@x.org"), ("sender_acl", "u@x.org", "*"), ("alias_domain", None, "y.org")]
    assert grants_from_rows(rows) == (Grant(Source.SENDER_ACL, "u@x.org", "*"),)


def test_resolve_owners_retries_without_tag_only_when_nothing_found() -> None:
    """The +tag-less key is looked up only after the full key found nothing."""
    asked: list[str] = []
    found = {"user@x.org": [Grant(Source.ALIAS, "user@x.org", "user@x.org")]}

    def fetch(key: LookupKey) -> list[Grant]:
        asked.append(key.key)
        return found.get(key.key, [])

    lookup = resolve_owners("User+Tag@X.org", fetch)
    assert asked == ["user+tag@x.org", "user@x.org"]
    assert (lookup.key, lookup.stripped, lookup.owners) == (
        LookupKey("user@x.org", "user", "x.org"),
        True,
        ("user@x.org",),
    )

    asked.clear()
    found["user+tag@x.org"] = [Grant(Source.ALIAS, "other@x.org", "@x.org")]
    lookup = resolve_owners("user+tag@x.org", fetch)
    assert asked == ["user+tag@x.org"]
    assert (lookup.stripped, lookup.owners) == (False, ("other@x.org",))


def test_resolve_owners_does_not_ask_for_keys_postfix_skips() -> None:
    """A sender without a usable key is never looked up."""
    asked: list[LookupKey] = []

    def fetch(key: LookupKey) -> list[Grant]:
        asked.append(key)
        return []

    lookup = resolve_owners("no-at-sign", fetch)
    assert asked == [] and lookup.key is None and lookup.grants == ()


@pytest.mark.parametrize(
    ("attributes", "granted"),
    [
        ('{"smtp_access": "1"}', True),
        ('{"smtp_access": 1, "imap_access": "0"}', True),
        ('{"smtp_access": "0"}', False),
        ('{"smtp_access": 0}', False),
        ('{"smtp_access": true}', False),
        ('{"smtp_access": "yes"}', False),
        ("{}", False),
        ("[1]", False),
        ("not json", False),
        ("", False),
        (None, False),
    ],
)
def test_smtp_access_granted(attributes: str | None, granted: bool) -> None:
    """Only smtp_access "1" or 1 grants SMTP; missing or anything else denies."""
    assert smtp_access_granted(attributes) is granted


def test_login_problem_accepts_a_valid_login() -> None:
    """An active, non-resource mailbox with smtp_access in an active domain may submit."""
    assert login_problem("u@x.org", Mailbox("u@x.org"), Domain("x.org")) is None


@pytest.mark.parametrize(
    ("mailbox", "domain", "problem"),
    [
        (None, None, "login u@x.org is not a mailbox"),
        (Mailbox("u@x.org", active=0), Domain("x.org"), "login u@x.org is inactive"),
        (Mailbox("u@x.org", active=2), Domain("x.org"), "login u@x.org is receive-only"),
        (Mailbox("u@x.org"), None, "login u@x.org: domain x.org does not exist"),
        (Mailbox("u@x.org"), Domain("x.org", 0), "login u@x.org: domain x.org is inactive"),
        (Mailbox("u@x.org", kind="thing"), Domain("x.org"), "login u@x.org is a resource (thing)"),
        (Mailbox("u@x.org", kind="Location"), Domain("x.org"), "login u@x.org is a resource (Location)"),
        (Mailbox("u@x.org", attributes='{"smtp_access": "0"}'), Domain("x.org"), "login u@x.org has no SMTP access"),
    ],
)
def test_login_problem(mailbox: Mailbox | None, domain: Domain | None, problem: str) -> None:
    """Each failed condition of mailcow's login check is named."""
    assert login_problem("u@x.org", mailbox, domain) == problem


def test_find_login_matches_case_insensitively() -> None:
    """The login's mailbox and domain rows are found whatever the case."""
    state = DbState(domains=(Domain("X.org"),), mailboxes=(Mailbox("U@x.org"),))
    assert find_login(state, "u@X.ORG") == (Mailbox("U@x.org"), Domain("X.org"))
    assert find_login(state, "v@x.org") == (None, None)


def test_decide_denies_an_invalid_login_before_ownership() -> None:
    """The login's own problem is the reason even when it owns the sender."""
    lookup = OwnerLookup("u@x.org", lookup_key("u@x.org"), (Grant(Source.ALIAS, "u@x.org", "u@x.org"),))
    assert decide("u@x.org", "u@x.org", lookup, "login u@x.org is inactive") == SenderDecision(
        False, "login u@x.org is inactive"
    )


def test_decide_lists_a_bounded_number_of_owners() -> None:
    """A long owner list is cut in the deny reason."""
    goto = ",".join(f"o{i}@x.org" for i in range(20))
    lookup = OwnerLookup("all@x.org", lookup_key("all@x.org"), (Grant(Source.ALIAS, goto, "@x.org"),))
    decision = decide("me@x.org", "all@x.org", lookup)
    assert not decision.allowed
    assert decision.reason == (
        "all@x.org is owned by o0@x.org, o1@x.org, o2@x.org, o3@x.org, o4@x.org, o5@x.org, o6@x.org, o7@x.org, ..., "
        "not by me@x.org"
    )


def test_decide_prefers_the_most_direct_rule_in_its_explanation() -> None:
    """With several grants for the login, the reason names its own mailbox before wider grants."""
    key = lookup_key("u@x.org")
    grants = (
        Grant(Source.SENDER_ACL, "u@x.org", "*"),
        Grant(Source.SENDER_ACL, "u@x.org", "@x.org"),
        Grant(Source.ALIAS, "u@x.org", "u@x.org"),
    )
    assert decide("u@x.org", "u@x.org", OwnerLookup("u@x.org", key, grants)).reason == "own mailbox"
    assert decide("u@x.org", "u@x.org", OwnerLookup("u@x.org", key, grants[:2])).reason == "sender_acl @x.org"


def test_authorize_over_in_memory_rows() -> None:
    """The whole pure check: a valid login owning an alias may send as it; others may not."""
    state = DbState(
        domains=(Domain("x.org"),),
        mailboxes=(Mailbox("u@x.org"), Mailbox("v@x.org")),
        aliases=(Alias("u@x.org", "u@x.org"), Alias("team@x.org", "u@x.org")),
    )
    assert authorize(state, "u@x.org", "team@x.org") == SenderDecision(True, "alias team@x.org -> u@x.org")
    assert authorize(state, "v@x.org", "team@x.org") == SenderDecision(
        False, "team@x.org is owned by u@x.org, not by v@x.org"
    )


def test_pure_core_modules_do_not_import_twisted() -> None:
    """senders, apikeys and throttle load without Twisted (the pure core stays pure)."""
    code = (
        "import sys; import mailcow_smtp_api.core.senders, mailcow_smtp_api.core.apikeys, mailcow_smtp_api.core.throttle; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('twisted', 'pymysql', 'sqlite3')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
