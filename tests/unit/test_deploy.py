"""The deployment files: the container image, the mailcow compose override and nginx's route.

Docker does not run where these tests run, so no image is built here. What is checked instead:
the Dockerfile's and the compose file's settings, that the three files agree with each other and
with the service's own options, and the image's entry point command itself, run with the same
argv and the environment the compose file gives it (test values standing in for mailcow.conf).
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailcow_smtp_api.core.apikeys import client_address
from mailcow_smtp_api.core.config import Config, from_options

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
COMPOSE = REPO / "deploy" / "docker-compose.override.yml"
NGINX = REPO / "deploy" / "nginx" / "site.smtpapi.custom"
SERVICE = "smtpapi-mailcow"
ROUTE = "/api/v1/send/email"
VENV_BIN = Path(sys.executable).parent

# A mailcow.conf as generate_config.sh writes it (the keys the compose file reads, and secrets it
# must not pass on). IPV4_NETWORK is left out, as in a default installation.
MAILCOW_CONF = {
    "MAILCOW_HOSTNAME": "mail.example.org",
    "DBNAME": "mailcow",
    "DBUSER": "mailcow",
    "DBPASS": "TestDbPass123",
    "DBROOT": "TestRootPass456",
    "REDISPASS": "TestRedisPass789",
    "TZ": "Etc/UTC",
}

# Bounds for the process tests: generous against a slow machine, yet a hang fails in seconds.
START_DEADLINE = 15.0
STOP_DEADLINE = 10.0


# --------------------------------------------------------------------------- reading the files


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # Docker skips comment lines inside a continued instruction too
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, arguments = full.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    assert not pending, "the Dockerfile ends inside a continued instruction"
    return instructions


def dockerfile_one(instructions: list[tuple[str, str]], keyword: str) -> str:
    """The arguments of the only (or last, which is the one Docker uses) ``keyword`` instruction."""
    found = [arguments for name, arguments in instructions if name == keyword]
    assert found, f"the Dockerfile has no {keyword}"
    return found[-1]


def dockerfile_env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    """Every ``ENV key=value`` of the Dockerfile, later ones winning."""
    env: dict[str, str] = {}
    for name, arguments in instructions:
        if name == "ENV":
            for item in shlex.split(arguments):
                key, equals, value = item.partition("=")
                assert equals, f"ENV {item!r} is not in key=value form"
                env[key] = value
    return env


def healthcheck_command(arguments: str) -> list[str]:
    """The exec-form command of ``HEALTHCHECK [--flags] CMD [...]``."""
    _, cmd, rest = arguments.partition(" CMD ")
    assert cmd, "HEALTHCHECK has no CMD"
    command = json.loads(rest)
    assert isinstance(command, list) and all(isinstance(word, str) for word in command)
    return command


_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}|\$")


def interpolate(value: str, variables: Mapping[str, str]) -> str:
    """Compose's interpolation of ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}`` and ``$$``.

    Anything else (``$VAR`` without braces, ``${VAR:?err}``) and a variable that is neither set
    nor given a default raise ValueError: compose would warn and pass an empty string, which the
    service would then take for a real setting.
    """

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, operator, default = match.group(1), match.group(2), match.group(3)
        if name is None:
            raise ValueError(f"unsupported $ form in {value!r}")
        if operator == ":-" and variables.get(name, "") == "":
            return default
        if operator == "-" and name not in variables:
            return default
        if name not in variables:
            raise ValueError(f"{name} is not set and has no default in {value!r}")
        return variables[name]

    return _VARIABLE.sub(replace, value)


def compose_service() -> dict[str, Any]:
    """The service's definition, as YAML (compose's own file format) reads it."""
    document = yaml.safe_load(COMPOSE.read_text())
    service = document["services"][SERVICE]
    assert isinstance(service, dict)
    return service


def compose_environment(service: Mapping[str, Any], conf: Mapping[str, str]) -> dict[str, str]:
    """The environment compose gives the container, with ``conf`` standing in for mailcow.conf."""
    environment = service["environment"]
    assert isinstance(environment, dict), "environment is written as a mapping"
    return {key: interpolate(str(value), conf) for key, value in environment.items()}


# nginx's tokens: a quoted string (which may hold braces, semicolons and #), a comment, a word, or
# one of the three characters that end statements and open or close blocks.
_NGINX_TOKEN = re.compile(r"""'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|#[^\n]*|[;{}]|[^\s;{}'"#]+""")


def nginx_statements(text: str) -> list[tuple[int, list[str]]]:
    """(block depth, words) of each nginx statement; comments dropped, ``{`` and ``}`` kept as words,
    quoted strings kept whole (quotes included)."""
    statements: list[tuple[int, list[str]]] = []
    words: list[str] = []
    depth = 0
    for token in _NGINX_TOKEN.findall(text):
        if token.startswith("#"):
            continue
        if token == ";":
            if words:
                statements.append((depth, words))
            words = []
        elif token == "{":
            statements.append((depth, [*words, "{"]))
            words = []
            depth += 1
        elif token == "}":
            assert not words, f"statement without ';' before '}}': {words}"
            depth -= 1
        else:
            words.append(token)
    assert depth == 0 and not words, "unbalanced braces or an unfinished statement"
    return statements


def nginx_size(text: str) -> int:
    """An nginx size (``30m``, ``512k``, ``1g`` or bytes) in bytes; nginx's units are binary."""
    match = re.fullmatch(r"(\d+)([kKmMgG]?)", text)
    assert match, f"not an nginx size: {text!r}"
    scale = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[match.group(2).lower()]
    return int(match.group(1)) * scale


def route_directives() -> dict[str, list[list[str]]]:
    """The directives inside ``location = /api/v1/send/email``, by name."""
    statements = nginx_statements(NGINX.read_text())
    locations = [words for depth, words in statements if words[0] == "location"]
    assert locations == [["location", "=", ROUTE, "{"]], locations
    directives: dict[str, list[list[str]]] = {}
    for depth, words in statements:
        if depth == 1:
            directives.setdefault(words[0], []).append(words[1:])
    return directives


def listen_port(endpoint: str) -> int:
    """The port of a ``tcp:PORT[:options]`` Twisted endpoint description."""
    kind, port, *_ = endpoint.split(":")
    assert kind == "tcp", endpoint
    return int(port)


def image_config(conf: Mapping[str, str]) -> Config:
    """The Config the container builds: the image's ENV overlaid by the compose environment."""
    environ = dockerfile_env(dockerfile_instructions(DOCKERFILE.read_text()))
    environ.update(compose_environment(compose_service(), conf))
    return from_options({}, environ)


# --------------------------------------------------------------------------- the Dockerfile


def test_dockerfile_entry_point_runs_twistd_in_the_foreground_without_pid_file() -> None:
    """The entry point is ``twistd -n --pidfile= smtpapi``: foreground, logs to stdout, no pid file."""
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    assert json.loads(dockerfile_one(instructions, "ENTRYPOINT")) == ["twistd", "-n", "--pidfile=", "smtpapi"]
    assert "CMD" not in [name for name, _ in instructions]


def test_dockerfile_builds_on_a_slim_python_base() -> None:
    """The image starts from an official slim Python image the package supports (3.11 or later)."""
    base = dockerfile_one(dockerfile_instructions(DOCKERFILE.read_text()), "FROM")
    match = re.fullmatch(r"python:3\.(\d+)-slim", base)
    assert match and int(match.group(1)) >= 11, base


def test_dockerfile_runs_as_a_named_non_root_user() -> None:
    """The last USER is neither root nor uid 0, and a WORKDIR is set for the SQLite default."""
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    user = dockerfile_one(instructions, "USER").split(":")[0]
    assert user not in ("root", "0", "")
    assert dockerfile_one(instructions, "WORKDIR").startswith("/")


def test_dockerfile_listens_on_all_container_interfaces_on_the_exposed_port() -> None:
    """SMTPAPI_LISTEN has no interface restriction and its port is the EXPOSEd one."""
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    listen = dockerfile_env(instructions)["SMTPAPI_LISTEN"]
    assert "interface=" not in listen
    assert dockerfile_one(instructions, "EXPOSE").split() == [str(listen_port(listen))]


def test_dockerfile_healthcheck_asks_healthz_on_the_listening_port_with_python() -> None:
    """HEALTHCHECK runs python (slim images have no curl) against 127.0.0.1:<listen port>/healthz."""
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    command = healthcheck_command(dockerfile_one(instructions, "HEALTHCHECK"))
    port = listen_port(dockerfile_env(instructions)["SMTPAPI_LISTEN"])
    assert command[:2] == ["python", "-c"]
    assert "'/healthz'" in command[2]
    assert f"'127.0.0.1', {port}," in command[2]


def test_dockerignore_lets_through_exactly_what_the_dockerfile_copies() -> None:
    """.dockerignore excludes everything, re-includes each COPY source, and drops build leftovers."""
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    patterns = [
        line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"
    included = {pattern[1:].rstrip("/") for pattern in patterns if pattern.startswith("!")}
    copied = {arguments.split()[0].rstrip("/") for name, arguments in instructions if name == "COPY"}
    assert copied == included == {"setup.py", "constraints.txt", "src"}
    assert "src/twisted/plugins/dropin.cache" in patterns
    assert "src/*.egg-info" in patterns


# --------------------------------------------------------------------------- the compose override


def test_compose_service_joins_mailcow_network_with_an_alias_and_publishes_no_port() -> None:
    """The service is on mailcow-network under an alias and has no ports (nginx is the way in)."""
    service = compose_service()
    assert list(service["networks"]) == ["mailcow-network"]
    assert service["networks"]["mailcow-network"]["aliases"]
    assert "ports" not in service
    assert "network_mode" not in service


def test_compose_service_starts_after_mailcow_database_and_postfix() -> None:
    """depends_on names mysql-mailcow and postfix-mailcow."""
    assert {"mysql-mailcow", "postfix-mailcow"} <= set(compose_service()["depends_on"])


def test_compose_service_restarts_and_is_built_not_pulled() -> None:
    """It restarts like mailcow's services, and `docker compose pull` skips it (pull_policy build)."""
    service = compose_service()
    assert service["restart"] == "always"
    assert service["pull_policy"] == "build"
    assert service["build"]["context"]
    assert service["image"]


def test_compose_healthcheck_is_the_image_healthcheck() -> None:
    """The compose healthcheck runs the same probe as the Dockerfile's HEALTHCHECK."""
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    image_probe = healthcheck_command(dockerfile_one(instructions, "HEALTHCHECK"))
    assert compose_service()["healthcheck"]["test"] == ["CMD", *image_probe]


def test_compose_passes_mailcow_database_settings_but_not_the_rest_of_mailcow_conf() -> None:
    """DBNAME/DBUSER/DBPASS come from mailcow.conf; its other secrets (DBROOT...) are not passed."""
    service = compose_service()
    environment = compose_environment(service, MAILCOW_CONF)
    assert "env_file" not in service
    assert {key: environment[key] for key in ("DBNAME", "DBUSER", "DBPASS")} == {
        "DBNAME": "mailcow",
        "DBUSER": "mailcow",
        "DBPASS": "TestDbPass123",
    }
    assert "DBROOT" not in environment and "REDISPASS" not in environment
    assert MAILCOW_CONF["DBROOT"] not in environment.values()


def test_compose_environment_gives_the_mailcow_configuration() -> None:
    """Image ENV plus compose environment: MariaDB from mailcow.conf, postfix 587 named by MAILCOW_HOSTNAME."""
    config = image_config(MAILCOW_CONF)
    assert config.db == "mysql://mailcow:TestDbPass123@mysql-mailcow:3306/mailcow"
    assert (config.smtp_host, config.smtp_port) == ("postfix-mailcow", 587)
    assert config.smtp_tls_name == "mail.example.org"
    assert config.smtp_helo == "mail.example.org"
    assert config.smtp_tls_verify
    assert config.listen == "tcp:8080"
    assert config.trusted_proxies == ("172.22.1.0/24",)


def test_compose_trusts_the_mailcow_network_mailcow_conf_configures() -> None:
    """With IPV4_NETWORK set in mailcow.conf, that /24 is the trusted proxy network."""
    config = image_config({**MAILCOW_CONF, "IPV4_NETWORK": "10.99.5"})
    assert config.trusted_proxies == ("10.99.5.0/24",)


def test_compose_interpolation_needs_every_variable_it_has_no_default_for() -> None:
    """A mailcow.conf without MAILCOW_HOSTNAME is refused here rather than giving an empty TLS name."""
    without_hostname = {key: value for key, value in MAILCOW_CONF.items() if key != "MAILCOW_HOSTNAME"}
    with pytest.raises(ValueError, match="MAILCOW_HOSTNAME"):
        compose_environment(compose_service(), without_hostname)


# --------------------------------------------------------------------------- nginx's route


def test_nginx_routes_only_the_send_path_to_the_service_alias_and_port() -> None:
    """One exact-match location proxies, URI unchanged, to the compose alias on the image's port."""
    directives = route_directives()
    (target,) = directives["proxy_pass"]
    upstream = target[0]
    if upstream.startswith("$"):
        sets = {words[0]: words[1] for words in directives["set"]}
        upstream = sets[upstream]
    match = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", upstream)
    assert match, f"{upstream!r} is not http://host:port without a URI part"
    service = compose_service()
    assert match.group(1) in [SERVICE, *service["networks"]["mailcow-network"]["aliases"]]
    assert int(match.group(2)) == listen_port(image_config(MAILCOW_CONF).listen)


def test_nginx_resolves_the_service_per_request_over_ipv4_through_docker_dns() -> None:
    """A variable upstream with Docker's resolver (nginx starts without the service); IPv4 like the listener."""
    directives = route_directives()
    assert directives["proxy_pass"][0][0].startswith("$")
    (resolver,) = directives["resolver"]
    assert resolver[0] == "127.0.0.11"
    assert "ipv6=off" in resolver
    assert image_config(MAILCOW_CONF).listen.startswith("tcp:")


def test_nginx_forwards_the_client_address_it_believes_and_nothing_the_client_wrote() -> None:
    """X-Forwarded-For is nginx's $remote_addr alone, and the service believes it from nginx only.

    nginx-mailcow gets a dynamic address in mailcow-network's subnet (here 172.22.1.7); a peer
    outside it that sends the header itself is taken at its own address.
    """
    directives = route_directives()
    headers = {words[0].lower(): words[1:] for words in directives["proxy_set_header"]}
    assert headers["x-forwarded-for"] == ["$remote_addr"]
    trusted = image_config(MAILCOW_CONF).trusted_proxies
    assert client_address("172.22.1.7", "203.0.113.7", trusted) == "203.0.113.7"
    assert client_address("198.51.100.2", "203.0.113.7", trusted) == "198.51.100.2"


def test_nginx_body_limit_equals_the_service_request_limit() -> None:
    """client_max_body_size is the service's --max-request-bytes, which the compose file sets."""
    (size,) = route_directives()["client_max_body_size"]
    assert nginx_size(size[0]) == image_config(MAILCOW_CONF).max_request_bytes


def test_nginx_waits_longer_than_several_smtp_steps() -> None:
    """proxy_read_timeout outlasts several --smtp-timeout steps, so nginx does not cut a send short."""
    (timeout,) = route_directives()["proxy_read_timeout"]
    seconds = int(timeout[0].rstrip("s"))
    assert seconds >= 5 * image_config(MAILCOW_CONF).smtp_timeout


# --------------------------------------------------------------------------- the entry point, run


def entry_point_environment(overrides: Mapping[str, str]) -> dict[str, str]:
    """What the container's process gets: the image ENV, the compose environment, ``overrides``.

    PATH finds this checkout's twistd (the image's is on its PATH); nothing else of the caller's
    environment leaks in, so a developer's SMTPAPI_* variables cannot change the outcome.
    """
    environment = dockerfile_env(dockerfile_instructions(DOCKERFILE.read_text()))
    environment.update(compose_environment(compose_service(), MAILCOW_CONF))
    environment.update(overrides)
    environment["PATH"] = os.pathsep.join([str(VENV_BIN), "/usr/bin", "/bin"])
    return environment


def entry_point() -> list[str]:
    """The image's ENTRYPOINT argv, exactly."""
    argv = json.loads(dockerfile_one(dockerfile_instructions(DOCKERFILE.read_text()), "ENTRYPOINT"))
    assert isinstance(argv, list) and all(isinstance(word, str) for word in argv)
    assert (VENV_BIN / argv[0]).exists(), f"{argv[0]} is not installed in {VENV_BIN}"
    return argv


def read_lines(stream: Any, lines: queue.Queue[str | None]) -> None:
    """Copy a process's output into ``lines`` line by line; None marks its end."""
    for line in iter(stream.readline, ""):
        lines.put(line)
    lines.put(None)


def wait_for_line(lines: queue.Queue[str | None], pattern: re.Pattern[str], seen: list[str]) -> re.Match[str]:
    """The first output line matching ``pattern``, read within START_DEADLINE."""
    deadline = time.monotonic() + START_DEADLINE
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, "no match within the deadline; output so far:\n" + "".join(seen)
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            continue
        assert line is not None, "the process ended; output:\n" + "".join(seen)
        seen.append(line)
        match = pattern.search(line)
        if match:
            return match


def get_healthz(port: int) -> tuple[int, bytes]:
    """GET /healthz on 127.0.0.1:port."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def run_probe(port: int) -> int:
    """Exit status of the image's HEALTHCHECK command, aimed at ``port`` instead of the image's."""
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    command = healthcheck_command(dockerfile_one(instructions, "HEALTHCHECK"))
    image_port = listen_port(dockerfile_env(instructions)["SMTPAPI_LISTEN"])
    code = command[2].replace(f"'127.0.0.1', {image_port},", f"'127.0.0.1', {port},")
    assert code != command[2]
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=STOP_DEADLINE, check=False)
    return probe.returncode


@dataclass
class Running:
    """A started entry point: its port, process, output queue and the output lines read so far."""

    port: int
    process: subprocess.Popen[str]
    lines: queue.Queue[str | None]
    seen: list[str]

    def rest_of_output(self) -> str:
        """Everything the process printed, once it has ended (read within STOP_DEADLINE)."""
        deadline = time.monotonic() + STOP_DEADLINE
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                return "".join(self.seen)
            self.seen.append(line)
        raise AssertionError("output did not end; so far:\n" + "".join(self.seen))


@pytest.fixture
def sidecar(tmp_path: Path) -> Iterator[Running]:
    """The entry point started as the container starts it, on a free loopback port, over SQLite.

    Stops the process afterwards if the test has not.
    """
    database = tmp_path / "smtpapi.sqlite"
    init = subprocess.run(
        [str(VENV_BIN / "smtpapi-admin"), "--db", f"sqlite:{database}", "init"],
        capture_output=True,
        text=True,
        timeout=STOP_DEADLINE,
        env=entry_point_environment({}),
        cwd=tmp_path,
        check=False,
    )
    assert init.returncode == 0, init.stderr
    environment = entry_point_environment(
        {"SMTPAPI_LISTEN": "tcp:0:interface=127.0.0.1", "SMTPAPI_DB": f"sqlite:{database}"}
    )
    process = subprocess.Popen(
        entry_point(),
        env=environment,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=read_lines, args=(process.stdout, lines), daemon=True).start()
    seen: list[str] = []
    try:
        # Port 0 lets the system pick a free port; twisted.web's Site logs the one it got.
        started = wait_for_line(lines, re.compile(r"Site starting on (\d+)"), seen)
        wait_for_line(lines, re.compile(r"database schema: ok"), seen)
        yield Running(int(started.group(1)), process, lines, seen)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_DEADLINE)


def test_entry_point_help_lists_the_options_with_their_environment_names() -> None:
    """``twistd -n --pidfile= smtpapi --help`` with the compose environment exits 0 and documents SMTPAPI_*."""
    result = subprocess.run(
        [*entry_point(), "--help"],
        env=entry_point_environment({}),
        capture_output=True,
        text=True,
        timeout=START_DEADLINE,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for option in ("--listen", "--db", "--smtp-tls-name", "--trusted-proxies"):
        assert option in result.stdout
    assert "SMTPAPI_TRUSTED_PROXIES" in result.stdout


def test_entry_point_serves_healthz_and_stops_on_sigterm(sidecar: Running) -> None:
    """Started as the container starts it, the service answers /healthz, passes the image's probe,
    logs to stdout, and shuts down on SIGTERM (docker stop), after which the probe fails."""
    status, body = get_healthz(sidecar.port)
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    assert run_probe(sidecar.port) == 0
    sidecar.process.send_signal(signal.SIGTERM)
    # twistd stops the reactor and its services, then ends by the signal that stopped it, which
    # docker reports as exit status 143 (128 + SIGTERM).
    assert sidecar.process.wait(timeout=STOP_DEADLINE) == -signal.SIGTERM
    output = sidecar.rest_of_output()
    assert "Received SIGTERM, shutting down." in output
    assert "Main loop terminated." in output
    assert run_probe(sidecar.port) != 0


def test_entry_point_with_the_compose_environment_refuses_a_bad_setting(tmp_path: Path) -> None:
    """A bad value in the compose environment stops the entry point at once with a one-line reason."""
    result = subprocess.run(
        entry_point(),
        env=entry_point_environment({"SMTPAPI_TRUSTED_PROXIES": "nginx-mailcow"}),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=START_DEADLINE,
        check=False,
    )
    assert result.returncode != 0
    assert "--trusted-proxies: 'nginx-mailcow' is not an IP address or network" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_state_database_lives_on_a_writable_volume() -> None:
    """With a read-only root, the default --state-db file (relative to WORKDIR) sits on a named volume."""
    service = compose_service()
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    workdir = dockerfile_one(instructions, "WORKDIR")
    default_state = Config().state_db
    assert default_state.startswith("sqlite:") and not default_state[len("sqlite:"):].startswith("/")
    assert service["read_only"] is True
    mounts = {entry.split(":")[1]: entry.split(":")[0] for entry in service["volumes"]}
    assert workdir in mounts
    document = yaml.safe_load(COMPOSE.read_text())
    assert mounts[workdir] in document["volumes"]
