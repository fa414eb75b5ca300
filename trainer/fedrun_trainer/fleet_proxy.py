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
request onto the SuperLink connection. Requests with ``Transfer-Encoding``, several or
malformed ``Content-Length`` headers, or an unusual request target are refused.

Run it standalone (``python -m fedrun_trainer.fleet_proxy --help``) or in a thread
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
from dataclasses import dataclass

log = logging.getLogger("fedrun.fleet_proxy")

# Flower's fleet RPC names are lower-case words joined by dashes
# (register-node, pull-messages, ...). Anything else (dot segments, percent-escapes,
# query strings, absolute-form targets, double slashes) is refused, so the SuperLink's
# router can never be steered to another prefix.
_FLEET_TARGET = re.compile(r"/v1/fleet/[a-z][a-z0-9-]{0,63}")
_HEALTH_TARGET = "/health"
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
# A bound on one request body. Flower ships a message's arrays as separate objects
# (push-object), so one body is one array or less; fedrun's models are far smaller.
DEFAULT_MAX_BODY_BYTES = 512 * 1024 * 1024
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class ProxyConfig:
    """Where the proxy listens and where it forwards to.

    ``server_ssl`` is the TLS context presented to SuperNodes (the run's server
    certificate; None serves plain HTTP, for tests only). ``upstream_ssl`` verifies the
    SuperLink's certificate on loopback (None connects in plain HTTP). ``upstream_hostname``
    is the name checked against that certificate (``127.0.0.1`` by default, which is why
    the run's server certificate must cover 127.0.0.1).
    """

    listen_host: str
    listen_port: int
    upstream_host: str
    upstream_port: int
    server_ssl: ssl.SSLContext | None = None
    upstream_ssl: ssl.SSLContext | None = None
    upstream_hostname: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    idle_timeout_s: float = 60.0


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
    version: str
    headers: list[tuple[str, str]]
    content_length: int


def parse_head(raw: bytes, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> _Head:
    """Parse and vet an HTTP/1.x request head (up to and including the blank line).

    Raises :class:`RefusedError` with the status the client gets: 404 for anything but the
    fleet API and health check, 400 for malformed heads, 411/413/501 for bodies the
    proxy will not frame.
    """
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError as exc:
        raise RefusedError(400, "Bad Request") from exc
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[2] not in ("HTTP/1.1", "HTTP/1.0"):
        raise RefusedError(400, "Bad Request")
    method, target, version = parts
    if not allowed(method, target):
        raise RefusedError(404, "Not Found")
    headers: list[tuple[str, str]] = []
    lengths: list[str] = []
    named: set[str] = set()
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        # No obsolete line folding, no whitespace before the colon (RFC 9112 5.1).
        if not sep or not name or name != name.strip() or line[0] in " \t":
            raise RefusedError(400, "Bad Request")
        value = value.strip()
        lower = name.lower()
        if lower == "transfer-encoding":
            raise RefusedError(501, "Not Implemented")
        if lower == "content-length":
            lengths.append(value)
            continue
        if lower == "connection":
            # Headers the client names in Connection are hop-by-hop too (RFC 9110 7.6.1).
            named.update(token.strip().lower() for token in value.split(","))
        if lower in _HOP_BY_HOP:
            continue
        headers.append((name, value))
    headers = [(name, value) for name, value in headers if name.lower() not in named]
    if len(lengths) > 1 or (lengths and not lengths[0].isdigit()):
        raise RefusedError(400, "Bad Request")
    length = int(lengths[0]) if lengths else 0
    if method == "POST" and not lengths:
        raise RefusedError(411, "Length Required")
    if length > max_body_bytes:
        raise RefusedError(413, "Content Too Large")
    return _Head(method, target, version, headers, length)


def _upstream_head(head: _Head) -> bytes:
    lines = [f"{head.method} {head.target} HTTP/1.1"]
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


class FleetProxy:
    """The proxy as an asyncio server: ``await start()``, then ``await close()``."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The port actually bound (useful when ``listen_port`` was 0)."""
        if self._server is None:
            raise RuntimeError("proxy not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        """Bind and start accepting connections."""
        self._server = await asyncio.start_server(
            self._handle,
            self.config.listen_host,
            self.config.listen_port,
            ssl=self.config.server_ssl,
            limit=_MAX_HEAD_BYTES,
        )

    async def close(self) -> None:
        """Stop accepting; connections in flight are cut."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        timeout = self.config.idle_timeout_s
        try:
            try:
                raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
                head = parse_head(raw, self.config.max_body_bytes)
            except RefusedError as refused:
                # A hospital probing Control or Runtime is worth a line in the server's log.
                log.warning(
                    "refused %s from %s: %d %s",
                    raw.split(b"\r\n", 1)[0][:200].decode("ascii", "replace"),
                    writer.get_extra_info("peername"),
                    refused.status,
                    refused.reason,
                )
                writer.write(_reply(refused.status, refused.reason))
                await writer.drain()
                return
            except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, TimeoutError):
                writer.write(_reply(400, "Bad Request"))
                await writer.drain()
                return
            await self._forward(head, reader, writer)
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError, TimeoutError):
            # A client that vanished or a TLS failure: nothing to answer.
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _forward(
        self, head: _Head, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        cfg = self.config
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
        except (OSError, ssl.SSLError, TimeoutError):
            writer.write(_reply(502, "Bad Gateway"))
            await writer.drain()
            return
        try:
            up_writer.write(_upstream_head(head))
            remaining = head.content_length
            while remaining:
                chunk = await asyncio.wait_for(
                    reader.read(min(_CHUNK, remaining)), cfg.idle_timeout_s
                )
                if not chunk:
                    return  # client gave up mid-body: the SuperLink sees a short body
                remaining -= len(chunk)
                up_writer.write(chunk)
                await up_writer.drain()
            await up_writer.drain()
            while True:
                chunk = await asyncio.wait_for(up_reader.read(_CHUNK), cfg.idle_timeout_s)
                if not chunk:
                    break
                writer.write(chunk)
                await writer.drain()
        finally:
            up_writer.close()
            with contextlib.suppress(Exception):
                await up_writer.wait_closed()


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
        """Stop the proxy and join its thread."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)


def _address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> int:
    """Command line: serve until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(
        prog="python -m fedrun_trainer.fleet_proxy",
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

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
