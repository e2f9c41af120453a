"""The test bed's postfix decides who may send as whom exactly as tests/sender_cases.py says.

Every case is loaded into the bed's database and checked twice: through postfix's mysql sender
login map (``postmap -q``, with postfix's +tag retry), which is fast and covers every case, and
through a real submission (STARTTLS, AUTH, MAIL FROM, RCPT TO on 10587) for every case whose login
can authenticate. A disagreement means either the bed's map or the case table is wrong; the
service's own rule is checked against the same table elsewhere.
"""

from __future__ import annotations

import smtplib
import ssl
from typing import Any

import pytest

from tests.integration.conftest import Testbed
from tests.sender_cases import CASES, PASSWORD

pytestmark = pytest.mark.integration

RECIPIENT = "someone@external.test"


def can_authenticate(case: dict[str, Any]) -> bool:
    """Whether the case's login passes dovecot's passdb: an active mailbox in an active domain."""
    login = case["login"].lower()
    rows = case["rows"]
    mailboxes = [row for row in rows["mailbox"] if row["username"].lower() == login]
    if not mailboxes or mailboxes[0]["active"] != 1:
        return False
    return any(row["domain"].lower() == mailboxes[0]["domain"].lower() and row["active"] == 1 for row in rows["domain"])


SMTP_CASES = [case for case in CASES if can_authenticate(case)]


def _load_case(testbed: Testbed, case: dict[str, Any]) -> None:
    testbed.reset_database()
    testbed.load_rows(case["rows"])


def test_case_table_covers_both_answers() -> None:
    """The table holds at least 20 cases, both answers occur, and at least 20 reach real SMTP."""
    assert len(CASES) >= 20
    assert len({case["name"] for case in CASES}) == len(CASES)
    assert {case["expected"] for case in CASES} == {True, False}
    assert len(SMTP_CASES) >= 20
    assert {case["expected"] for case in SMTP_CASES} == {True, False}


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_sender_login_map_gives_expected_owner(testbed: Testbed, case: dict[str, Any]) -> None:
    """postfix's map lists the login among the sender's owners exactly when the case expects it."""
    _load_case(testbed, case)
    owners = testbed.sender_owners(case["sender"])
    owned = any(owner.lower() == case["login"].lower() for owner in owners)
    assert owned is case["expected"], f"{case['why']}; owners of {case['sender']!r}: {owners}"


@pytest.mark.parametrize("case", SMTP_CASES, ids=[case["name"] for case in SMTP_CASES])
def test_submission_accepts_or_refuses_sender_as_expected(testbed: Testbed, case: dict[str, Any]) -> None:
    """postfix answers RCPT TO with 250 for an owned sender and 553 "not owned by user" otherwise."""
    _load_case(testbed, case)
    context = ssl.create_default_context(cafile=str(testbed.cert_path))
    with smtplib.SMTP(testbed.host, testbed.submission_port, timeout=10) as smtp:
        smtp.starttls(context=context)
        smtp.ehlo()
        smtp.user, smtp.password = case["login"], PASSWORD
        assert smtp.auth("PLAIN", smtp.auth_plain)[0] == 235
        assert smtp.mail(case["sender"])[0] == 250  # smtpd_delay_reject: the verdict comes at RCPT
        code, text = smtp.rcpt(RECIPIENT)
        smtp.rset()
    if case["expected"]:
        assert code == 250, f"{case['why']}: {code} {text!r}"
    else:
        assert code == 553 and b"not owned by user" in text, f"{case['why']}: {code} {text!r}"
