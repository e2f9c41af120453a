"""Pooled SMTP sessions against the real postfix: one TLS+AUTH session for many messages, never shared wrongly."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from .conftest import Sidecar, Testbed
from .test_send_api import SENDER, example_body, post

pytestmark = pytest.mark.integration


@pytest.fixture
def bed(bed: Testbed) -> Testbed:
    """The shared rows plus a second mailbox."""
    bed.add_mailbox("other@example.com", "other-password")
    return bed


def sasl_logins(bed: Testbed, before: str) -> list[str]:
    """The SASL logins postfix recorded after the log prefix ``before``."""
    text = bed.log_text("postfix")[len(before):]
    return [line.split("sasl_username=")[1].split(",")[0].strip() for line in text.splitlines() if "sasl_username=" in line]


def test_messages_of_one_mailbox_share_one_session(bed: Testbed, sidecar: Callable[..., Sidecar]) -> None:
    """Five sends of one mailbox make one SMTP connection; another mailbox gets its own."""
    running = sidecar()
    before = bed.log_text("postfix")
    for i in range(5):
        assert post(running.url, example_body(subject=f"pooled {i}"))[0] == 200
    assert post(running.url, example_body(**{"from": "other@example.com", "password": "other-password"}))[0] == 200
    assert len(bed.wait_for_messages(6)) == 6
    log = bed.log_text("postfix")[len(before):]
    assert log.count(": connect from localhost[127.0.0.1]") == 2
    assert sorted(set(sasl_logins(bed, before))) == ["other@example.com", SENDER]


def test_wrong_password_never_rides_a_pooled_session(bed: Testbed, sidecar: Callable[..., Sidecar]) -> None:
    """With a good session open, a wrong password still gets postfix's 535 and sends nothing."""
    running = sidecar()
    assert post(running.url, example_body())[0] == 200
    status, body, _ = post(running.url, example_body(password="not-the-password"))
    assert (status, body[0]["msg"], body[0]["detail"]["smtp_code"]) == (403, "smtp_auth_failed", 535)
    assert len(bed.wait_for_messages(1)) == 1


def test_pool_size_zero_opens_a_session_per_message(bed: Testbed, sidecar: Callable[..., Sidecar]) -> None:
    """--smtp-pool-size 0 turns reuse off: one connection per message."""
    running = sidecar("--smtp-pool-size", "0")
    before = bed.log_text("postfix")
    for _ in range(3):
        assert post(running.url, example_body())[0] == 200
    bed.wait_for_messages(3)
    assert bed.log_text("postfix")[len(before):].count(": connect from localhost[127.0.0.1]") == 3
