"""The benchmark's helpers: statistics, /proc parsing, payloads, ratios, table layout, log trimming.

Nothing here starts a server or measures time (one test writes files under tmp_path); speed is never asserted.
"""

from __future__ import annotations

import json
import multiprocessing
from email import message_from_bytes
from pathlib import Path

import pytest

from bench import run as bench


def test_percentile_interpolates_between_closest_ranks() -> None:
    """The median of an even count lies halfway between the two middle values."""
    assert bench.percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)


def test_percentile_extremes_are_min_and_max() -> None:
    """p0 is the smallest value and p100 the largest, whatever the input order."""
    values = [7.0, -2.0, 10.5, 3.0]
    assert bench.percentile(values, 0) == -2.0
    assert bench.percentile(values, 100) == 10.5


def test_percentile_p99_of_hundred_values() -> None:
    """With 1..100, p99 sits at rank 98.01 (0-based): 99.01."""
    values = [float(v) for v in range(1, 101)]
    assert bench.percentile(values, 99) == pytest.approx(99.01)
    assert bench.percentile(values, 95) == pytest.approx(95.05)


def test_percentile_of_one_value_is_that_value() -> None:
    """A single sample is its own percentile at every q."""
    assert bench.percentile([0.25], 99) == 0.25


@pytest.mark.parametrize(("values", "q"), [([], 50), ([1.0], -1), ([1.0], 100.5)])
def test_percentile_rejects_empty_input_and_bad_q(values: list[float], q: float) -> None:
    """No values, or q outside 0..100, is an error rather than a made-up number."""
    with pytest.raises(ValueError):
        bench.percentile(values, q)


def test_latency_summary_reports_milliseconds() -> None:
    """Latencies measured in seconds come out in milliseconds; nothing measured gives None."""
    summary = bench.latency_summary([0.010, 0.020, 0.030])
    assert summary is not None
    assert summary["p50"] == pytest.approx(20.0)
    assert summary["mean"] == pytest.approx(20.0)
    assert summary["max"] == pytest.approx(30.0)
    assert bench.latency_summary([]) is None


def test_ratio_and_per_thousand_handle_unknowns() -> None:
    """Ratios and per-1,000 figures are None when an input is unknown or the base is zero."""
    assert bench.ratio(30.0, 120.0) == pytest.approx(0.25)
    assert bench.ratio(None, 1.0) is None
    assert bench.ratio(1.0, None) is None
    assert bench.ratio(1.0, 0.0) is None
    assert bench.per_thousand(3.0, 1500) == pytest.approx(2.0)
    assert bench.per_thousand(3.0, 0) is None
    assert bench.per_thousand(None, 10) is None


def test_format_number_cells() -> None:
    """Unknown is '-', integers get separators, floats the requested decimals."""
    assert bench.format_number(None) == "-"
    assert bench.format_number(12345) == "12,345"
    assert bench.format_number(1234.567) == "1,234.6"
    assert bench.format_number(0.456, 2) == "0.46"
    assert bench.format_number(99.6, 0) == "100"


def test_format_table_aligns_text_left_and_numbers_right() -> None:
    """Text columns are padded on the right, numeric ones on the left, under a dashed rule."""
    table = bench.format_table(["path", "msg/s"], [["ceiling", "1,200.0"], ["sidecar-587", "95.1"]], numeric_from=1)
    assert table.splitlines() == [
        "path           msg/s",
        "-----------  -------",
        "ceiling      1,200.0",
        "sidecar-587     95.1",
    ]


def test_format_table_rejects_ragged_rows() -> None:
    """A row with the wrong number of cells is a programming error, not a silently shifted table."""
    with pytest.raises(ValueError):
        bench.format_table(["a", "b"], [["only one"]])


def test_parse_proc_stat_survives_odd_command_names() -> None:
    """Fields are counted from the last ')', so a name holding ') ' does not shift them."""
    fields = ["S", "42"] + ["0"] * 9 + ["150", "50", "7", "3"] + ["0"] * 10
    stat = bench.parse_proc_stat("1234 (odd) name) " + " ".join(fields))
    assert stat == bench.ProcStat(pid=1234, comm="odd) name", ppid=42, own_ticks=200, reaped_ticks=10)


def _stat(pid: int, ppid: int, own: int, reaped: int = 0, comm: str = "x") -> bench.ProcStat:
    return bench.ProcStat(pid=pid, comm=comm, ppid=ppid, own_ticks=own, reaped_ticks=reaped)


def test_family_ticks_follows_parents_to_the_root() -> None:
    """Descendants count for their root's family with their reaped children; the rest for ``unrooted``."""
    table = {
        1: _stat(1, 0, 1000),
        10: _stat(10, 1, 5, reaped=40, comm="master"),  # postfix master: 40 from smtpds that exited
        11: _stat(11, 10, 7, comm="smtpd"),
        12: _stat(12, 11, 3, comm="child-of-smtpd"),
        20: _stat(20, 1, 100, comm="mariadbd"),
        30: _stat(30, 1, 9, comm="unrelated"),
    }
    totals = bench.family_ticks(table, {10: "postfix", 20: "mariadb", 99: "dovecot"}, unrooted="else")
    assert totals == {"postfix": 5 + 40 + 7 + 3, "mariadb": 100, "else": 1000 + 9}


def test_cpu_between_two_readings_uses_the_threads_nanoseconds_while_they_all_live() -> None:
    """Per-thread schedstat time when every thread of the first reading is still there (new ones
    count from zero); the coarse utime + stime once a thread has exited and taken its time along."""
    before = bench.ProcessCpu(ticks_seconds=1.00, threads_ns={10: 500_000_000, 11: 200_000_000})
    grown = bench.ProcessCpu(ticks_seconds=1.01, threads_ns={10: 503_250_000, 11: 200_500_000, 12: 1_000})
    assert bench.cpu_seconds_between(before, grown) == pytest.approx(0.003751)
    lost = bench.ProcessCpu(ticks_seconds=1.02, threads_ns={10: 503_250_000})
    assert bench.cpu_seconds_between(before, lost) == pytest.approx(0.02)
    assert bench.cpu_seconds_between(bench.ProcessCpu(1.0, {}), bench.ProcessCpu(1.5, {})) == pytest.approx(0.5)


def test_process_cpu_of_this_process_grows_with_work() -> None:
    """The reading of a live process has its threads; spinning shows up in the nanosecond counters."""
    import os
    import time

    before = bench.ProcessCpu.read(os.getpid())
    assert os.getpid() in before.threads_ns
    end = time.process_time() + 0.05
    while time.process_time() < end:
        pass
    spent = bench.cpu_seconds_between(before, bench.ProcessCpu.read(os.getpid()))
    assert 0.04 <= spent < 5.0


def test_machine_busy_ticks_excludes_idle_and_iowait() -> None:
    """Busy time is user+nice+system+irq+softirq+steal of the aggregate cpu line."""
    text = "cpu  100 5 50 9000 300 2 3 4 0 0\ncpu0 50 2 25 4500 150 1 1 2 0 0\n"
    assert bench.machine_busy_ticks(text) == 100 + 5 + 50 + 2 + 3 + 4


def test_status_kb_reads_named_values() -> None:
    """VmRSS and VmHWM are read in kB; a missing name gives None."""
    text = "Name:\ttwistd\nVmHWM:\t  81234 kB\nVmRSS:\t   70000 kB\n"
    assert bench.status_kb(text, "VmHWM") == 81234
    assert bench.status_kb(text, "VmRSS") == 70000
    assert bench.status_kb(text, "VmSwap") is None


@pytest.mark.parametrize("size", [1, 2, 75, 76, 77, 1024, 100 * 1024])
def test_make_body_has_the_exact_size_and_short_ascii_lines(size: int) -> None:
    """The body is exactly ``size`` ASCII bytes, ends with a newline, and no line is long or starts with '.'."""
    body = bench.make_body(size)
    assert len(body.encode("ascii")) == size
    assert body.endswith("\n")
    lines = body.split("\n")[:-1]
    assert all(len(line) + 1 <= bench.LINE_LENGTH for line in lines)
    assert not any(line.startswith(".") for line in lines)


def test_make_body_rejects_empty() -> None:
    """A zero-byte body cannot be sent (the API refuses empty bodies)."""
    with pytest.raises(ValueError):
        bench.make_body(0)


def test_build_message_is_crlf_7bit_and_carries_every_recipient() -> None:
    """The direct paths send CRLF lines, a 7bit body identical to the input, and all recipients in To."""
    recipients = bench.recipients_for(3)
    body = bench.make_body(300)
    raw = bench.build_message(bench.SENDER, recipients, body)
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")
    parsed = message_from_bytes(raw)
    assert parsed["Content-Transfer-Encoding"] == "7bit"
    assert [a.strip() for a in parsed["To"].split(",")] == recipients
    payload = parsed.get_payload(decode=True)
    assert isinstance(payload, bytes)
    assert payload.decode("ascii").replace("\r\n", "\n") == body


def test_send_payload_is_the_documented_request() -> None:
    """The POST body names from, to, subject, body, password and the postfix port."""
    payload = json.loads(bench.send_payload(["a@sink.example"], "hi\n", "secret", 10465))
    assert payload == {
        "from": bench.SENDER,
        "to": ["a@sink.example"],
        "subject": "bench",
        "body": "hi\n",
        "password": "secret",
        "smtp_port": 10465,
    }


def test_http_outcome_classifies_answers() -> None:
    """Only a 200 'success' counts as sent; errors are labelled by status and code, never by body text."""
    assert bench.http_outcome(200, b'[{"type": "success", "msg": ["smtp_mail_sent", "a", "b"]}]') is None
    partial = b'[{"type": "danger", "msg": ["smtp_partially_sent", "a", "b", "c"]}]'
    assert bench.http_outcome(200, partial) == "HTTP 200 smtp_partially_sent"
    unavailable = b'[{"type": "error", "msg": "smtp_port25_unavailable", "message": "use 587"}]'
    assert bench.http_outcome(403, unavailable) == "HTTP 403 smtp_port25_unavailable"
    assert (
        bench.http_outcome(401, b'{"type": "error", "msg": "authentication failed"}')
        == "HTTP 401 authentication failed"
    )
    assert bench.http_outcome(502, b"<html>bad gateway</html>") == "HTTP 502 (not JSON)"


@pytest.mark.parametrize(("clients", "processes"), [(1, 4), (10, 4), (100, 4), (7, 7), (3, 1)])
def test_split_clients_spreads_evenly(clients: int, processes: int) -> None:
    """Every client gets a place, no process is idle, and shares differ by at most one."""
    shares = bench.split_clients(clients, processes)
    assert sum(shares) == clients
    assert len(shares) == min(clients, processes)
    assert min(shares) >= 1 and max(shares) - min(shares) <= 1


def test_split_clients_rejects_nothing_to_do() -> None:
    """Zero clients or zero processes is refused."""
    with pytest.raises(ValueError):
        bench.split_clients(0, 4)
    with pytest.raises(ValueError):
        bench.split_clients(4, 0)


def test_plan_covers_the_issue_matrix() -> None:
    """Sizes 1 KB/100 KB/5 MB, 1/10/20/100 clients and 1/50 recipients appear; --quick only shrinks limits."""
    full, quick = bench.plan(False), bench.plan(True)
    assert {s.size for s in full} == {1024, 100 * 1024, 5 * 1024 * 1024}
    assert {s.concurrency for s in full} == {1, 10, 20, 100}
    assert {s.recipients for s in full} == {1, 50}
    assert [s.name for s in quick] == [s.name for s in full]
    assert len({s.name for s in full}) == len(full)
    for small, large in zip(quick, full):
        assert (small.size, small.concurrency, small.recipients) == (large.size, large.concurrency, large.recipients)
        assert small.max_messages <= large.max_messages and small.max_seconds <= large.max_seconds


def test_size_label_uses_binary_units() -> None:
    """Sizes print as KB/MB when they are whole binary units, else in bytes."""
    assert [bench.size_label(n) for n in (1024, 102400, 5 * 1024 * 1024, 1500)] == ["1KB", "100KB", "5MB", "1500B"]


def _result(
    path: str, rate: float | None, p50: float, p99: float, machine: float, client: float, sidecar: float | None = None
) -> bench.PhaseResult:
    result = bench.PhaseResult("size-1KB", 1024, 10, 1, path, sent=1000, wall_s=1000 / rate if rate else None)
    result.msgs_per_s = rate
    result.latency_ms = {"p50": p50, "p95": p99, "p99": p99}
    result.machine_cpu_s = machine
    result.client_cpu_s = client
    result.sidecar_cpu_s = sidecar
    return result


def test_ratios_divide_by_the_baselines_of_the_scenario() -> None:
    """Each sidecar figure is divided by the ceiling, reused, new and same-port baselines."""
    group = {
        "ceiling": _result("ceiling", 800.0, 0, 0, machine=2.0, client=0.1),
        "direct-reused": _result("direct-reused", 400.0, 10.0, 40.0, machine=4.0, client=0.5),
        "direct-new": _result("direct-new", 200.0, 30.0, 60.0, machine=8.0, client=2.0),
        "direct-new-465": _result("direct-new-465", 160.0, 50.0, 90.0, machine=9.0, client=2.0),
    }
    sidecar = _result("sidecar-465", 100.0, 60.0, 120.0, machine=16.0, client=0.3, sidecar=6.0)
    values = bench.ratios(sidecar, {**group, "sidecar-465": sidecar})
    assert values["msgs_per_s_vs_ceiling"] == pytest.approx(100 / 800)
    assert values["msgs_per_s_vs_reused"] == pytest.approx(100 / 400)
    assert values["msgs_per_s_vs_new"] == pytest.approx(100 / 200)
    assert values["msgs_per_s_vs_port"] == pytest.approx(100 / 160)
    assert values["p50_vs_reused"] == pytest.approx(60 / 10)
    assert values["p50_vs_port"] == pytest.approx(60 / 50)
    assert values["p99_vs_new"] == pytest.approx(120 / 60)
    assert values["machine_cpu_vs_ceiling"] == pytest.approx(16 / 2)
    assert values["sidecar_cpu_vs_client_new"] == pytest.approx(6 / 2)


def test_ratios_are_unknown_without_a_usable_baseline() -> None:
    """A missing or failed baseline gives None instead of a misleading quotient."""
    failed = _result("direct-new", 200.0, 30.0, 60.0, machine=8.0, client=2.0)
    failed.status = "failed"
    sidecar = _result("sidecar-587", 100.0, 60.0, 120.0, machine=16.0, client=0.3, sidecar=6.0)
    values = bench.ratios(sidecar, {"direct-new": failed})
    assert values["msgs_per_s_vs_new"] is None
    assert values["msgs_per_s_vs_ceiling"] is None
    assert values["msgs_per_s_vs_port"] is None


def test_cpu_rest_is_what_no_accounted_process_spent() -> None:
    """'rest' is the machine's CPU minus the sidecar, the clients and every accounted family."""
    result = _result("sidecar-587", 100.0, 60.0, 120.0, machine=20.0, client=1.0, sidecar=6.0)
    result.family_cpu_s = {"postfix": 5.0, "sink": 0.5, "dovecot": 0.5, "mariadb": 2.0, "kernel": 1.0, "other": 3.0}
    assert result.cpu_s("rest") == pytest.approx(1.0)
    assert result.cpu_per_1k("postfix") == pytest.approx(5.0)
    assert result.cpu_share("sidecar") == pytest.approx(60.0)  # 6 s over a 10 s phase


def test_render_report_lists_every_phase_and_ratios_only_for_the_sidecar() -> None:
    """Failed or unavailable phases show their reason; the ratio table has one line per sidecar path."""
    ceiling = _result("ceiling", 800.0, 0, 0, machine=2.0, client=0.1)
    sidecar = _result("sidecar-587", 100.0, 60.0, 120.0, machine=16.0, client=0.3, sidecar=6.0)
    unavailable = bench.PhaseResult(
        "size-1KB", 1024, 10, 1, "sidecar-25", status="not available", note="smtp_port25_unavailable"
    )
    sidecar.errors, sidecar.error_samples = 2, {"HTTP 503 smtp_db_unavailable": 2}
    report = bench.render_report([ceiling, sidecar, unavailable])
    speed, _, rest = report.partition("CPU seconds per 1,000 messages")
    assert "not available: smtp_port25_unavailable" in speed
    assert "HTTP 503 smtp_db_unavailable x2" in speed
    ratio_lines = [line for line in rest.split("ratios to the baselines")[1].splitlines() if line.startswith("1KB")]
    assert [line.split()[3] for line in ratio_lines] == ["sidecar-587", "sidecar-25"]
    assert ratio_lines[0].split()[4] == "0.12"  # 100 / 800 msg/s


def test_take_ticket_stops_at_the_count_and_at_the_deadline() -> None:
    """Tickets run out after max_messages, and none is handed out once max_seconds have passed."""
    context = multiprocessing.get_context("fork")
    shared = bench.Shared(
        tickets=context.Value("q", 0),
        start=context.Value("d", 1e12),  # the clock starts far in the future: no deadline yet
        go=None,
        out=None,
        max_messages=3,
        max_seconds=1.0,
    )
    assert [bench.take_ticket(shared) for _ in range(5)] == [True, True, True, False, False]
    shared.tickets.value, shared.start.value = 0, 0.0  # started at boot: long past the deadline
    assert bench.take_ticket(shared) is False


def test_selected_keeps_canonical_order_and_refuses_unknown_names() -> None:
    """A subset comes back in the run's order; an unknown name stops the run with a message."""
    assert bench.selected("sidecar-587,ceiling", bench.ALL_PATHS, "paths") == ["ceiling", "sidecar-587"]
    assert bench.selected(None, ["a", "b"], "x") == ["a", "b"]
    with pytest.raises(SystemExit):
        bench.selected("nope", bench.ALL_PATHS, "paths")


def test_logs_trimmed_removes_only_what_the_run_appended(tmp_path: Path) -> None:
    """Logs go back to their sizes before the run (earlier lines kept); logs the run created end empty."""
    folder = tmp_path / "log"
    folder.mkdir()
    old = folder / "postfix.log"
    old.write_bytes(b"earlier line\n")
    with bench.logs_trimmed(tmp_path):
        with old.open("ab") as log:
            log.write(b"benchmark line\n")
        (folder / "dovecot.log").write_bytes(b"new during the run\n")
    assert old.read_bytes() == b"earlier line\n"
    assert (folder / "dovecot.log").read_bytes() == b""


def test_source_fingerprint_follows_the_code(tmp_path: Path) -> None:
    """The fingerprint is stable for the same files and changes when a source file changes."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "a.py").write_text("x = 1\n")
    first = bench.source_fingerprint(tmp_path)
    assert bench.source_fingerprint(tmp_path) == first
    (package / "a.py").write_text("x = 2\n")
    assert bench.source_fingerprint(tmp_path) != first


def test_family_deltas_count_exited_kernel_threads_per_thread() -> None:
    """A kernel thread that exits takes nothing back; a new one counts in full; reaped children still count."""
    before = {
        2: _stat(2, 0, 0, comm="kthreadd"),
        40: _stat(40, 2, 500, comm="kworker/0:1"),  # exits before the second table
        41: _stat(41, 2, 100, comm="kworker/1:0"),
        10: _stat(10, 1, 5, reaped=40, comm="master"),
        11: _stat(11, 10, 30, comm="smtpd"),  # exits and is reaped by master
    }
    after = {
        2: _stat(2, 0, 0, comm="kthreadd"),
        41: _stat(41, 2, 104, comm="kworker/1:0"),
        42: _stat(42, 2, 3, comm="kworker/0:2"),
        10: _stat(10, 1, 6, reaped=40 + 36, comm="master"),
    }
    deltas = bench.family_deltas(before, after, {2: "kernel", 10: "postfix"})
    assert deltas["kernel"] == 4 + 3
    assert deltas["postfix"] == 1 + 6  # master's own tick, and the smtpd's 6 ticks after the first table
