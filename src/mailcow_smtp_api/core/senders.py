"""mailcow's sender-ownership rule as pure functions over table rows.

postfix-mailcow rejects a sender the authenticated login does not own
(``reject_authenticated_sender_login_mismatch`` with the SQL "sender login map" that mailcow writes
to ``mysql_virtual_sender_acl.cf``). This module states that map, and the login's own validity, in
plain Python so that a decision can be explained and so that the SQL in ``mailcow/db.py`` can be checked
against it for any database state. Pure core: stdlib and attrs only.

Comparisons: mailcow's MariaDB compares with ``utf8mb4_general_ci`` and the embedded SQLite with
``COLLATE NOCASE``; both agree with :func:`fold` (ASCII case folding) for the ASCII addresses postfix
sees on the wire. general_ci also ignores trailing spaces and folds some accents; mailcow trims its
input and stores IDNA domains, so such values do not occur in its tables.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from enum import Enum

import attrs

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")

# postfix splits a lookup result into owners at commas and white space (smtpd_check.c, CHARS_COMMA_SP).
_OWNER_SEPARATORS = re.compile(r"[, \t\r\n]+")

# mailcow's resource mailboxes; mailcow tests ``kind REGEXP 'location|thing|group'`` (a substring match).
RESOURCE_KINDS = ("location", "thing", "group")

# How many owners a deny reason lists before it says "..." (a catch-all may list many).
_MAX_OWNERS_SHOWN = 8


def fold(text: str) -> str:
    """Case-fold the ASCII letters only, as SQLite's NOCASE and postfix's strcasecmp do."""
    return text.translate(_ASCII_LOWER)


def _same(a: str, b: str) -> bool:
    return fold(a) == fold(b)


def _domain_of(address: str) -> str:
    return address.rpartition("@")[2]


def _local_of(address: str) -> str:
    return address.rpartition("@")[0]


# --------------------------------------------------------------------------- rows


@attrs.frozen
class Domain:
    """A row of ``domain``."""

    domain: str
    active: int = 1


@attrs.frozen
class Mailbox:
    """A row of ``mailbox`` (the columns the rule reads). ``attributes`` is the JSON text."""

    username: str
    active: int = 1
    kind: str = ""
    attributes: str | None = '{"smtp_access": "1"}'
    domain: str = attrs.field(default=attrs.Factory(lambda self: _domain_of(self.username), takes_self=True))
    local_part: str = attrs.field(default=attrs.Factory(lambda self: _local_of(self.username), takes_self=True))


@attrs.frozen
class Alias:
    """A row of ``alias``: ``address`` is ``user@dom`` or ``@dom`` (catch-all); ``goto`` is a list."""

    address: str
    goto: str
    active: int = 1
    sender_allowed: int = 1
    domain: str = attrs.field(default=attrs.Factory(lambda self: _domain_of(self.address), takes_self=True))


@attrs.frozen
class AliasDomain:
    """A row of ``alias_domain``: mail for ``alias_domain`` belongs to ``target_domain``."""

    alias_domain: str
    target_domain: str
    active: int = 1


@attrs.frozen
class SenderAcl:
    """A row of ``sender_acl``: ``logged_in_as`` may send as ``send_as`` (address, ``@dom`` or ``*``)."""

    logged_in_as: str
    send_as: str
    external: int = 0


@attrs.frozen
class DbState:
    """The rows of the tables the rule reads."""

    domains: tuple[Domain, ...] = ()
    mailboxes: tuple[Mailbox, ...] = ()
    aliases: tuple[Alias, ...] = ()
    alias_domains: tuple[AliasDomain, ...] = ()
    sender_acl: tuple[SenderAcl, ...] = ()


# --------------------------------------------------------------------------- owners with provenance


class Source(str, Enum):
    """Which part of mailcow's sender login map produced an owner."""

    ALIAS = "alias"
    SENDER_ACL = "sender_acl"
    ALIAS_DOMAIN = "alias_domain"


@attrs.frozen(order=True)
class Grant:
    """One value the sender login map returns, and where it came from.

    ``value`` is what postfix receives (an alias ``goto``, a ``logged_in_as`` or a mailbox
    ``username``); ``via`` is the alias address, the ``send_as`` entry, or the alias domain.
    """

    source: Source
    value: str
    via: str

    @property
    def tokens(self) -> tuple[str, ...]:
        """The owners in ``value``, split as postfix splits them."""
        return split_owners(self.value)


def split_owners(value: str) -> tuple[str, ...]:
    """Split a map value into owners at commas and white space, dropping empty pieces."""
    return tuple(token for token in _OWNER_SEPARATORS.split(value) if token)


@attrs.frozen
class LookupKey:
    """The key postfix looks up for a sender: ``key`` = ``local@domain``, lowercased."""

    key: str
    local: str
    domain: str

    @property
    def params(self) -> dict[str, str]:
        """The key as SQL parameters: ``k`` (postfix %s), ``u`` (%u) and ``d`` (%d)."""
        return {"k": self.key, "u": self.local, "d": self.domain}


def lookup_key(sender: str) -> LookupKey | None:
    """The key for ``sender``, or None when postfix would not query the map at all.

    postfix lowercases the key and splits it at the last ``@``; a query template that uses %u and
    %d is skipped for a key without a domain or with an empty local part (db_common_expand), so such
    a sender has no owners.
    """
    key = fold(sender)
    local, at, domain = key.rpartition("@")
    if not at or not local or not domain:
        return None
    return LookupKey(key=key, local=local, domain=domain)


def strip_extension(key: LookupKey) -> LookupKey | None:
    """The key without its ``+tag``, or None when postfix would not retry.

    mailcow sets ``recipient_delimiter = +``. postfix cuts the local part at the first ``+`` but
    never when that leaves an empty local part (split_addr). Its reserved names (postmaster,
    mailer-daemon, double-bounce) hold no ``+``, so they never reach the cut.
    """
    local = key.local
    cut = local.find("+")
    if cut <= 0:
        return None
    bare_local = local[:cut]
    return LookupKey(key=f"{bare_local}@{key.domain}", local=bare_local, domain=key.domain)


def grants_from_rows(rows: Iterable[tuple[str, str | None, str]]) -> tuple[Grant, ...]:
    """Grants from ``(source, value, via)`` rows, without empty values.

    postfix's SQL tables skip empty result values (db_common_expand) and report "not found" when
    nothing is left (dict_mysql_lookup); only then does it retry without the ``+tag``.
    """
    return tuple(Grant(Source(source), value, via) for source, value, via in rows if value)


def _alias_grants(state: DbState, key: LookupKey) -> list[Grant]:
    """Source A: one alias row, exact address first, else the catch-all; then mailcow's filters."""

    def eligible(row: Alias) -> bool:
        return row.active in (1, 2) and row.sender_allowed == 1

    catch_all = "@" + key.domain
    picked = next((row for row in state.aliases if _same(row.address, key.key) and eligible(row)), None)
    if picked is None:
        picked = next((row for row in state.aliases if _same(row.address, catch_all) and eligible(row)), None)
    if picked is None:
        return []
    # A picked row with active = 2 (or any row failing these) gives nothing, and there is no
    # fallback to the catch-all: the COALESCE has already chosen its id.
    domain_live = any(_same(row.domain, key.domain) and row.active == 1 for row in state.domains) or any(
        _same(row.alias_domain, key.domain) and row.active == 1 for row in state.alias_domains
    )
    if picked.active != 1 or picked.sender_allowed != 1 or not _same(picked.domain, key.domain) or not domain_live:
        return []
    return [Grant(Source.ALIAS, picked.goto, picked.address)]


def _sender_acl_grants(state: DbState, key: LookupKey) -> list[Grant]:
    """Source B: sender_acl rows, with mailcow's ``a OR b OR c OR d OR e AND f`` precedence."""
    targets = [row.target_domain for row in state.alias_domains if _same(row.alias_domain, key.domain)]
    gotos_of_key = [row.goto for row in state.aliases if _same(row.address, key.key)]
    out = []
    for row in state.sender_acl:
        send_as = row.send_as
        plain = (
            _same(send_as, "@" + key.domain)
            or _same(send_as, key.key)
            or send_as == "*"
            or any(_same(send_as, "@" + target) for target in targets)
        )
        # The last term is ANDed with "logged_in_as NOT IN (goto of the alias row for the key)".
        via_alias_domain = any(_same(send_as, f"{key.local}@{target}") for target in targets) and not any(
            _same(row.logged_in_as, goto) for goto in gotos_of_key
        )
        if plain or via_alias_domain:
            out.append(Grant(Source.SENDER_ACL, row.logged_in_as, row.send_as))
    return out


def _alias_domain_grants(state: DbState, key: LookupKey) -> list[Grant]:
    """Source C: the mailbox ``local@target`` owns ``local@alias`` for an active alias domain."""
    out = []
    for link in state.alias_domains:
        if not (_same(link.alias_domain, key.domain) and link.active == 1):
            continue
        wanted = f"{key.local}@{link.target_domain}"
        for box in state.mailboxes:
            if _same(box.username, wanted) and box.active in (1, 2):
                out.append(Grant(Source.ALIAS_DOMAIN, box.username, link.alias_domain))
    return out


def grants_for_key(state: DbState, key: LookupKey) -> tuple[Grant, ...]:
    """Every non-empty value the sender login map returns for one key, with its provenance."""
    grants = _alias_grants(state, key) + _sender_acl_grants(state, key) + _alias_domain_grants(state, key)
    return grants_from_rows((g.source.value, g.value, g.via) for g in grants)


@attrs.frozen
class OwnerLookup:
    """What postfix's lookup of a sender found.

    ``key`` is the key whose values count (the ``+tag``-less key after a retry), or None when the
    sender cannot be looked up; ``stripped`` says a retry without the ``+tag`` happened.
    """

    sender: str
    key: LookupKey | None
    grants: tuple[Grant, ...]
    stripped: bool = False

    @property
    def owners(self) -> tuple[str, ...]:
        """Every owner token once (case-insensitively), in grant order."""
        seen: set[str] = set()
        out = []
        for grant in self.grants:
            for token in grant.tokens:
                if fold(token) not in seen:
                    seen.add(fold(token))
                    out.append(token)
        return tuple(out)

    def grants_for(self, login: str) -> tuple[Grant, ...]:
        """The grants that list ``login`` among their owners."""
        return tuple(g for g in self.grants if any(_same(token, login) for token in g.tokens))


def resolve_owners(sender: str, fetch: Callable[[LookupKey], Iterable[Grant]]) -> OwnerLookup:
    """Run postfix's lookup for ``sender`` with ``fetch(key) -> grants``: full key, then without ``+tag``.

    ``fetch`` is the pure rule over a ``DbState`` or the SQL in ``mailcow/db.py``; both share this driver.
    It must return only non-empty values (see :func:`grants_from_rows`): an empty answer is "not
    found", and only "not found" leads to the retry (mail_addr_find).
    """
    key = lookup_key(sender)
    if key is None:
        return OwnerLookup(sender=sender, key=None, grants=())
    grants = tuple(fetch(key))
    if grants:
        return OwnerLookup(sender=sender, key=key, grants=grants)
    bare = strip_extension(key)
    if bare is None:
        return OwnerLookup(sender=sender, key=key, grants=grants)
    return OwnerLookup(sender=sender, key=bare, grants=tuple(fetch(bare)), stripped=True)


def sender_owners(state: DbState, sender: str) -> OwnerLookup:
    """The owners of ``sender`` in ``state``, exactly as postfix-mailcow computes them."""
    return resolve_owners(sender, lambda key: grants_for_key(state, key))


# --------------------------------------------------------------------------- the login itself


def smtp_access_granted(attributes: str | None) -> bool:
    """True when the mailbox's JSON attributes hold ``smtp_access`` 1 (``"1"`` or ``1``).

    mailcow writes ``smtp_access`` for every mailbox and its login check compares it with 1, so a
    missing attribute, unreadable JSON, or any other value (including JSON ``true``) denies.
    """
    if not attributes:
        return False
    try:
        parsed = json.loads(attributes)
    except ValueError:
        return False
    if not isinstance(parsed, dict):
        return False
    value = parsed.get("smtp_access")
    return value == "1" or (type(value) is int and value == 1)


def login_problem(login: str, mailbox: Mailbox | None, domain: Domain | None) -> str | None:
    """Why ``login`` may not submit mail (mailcow's login check), or None when it may.

    Valid: the mailbox exists with ``active = 1`` (2 is receive-only), its domain row exists with
    ``active = 1``, ``kind`` is not a resource, and ``attributes.smtp_access`` is 1.
    """
    if mailbox is None:
        return not_a_mailbox(login)
    if mailbox.active != 1:
        state = "receive-only" if mailbox.active == 2 else "inactive"
        return f"login {login} is {state}"
    if domain is None:
        return f"login {login}: domain {mailbox.domain} does not exist"
    if domain.active != 1:
        return f"login {login}: domain {mailbox.domain} is inactive"
    kind = fold(mailbox.kind or "")
    if any(word in kind for word in RESOURCE_KINDS):
        return f"login {login} is a resource ({mailbox.kind})"
    if not smtp_access_granted(mailbox.attributes):
        return f"login {login} has no SMTP access"
    return None


def not_a_mailbox(login: str) -> str:
    """The reason given when ``login`` is no mailbox at all (an alias, a typo, another server's)."""
    return f"login {login} is not a mailbox"


def find_login(state: DbState, login: str) -> tuple[Mailbox | None, Domain | None]:
    """The mailbox row of ``login`` and its domain row, matched case-insensitively."""
    box = next((row for row in state.mailboxes if _same(row.username, login)), None)
    if box is None:
        return None, None
    dom = next((row for row in state.domains if _same(row.domain, box.domain)), None)
    return box, dom


# --------------------------------------------------------------------------- the decision


@attrs.frozen
class SenderDecision:
    """May the login send as the sender, and why (for logs, the admin command and error details)."""

    allowed: bool
    reason: str


def _grant_rank(grant: Grant, login: str, key: LookupKey) -> tuple[int, Grant]:
    """Order grants for the explanation: own mailbox, alias, exact ACL, domain ACL, '*', alias domain."""
    if grant.source is Source.ALIAS:
        rank = 0 if _same(grant.via, login) else 1
    elif grant.source is Source.SENDER_ACL:
        if _same(grant.via, key.key):
            rank = 2
        elif grant.via == "*":
            rank = 4
        else:
            rank = 3
    else:
        rank = 5
    return rank, grant


def explain_grant(grant: Grant, login: str, key: LookupKey) -> str:
    """Say in one phrase which rule made ``login`` an owner."""
    if grant.source is Source.ALIAS:
        if _same(grant.via, login):
            return "own mailbox"
        kind = "catch-all" if grant.via.startswith("@") else "alias"
        return f"{kind} {grant.via} -> {','.join(grant.tokens)}"
    if grant.source is Source.SENDER_ACL:
        plain = {"@" + key.domain, key.key, "*"}
        if fold(grant.via) in plain:
            return f"sender_acl {grant.via}"
        return f"sender_acl {grant.via} via alias domain {key.domain}"
    return f"alias domain {grant.via} -> {grant.value}"


def _owner_list(owners: Sequence[str]) -> str:
    shown = ", ".join(owners[:_MAX_OWNERS_SHOWN])
    return shown + (", ..." if len(owners) > _MAX_OWNERS_SHOWN else "")


def decide(login: str, sender: str, lookup: OwnerLookup, problem: str | None = None) -> SenderDecision:
    """Decide as postfix does: ``login`` may send as ``sender`` iff it is one of the owners.

    ``problem`` is the login's own invalidity (see :func:`login_problem`); it denies first.
    """
    if problem is not None:
        return SenderDecision(False, problem)
    key = lookup.key
    if key is None or not lookup.grants:
        return SenderDecision(False, f"no owner for {sender}")
    mine = lookup.grants_for(login)
    if not mine:
        owners = lookup.owners
        if not owners:
            return SenderDecision(False, f"{sender} has an empty owner list")
        return SenderDecision(False, f"{sender} is owned by {_owner_list(owners)}, not by {login}")
    best = min(_grant_rank(grant, login, key) for grant in mine)[1]
    reason = explain_grant(best, login, key)
    if lookup.stripped:
        reason += f" (as {key.key}, without the +tag)"
    return SenderDecision(True, reason)


def authorize(state: DbState, login: str, sender: str) -> SenderDecision:
    """The whole check over in-memory rows: the login's validity, then ownership of ``sender``."""
    box, dom = find_login(state, login)
    return decide(login, sender, sender_owners(state, sender), login_problem(login, box, dom))
