"""The fleet-only proxy: what it forwards, what it refuses, and that bodies arrive intact.

The upstream here is a plain-HTTP echo server standing in for the SuperLink (the TLS
path, with a real SuperLink and SuperNodes, is in tests/e2e/test_flower_security.py).
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from fedrun_trainer.fleet_proxy import (
    ProxyConfig,
    ProxyThread,
    RefusedError,
    allowed,
    parse_head,
)


class _Echo(BaseHTTPRequestHandler):
    """Answers every request with what it received, as JSON; records each request."""

    seen: ClassVar[list[str]] = []

    def _echo(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.seen.append(f"{self.command} {self.path}")
        out = json.dumps(
            {
                "method": self.command,
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "body_hex": body.hex(),
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def do_GET(self) -> None:
        self._echo()

    def do_POST(self) -> None:
        self._echo()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[ThreadingHTTPServer]:
    _Echo.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def proxy_port(upstream: ThreadingHTTPServer) -> Iterator[int]:
    proxy = ProxyThread(
        ProxyConfig(
            listen_host="127.0.0.1",
            listen_port=0,
            upstream_host="127.0.0.1",
            upstream_port=upstream.server_address[1],
            max_body_bytes=1024 * 1024,
        )
    )
    proxy.start()
    yield proxy.port
    proxy.stop()


def _raw(port: int, request: bytes) -> tuple[int, bytes]:
    """Send raw bytes, read the whole answer (the proxy always closes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]


def _post(path: str, body: bytes, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/protobuf\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def test_fleet_request_reaches_the_superlink_with_body_and_headers_intact(
    proxy_port: int,
) -> None:
    body = bytes(range(256)) * 1000  # binary, larger than one read
    status, answer = _raw(
        proxy_port, _post("/v1/fleet/pull-messages", body, "X-Flwr-Signature: abc\r\n")
    )
    assert status == 200
    echoed = json.loads(answer)
    assert echoed["path"] == "/v1/fleet/pull-messages"
    assert bytes.fromhex(echoed["body_hex"]) == body
    assert echoed["headers"]["x-flwr-signature"] == "abc"
    # Each forwarded request gets its own upstream connection, closed after the answer.
    assert echoed["headers"]["connection"] == "close"


def test_health_is_forwarded(proxy_port: int) -> None:
    status, answer = _raw(proxy_port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200
    assert json.loads(answer)["path"] == "/health"


@pytest.mark.parametrize(
    "path",
    [
        "/v1/control/start-run",
        "/v1/control/stop-run",
        "/v1/control/register-node",
        "/v1/control/list-runs",
        "/v1/runtime/acquire-task",
        "/v1/fleet/../control/start-run",
        "/v1/fleet/%2e%2e/control/start-run",
        "/v1/fleet//../control/stop-run",
        "/v1/fleet/pull-messages?x=/v1/control",
        "http://127.0.0.1/v1/control/start-run",
        "/V1/FLEET/pull-messages",
        "/docs",
        "/openapi.json",
    ],
)
def test_everything_but_the_fleet_api_is_404_and_never_reaches_the_superlink(
    proxy_port: int, path: str
) -> None:
    status, _ = _raw(proxy_port, _post(path, b"\x00"))
    assert status == 404
    assert _Echo.seen == []


def test_get_on_a_fleet_path_and_post_on_health_are_refused(proxy_port: int) -> None:
    assert _raw(proxy_port, b"GET /v1/fleet/pull-messages HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 404
    assert _raw(proxy_port, _post("/health", b""))[0] == 404
    assert _Echo.seen == []


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        # A chunked body could hide a second request from a proxy that frames by length.
        (
            b"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            501,
        ),
        (
            b"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 1\r\nContent-Length: 40\r\n\r\nx",
            400,
        ),
        (b"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
        (b"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: x\r\n\r\n", 411),
        (
            b"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 99999999999\r\n\r\n",
            413,
        ),
        (b"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost : x\r\nContent-Length: 0\r\n\r\n", 400),
        (b"POST /v1/fleet/pull-messages HTTP/2.0\r\nContent-Length: 0\r\n\r\n", 400),
        (b"garbage\r\n\r\n", 400),
    ],
)
def test_requests_the_proxy_will_not_frame_are_refused(
    proxy_port: int, request_bytes: bytes, status: int
) -> None:
    assert _raw(proxy_port, request_bytes)[0] == status
    assert _Echo.seen == []


def test_a_pipelined_second_request_never_reaches_the_superlink(proxy_port: int) -> None:
    smuggled = _post("/v1/fleet/pull-messages", b"a") + _post("/v1/control/stop-run", b"b")
    status, _ = _raw(proxy_port, smuggled)
    assert status == 200
    assert _Echo.seen == ["POST /v1/fleet/pull-messages"]


def test_unreachable_superlink_is_502() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    proxy = ProxyThread(
        ProxyConfig(
            listen_host="127.0.0.1",
            listen_port=0,
            upstream_host="127.0.0.1",
            upstream_port=dead_port,
        )
    )
    proxy.start()
    try:
        assert _raw(proxy.port, _post("/v1/fleet/pull-messages", b"x"))[0] == 502
    finally:
        proxy.stop()


def test_allowed_is_exactly_fleet_posts_and_health_gets() -> None:
    assert allowed("POST", "/v1/fleet/activate-node")
    assert allowed("GET", "/health")
    assert not allowed("POST", "/v1/fleet/")
    assert not allowed("PUT", "/v1/fleet/push-messages")
    assert not allowed("POST", "/v1/runtime/acquire-task")


def test_parse_head_drops_hop_by_hop_headers() -> None:
    head = parse_head(
        b"POST /v1/fleet/push-messages HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, X-A\r\n"
        b"Upgrade: h2c\r\nContent-Length: 3\r\nX-A: 1\r\n\r\n"
    )
    assert head.content_length == 3
    assert [name.lower() for name, _ in head.headers] == ["host"]
    with pytest.raises(RefusedError) as refused:
        parse_head(b"POST /v1/control/start-run HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    assert refused.value.status == 404


def test_refused_requests_are_logged_with_the_request_line(
    proxy_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING", logger="fedrun.fleet_proxy"):
        assert _raw(proxy_port, _post("/v1/control/stop-run", b"x"))[0] == 404
    assert "refused POST /v1/control/stop-run HTTP/1.1" in caplog.text
    assert "404" in caplog.text
