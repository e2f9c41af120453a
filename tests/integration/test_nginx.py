"""deploy/nginx/site.smtpapi.custom in a real nginx (Debian's package), inside server blocks laid
out as mailcow-dockerized's nginx templates lay them out.

mailcow (data/conf/nginx/templates/nginx.conf.j2) serves its plain-HTTP port and its HTTPS port
in one server block unless HTTP_REDIRECT is set, and that block includes sites-default.conf, which
sets the real-IP rules, mailcow's own API location ``~ ^/api/v1/(.*)$`` and, last,
``include /etc/nginx/conf.d/site.*.custom``. The model below keeps exactly those parts (mailcow's
PHP API is a stand-in answering 200) and puts the route's file, unchanged but for the upstream's
address, where mailcow includes it. A recording HTTP server on loopback stands in for the service.
"""

from __future__ import annotations

import http.client
import http.server
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SNIPPET = REPO / "deploy" / "nginx" / "site.smtpapi.custom"
ROUTE = "/api/v1/send/email"
START_TIMEOUT = 20.0
BODY = json.dumps({"from": "sender@example.com", "to": ["r@example.org"], "subject": "s", "body": "b", "password": "mailbox-secret-1"}).encode()

NGINX_CONF = """\
user root;
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log notice;
events {{ worker_connections 64; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    server_tokens off;
    # mailcow's "Default Server Name" block without HTTP_REDIRECT: plain HTTP and HTTPS together.
    server {{
        listen 127.0.0.1:{http_port};
        listen 127.0.0.1:{https_port} ssl;
        ssl_certificate {prefix}/cert.pem;
        ssl_certificate_key {prefix}/key.pem;
        server_name mail.example.org;
        include {prefix}/includes/sites-default.conf;
    }}
}}
"""

SITES_DEFAULT = """\
client_max_body_size 0;
add_header Strict-Transport-Security "max-age=15768000;";
set_real_ip_from 10.0.0.0/8;
set_real_ip_from 172.16.0.0/12;
set_real_ip_from 192.168.0.0/16;
set_real_ip_from fc00::/7;
real_ip_header X-Forwarded-For;
real_ip_recursive on;
location ~ ^/api/v1/(.*)$ {{
    default_type application/json;
    return 200 '{{"mailcow_api": "$1"}}';
}}
include {prefix}/conf.d/site.*.custom;
"""


@dataclass
class Upstream:
    """The service's stand-in: records each request it gets and answers 200."""

    port: int
    requests: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Nginx:
    prefix: Path
    http_port: int
    https_port: int
    upstream: Upstream

    def request(self, method: str, path: str, body: bytes | None = None, tls: bool = False, **headers: str) -> tuple[int, bytes]:
        if tls:
            context = ssl.create_default_context(cafile=str(self.prefix / "cert.pem"))
            connection: http.client.HTTPConnection = http.client.HTTPSConnection(
                "localhost", self.https_port, timeout=10, context=context
            )
        else:
            connection = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=10)
        try:
            sent = {"Content-Type": "application/json", **{k.replace("_", "-"): v for k, v in headers.items()}}
            connection.request(method, path, body=body, headers=sent)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _upstream() -> tuple[Upstream, http.server.ThreadingHTTPServer]:
    upstream = Upstream(port=0)

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the library's name
            length = int(self.headers.get("Content-Length", "0"))
            upstream.requests.append({"path": self.path, "headers": dict(self.headers), "body": self.rfile.read(length)})
            answer = b'[{"type": "success"}]'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    upstream.port = int(server.server_address[1])
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return upstream, server


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    """nginx with mailcow's server layout and the route's file, in front of the recording upstream."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    assert Path(binary).exists(), "nginx is not installed (scripts/test.sh installs Debian's nginx package)"
    prefix = tmp_path_factory.mktemp("nginx")
    for folder in ("includes", "conf.d", "tmp"):
        (prefix / folder).mkdir()
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost", "-keyout", str(prefix / "key.pem"), "-out", str(prefix / "cert.pem")],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    upstream, server = _upstream()
    snippet = SNIPPET.read_text()
    assert "http://smtpapi:8080" in snippet
    (prefix / "conf.d" / "site.smtpapi.custom").write_text(snippet.replace("http://smtpapi:8080", f"http://127.0.0.1:{upstream.port}"))
    (prefix / "includes" / "sites-default.conf").write_text(SITES_DEFAULT.format(prefix=prefix))
    running = Nginx(prefix=prefix, http_port=_free_port(), https_port=_free_port(), upstream=upstream)
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, http_port=running.http_port, https_port=running.https_port))
    checked = subprocess.run([binary, "-t", "-p", str(prefix), "-c", str(conf)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr
    with open(prefix / "stderr.log", "wb") as log:
        process = subprocess.Popen([binary, "-p", str(prefix), "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert process.poll() is None, (prefix / "error.log").read_text(errors="replace")
            try:
                socket.create_connection(("127.0.0.1", running.https_port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "nginx did not listen in time"
                time.sleep(0.1)
        yield running
    finally:
        process.terminate()
        process.wait(10)
        server.shutdown()


def test_plain_http_to_the_send_route_is_refused_and_never_passed_on(nginx: Nginx) -> None:
    """Over mailcow's plain-HTTP port the route answers 403 smtp_https_required; the body, which
    holds a mailbox password, never reaches the service."""
    before = len(nginx.upstream.requests)
    status, body = nginx.request("POST", ROUTE, BODY)
    assert status == 403
    answer = json.loads(body)
    assert answer[0]["msg"] == "smtp_https_required" and "https://" in answer[0]["message"]
    assert len(nginx.upstream.requests) == before
    assert nginx.request("GET", ROUTE)[0] == 403  # whatever the method


def test_https_reaches_the_service_with_the_client_address(nginx: Nginx) -> None:
    """Over HTTPS the request goes to the service unchanged, with the address nginx believes."""
    status, body = nginx.request("POST", ROUTE, BODY, tls=True, X_Forwarded_For="203.0.113.9")
    assert (status, json.loads(body)) == (200, [{"type": "success"}])
    last = nginx.upstream.requests[-1]
    assert last["path"] == ROUTE and last["body"] == BODY
    assert last["headers"]["X-Forwarded-For"] == "127.0.0.1"  # loopback is not a trusted proxy here


def test_tls_ended_by_a_proxy_in_front_is_accepted(nginx: Nginx) -> None:
    """A proxy that ended TLS and forwards to mailcow's HTTP port says so with X-Forwarded-Proto."""
    before = len(nginx.upstream.requests)
    status, _ = nginx.request("POST", ROUTE, BODY, X_Forwarded_Proto="https")
    assert status == 200
    assert len(nginx.upstream.requests) == before + 1


def test_mailcows_own_api_is_untouched(nginx: Nginx) -> None:
    """Every other /api/v1/ path stays with mailcow's API location, over HTTP as over HTTPS."""
    for tls in (False, True):
        status, body = nginx.request("GET", "/api/v1/get/logs/postfix/10", tls=tls)
        assert (status, json.loads(body)) == (200, {"mailcow_api": "get/logs/postfix/10"})
