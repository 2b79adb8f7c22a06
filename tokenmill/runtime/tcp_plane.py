"""Direct TCP request plane: msgspec frames over one multiplexed connection per
(client runtime, server address), optionally TLS, with a shared token.

Frame layout (little-endian)::

    | u32 body length | u8 kind | body (msgpack) |

Kinds: HELLO (client token, first frame; the server answers HELLO_OK or closes), REQUEST
(``RequestEnvelope``), CANCEL (``CancelRequest``), CHUNK (``StreamChunk``), KEEPALIVE (a
request id, utf-8). Reading uses ``asyncio.BufferedProtocol`` into one growing buffer that
frames are parsed out of in place (no ``readexactly`` per frame, no copy of the bulk bytes
before msgspec decodes them). Writing coalesces the frames queued in one event-loop iteration
into one ``transport.write`` (one syscall for a burst of chunks) and respects the transport's
flow control: a sender waits while the transport is paused. A lost connection fails every stream open on it with
``InstanceFailedError`` (client side) or cancels its handlers (server side). A request id
already open on a connection is refused on the client side with ``DuplicateRequestError``,
the error the server would answer.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import ssl
import struct
from collections.abc import Callable
from typing import Any

import msgspec

from tokenmill.core.errors import DuplicateRequestError, InstanceFailedError
from tokenmill.runtime.remote_stream import Canceller, RemoteStream, StreamRunner
from tokenmill.runtime.wire import WIRE_VERSION, CancelRequest, RequestEnvelope, StreamChunk

HELLO, HELLO_OK, REQUEST, CANCEL, CHUNK, KEEPALIVE = range(1, 7)
_HEADER = struct.Struct("<IB")
_MIN_FREE = 64 * 1024
MAX_FRAME = 256 * 1024 * 1024


class Hello(msgspec.Struct, frozen=True, kw_only=True):
    token: str = ""
    version: int = WIRE_VERSION


_ENC = msgspec.msgpack.Encoder()
_DECODERS: dict[int, Any] = {
    HELLO: msgspec.msgpack.Decoder(Hello),
    REQUEST: msgspec.msgpack.Decoder(RequestEnvelope),
    CANCEL: msgspec.msgpack.Decoder(CancelRequest),
    CHUNK: msgspec.msgpack.Decoder(StreamChunk),
}


def encode_frame(kind: int, body: Any) -> bytes:
    data = body if isinstance(body, bytes) else _ENC.encode(body)
    return _HEADER.pack(len(data), kind) + data


class FrameProtocol(asyncio.BufferedProtocol):
    """Buffered reader/writer of frames. Subclasses implement ``on_frame`` and ``on_lost``."""

    def __init__(self) -> None:
        self._buf = bytearray(_MIN_FREE * 4)
        self._start = self._end = 0
        self.transport: asyncio.Transport | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._pending: list[bytes] = []
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        if len(self._buf) - self._end < _MIN_FREE:
            self._compact(max(sizehint, _MIN_FREE))
        return memoryview(self._buf)[self._end :]

    def _compact(self, need: int) -> None:
        """A fresh buffer (never resized in place: the loop may still hold a view)."""
        pending = self._end - self._start
        size = max(len(self._buf), 2 * (pending + need))
        fresh = bytearray(size)
        fresh[:pending] = self._buf[self._start : self._end]
        self._buf, self._start, self._end = fresh, 0, pending

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        view = memoryview(self._buf)
        try:
            while self._end - self._start >= _HEADER.size:
                length, kind = _HEADER.unpack_from(self._buf, self._start)
                if length > MAX_FRAME:
                    raise ValueError(f"frame of {length} bytes")
                stop = self._start + _HEADER.size + length
                if stop > self._end:
                    break
                body = view[self._start + _HEADER.size : stop]
                self._start = stop
                self.on_frame(kind, body)
        except Exception as exc:  # malformed frame: drop the connection
            self.abort(exc)
        finally:
            view.release()
        if self._start == self._end:
            self._start = self._end = 0

    def write(self, data: bytes) -> None:
        """Queues a frame; frames queued in one loop iteration go out in one write."""
        if self.transport is None or self.closed:
            return
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(data)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if self.transport is not None and not self.closed:
            self.transport.write(b"".join(pending) if len(pending) > 1 else pending[0])

    async def drained(self) -> None:
        await self._writable.wait()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def abort(self, exc: BaseException | None = None) -> None:
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        """Sends what is queued, then closes."""
        if self._pending:
            self._flush()
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._writable.set()
        self.on_lost(exc)

    def on_frame(self, kind: int, body: memoryview) -> None:
        raise NotImplementedError

    def on_lost(self, exc: Exception | None) -> None:
        raise NotImplementedError


class _ServerChannel:
    """Where one request's chunks go: the connection it came on."""

    __slots__ = ("key", "_conn")

    def __init__(self, conn: _ServerConnection):
        self.key, self._conn = conn, conn

    async def send(self, chunk: StreamChunk) -> None:
        self._conn.write(encode_frame(CHUNK, chunk))
        await self._conn.drained()

    def send_keepalive(self, request_id: str) -> None:
        self._conn.write(encode_frame(KEEPALIVE, request_id.encode()))


class _ServerConnection(FrameProtocol):
    def __init__(self, runner: StreamRunner, token: str, conns: set[_ServerConnection]):
        super().__init__()
        self._runner, self._token, self._authed = runner, token, False
        self._channel = _ServerChannel(self)
        self._conns = conns
        conns.add(self)

    def on_frame(self, kind: int, body: memoryview) -> None:
        if not self._authed:
            hello = _DECODERS[HELLO].decode(body) if kind == HELLO else None
            if hello is None or not hmac.compare_digest(hello.token, self._token):
                self.abort()
                return
            self._authed = True
            self.write(encode_frame(HELLO_OK, b""))
        elif kind == REQUEST:
            self._runner.start(_DECODERS[REQUEST].decode(body), self._channel)
        elif kind == CANCEL:
            self._runner.cancel(self, _DECODERS[CANCEL].decode(body).request_id)

    def on_lost(self, exc: Exception | None) -> None:
        self._conns.discard(self)
        self._runner.cancel_channel(self)


class TcpServer:
    """Listens for request-plane connections and feeds requests to ``runner``."""

    def __init__(
        self, runner: StreamRunner, *, token: str = "", ssl_context: ssl.SSLContext | None = None
    ):
        self._runner, self._token, self._ssl = runner, token, ssl_context
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[_ServerConnection] = set()
        self.port = 0

    async def start(self, host: str, port: int = 0) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _ServerConnection(self._runner, self._token, self._conns),
            host,
            port,
            ssl=self._ssl,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        """Stops listening and closes every connection (after sending what is queued)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for conn in list(self._conns):
            conn.close()


class _ClientConnection(FrameProtocol):
    def __init__(self, address: str, on_lost: Callable[[_ClientConnection], None]):
        super().__init__()
        self.address, self._notify_lost = address, on_lost
        self.streams: dict[str, RemoteStream] = {}
        self.hello_ok: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_frame(self, kind: int, body: memoryview) -> None:
        if kind == CHUNK:
            chunk = _DECODERS[CHUNK].decode(body)
            stream = self.streams.get(chunk.request_id)
            if stream is not None:
                stream.deliver(chunk)
        elif kind == KEEPALIVE:
            stream = self.streams.get(bytes(body).decode())
            if stream is not None:
                stream.keepalive()
        elif kind == HELLO_OK and not self.hello_ok.done():
            self.hello_ok.set_result(None)

    def on_lost(self, exc: Exception | None) -> None:
        if not self.hello_ok.done():
            self.hello_ok.set_exception(
                InstanceFailedError(
                    f"{self.address}: connection closed during handshake (token or TLS mismatch?)"
                )
            )
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.fail(InstanceFailedError(f"connection to {self.address} lost: {exc}"))
        self._notify_lost(self)


class TcpClientPool:
    """One connection per address, opened on first use and dropped when lost."""

    def __init__(
        self,
        *,
        token: str = "",
        ssl_context: ssl.SSLContext | None = None,
        connect_timeout_s: float = 5.0,
    ):
        self._token, self._ssl, self._timeout_s = token, ssl_context, connect_timeout_s
        self._conns: dict[str, asyncio.Task[_ClientConnection]] = {}
        self._ids = itertools.count()

    async def open_stream(
        self, address: str, stream: RemoteStream, envelope: RequestEnvelope
    ) -> None:
        """Sends the request; binds the stream's cancel path to this connection."""
        conn = await self._connection(address)
        if conn.closed:
            raise InstanceFailedError(f"connection to {address} lost")
        if envelope.request_id in conn.streams:  # the server would reject it the same way
            raise DuplicateRequestError.for_request(envelope.request_id)
        conn.streams[envelope.request_id] = stream

        def forget() -> None:
            conn.streams.pop(envelope.request_id, None)

        def cancel() -> None:
            conn.write(encode_frame(CANCEL, CancelRequest(request_id=envelope.request_id)))

        stream.bind_canceller(Canceller(forget, cancel))
        conn.write(encode_frame(REQUEST, envelope))

    async def _connection(self, address: str) -> _ClientConnection:
        task = self._conns.get(address)
        if task is None or (task.done() and _connection_of(task) is None):
            task = asyncio.get_running_loop().create_task(self._connect(address))
            self._conns[address] = task
        try:
            return await asyncio.shield(task)
        except OSError as exc:
            raise InstanceFailedError(f"cannot connect to {address}: {exc}") from exc

    async def _connect(self, address: str) -> _ClientConnection:
        host, port = parse_tcp_address(address)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._timeout_s):
            _, conn = await loop.create_connection(
                lambda: _ClientConnection(address, self._lost),
                host,
                port,
                ssl=self._ssl,
                server_hostname=host if self._ssl is not None else None,
            )
            conn.write(encode_frame(HELLO, Hello(token=self._token)))
            await conn.hello_ok
        return conn

    def _lost(self, conn: _ClientConnection) -> None:
        task = self._conns.get(conn.address)
        if task is not None and task.done() and _connection_of(task) in (conn, None):
            del self._conns[conn.address]

    async def close(self) -> None:
        for task in self._conns.values():
            task.cancel()
            conn = _connection_of(task) if task.done() else None
            if conn is not None:
                conn.abort()
        self._conns.clear()


def _connection_of(task: asyncio.Task[_ClientConnection]) -> _ClientConnection | None:
    """The open connection a finished connect task produced, None if it failed or closed."""
    if task.cancelled() or task.exception() is not None or task.result().closed:
        return None
    return task.result()


def make_ssl_contexts(
    cert_file: str, key_file: str, ca_file: str | None = None
) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts for the TCP plane from PEM files (the ``--tls-*`` flags):
    the server presents ``cert_file``; the client verifies it against ``ca_file`` (default:
    the certificate itself, for a self-signed deployment certificate)."""
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_file, key_file)
    client = ssl.create_default_context(cafile=ca_file or cert_file)
    return server, client


def parse_tcp_address(address: str) -> tuple[str, int]:
    """``tcp://host:port`` (or ``tls://``) → (host, port); IPv6 hosts in brackets."""
    rest = address.split("://", 1)[-1]
    host, _, port = rest.rpartition(":")
    return host.strip("[]"), int(port)
