"""The outbox soak's pure helpers: its plans, Message-IDs and pacing, reading the sink's captures,
counting lost and duplicated messages, latencies and the table.

Nothing here starts a process or touches the bed.
"""

from __future__ import annotations

import pytest

from bench import soak
from bench.soak import Report, Tally


def test_the_full_plan_is_the_issues_soak_and_quick_fits_in_a_minute() -> None:
    """10,000 messages with postfix restarted every 30 s; --quick sends 300 at 15/s (20 s), kills
    after 30 % and leases 26 s, so that the drain ends well within a minute."""
    full = soak.make_plan(quick=False)
    assert (full.messages, full.restart_every, full.kill_at) == (10_000, 30.0, 0.5)
    quick = soak.make_plan(quick=True)
    assert (quick.messages, quick.rate, quick.smtp_timeout, quick.lease) == (300, 15.0, 2, 26.0)
    assert quick.messages / quick.rate + quick.lease < 60
    assert quick.restart_every < quick.messages / quick.rate  # postfix restarts while it sends


def test_given_values_override_the_plan_and_bad_ones_are_refused() -> None:
    """--messages, --rate, --restart-every and --clients replace the plan's values; nonsense is a ValueError."""
    plan = soak.make_plan(quick=True, messages=50, rate=0, restart_every=3, clients=2)
    assert (plan.messages, plan.rate, plan.restart_every, plan.clients) == (50, 0, 3, 2)
    assert plan.smtp_timeout == soak.make_plan(quick=True).smtp_timeout
    for bad in ({"messages": 0}, {"rate": -1}, {"restart_every": 0}, {"clients": 0}):
        with pytest.raises(ValueError):
            soak.make_plan(quick=False, **bad)  # type: ignore[arg-type]


def test_message_ids_are_unique_per_run_and_index() -> None:
    """Each message's Message-ID names its run and index, in the form the API accepts."""
    ids = {soak.message_id_for(run, index, "example.com") for run in ("aa", "bb") for index in range(100)}
    assert len(ids) == 200
    assert soak.message_id_for("1f2e", 7, "example.com") == "<soak.1f2e.7@example.com>"


def test_sends_are_spread_evenly_at_the_rate() -> None:
    """Message i is due i/rate seconds after the start; rate 0 means at once."""
    assert [soak.due_at(100.0, i, 4.0) for i in range(3)] == [100.0, 100.25, 100.5]
    assert soak.due_at(100.0, 999, 0) == 100.0


CAPTURE = (
    b"X-Client-Addr: 127.0.0.1\n"
    b"X-Helo-Args: mail.testbed.invalid\n"
    b"X-Mail-Args: <sender@example.com>\n"
    b"X-Rcpt-Args: <soak@sink.example> ORCPT=rfc822;soak@sink.example\n"
    b"Received: from mail.testbed.invalid ([127.0.0.1])\n"
    b"\tby sink.testbed.invalid (smtp-sink) with ESMTP id 063448a8;\n"
    b"\tTue,  1 Dec 2026 23:14:08 +0000 (UTC)\n"
    b"Received: from replica-b.soak (localhost [127.0.0.1])\n"
    b"\tby mail.testbed.invalid (Postfix) with ESMTP id 994AE20C261\n"
    b"\tfor <soak@sink.example>; Tue,  1 Dec 2026 23:14:08 +0000 (UTC)\n"
    b"Subject: soak 1f2e 61\n"
    b"MESSAGE-ID:  <soak.1f2e.61@example.com>\n"
    b"\n"
    b"Message-ID: <quoted@example.com>\n"
    b"(Postfix) with ESMTP id QUOTED\n"
)


def test_a_sink_capture_gives_its_message_id_and_postfix_queue_id() -> None:
    """The Message-ID (any case) and the queue id of postfix's own Received header, never smtp-sink's
    id and never lines of the body."""
    assert soak.sink_entry(CAPTURE) == ("<soak.1f2e.61@example.com>", "994AE20C261")
    assert soak.sink_entry(CAPTURE.replace(b"\n", b"\r\n")) == ("<soak.1f2e.61@example.com>", "994AE20C261")
    headers_only = b"Subject: x\nMessage-ID: <a@b>\n"
    assert soak.sink_entry(headers_only) == ("<a@b>", None)
    assert soak.sink_entry(b"Subject: none\n\nMessage-ID: <in@body>\n") == (None, None)


def test_tally_tells_lost_duplicated_and_postfixs_own_repeats_apart() -> None:
    """Lost: accepted, no copy. Duplicated: copies from two queue files (handed over twice).
    Redelivered: two copies of one queue file (postfix's at-least-once after its restart).
    Copies of unknown Message-IDs are strangers; a copy without a queue id is a file of its own."""
    accepted = ["<a>", "<b>", "<c>", "<d>", "<e>"]
    copies: dict[str, list[str | None]] = {
        "<a>": ["Q1"],
        "<b>": ["Q2", "Q3"],
        "<c>": ["Q4", "Q4", "Q4"],
        "<e>": [None, None],
        "<x>": ["Q9", "Q9"],
    }
    found = soak.tally(accepted, copies)
    assert found == Tally(
        accepted=5, arrived=4, lost=["<d>"], duplicated={"<b>": 2, "<e>": 2}, redelivered={"<c>": 2}, strangers=2
    )
    assert found.extra_copies == 1 + 1 + 2
    clean = soak.tally(["<a>", "<a>"], {"<a>": ["Q1"]})
    assert (clean.accepted, clean.lost, clean.duplicated, clean.redelivered, clean.extra_copies) == (1, [], {}, {}, 0)


def test_latencies_run_from_the_record_to_the_first_copy() -> None:
    """Only messages that arrived count; a clock a little behind never gives a negative latency."""
    created = {"<a>": 100.0, "<b>": 100.0, "<c>": 100.0}
    assert sorted(soak.delivery_latencies(created, {"<a>": 100.5, "<b>": 99.9})) == [0.0, 0.5]
    cells = soak.latency_cells([float(n) for n in range(1, 101)])
    assert cells["p50"] == pytest.approx(50.5) and cells["p99"] == pytest.approx(99.01) and cells["max"] == 100.0
    assert soak.latency_cells([]) == {"p50": None, "p99": None, "max": None}


def report(**changes: object) -> Report:
    values: dict[str, object] = {
        "plan": soak.make_plan(quick=True),
        "tally": soak.tally(["<a>", "<b>"], {"<a>": ["Q1"], "<b>": ["Q2", "Q2"]}),
        "refused": {},
        "states": {"delivered": 2},
        "accept_latency": {"p50": 0.0194, "p99": 0.05, "max": 0.06},
        "delivery_latency": {"p50": 0.04, "p99": 10.8, "max": 26.9},
        "send_seconds": 19.9,
        "total_seconds": 38.3,
        "restarts": 2,
        "killed_in_flight": 3,
        "retried_sends": 6,
        "handed_over": {"replica-a.soak": 1, "replica-b.soak": 2},
    }
    values.update(changes)
    return Report(**values)  # type: ignore[arg-type]


def test_the_table_shows_lost_duplicated_latencies_and_states() -> None:
    """One row per figure with its value right-aligned, then the states and who handed over."""
    text = soak.render_report(report())
    lines = text.splitlines()
    assert lines[0].split() == ["soak", "value"]
    rows = {line.rsplit("  ", 1)[0].strip(): line.rsplit(" ", 1)[1] for line in lines[2:] if "  " in line}
    assert rows["lost (must be 0)"] == "0"
    assert rows["duplicated: handed to postfix twice (must be 0)"] == "0"
    assert rows["delivered again by postfix after its restart"] == "1"
    assert rows["accept -> sink p50 s"] == "0.04" and rows["accept -> sink p99 s"] == "10.80"
    assert rows["HTTP 202 p50 ms"] == "19.4"
    assert "record states: delivered 2" in lines
    assert "handed over by: replica-a.soak 1, replica-b.soak 2" in lines
    assert "delivered again by postfix: <b> +1" in lines


def test_the_table_names_what_was_lost_refused_and_not_drained() -> None:
    """Lost Message-IDs, refusals and an outbox that did not drain are spelled out; unknown figures show '-'."""
    lost = report(
        tally=soak.tally(["<a>", "<b>"], {"<b>": ["Q1", "Q2"]}),
        refused={"403 smtp_auth_failed": 2},
        delivery_latency={"p50": None, "p99": None, "max": None},
        drained=False,
    )
    text = soak.render_report(lost)
    assert "lost: <a>" in text and "duplicated: <b> x2" in text
    assert "refused: 403 smtp_auth_failed x2" in text
    assert "(not drained)" in text
    assert any(line.startswith("accept -> sink p50 s") and line.endswith("-") for line in text.splitlines())
