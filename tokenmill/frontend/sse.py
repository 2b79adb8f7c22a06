"""Server-sent events and client-disconnect handling at the ASGI level.

``cancel_on_disconnect(receive)`` cancels the current task when the client goes away (the
ASGI ``http.disconnect`` message) and turns that cancellation into ``ClientDisconnectedError``;
a cancellation from elsewhere (server shutdown) passes through untouched.

``SSEResponse`` streams an async iterator of ready-made SSE frames, one ASGI body message
(one socket write) per item: an item may hold several frames. The headers are sent when the
first item is ready (right before it), and an item ending with ``SSE_DONE`` ends the body in
the same message. It always closes the iterator
(``aclose()``), whether it ended, the client left, or ``send`` failed, so the request's
``finally`` blocks (abort the engine requests) run at once rather than at garbage collection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from tokenmill.core.errors import ClientDisconnectedError

SSE_DONE = b"data: [DONE]\n\n"


__all__ = ["SSE_DONE", "SSEResponse", "cancel_on_disconnect"]


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


@contextlib.asynccontextmanager
async def cancel_on_disconnect(receive: Receive):
    task = asyncio.current_task()
    assert task is not None
    disconnected = False

    async def watch() -> None:
        nonlocal disconnected
        await _wait_disconnect(receive)
        disconnected = True
        task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        yield
    except asyncio.CancelledError:
        if not disconnected:
            raise
        task.uncancel()
        raise ClientDisconnectedError() from None
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


class SSEResponse(Response):
    media_type = "text/event-stream"

    def __init__(self, frames: AsyncIterator[bytes], status_code: int = 200):
        self.frames = frames
        self.status_code = status_code
        self.background = None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start: dict[str, Any] = {
            "type": "http.response.start",
            "status": self.status_code,
            "headers": self.raw_headers,
        }
        more = True
        try:
            async with cancel_on_disconnect(receive):
                frames = await anext(self.frames, None)
                await send(start)  # right before the first frames: the client wakes up once
                while frames is not None:
                    more = not frames.endswith(SSE_DONE)
                    await send({"type": "http.response.body", "body": frames, "more_body": more})
                    frames = await anext(self.frames, None)
            if more:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (ClientDisconnectedError, OSError):
            pass  # the client is gone; closing the frames aborts its requests
        finally:
            await self.frames.aclose()  # type: ignore[attr-defined]
