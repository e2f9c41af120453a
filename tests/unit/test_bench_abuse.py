"""The abuse-controls benchmark's pure helpers: RESP, INFO and CLIENT LIST parsing, counting, tables.

Nothing here connects to Redis or measures time; speed is never asserted.
"""

from __future__ import annotations

from typing import Any

import pytest

from bench import abuse
from bench.abuse import RoundResult


def test_encode_command_is_an_array_of_bulk_strings() -> None:
    """Every argument, text, bytes or number, is sent as a bulk string with its byte length."""
    assert abuse.encode_command("HSET", b"RL_VALUE", "é", 5) == (
        b"*4\r\n$4\r\nHSET\r\n$8\r\nRL_VALUE\r\n$2\r\n\xc3\xa9\r\n$1\r\n5\r\n"
    )


@pytest.mark.parametrize(
    ("data", "value"),
    [
        (b"+PONG\r\n", "PONG"),
        (b":42\r\n", 42),
        (b"$5\r\nhe\r\nl\r\n", b"he\r\nl"),
        (b"$-1\r\n", None),
        (b"*-1\r\n", None),
        (b"*3\r\n$1\r\na\r\n:1\r\n*1\r\n$0\r\n\r\n", [b"a", 1, [b""]]),
    ],
)
def test_parse_reply_reads_each_kind_and_says_where_it_ends(data: bytes, value: Any) -> None:
    """Simple strings, integers, bulk strings (CRLF inside), nil and nested arrays; the offset is the end."""
    assert abuse.parse_reply(data + b"+next\r\n") == (value, len(data))


def test_parse_reply_returns_an_error_reply_as_an_exception_value() -> None:
    """An error reply is a value the client raises, so that one inside an array does not cut the array short."""
    value, used = abuse.parse_reply(b"-NOSCRIPT No matching script\r\n")
    assert isinstance(value, abuse.RedisReplyError)
    assert str(value) == "NOSCRIPT No matching script"
    assert used == 30


@pytest.mark.parametrize("data", [b"", b"+PON", b"$5\r\nabc", b"*2\r\n:1\r\n", b"$3\r\nabc"])
def test_parse_reply_asks_for_more_when_the_reply_is_not_whole(data: bytes) -> None:
    """A reply cut anywhere, even before its final CRLF, is incomplete rather than wrong."""
    with pytest.raises(abuse.IncompleteReply):
        abuse.parse_reply(data)


def test_parse_reply_refuses_what_is_not_resp() -> None:
    """An unknown first byte is an error, not a guess."""
    with pytest.raises(ValueError):
        abuse.parse_reply(b"HTTP/1.1 400\r\n")


INFO = (
    "# CPU\r\n"
    "used_cpu_sys:1.008625\r\n"
    "used_cpu_user:0.791788\r\n"
    "used_cpu_sys_children:0.000000\r\n"
    "\r\n"
    "# Commandstats\r\n"
    "cmdstat_hmget:calls=7,usec=40,usec_per_call=5.71,rejected_calls=0,failed_calls=0\r\n"
    "cmdstat_script|load:calls=1,usec=85,usec_per_call=85.00,rejected_calls=0,failed_calls=0\r\n"
    "cmdstat_evalsha:calls=3,usec=90,usec_per_call=30.00,rejected_calls=0,failed_calls=0\r\n"
)


def test_parse_info_skips_headers_and_blank_lines() -> None:
    """Only field:value lines are kept; a value may hold ':' and '=' of its own."""
    info = abuse.parse_info(INFO)
    assert info["used_cpu_user"] == "0.791788"
    assert not any(key.startswith("#") for key in info)
    assert info["cmdstat_hmget"].startswith("calls=7,usec=40")


def test_cpu_seconds_adds_system_and_user_time_of_the_server_itself() -> None:
    """used_cpu_sys + used_cpu_user; the children's time (a BGSAVE fork) is not the server's work."""
    assert abuse.cpu_seconds(abuse.parse_info(INFO)) == pytest.approx(1.800413)


def test_command_stats_reads_calls_and_usec_per_command() -> None:
    """Calls and microseconds per command, subcommands named as Redis names them."""
    info = abuse.parse_info(INFO)
    assert abuse.command_calls(info) == {"hmget": 7, "script|load": 1, "evalsha": 3}
    assert abuse.command_stats(info, "usec") == {"hmget": 40.0, "script|load": 85.0, "evalsha": 90.0}


def test_calls_delta_keeps_only_what_grew() -> None:
    """A command that appears only after counts from zero; unchanged ones are left out."""
    before = {"hmget": 7, "info": 2}
    after = {"hmget": 10, "info": 2, "evalsha": 3}
    assert abuse.calls_delta(before, after) == {"evalsha": 3, "hmget": 3}


def test_client_calls_removes_the_scripts_own_commands() -> None:
    """Two sends, one bucket each: the script's HMGET (one per HSET) and TIME/PEXPIRE are not round trips."""
    delta = {"hexists": 2, "hmget": 4, "evalsha": 2, "time": 2, "hset": 2, "pexpire": 2, "info": 4}
    assert abuse.client_calls(delta) == {
        "hgetall": 0, "hexists": 2, "hmget": 2, "evalsha": 2, "publish": 0, "script|load": 0,
    }  # fmt: skip


def test_client_calls_counts_two_buckets_per_script_call() -> None:
    """A send key's rate is a second bucket in the same EVALSHA: two script HMGETs, still one round trip."""
    delta = {"hexists": 1, "hmget": 3, "evalsha": 1, "time": 1, "hset": 2, "pexpire": 2}
    assert abuse.client_calls(delta)["hmget"] == 1
    assert sum(abuse.client_calls(delta).values()) == 3


def test_top_level_usec_counts_a_script_once() -> None:
    """EVALSHA's time holds its nested calls; HMGET counts only for the client's share of its calls."""
    calls = {"hexists": 2, "hmget": 4, "evalsha": 2, "time": 2, "hset": 2, "pexpire": 2}
    usec = {"hexists": 3.0, "hmget": 8.0, "evalsha": 50.0, "time": 1.0, "hset": 4.0, "pexpire": 2.0}
    assert abuse.top_level_usec(calls, usec) == pytest.approx(3.0 + 4.0 + 50.0)
    assert abuse.top_level_usec({}, {}) == 0.0


def test_foreign_calls_are_those_nobody_in_this_run_sends() -> None:
    """FLUSHDB or GET are another client's; the checks', the script's and the snapshots' are not."""
    delta = {"hexists": 1, "time": 1, "info": 3, "client|list": 1, "flushdb": 1, "get": 2}
    assert abuse.foreign_calls(delta) == {"flushdb": 1, "get": 2}


CLIENT_LIST = (
    "id=159 addr=127.0.0.1:55298 laddr=127.0.0.1:6379 fd=8 name= age=1 idle=1 flags=N db=13 cmd=flushdb\n"
    "id=160 addr=127.0.0.1:55300 laddr=127.0.0.1:6379 fd=9 name= age=90 idle=90 flags=P db=0 cmd=subscribe\n"
    "id=161 addr=127.0.0.1:55308 laddr=127.0.0.1:6379 fd=10 name= age=3 idle=0 flags=N db=12 cmd=client|list\n"
)


def test_parse_client_list_gives_one_mapping_per_client() -> None:
    """Empty values (name=) stay empty strings."""
    clients = abuse.parse_client_list(CLIENT_LIST)
    assert [c["id"] for c in clients] == ["159", "160", "161"]
    assert clients[0]["name"] == ""
    assert clients[2]["cmd"] == "client|list"


def test_active_foreign_clients_are_recent_ones_on_another_db() -> None:
    """A client on db 13 busy within the round (rounded up to whole seconds) counts; an idle
    subscriber and this run's own db do not."""
    clients = abuse.parse_client_list(CLIENT_LIST)
    assert abuse.active_foreign_clients(clients, 12, 0.4) == ["127.0.0.1:55298 db=13 cmd=flushdb"]
    assert abuse.active_foreign_clients(clients, 12, 0.0) == []


def snapshot(connections: int, clients: str = "") -> abuse.Snapshot:
    return abuse.Snapshot(0.0, {}, {}, connections, abuse.parse_client_list(clients))


def test_shared_by_reports_new_connections_and_busy_clients() -> None:
    """A connection opened during the round is a sign even when it has gone by the second snapshot."""
    assert abuse.shared_by(snapshot(10), snapshot(10), 12, 0.5) == []
    assert abuse.shared_by(snapshot(10), snapshot(12), 12, 0.5) == ["2 new connection(s)"]
    assert abuse.shared_by(snapshot(10), snapshot(10, CLIENT_LIST), 12, 0.5) == ["127.0.0.1:55298 db=13 cmd=flushdb"]


def test_summed_and_per_request() -> None:
    """Counts add up per key over rounds, then divide by the requests; no requests, no figures."""
    assert abuse.summed([{"b": 1, "a": 2}, {"a": 3}]) == {"a": 5, "b": 1}
    assert abuse.per_request({"hmget": 6}, 3) == {"hmget": 2.0}
    assert abuse.per_request({"hmget": 6}, 0) == {}


def round_of(variant: str, requests: int, cpu_s: float, redis_cpu_s: float, latency_s: float, **extra: Any) -> RoundResult:
    fields: dict[str, Any] = {
        "variant": variant, "round": 1, "requests": requests, "errors": {}, "wall_s": requests * latency_s,
        "cpu_s": cpu_s, "redis_cpu_s": redis_cpu_s, "redis_calls": {}, "redis_usec": {},
        "latencies_s": [latency_s] * requests,
    }  # fmt: skip
    fields.update(extra)
    return RoundResult(**fields)


def test_summarise_gives_microseconds_per_request_over_all_rounds() -> None:
    """Totals over the rounds divided by all requests; each round's own CPU figure is kept for the spread."""
    calls = {"hexists": 100, "hmget": 200, "evalsha": 100, "hset": 100, "time": 100, "pexpire": 100}
    rounds = [
        round_of("redis", 100, 0.05, 0.008, 0.001, redis_calls=calls, errors={"smtp_rate_limited": 1}),
        round_of("redis", 300, 0.09, 0.012, 0.002, shared=["1 new connection(s)"]),
    ]
    s = abuse.summarise("redis", rounds)
    assert (s["rounds"], s["requests"], s["errors"], s["error_codes"]) == (2, 400, 1, {"smtp_rate_limited": 1})
    assert s["cpu_us"] == pytest.approx(350.0)
    assert s["cpu_us_rounds"] == pytest.approx([500.0, 300.0])
    assert s["redis_cpu_us"] == pytest.approx(50.0)
    assert s["req_per_s"] == pytest.approx(400 / 0.7)
    assert s["p50_us"] == pytest.approx(2000.0)
    assert s["round_trips"]["hmget"] == pytest.approx(0.25)
    assert s["round_trips_total"] == pytest.approx(0.75)
    assert s["shared_rounds"] == 1


def test_summarise_splits_the_machines_other_cpu_into_interrupts_and_other_processes() -> None:
    """Interrupt time per request, and what neither this process, Redis nor interrupts used, in % of a CPU."""
    rounds = [
        round_of("redis", 1000, 0.4, 0.07, 0.0005, machine_busy_s=0.77, interrupt_s=0.05),
        round_of("redis", 1000, 0.4, 0.07, 0.0005, machine_busy_s=0.57, interrupt_s=0.05),
    ]
    s = abuse.summarise("redis", rounds)
    assert s["interrupt_us"] == pytest.approx(50.0)
    assert s["others_cpu_pct"] == pytest.approx((0.25 + 0.05) / 1.0 * 100)
    unknown = abuse.summarise("redis", [round_of("redis", 10, 0.1, 0.0, 0.001)])
    assert (unknown["interrupt_us"], unknown["others_cpu_pct"]) == (None, None)


def test_interrupt_ticks_and_machine_deltas() -> None:
    """irq + softirq of the first /proc/stat line; deltas need both readings."""
    text = "cpu  100 5 50 9000 20 3 7 0 0 0\ncpu0 50 2 25 4500 10 1 3 0 0 0\n"
    assert abuse.interrupt_ticks(text) == 10
    with pytest.raises(ValueError):
        abuse.interrupt_ticks("intr 1 2 3\n")
    assert abuse.machine_deltas((10.0, 1.0), (12.5, 1.25)) == (2.5, 0.25)
    assert abuse.machine_deltas(None, (12.5, 1.25)) == (None, None)


def test_summarise_without_rounds_has_no_figures() -> None:
    """A variant whose rounds were all cut by --max-seconds reports nothing rather than dividing by zero."""
    s = abuse.summarise("none", [])
    assert (s["requests"], s["cpu_us"], s["p50_us"], s["req_per_s"]) == (0, None, None, None)


def test_cost_of_checks_is_the_difference_to_the_baseline() -> None:
    """Our CPU, Redis's CPU and p50 beyond the baseline; unknown stays unknown."""
    variant = {"cpu_us": 500.0, "redis_cpu_us": 80.0, "p50_us": None}
    base = {"cpu_us": 120.0, "redis_cpu_us": 1.5, "p50_us": 100.0}
    assert abuse.cost_of_checks(variant, base) == {"cpu_us": 380.0, "redis_cpu_us": 78.5, "p50_us": None}


def test_spread_is_min_to_max() -> None:
    """Per-round figures as 'min-max'; none as '-'."""
    assert abuse.spread([130.2, 120.04, 125.0]) == "120.0-130.2"
    assert abuse.spread([]) == "-"


def test_render_report_compares_each_variant_with_its_baseline() -> None:
    """A baseline row has no cost; the others name their baseline and show the differences."""
    summaries = [
        abuse.summarise("none", [round_of("none", 100, 0.012, 0.0001, 0.0001)]),
        abuse.summarise("redis", [round_of("redis", 100, 0.05, 0.008, 0.001)]),
    ]
    text = abuse.render_report(summaries, {"none": "none", "redis": "none"})
    figures, trips = text.split("\n\n")
    lines = figures.splitlines()
    assert lines[1].split()[0] == "variant" and "Δ CPU µs" in lines[1]
    none_row, redis_row = lines[3].split(), lines[4].split()
    assert none_row[0] == "none" and none_row[-4:] == ["-", "-", "-", "-"]
    assert redis_row[0] == "redis" and redis_row[-4:] == ["none", "380.0", "79.0", "900.0"]
    assert "round trips" in trips and trips.splitlines()[-1].split()[-3:] == ["-", "0/1", "-"]


def test_selected_variants_add_the_baselines() -> None:
    """Asking for redis-key alone also runs none-key, which it is compared with; unknown names stop the run."""
    assert [v.name for v in abuse.selected_variants("redis-key")] == ["none-key", "redis-key"]
    assert [v.name for v in abuse.selected_variants(None)] == list(abuse.VARIANT_NAMES)
    with pytest.raises(SystemExit):
        abuse.selected_variants("redis,nope")


def test_every_baseline_is_a_variant_that_is_its_own_baseline() -> None:
    """Costs are always measured against a row that has no limits."""
    by_name = {v.name: v for v in abuse.VARIANTS}
    for variant in abuse.VARIANTS:
        base = by_name[variant.baseline]
        assert (base.baseline, base.controls) == (base.name, "none")


@pytest.mark.parametrize("url", ["redis://10.0.0.1:6379/12", "redis://localhost:6379/12", "http://127.0.0.1/"])
def test_check_redis_url_allows_only_127_0_0_1(url: str) -> None:
    """Another host, even localhost by name, or a malformed URL stops the run before any connection."""
    with pytest.raises(SystemExit):
        abuse.check_redis_url(url)


def test_check_redis_url_keeps_port_and_db() -> None:
    """The default db is 14: away from mailcow's db 0 and from the test suites' 11-13."""
    url = abuse.check_redis_url(abuse.DEFAULT_REDIS_URL)
    assert (url.host, url.port, url.db) == ("127.0.0.1", 6379, 14)


def test_parse_args_bounds_counts() -> None:
    """Counts must be positive and bounded; defaults finish well under a minute."""
    options = abuse.parse_args([])
    assert (options.requests, options.rounds, options.concurrency) == (2000, 3, 10)
    for bad in (["--requests", "0"], ["--concurrency", "-1"], ["--max-seconds", "0"]):
        with pytest.raises(SystemExit):
            abuse.parse_args(bad)
