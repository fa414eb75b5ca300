"""A fleet-only reverse proxy for the Flower SuperLink (flwr 1.41).

flwr 1.41 serves its Fleet (``/v1/fleet``), Control (``/v1/control``) and Runtime
(``/v1/runtime``) APIs on ONE uvicorn port (HTTP/1.1, protobuf bodies); the old
``--fleet-api-address``/``--control-api-address`` flags are deprecated and ignored for
HTTP. The open-source Control API has no authentication: whoever reaches it can start
and stop runs and register SuperNode keys (which defeats ``--enable-supernode-auth``).
So the SuperLink listens on 127.0.0.1 only, and this proxy listens on the pod's fleet
port, terminates TLS with the run's server certificate, and forwards exactly two kinds
of request to the SuperLink over TLS on loopback:

- ``POST /v1/fleet/<rpc>`` (what a SuperNode sends), and
- ``GET /health``.

Everything else is answered ``404`` without touching the SuperLink. A TCP-level proxy
could not filter paths inside TLS, hence an HTTP proxy that terminates TLS itself.

Each forwarded request gets its own upstream connection and ``Connection: close``:
exactly ``Content-Length`` body bytes go upstream, so a client cannot smuggle a second
request onto the SuperLink connection. The request head is parsed strictly
(:func:`parse_head`): request line ``METHOD SP target SP HTTP/1.1``, header names that
are RFC 9110 tokens, header values without control characters, no obsolete line
folding, ``Content-Length`` as 1 to 19 ASCII digits; ``Transfer-Encoding`` and bodies
on ``GET`` are refused. Each connection is bounded in number
(:attr:`ProxyConfig.max_connections`), in body size (:attr:`ProxyConfig.max_body_bytes`),
in time between reads (:attr:`ProxyConfig.idle_timeout_s`) and in total time
(:attr:`ProxyConfig.request_timeout_s`). Every refusal is a short fixed-text answer and
one log line with the request line and the peer, never header values or bodies.

The proxy counts what it forwards per request target (:class:`Traffic`: requests, body
bytes in, answer bytes out); a :class:`ProxyThread` logs the totals when it stops.

Run it standalone (``python -m fedrun_trainer.server.fleet_proxy --help``) or in a thread
(:class:`ProxyThread`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import re
import signal
import ssl
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("fedrun.fleet_proxy")

# Flower's fleet RPC names are lower-case words joined by dashes
# (register-node, pull-messages, ...). Anything else (dot segments, percent-escapes,
# query strings, absolute-form targets, double slashes) is refused, so the SuperLink's
# router can never be steered to another prefix.
_FLEET_TARGET = re.compile(r"/v1/fleet/[a-z][a-z0-9-]{0,63}")
_HEALTH_TARGET = "/health"
# RFC 9110 5.1 / 5.6.2: a field name (and a method) is a token.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# RFC 9110 5.5: a field value holds visible ASCII, SP and HTAB; no other control character
# (a bare CR or LF could start a new line on a lenient backend). obs-text is refused too.
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e]*")
# A request target: visible ASCII only (RFC 9112 3.2); allowed() narrows it further.
_TARGET = re.compile(r"[\x21-\x7e]+")
# 19 digits stay below 2**63 and far below Python's int() digit limit.
_CONTENT_LENGTH = re.compile(r"[0-9]{1,19}")
# Headers that describe one hop, not the request: never forwarded.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "te",
        "trailer",
        "upgrade",
    }
)
_MAX_HEAD_BYTES = 64 * 1024
# Flower 1.41 splits every array into chunks of at most 5 MiB
# (FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE) and pushes each chunk as its own push-object body;
# the other Fleet requests are small protobufs. 64 MiB leaves more than tenfold headroom
# (for a raised chunk size) while bounding what one client can make the proxy stream.
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
# A SuperNode holds about four connections at once (its main loop, its heartbeat, two
# concurrent object pushes or pulls); a run has at most 50 hospitals (the CRD's bound).
DEFAULT_MAX_CONNECTIONS = 256
DEFAULT_IDLE_TIMEOUT_S = 60.0
# One request is at most one array chunk plus Flower's answer (no Fleet RPC long-polls):
# seconds inside a cluster, so two minutes only cuts off clients that drip on purpose.
DEFAULT_REQUEST_TIMEOUT_S = 120.0
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class ProxyConfig:
    """Where the proxy listens, where it forwards to, and its limits.

    ``server_ssl`` is the TLS context presented to SuperNodes (the run's server
    certificate; None serves plain HTTP, for tests only). ``upstream_ssl`` verifies the
    SuperLink's certificate on loopback (None connects in plain HTTP). ``upstream_hostname``
    is the name checked against that certificate (``127.0.0.1`` by default, which is why
    the run's server certificate must cover 127.0.0.1).

    Limits, each answered with a fixed-text error and a log line:

    - ``max_body_bytes``: the largest ``Content-Length`` forwarded; larger is ``413``
      before any body byte is read.
    - ``max_connections``: client connections served at once (counted from the end of
      the TLS handshake); one more is answered ``503`` and closed without being read.
    - ``idle_timeout_s``: the longest wait for the request head, for each body read, for
      the SuperLink's connection and for each read of its answer (also bounds the TLS
      handshake).
    - ``request_timeout_s``: the longest one connection may take from its first request
      byte to the end of the SuperLink's answer, however steadily bytes trickle in.
    """

    listen_host: str
    listen_port: int
    upstream_host: str
    upstream_port: int
    server_ssl: ssl.SSLContext | None = None
    upstream_ssl: ssl.SSLContext | None = None
    upstream_hostname: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S


class RefusedError(Exception):
    """A request the proxy answers itself, with this status and reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def allowed(method: str, target: str) -> bool:
    """Whether the proxy forwards a request with this method and request target."""
    if method == "POST":
        return _FLEET_TARGET.fullmatch(target) is not None
    if method == "GET":
        return target == _HEALTH_TARGET
    return False


@dataclass(frozen=True)
class _Head:
    method: str
    target: str
    headers: list[tuple[str, str]]
    content_length: int

    @property
    def request_line(self) -> str:
        return f"{self.method} {self.target} HTTP/1.1"


def parse_head(raw: bytes, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> _Head:
    """Parse and vet an HTTP/1.1 request head (up to and including the blank line).

    Raises :class:`RefusedError` with the status the client gets: 400 for a malformed
    head (anything but ``METHOD SP target SP HTTP/1.1``, a header name that is not a
    token, a control character in a value, obsolete line folding, a malformed or
    repeated ``Content-Length``, a body on ``GET``), 404 for anything but the fleet API
    and the health check, 411/413/501 for bodies the proxy will not frame.
    """
    if not raw.endswith(b"\r\n\r\n"):
        raise RefusedError(400, "Bad Request")
    try:
        text = raw[:-4].decode("ascii")
    except UnicodeDecodeError as exc:
        raise RefusedError(400, "Bad Request") from exc
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if (
        len(parts) != 3
        or _TOKEN.fullmatch(parts[0]) is None
        or _TARGET.fullmatch(parts[1]) is None
        or parts[2] != "HTTP/1.1"
    ):
        raise RefusedError(400, "Bad Request")
    method, target, _ = parts
    if not allowed(method, target):
        raise RefusedError(404, "Not Found")
    headers: list[tuple[str, str]] = []
    lengths: list[str] = []
    named: set[str] = set()
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        # A name must be a token right up to the colon: this also refuses empty lines,
        # whitespace before the colon and obsolete line folding (a line that starts with
        # SP or HTAB), RFC 9112 5.1-5.2.
        if not sep or _TOKEN.fullmatch(name) is None:
            raise RefusedError(400, "Bad Request")
        value = value.strip(" \t")
        if _FIELD_VALUE.fullmatch(value) is None:
            raise RefusedError(400, "Bad Request")
        lower = name.lower()
        if lower == "transfer-encoding":
            raise RefusedError(501, "Not Implemented")
        if lower == "content-length":
            lengths.append(value)
            continue
        if lower == "connection":
            # Headers the client names in Connection are hop-by-hop too (RFC 9110 7.6.1).
            named.update(token.strip(" \t").lower() for token in value.split(","))
        if lower in _HOP_BY_HOP:
            continue
        headers.append((name, value))
    headers = [(name, value) for name, value in headers if name.lower() not in named]
    if len(lengths) > 1 or (lengths and _CONTENT_LENGTH.fullmatch(lengths[0]) is None):
        raise RefusedError(400, "Bad Request")
    length = int(lengths[0]) if lengths else 0
    if method == "POST" and not lengths:
        raise RefusedError(411, "Length Required")
    if method == "GET" and length:
        # Nothing would tell the SuperLink where such a body ends.
        raise RefusedError(400, "Bad Request")
    if length > max_body_bytes:
        raise RefusedError(413, "Content Too Large")
    return _Head(method, target, headers, length)


def _upstream_head(head: _Head) -> bytes:
    lines = [head.request_line]
    lines += [f"{name}: {value}" for name, value in head.headers]
    if head.method == "POST":
        lines.append(f"Content-Length: {head.content_length}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def _reply(status: int, reason: str) -> bytes:
    body = f"{status} {reason}\n".encode("ascii")
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode("ascii") + body


def _printable(line: bytes) -> str:
    """A client's request line, fit for one log line: at most 200 bytes, escaped."""
    return "".join(chr(b) if 0x20 <= b < 0x7F else f"\\x{b:02x}" for b in line[:200])


@dataclass
class RouteTraffic:
    """Forwarded requests to one target: how many, body bytes in, answer bytes out."""

    requests: int = 0
    bytes_in: int = 0
    bytes_out: int = 0

    def add(self, other: RouteTraffic) -> None:
        self.requests += other.requests
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out


#: Distinct request targets counted apart; further ones are summed under ``other``
#: (Flower's Fleet API has about ten; a client cannot grow the table without bound).
MAX_ROUTES = 32


@dataclass
class Traffic:
    """What the proxy forwarded, per request target (``/v1/fleet/push-messages``, ...).

    Bytes in are request bodies sent to the SuperLink; bytes out are the SuperLink's
    answers (head and body) sent back to the client, as counted before TLS.
    """

    routes: dict[str, RouteTraffic] = field(default_factory=dict)

    def add(self, target: str, bytes_in: int, bytes_out: int) -> None:
        """Count one forwarded request."""
        key = target if target in self.routes or len(self.routes) < MAX_ROUTES else "other"
        route = self.routes.setdefault(key, RouteTraffic())
        route.add(RouteTraffic(1, bytes_in, bytes_out))

    def total(self) -> RouteTraffic:
        """Every route summed."""
        out = RouteTraffic()
        for route in self.routes.values():
            out.add(route)
        return out

    def summary(self) -> str:
        """One line: totals, then each route (largest first)."""
        total = self.total()
        routes = sorted(self.routes.items(), key=lambda kv: -(kv[1].bytes_in + kv[1].bytes_out))
        parts = [
            f"{target.rsplit('/', 1)[-1]} {r.requests} ({r.bytes_in} in, {r.bytes_out} out)"
            for target, r in routes
        ]
        return (
            f"fleet proxy forwarded {total.requests} requests, {total.bytes_in} bytes in, "
            f"{total.bytes_out} bytes out" + (f": {'; '.join(parts)}" if parts else "")
        )


class _Exchange:
    """What one connection has got to: for the log line and the answer on a timeout."""

    def __init__(self) -> None:
        self.request_line = "<no request head>"
        self.phase = "head"  # head -> upstream (connecting) -> body -> upstream -> answer


class FleetProxy:
    """The proxy as an asyncio server: ``await start()``, then ``await close()``."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self._server: asyncio.Server | None = None
        self._open = 0
        self._tasks: set[asyncio.Task[Any]] = set()  # one per open client connection
        self.traffic = Traffic()

    @property
    def port(self) -> int:
        """The port actually bound (useful when ``listen_port`` was 0)."""
        if self._server is None:
            raise RuntimeError("proxy not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        """Bind and start accepting connections."""
        cfg = self.config
        self._server = await asyncio.start_server(
            self._handle,
            cfg.listen_host,
            cfg.listen_port,
            limit=_MAX_HEAD_BYTES,
            ssl=cfg.server_ssl,
            ssl_handshake_timeout=cfg.idle_timeout_s if cfg.server_ssl is not None else None,
        )

    async def close(self) -> None:
        """Stop accepting and cut the connections in flight; returns once they are closed."""
        if self._server is not None:
            self._server.close()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        counted = self._open < self.config.max_connections
        if counted:
            self._open += 1
        try:
            if counted:
                await self._serve(reader, writer, peer)
            else:
                log.warning(
                    "refused a connection from %s: %d connections open (max_connections): "
                    "503 Service Unavailable",
                    peer,
                    self._open,
                )
                writer.write(_reply(503, "Service Unavailable"))
        except asyncio.CancelledError:
            pass  # close() cut the connection; asyncio would log a cancelled handler as an error
        except Exception:
            # A bug must cost one connection, never the server task.
            log.exception("fleet proxy failed serving %s", peer)
        finally:
            await self._close(writer)
            if counted:
                self._open -= 1

    async def _close(self, writer: asyncio.StreamWriter) -> None:
        """Close the client connection, sending what is buffered; bounded in time."""
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), self.config.idle_timeout_s)

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: object
    ) -> None:
        exchange = _Exchange()
        try:
            async with asyncio.timeout(self.config.request_timeout_s):
                head = await self._read_head(reader, exchange)
                await self._forward(head, reader, writer, exchange)
        except RefusedError as refused:
            self._refuse(writer, peer, exchange, refused)
        except TimeoutError:
            # The total time limit (or the idle one while the answer streams): a client
            # dripping its head or body gets 408, a SuperLink that has not answered 504;
            # once its answer streams, the connection is only cut.
            if exchange.phase in ("head", "body"):
                self._refuse(writer, peer, exchange, RefusedError(408, "Request Timeout"))
            elif exchange.phase == "upstream":
                self._refuse(writer, peer, exchange, RefusedError(504, "Gateway Timeout"))
            else:
                log.warning("cut %s from %s: timed out in the answer", exchange.request_line, peer)
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
            # A client that vanished or a TLS failure: nothing to answer.
            pass

    @staticmethod
    def _refuse(
        writer: asyncio.StreamWriter, peer: object, exchange: _Exchange, refused: RefusedError
    ) -> None:
        # A hospital probing Control or Runtime is worth a line in the server's log.
        log.warning(
            "refused %s from %s: %d %s",
            exchange.request_line,
            peer,
            refused.status,
            refused.reason,
        )
        writer.write(_reply(refused.status, refused.reason))

    async def _read_head(self, reader: asyncio.StreamReader, exchange: _Exchange) -> _Head:
        try:
            raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.config.idle_timeout_s)
        except asyncio.LimitOverrunError as exc:
            exchange.request_line = f"<request head over {_MAX_HEAD_BYTES} bytes>"
            raise RefusedError(431, "Request Header Fields Too Large") from exc
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise  # connected and closed (a port probe): nothing to answer or log
            exchange.request_line = _printable(exc.partial.split(b"\r\n", 1)[0])
            raise RefusedError(400, "Bad Request") from exc
        except TimeoutError as exc:
            raise RefusedError(408, "Request Timeout") from exc
        exchange.request_line = _printable(raw.split(b"\r\n", 1)[0])
        return parse_head(raw, self.config.max_body_bytes)

    async def _forward(
        self,
        head: _Head,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        exchange: _Exchange,
    ) -> None:
        cfg = self.config
        exchange.phase = "upstream"
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(
                    cfg.upstream_host,
                    cfg.upstream_port,
                    ssl=cfg.upstream_ssl,
                    server_hostname=(cfg.upstream_hostname or cfg.upstream_host)
                    if cfg.upstream_ssl is not None
                    else None,
                ),
                cfg.idle_timeout_s,
            )
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            raise RefusedError(502, "Bad Gateway") from exc
        sent_up = answered = 0
        try:
            exchange.phase = "body"
            up_writer.write(_upstream_head(head))
            remaining = head.content_length
            while remaining:
                try:
                    chunk = await asyncio.wait_for(
                        reader.read(min(_CHUNK, remaining)), cfg.idle_timeout_s
                    )
                except TimeoutError as exc:
                    raise RefusedError(408, "Request Timeout") from exc
                if not chunk:
                    return  # client gave up mid-body: the SuperLink sees a short body
                remaining -= len(chunk)
                sent_up += len(chunk)
                up_writer.write(chunk)
                await up_writer.drain()
            await up_writer.drain()
            exchange.phase = "upstream"
            while True:
                try:
                    chunk = await asyncio.wait_for(up_reader.read(_CHUNK), cfg.idle_timeout_s)
                except TimeoutError as exc:
                    if exchange.phase == "upstream":
                        raise RefusedError(504, "Gateway Timeout") from exc
                    raise
                if not chunk:
                    break
                exchange.phase = "answer"
                answered += len(chunk)
                writer.write(chunk)
                await writer.drain()
        finally:
            self.traffic.add(head.target, sent_up, answered)
            up_writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(up_writer.wait_closed(), cfg.idle_timeout_s)


def server_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """TLS context that presents the run's server certificate (TLS 1.2 or newer)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile, keyfile)
    return ctx


def upstream_context(ca_certfile: str) -> ssl.SSLContext:
    """TLS context that trusts only the run's CA when dialling the SuperLink."""
    ctx = ssl.create_default_context(cafile=ca_certfile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class ProxyThread:
    """Runs a :class:`FleetProxy` on its own event loop in a daemon thread.

    ``start()`` returns once the port is bound (or raises what binding raised);
    ``stop()`` closes it and joins the thread.
    """

    def __init__(self, config: ProxyConfig) -> None:
        self.proxy = FleetProxy(config)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fleet-proxy", daemon=True)

    @property
    def port(self) -> int:
        """The bound port."""
        return self.proxy.port

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self.proxy.start())
        except BaseException as exc:  # handed to start() in the caller's thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self.proxy.close())
        self._loop.close()

    def start(self) -> None:
        """Start the thread and wait until the proxy listens."""
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        """Stop the proxy, join its thread and log what it forwarded (:class:`Traffic`)."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            log.info("%s", self.proxy.traffic.summary())


def _address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> int:
    """Command line: serve until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(
        prog="python -m fedrun_trainer.server.fleet_proxy",
        description="Forward only Flower's Fleet API (and /health) to a loopback SuperLink.",
    )
    parser.add_argument("--listen", type=_address, required=True, help="HOST:PORT to serve")
    parser.add_argument("--upstream", type=_address, required=True, help="SuperLink HOST:PORT")
    parser.add_argument("--certfile", required=True, help="server certificate (PEM)")
    parser.add_argument("--keyfile", required=True, help="server private key (PEM)")
    parser.add_argument("--ca-certfile", required=True, help="CA that signed the SuperLink's")
    args = parser.parse_args(argv)
    config = ProxyConfig(
        listen_host=args.listen[0],
        listen_port=args.listen[1],
        upstream_host=args.upstream[0],
        upstream_port=args.upstream[1],
        server_ssl=server_context(args.certfile, args.keyfile),
        upstream_ssl=upstream_context(args.ca_certfile),
    )

    async def serve() -> None:
        proxy = FleetProxy(config)
        await proxy.start()
        print(f"fleet proxy listening on {config.listen_host}:{proxy.port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await proxy.close()
        print(proxy.traffic.summary(), flush=True)

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
