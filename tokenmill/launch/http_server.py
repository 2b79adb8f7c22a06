"""The HTTP server of ``serve`` and ``frontend``: uvicorn (httptools, no loop of its own: it
runs on the loop ``event_loop.run`` made) with a drain on SIGINT/SIGTERM, and the serve loop
that prints the ready line once the socket listens.

SIGINT/SIGTERM: stop accepting connections, close idle keep-alive ones, ``await
stack.drain(timeout)`` (in-flight requests finish or are aborted), then uvicorn's own
shutdown (a backstop that cancels what is still running). Signals are not re-raised
afterwards: the process exits 0.

Read deadlines: a connection's request headers must arrive within ``http.header_timeout_s``
of the connection (or of the request's first byte, on a kept-alive connection), else it is
answered 408 and closed (uvicorn has no such timer: a client that sends half a header line
would hold the connection forever). The body's deadline is the app's (``FrontendConfig.
body_timeout_s``), so its 408 is counted and logged like any response.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from tokenmill.core.errors import RequestTimeoutError
from tokenmill.launch.gc_tuning import freeze_startup_heap
from tokenmill.launch.specs import HttpSpec

SHUTDOWN_BACKSTOP_S = 5.0  # after the drain: how long uvicorn waits before cancelling

Drain = Callable[[float], Awaitable[None]]


def make_server(app: Any, http: HttpSpec, drain: Drain | None = None) -> Any:
    """A uvicorn server for ``app`` on ``http.host:http.port`` (see the module docstring)."""
    import uvicorn

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.handle_exit, sig, None)
            try:
                yield
            finally:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)

        async def shutdown(self, sockets=None) -> None:
            for server in self.servers:
                server.close()
            for connection in list(self.server_state.connections):
                connection.shutdown()  # idle keep-alive connections close; streams go on
            if drain is not None:
                await drain(http.shutdown_timeout_s)
            await super().shutdown(sockets)

    config = uvicorn.Config(
        app,
        host=http.host,
        port=http.port,
        loop="none",
        http=_protocol_with_header_deadline(http.header_timeout_s),
        lifespan="on",
        log_level="warning",
        access_log=False,
        timeout_keep_alive=http.timeout_keep_alive_s,
        timeout_graceful_shutdown=SHUTDOWN_BACKSTOP_S,
    )
    return _Server(config)


def _timeout_response(seconds: float) -> bytes:
    """The raw 408 answer, its JSON from the one error mapping (``frontend.errors.classify``)."""
    from tokenmill.frontend.errors import classify, encode

    err = RequestTimeoutError(f"the request headers did not arrive within {seconds:g} s")
    status, error_json, _ = classify(err)
    body = encode(error_json)
    head = (
        f"HTTP/1.1 {status} Request Timeout\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


def _protocol_with_header_deadline(header_timeout_s: float) -> type:
    """uvicorn's httptools protocol with a header timer: armed on ``connection_made`` and on
    each request's first byte (``on_message_begin``), cancelled once the headers are parsed
    (``on_headers_complete``) or the connection is lost; when it fires, 408 and close."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    response = _timeout_response(header_timeout_s)

    class _Protocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._header_timer is None:
                self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._header_timer = self.loop.call_later(header_timeout_s, self._timed_out)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _timed_out(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.write(response)
                self.transport.close()

    return _Protocol


async def serve_stack(
    stack: Any,
    http: HttpSpec,
    start: float,
    note: str = "",
    fatal: asyncio.Future[str] | None = None,
) -> int:
    """Serves ``stack.app`` until SIGINT/SIGTERM (or until ``fatal`` resolves: the server
    shuts down as on SIGTERM and the reason goes to stderr), then ``stack.close()``. Prints
    ``tokenmill: serving 'MODEL' at URL (started in S s{note})`` once listening. Returns 0
    after a signal, 1 when the server never started (the port is taken, ...) or on ``fatal``."""
    server = make_server(stack.app, http, stack.drain)
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    if server.started:
        freeze_startup_heap()
        print(
            f"tokenmill: serving {stack.model.name!r} at http://{http.host}:{http.port}/v1 "
            f"(started in {time.monotonic() - start:.2f} s{note})",
            flush=True,
        )
    try:
        if fatal is not None:
            await asyncio.wait([task, fatal], return_when=asyncio.FIRST_COMPLETED)
        if fatal is not None and fatal.done():
            print(f"tokenmill: error: {fatal.result()}; stopping", file=sys.stderr, flush=True)
            server.should_exit = True
        await task
    finally:
        await stack.close()
    return 0 if server.started and not (fatal is not None and fatal.done()) else 1
