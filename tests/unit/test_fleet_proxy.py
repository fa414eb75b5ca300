"""The fleet-only proxy: what it forwards, what it refuses, the limits it holds each connection
to, and that bodies arrive intact.

The upstream here is a plain-HTTP echo server standing in for the SuperLink (the TLS
path, with a real SuperLink and SuperNodes, is in tests/e2e/test_flower_security.py).
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest

from fedrun_trainer.server.fleet_proxy import (
    MAX_ROUTES,
    ProxyConfig,
    ProxyThread,
    RefusedError,
    Traffic,
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


@contextlib.contextmanager
def _proxy_thread(upstream: ThreadingHTTPServer, **limits: Any) -> Iterator[ProxyThread]:
    """A started proxy in front of ``upstream`` with these ProxyConfig limits."""
    proxy = ProxyThread(
        ProxyConfig(
            listen_host="127.0.0.1",
            listen_port=0,
            upstream_host="127.0.0.1",
            upstream_port=upstream.server_address[1],
            **limits,
        )
    )
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


@contextlib.contextmanager
def _proxy(upstream: ThreadingHTTPServer, **limits: Any) -> Iterator[int]:
    """A proxy in front of ``upstream`` with these ProxyConfig limits; yields its port."""
    with _proxy_thread(upstream, **limits) as proxy:
        yield proxy.port


@pytest.fixture
def proxy_port(upstream: ThreadingHTTPServer) -> Iterator[int]:
    with _proxy(upstream, max_body_bytes=1024 * 1024) as port:
        yield port


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


# --- Audit findings: each test below failed against the proxy before they were fixed.


@pytest.mark.parametrize(
    "value",
    [
        b"a\nPOST /v1/control/stop-run HTTP/1.1",  # bare LF: a second request line
        b"a\rPOST /v1/control/stop-run HTTP/1.1",  # bare CR
        b"a\x00b",
        b"a\x1fb",
        b"a\x7fb",
    ],
    ids=["LF", "CR", "NUL", "US", "DEL"],
)
def test_control_characters_in_a_header_value_are_400_and_never_reach_the_superlink(
    proxy_port: int, value: bytes
) -> None:
    request = (
        b"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: x\r\nX-A: " + value + b"\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    assert _raw(proxy_port, request)[0] == 400
    assert _Echo.seen == []


def test_a_tab_inside_a_header_value_is_still_forwarded(proxy_port: int) -> None:
    status, answer = _raw(proxy_port, _post("/v1/fleet/pull-messages", b"", "X-A: a\tb\r\n"))
    assert status == 200
    assert json.loads(answer)["headers"]["x-a"] == "a\tb"


@pytest.mark.parametrize("name", [b"X A", b"X(A)", b"X@A", b"X/A", b"\x00X", b"X\x7f"])
def test_a_header_name_that_is_not_a_token_is_400(proxy_port: int, name: bytes) -> None:
    request = (
        b"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: x\r\n" + name + b": 1\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    assert _raw(proxy_port, request)[0] == 400
    assert _Echo.seen == []


@pytest.mark.parametrize("fold", [b" b", b"\tb", b" Content-Length: 5"])
def test_obsolete_line_folding_is_400(proxy_port: int, fold: bytes) -> None:
    request = (
        b"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: x\r\nX-A: a\r\n" + fold + b"\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    assert _raw(proxy_port, request)[0] == 400
    assert _Echo.seen == []


@pytest.mark.parametrize(
    "request_line",
    [
        b"GET /health HTTP/1.0",
        b"GET /health\x0b HTTP/1.1",
        b"G(T /health HTTP/1.1",
        b"GET  /health HTTP/1.1",
    ],
)
def test_the_request_line_is_exactly_method_sp_target_sp_http11(
    proxy_port: int, request_line: bytes
) -> None:
    assert _raw(proxy_port, request_line + b"\r\nHost: x\r\n\r\n")[0] == 400
    assert _Echo.seen == []


def test_a_get_with_a_body_is_400(proxy_port: int) -> None:
    # Forwarded without its Content-Length, the body would be a second request upstream.
    smuggled = b"POST /v1/control/stop-run HTTP/1.1\r\nContent-Length: 0\r\n\r\n"
    request = (
        b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(smuggled) + smuggled
    )
    assert _raw(proxy_port, request)[0] == 400
    assert _Echo.seen == []


def test_a_head_over_64_kib_is_431(proxy_port: int) -> None:
    request = _post("/v1/fleet/pull-messages", b"", "X-A: " + "a" * 70_000 + "\r\n")
    assert _raw(proxy_port, request)[0] == 431
    assert _Echo.seen == []


def test_refusals_log_the_request_line_but_never_header_values(
    proxy_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    request = _post("/v1/fleet/pull-messages", b"", "X-Secret: hunter2\nX-B: 1\r\n")
    forging = b"GET /health\nrefused-nothing HTTP/1.1\r\nHost: x\r\n\r\n"
    with caplog.at_level("WARNING", logger="fedrun.fleet_proxy"):
        assert _raw(proxy_port, request)[0] == 400
        assert _raw(proxy_port, forging)[0] == 400
    assert "refused POST /v1/fleet/pull-messages HTTP/1.1" in caplog.text
    assert "hunter2" not in caplog.text
    # A bare LF in the request line is logged escaped: it cannot start a log line.
    assert "refused GET /health\\x0arefused-nothing HTTP/1.1" in caplog.text
    assert all("\n" not in record.getMessage() for record in caplog.records)


def test_connections_over_the_cap_are_503_while_earlier_ones_are_held_open(
    upstream: ThreadingHTTPServer, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level("WARNING", logger="fedrun.fleet_proxy"),
        _proxy(upstream, max_connections=2) as port,
        contextlib.ExitStack() as sockets,
    ):
        held = [
            sockets.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
            for _ in range(2)
        ]
        for sock in held:  # a head that never ends keeps the connection open
            sock.sendall(b"POST /v1/fleet/push-object HTTP/1.1\r\n")
        # The proxy serves connections in the order it accepted them, so both held ones
        # are counted before this one is looked at. It is answered without sending anything.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as over:
            answer = b""
            while chunk := over.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 503 ")
        assert "max_connections" in caplog.text
        held[0].close()
        # A freed slot serves again, once the proxy has noticed the close. Until then each
        # try is refused: 503, or a reset when the refusal closes on the unread request.
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(ConnectionResetError):
                status = _raw(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")[0]
                if status != 503:
                    break
            assert time.monotonic() < deadline, "the closed connection's slot never freed"
            time.sleep(0.05)
        assert status == 200
    assert _Echo.seen == ["GET /health"]


def test_a_body_over_the_default_cap_is_413_before_the_superlink_sees_anything(
    upstream: ThreadingHTTPServer,
) -> None:
    with _proxy(upstream) as port:  # the default cap, 64 MiB
        request = (
            b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: %d\r\n\r\n" % (64 * 1024 * 1024 + 1)
        )
        assert _raw(port, request)[0] == 413
    assert _Echo.seen == []


def test_the_body_cap_is_inclusive() -> None:
    head = b"POST /v1/fleet/push-object HTTP/1.1\r\nContent-Length: %d\r\n\r\n"
    assert parse_head(head % 10, max_body_bytes=10).content_length == 10
    with pytest.raises(RefusedError) as refused:
        parse_head(head % 11, max_body_bytes=10)
    assert refused.value.status == 413


def test_a_slow_drip_body_is_cut_off_at_the_total_time_limit(
    upstream: ThreadingHTTPServer,
) -> None:
    # One byte every 0.3 s never trips the 2 s idle timeout; the 1 s total limit must.
    with (
        _proxy(upstream, request_timeout_s=1.0, idle_timeout_s=2.0) as port,
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
    ):
        sock.sendall(
            b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
        )
        started = time.monotonic()
        answer, closed = b"", False
        # 1000 bytes at 0.3 s would take 5 minutes: the proxy must end it long before 20 s.
        while not closed and time.monotonic() - started < 20:
            try:
                if select.select([sock], [], [], 0.3)[0]:
                    chunk = sock.recv(65536)
                    answer += chunk
                    closed = not chunk
                else:
                    sock.sendall(b"x")
            except (BrokenPipeError, ConnectionResetError):
                closed = True
        elapsed = time.monotonic() - started
    assert closed, "the proxy let a client drip its body for 20 s"
    assert elapsed >= 0.9
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408 ")


@pytest.mark.parametrize(
    "length",
    ["9" * 5000, "9" * 20, "+1", "1 1", "0x1", "1.0"],
    ids=["5000-digits", "20-digits", "plus", "space", "hex", "decimal"],
)
def test_a_content_length_that_is_not_1_to_19_digits_is_400_and_the_proxy_still_serves(
    proxy_port: int, length: str
) -> None:
    request = (
        f"POST /v1/fleet/push-object HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n"
    ).encode()
    assert _raw(proxy_port, request)[0] == 400
    assert _raw(proxy_port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200
    assert _Echo.seen == ["GET /health"]


def test_traffic_counts_forwarded_bodies_and_answers_per_route(
    upstream: ThreadingHTTPServer, caplog: pytest.LogCaptureFixture
) -> None:
    answers: list[bytes] = []
    with caplog.at_level("INFO", logger="fedrun.fleet_proxy"), _proxy_thread(upstream) as proxy:
        for body in (b"a" * 1000, b"b" * 10):
            request = _post("/v1/fleet/push-messages", body)
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
                sock.sendall(request)
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
            answers.append(data)
        assert _raw(proxy.port, b"GET /v1/control/start-run HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 404
    traffic = proxy.proxy.traffic
    assert list(traffic.routes) == ["/v1/fleet/push-messages"]  # refused requests are not counted
    route = traffic.routes["/v1/fleet/push-messages"]
    assert (route.requests, route.bytes_in) == (2, 1010)
    assert route.bytes_out == sum(len(a) for a in answers)
    assert "fleet proxy forwarded 2 requests, 1010 bytes in" in caplog.text


def test_traffic_keeps_a_bounded_number_of_routes() -> None:
    traffic = Traffic()
    for i in range(MAX_ROUTES + 10):
        traffic.add(f"/v1/fleet/rpc-{i}", 1, 2)
    assert len(traffic.routes) == MAX_ROUTES + 1 and traffic.routes["other"].requests == 10
    assert traffic.total().requests == MAX_ROUTES + 10
