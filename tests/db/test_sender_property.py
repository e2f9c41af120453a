"""Property: for random database states, the SQL of mailcow/db.py decides exactly as the pure rule in core/senders.py.

States mix a few domains, alias domains (active or not), mailboxes (active 0/1/2, resources, with or
without smtp_access), aliases (catch-alls, active 0/1/2, sender_allowed 0/1, multi-goto lists with
commas and white space, empty gotos, foreign ``domain`` columns), and sender_acl rows (addresses,
``@domain``, ``*``); names come in mixed case and with ``+tags``. Only ASCII without trailing
spaces: the collations agree there (see core/senders.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailcow_smtp_api.mailcow import db
from mailcow_smtp_api.core.senders import (
    Alias,
    AliasDomain,
    DbState,
    Domain,
    Mailbox,
    SenderAcl,
    authorize,
    fold,
    resolve_owners,
    sender_owners,
)
from tests.db.dbtesting import ScratchMariaDb, load_state, sqlite_memory_db

DOMAINS = ("ex.org", "al.org", "zz.org")
LOCALS = ("u", "v", "u+t", "u+t+s", "+u", "u+")
SEPARATORS = (",", ", ", " ", ",\n", "\t", " ,")
ATTRIBUTES = ('{"smtp_access": "1"}', '{"smtp_access": 1}', '{"smtp_access": "0"}', "{}", None)


def recased(text: str) -> st.SearchStrategy[str]:
    """``text`` with any of its letters in upper case."""
    flips = st.lists(st.booleans(), min_size=len(text), max_size=len(text))
    return flips.map(lambda fs: "".join(c.upper() if f else c for c, f in zip(text, fs)))


domains = st.sampled_from(DOMAINS).flatmap(recased)
locals_ = st.sampled_from(LOCALS).flatmap(recased)
addresses = st.builds(lambda local, domain: f"{local}@{domain}", locals_, domains)
catch_alls = domains.map(lambda d: "@" + d)
gotos = st.one_of(
    st.sampled_from(("", ",")),
    st.tuples(st.lists(addresses, min_size=1, max_size=3), st.sampled_from(SEPARATORS)).map(lambda t: t[1].join(t[0])),
)
senders = st.one_of(addresses, catch_alls, st.sampled_from(("u", "u@", "*", "a@b@ex.org")))


@st.composite
def aliases(draw: st.DrawFn, address: st.SearchStrategy[str] = addresses) -> Alias:
    """An alias row, its ``domain`` column usually that of its address."""
    where = draw(address)
    own_domain = where.rpartition("@")[2]
    return Alias(
        address=where,
        goto=draw(gotos),
        active=draw(st.sampled_from((0, 1, 1, 2))),
        sender_allowed=draw(st.sampled_from((0, 1, 1))),
        domain=draw(st.one_of(st.just(own_domain), st.just(own_domain), st.just(own_domain), domains)),
    )


@st.composite
def states(draw: st.DrawFn) -> DbState:
    """A small random database state that satisfies mailcow's keys (unique case-insensitively)."""
    mailboxes = draw(
        st.lists(
            st.builds(
                Mailbox,
                username=addresses,
                active=st.sampled_from((0, 1, 2)),
                kind=st.sampled_from(("", "", "location")),
                attributes=st.sampled_from(ATTRIBUTES),
            ),
            max_size=5,
            unique_by=lambda m: fold(m.username),
        )
    )
    self_aliases = [Alias(m.username, m.username) for m in mailboxes if draw(st.booleans())]
    taken = {fold(a.address) for a in self_aliases}
    catch_all = [draw(aliases(recased("@" + d))) for d in DOMAINS if draw(st.booleans())]
    others = catch_all + draw(st.lists(aliases(), max_size=5, unique_by=lambda a: fold(a.address)))
    present = [d for d in DOMAINS if draw(st.sampled_from((False, True, True, True)))]
    return DbState(
        domains=tuple(Domain(draw(recased(d)), draw(st.sampled_from((0, 1, 1, 1)))) for d in present),
        mailboxes=tuple(mailboxes),
        aliases=tuple(self_aliases) + tuple(a for a in others if fold(a.address) not in taken),
        alias_domains=tuple(
            draw(
                st.lists(
                    st.builds(AliasDomain, domains, domains, st.sampled_from((0, 1))),
                    max_size=3,
                    unique_by=lambda a: fold(a.alias_domain),
                )
            )
        ),
        sender_acl=tuple(
            draw(
                st.lists(
                    st.builds(
                        SenderAcl,
                        logged_in_as=addresses,
                        send_as=st.one_of(addresses, catch_alls, st.just("*")),
                        external=st.sampled_from((0, 1)),
                    ),
                    max_size=4,
                )
            )
        ),
    )


def _with_tag(address: str) -> st.SearchStrategy[str]:
    """``address``, sometimes with a ``+tag`` added to its local part."""
    local, _, domain = address.rpartition("@")
    return st.sampled_from((address, address, f"{local}+x@{domain}"))


def _related_senders(state: DbState) -> list[str]:
    """Addresses the state's rows speak of, and their local parts on each alias domain."""
    named = [a.address for a in state.aliases] + [m.username for m in state.mailboxes]
    named += [s.send_as for s in state.sender_acl if "@" in s.send_as]
    locals_seen = {address.rpartition("@")[0] for address in named if not address.startswith("@")}
    named += [f"{local}@{link.alias_domain}" for local in sorted(locals_seen) for link in state.alias_domains]
    return [address for address in named if not address.startswith("@")]


@st.composite
def cases(draw: st.DrawFn) -> tuple[DbState, list[tuple[str, str]]]:
    """A state and (login, sender) pairs, mostly names taken from the state's own rows."""
    state = draw(states())
    known_logins = [m.username for m in state.mailboxes] + [a.logged_in_as for a in state.sender_acl]
    logins = st.one_of(st.sampled_from(known_logins).flatmap(recased), addresses) if known_logins else addresses
    related = _related_senders(state)
    from_rows = st.sampled_from(related).flatmap(_with_tag).flatmap(recased) if related else senders
    sender = st.one_of(from_rows, from_rows, from_rows, senders)
    return state, draw(st.lists(st.tuples(logins, sender), min_size=4, max_size=12))


def assert_sql_agrees(conn: object, dialect: db.Dialect, state: DbState, pairs: list[tuple[str, str]]) -> None:
    """Owners (with provenance) and decisions from SQL equal the pure rule's for every pair."""
    for login, sender in pairs:
        sql = resolve_owners(sender, lambda key: db.fetch_grants(conn, dialect, key))
        pure = sender_owners(state, sender)
        assert (sql.key, sql.stripped, sorted(sql.grants)) == (pure.key, pure.stripped, sorted(pure.grants)), sender
        assert db.sender_decision(conn, dialect, login, sender) == authorize(state, login, sender), (login, sender)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_sqlite_agrees_with_pure_rule(case: tuple[DbState, list[tuple[str, str]]]) -> None:
    """On the embedded SQLite schema, the SQL and the pure rule agree for random states and pairs."""
    state, pairs = case
    conn = sqlite_memory_db()
    try:
        load_state(conn, state, "?")
        assert_sql_agrees(conn, db.SQLITE, state, pairs)
    finally:
        conn.close()


@pytest.fixture(scope="module")
def maria_reader(mariadb: ScratchMariaDb) -> Iterator[tuple[ScratchMariaDb, db.BlockingDatabase]]:
    """The scratch database, and a read-only session on it as the sidecar opens one."""
    reader = db.connect_blocking(mariadb.url)
    yield mariadb, reader
    reader.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_mariadb_agrees_with_pure_rule(
    maria_reader: tuple[ScratchMariaDb, db.BlockingDatabase], case: tuple[DbState, list[tuple[str, str]]]
) -> None:
    """On MariaDB with mailcow's types and collation, the SQL and the pure rule agree."""
    scratch, reader = maria_reader
    state, pairs = case
    scratch.load(state)
    assert_sql_agrees(reader.conn, db.MARIADB, state, pairs)
