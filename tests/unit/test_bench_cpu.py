"""bench/cpu.py's arithmetic: µs per message, ratios to postfix, the floors and direct-reused, goals, A/B medians.

Nothing here starts a server or measures time; speed is never asserted.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from bench import cpu
from bench import profiled
from bench import run as bench


def _phase(
    scenario: str, path: str, sent: int, own: float | None, *, postfix: float = 0.0, dovecot: float = 0.0, msgs: float = 100.0
) -> bench.PhaseResult:
    result = bench.PhaseResult(scenario, 1024, 10, 1, path, sent=sent, msgs_per_s=msgs)
    if path == bench.DIRECT_REUSED:
        result.client_cpu_s = own
    else:
        result.sidecar_cpu_s = own
    result.family_cpu_s = {"postfix": postfix, "dovecot": dovecot, "other": 0.5}
    result.machine_cpu_s = 4.0
    return result


def test_micros_per_message() -> None:
    """0.9 s of CPU over 1,000 messages is 900 µs each; nothing sent or unknown CPU is unknown."""
    assert cpu.micros_per_message(0.9, 1000) == pytest.approx(900.0)
    assert cpu.micros_per_message(None, 1000) is None
    assert cpu.micros_per_message(1.0, 0) is None


def test_rows_divide_by_postfix_floors_and_direct_reused_of_the_same_scenario() -> None:
    """The sidecar's µs over postfix+dovecot's, over each floor's, and its msg/s over direct-reused's."""
    results = [
        _phase("paced-1KB", "sidecar-587", 1000, 1.2, postfix=1.8, dovecot=0.2, msgs=200.0),
        _phase("paced-1KB", "direct-reused", 2000, 1.0, postfix=3.0, msgs=400.0),
        _phase("paced-1KB", "floor-resource", 1000, 0.3),
        _phase("paced-1KB", "floor-klein", 1000, 0.4),
        _phase("other", "floor-resource", 1000, 0.1),  # another scenario's floor is not used
    ]
    rows = {row.path: row for row in cpu.cpu_rows(results) if row.scenario == "paced-1KB"}
    side = rows["sidecar-587"]
    assert side.own_us == pytest.approx(1200.0)
    assert side.postfix_us == pytest.approx(2000.0)
    assert side.own_vs_postfix == pytest.approx(0.6)
    assert side.vs_floor_resource == pytest.approx(4.0)
    assert side.vs_floor_klein == pytest.approx(3.0)
    assert side.vs_reused == pytest.approx(0.5)
    assert side.machine_us == pytest.approx(4000.0)
    assert side.other_us == pytest.approx(500.0)
    # direct-reused's own CPU is its smtplib clients'; the floors have no postfix share.
    assert rows["direct-reused"].own_us == pytest.approx(500.0)
    assert rows["direct-reused"].own_vs_postfix is None
    assert rows["floor-klein"].postfix_us is None and rows["floor-klein"].vs_floor_resource is None


def test_the_sidecar_over_floor_app_which_is_also_set_beside_postfix() -> None:
    """floor-app does the whole job at its least: the sidecar's ratio to it, and its own to postfix."""
    results = [
        _phase("paced-1KB", "sidecar-587", 1000, 3.0, postfix=4.0),
        _phase("paced-1KB", "floor-app", 1000, 2.0, postfix=4.5, dovecot=0.5),
    ]
    rows = {row.path: row for row in cpu.cpu_rows(results)}
    assert rows["sidecar-587"].vs_floor_app == pytest.approx(1.5)
    assert rows["floor-app"].postfix_us == pytest.approx(5000.0)
    assert rows["floor-app"].own_vs_postfix == pytest.approx(0.4)
    assert rows["floor-app"].vs_floor_app is None
    lines = cpu.floor_lines(list(rows.values()))
    assert len(lines) == 1 and "3,000 us = 1.50x floor-app's 2,000 us (1,000 us above it)" in lines[0]
    assert cpu.floor_lines(cpu.cpu_rows(results[:1])) == []


def test_rows_of_a_failed_phase_have_no_figures() -> None:
    """A phase that sent nothing gets no per-message figures and gives its ratios nothing."""
    failed = _phase("clients-1", "direct-reused", 0, None)
    failed.status = "failed"
    rows = cpu.cpu_rows([_phase("clients-1", "sidecar-587", 100, 0.1), failed])
    assert rows[0].vs_reused is None and rows[0].own_us == pytest.approx(1000.0)
    assert rows[1].own_us is None and rows[1].machine_us is None


def test_goals_are_met_missed_or_unmeasured() -> None:
    """Each goal compares the run's figure with the issue's bound; a goal without its phase is '-'."""
    results = [
        _phase("paced-1KB", "sidecar-587", 1000, 0.8, postfix=2.0),  # 800 µs, 0.4x postfix
        _phase("paced-1KB", "sidecar-25", 1000, 0.7, postfix=2.0),  # 700 µs: cheaper, but over 600
        _phase("clients-10", "sidecar-587", 1000, 0.7, postfix=2.0, msgs=300.0),  # 700 µs > 600
        _phase("clients-10", "direct-reused", 1000, 0.5, msgs=250.0),
    ]
    found = {goal.text: goal for goal in cpu.goals(cpu.cpu_rows(results))}
    assert found["587 paced: sidecar <= 900 us/msg"].met is True
    assert found["587 paced: sidecar <= 0.5x postfix+dovecot"].met is True
    assert found["587 saturated (10 clients): sidecar <= 600 us/msg"].met is False
    assert found["port 25 cheaper than 587 (paced-1KB)"].met is True
    assert found["port 25 paced: sidecar <= 600 us/msg"].met is False
    assert found["clients-10 587: msg/s >= 1.0x direct-reused"].met is True
    assert found["clients-1 587: msg/s >= 1.0x direct-reused"].met is None
    assert found["size-5MB 587: sidecar <= 0.5x postfix+dovecot"].met is None
    assert "| yes" not in cpu.render_goals(list(found.values()))  # a plain table, one goal a line
    assert len(cpu.render_goals(list(found.values())).splitlines()) == len(found) + 2


def test_plan_has_the_paced_and_saturated_scenarios() -> None:
    """Only the paced scenario has a rate; clients 1/10/100 at 1 KB, then 100 KB and 5 MB."""
    scenarios = {s.name: s for s in cpu.plan(False)}
    assert scenarios["paced-1KB"].rate == cpu.PACED_RATE
    assert scenarios["paced-1KB"].max_messages == pytest.approx(cpu.PACED_RATE * scenarios["paced-1KB"].max_seconds)
    assert [scenarios[f"clients-{n}"].concurrency for n in (1, 10, 100)] == [1, 10, 100]
    assert all(s.rate == 0 for name, s in scenarios.items() if name != "paced-1KB")
    assert scenarios["size-5MB"].size == 5 * bench.MB
    warm = cpu.warm_scenario(scenarios["clients-10"])
    assert warm.max_seconds == cpu.WARM_SECONDS and warm.concurrency == 10


def test_ticket_due_spreads_tickets_over_time() -> None:
    """Ticket n is due n/rate seconds after the start; without a rate, at once."""
    assert bench.ticket_due(100.0, 0, 200.0) == 100.0
    assert bench.ticket_due(100.0, 50, 200.0) == pytest.approx(100.25)
    assert bench.ticket_due(100.0, 50, 0.0) == 100.0


def test_paced_tickets_due_after_the_deadline_are_not_handed_out() -> None:
    """Under a rate, a ticket that would be due after max_seconds is refused without waiting for it."""
    context = multiprocessing.get_context("fork")
    shared = bench.Shared(
        tickets=context.Value("q", 10),  # ticket 10 at 10/s is due 1 s after the start: the deadline
        start=context.Value("d", 0.0),
        go=None,
        out=None,
        max_messages=100,
        max_seconds=1.0,
        rate=10.0,
    )
    shared.start.value = 1e12  # not started yet, so only the due time can refuse it
    assert bench.take_ticket(shared) is False
    assert shared.tickets.value == 11


def test_ab_summary_takes_medians_and_the_paired_difference() -> None:
    """A and B medians over repetitions, and the median of B - A taken pair by pair."""
    summary = cpu.ab_summary({"a": [1000.0, 900.0, 1100.0], "b": [800.0, 850.0, 700.0]})
    assert summary["a_us"] == 1000.0
    assert summary["b_us"] == 800.0
    assert summary["b_minus_a_us"] == -200.0  # pairs: -200, -50, -400
    assert cpu.ab_summary({"a": [], "b": []}) == {
        "a_us": None, "b_us": None, "b_minus_a_us": None, "b_minus_a_mean_us": None, "position_us": None,
    }  # fmt: skip


def test_ab_summary_cancels_what_a_place_costs_when_half_the_runs_are_swapped() -> None:
    """B is 100 us cheaper; the second place costs 150 us less than the first. Straight runs see
    -250, swapped ones +50: the mean gives the -100 and the place effect comes out as -150."""
    a = [1000.0, 1000.0, 1000.0, 1000.0]
    b = [750.0, 1050.0, 750.0, 1050.0]
    summary = cpu.ab_summary({"a": a, "b": b}, [False, True, False, True])
    assert summary["b_minus_a_mean_us"] == -100.0
    assert summary["position_us"] == -150.0
    unbalanced = cpu.ab_summary({"a": a[:3], "b": b[:3]}, [False, True, False])
    assert unbalanced["b_minus_a_mean_us"] is None and unbalanced["position_us"] is None


def test_alternating_sender_takes_turns() -> None:
    """Every other message goes to the second sidecar; both connect and close together."""

    class Recorder:
        def __init__(self, name: str, log: list[str]) -> None:
            self.name, self.log = name, log

        def open(self) -> None:
            self.log.append(f"open {self.name}")

        def send(self) -> str | None:
            self.log.append(self.name)
            return None

        def close(self) -> None:
            self.log.append(f"close {self.name}")

    log: list[str] = []
    sender = cpu.AlternatingSender(Recorder("a", log), Recorder("b", log))  # type: ignore[arg-type]
    sender.open()
    for _ in range(3):
        assert sender.send() is None
    sender.close()
    assert log == ["open a", "open b", "a", "b", "a", "close a", "close b"]


def test_clients_sharing_turns_alternate_over_all_their_messages(tmp_path: Path) -> None:
    """With a shared counter, five clients of one message each still send to A, B, A, B, A; and a
    sidecar's answered sends are counted from its log's 200 send lines."""

    class Named:
        def __init__(self, name: str, log: list[str]) -> None:
            self.name, self.log = name, log

        def send(self) -> str | None:
            self.log.append(self.name)
            return None

    log: list[str] = []
    turns = multiprocessing.get_context("fork").Value("q", 0)
    for _ in range(5):
        client = cpu.AlternatingSender(Named("a", log), Named("b", log), turns)  # type: ignore[arg-type]
        client.send()
    assert log == ["a", "b", "a", "b", "a"]
    sidecar_log = tmp_path / "sidecar.log"
    sidecar_log.write_bytes(
        b"2026-12-02T04:00:00+0000 [smtpapi#info] send 01 ip=127.0.0.1 key=k status=200 code=smtp_mail_sent\n"
        b"2026-12-02T04:00:00+0000 [smtpapi#info] send 02 ip=127.0.0.1 key=k status=503 code=smtp_error\n"
        b"2026-12-02T04:00:00+0000 [smtpapi#info] http 03 ip=127.0.0.1 GET /healthz status=200 code=-\n"
        b"2026-12-02T04:00:01+0000 [smtpapi#info] send 04 ip=127.0.0.1 key=k status=200 code=smtp_partially_sent\n"
    )
    assert cpu.sends_logged(sidecar_log) == 2


@pytest.mark.parametrize(
    ("filename", "function", "group"),
    [
        ("/x/site-packages/twisted/web/http.py", "f", "twisted.web"),
        ("/x/site-packages/twisted/internet/defer.py", "f", "Deferred/coroutine glue"),
        ("/x/site-packages/twisted/internet/tcp.py", "f", "reactor"),
        ("/x/src/mailcow_smtp_api/core/mime.py", "f", "MIME (ours)"),
        ("/usr/lib/python3.11/email/generator.py", "f", "MIME (email package)"),
        ("/x/src/mailcow_smtp_api/core/validate.py", "f", "validation"),
        ("_socket", "<method 'send' of '_socket.socket' objects>", "socket and I/O builtins"),
        ("builtins", "isinstance", "other builtins"),
        ("/somewhere/else.py", "f", "other Python"),
    ],
)
def test_profile_groups_by_file(filename: str, function: str, group: str) -> None:
    """The profile's parts follow the function's file; builtins go by their name."""
    assert profiled.group_of(filename, function) == group
