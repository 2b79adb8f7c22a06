"""Response streams across a process boundary, shared by both networked request planes
(NATS and direct TCP): the client-side ``RemoteStream`` and the server-side ``StreamRunner``.

A plane only moves bytes. The client side feeds ``RemoteStream.deliver(chunk)``,
``keepalive()`` and ``fail(exc)``; the stream checks sequence numbers (a gap or duplicate is an
instance failure), applies the inactivity timeout (no chunk and no keepalive for
``inactivity_timeout_s`` is an instance failure) and the deadline, and asks the plane to
cancel the remote handler when it is closed, cancelled or times out. The server side runs
each handler in its own task, sends chunks with ``seq`` 0, 1, 2..., a final chunk (with the
error when the handler raised), and keepalives for idle streams; a cancel request or a lost
client connection cancels the task, so the handler's ``finally`` runs.

Errors cross as their registered code, message and param (``error_to_chunk`` /
``error_from_chunk``, both through ``core.errors``' registry only), so a client raises the
class the handler raised. An exception that is not a registered error is logged here, with
its traceback, and crosses as an ``InternalError`` naming its class: what the frontend
would tell a client about it in-process too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import msgspec

from tokenmill.core.errors import (
    DeadlineExceededError,
    DuplicateRequestError,
    InstanceFailedError,
    InternalError,
    NoInstancesError,
    client_error,
    from_wire,
    is_registered,
)
from tokenmill.runtime.interface import Handler, RequestContext, ResponseStream
from tokenmill.runtime.wire import WIRE_VERSION, RequestEnvelope, StreamChunk, check_version

log = logging.getLogger(__name__)
_ENCODER = msgspec.msgpack.Encoder()
_KEEPALIVE = object()


def encode_payload(obj: Any) -> bytes:
    return _ENCODER.encode(obj)


def payload_decoder(type_: type | None) -> Callable[[bytes], Any]:
    """Decodes payloads into ``type_`` (untyped msgpack when None)."""
    decoder = msgspec.msgpack.Decoder(type_) if type_ is not None else msgspec.msgpack.Decoder()
    return decoder.decode


def error_to_chunk(request_id: str, seq: int, exc: BaseException) -> StreamChunk:
    """The final chunk of a stream that ended with ``exc``: its registered code, message,
    param and Retry-After; an exception that is not a registered error is sent as the
    ``InternalError`` naming its class (``core.errors.client_error``)."""
    err = client_error(exc)
    return StreamChunk(
        request_id=request_id,
        seq=seq,
        final=True,
        error=str(err),
        error_code=err.code,
        error_param=err.param,
        error_retry_after_s=err.retry_after_s,
    )


def error_from_chunk(chunk: StreamChunk) -> Exception:
    """The error an error chunk carries, as its registered class (``core.errors.from_wire``;
    an unknown or missing code gives an ``InternalError`` with the message)."""
    return from_wire(
        chunk.error_code or "", chunk.error or "", chunk.error_param, chunk.error_retry_after_s
    )


class RemoteStream(ResponseStream):
    """Client end of one call. The opener sends the request (awaited on the first read, so it
    may wait for discovery); the canceller, bound by the plane, stops the remote handler and
    forgets the stream (called at most once, synchronously, so it also works from the
    consumer's cancellation path).

    The plane appends to one buffer (chunks, keepalives, failures); ``__anext__`` takes one
    item from it, ``next_batch`` every item there (one wake-up of the consumer for a burst of
    chunks). A chunk is decoded only when it is taken. Whatever ends the stream (the final
    chunk, an error chunk, a failure, a sequence gap, a timeout) is raised by the read after
    the one that returned the items before it."""

    def __init__(
        self,
        request_id: str,
        instance_id: str,
        *,
        decode: Callable[[bytes], Any],
        inactivity_timeout_s: float,
        deadline: float | None,
    ):
        self.request_id, self.instance_id = request_id, instance_id
        self._decode, self._inactivity_s, self._deadline = decode, inactivity_timeout_s, deadline
        self._buffer: deque[Any] = deque()
        self._waiter: asyncio.Future[bool] | None = None
        self._next_seq = 0
        self._end: BaseException | type[StopAsyncIteration] | None = None  # raised next
        self._opener: Callable[[], Awaitable[None]] | None = None
        self._canceller: Canceller | None = None

    def set_opener(self, opener: Callable[[], Awaitable[None]]) -> None:
        """``opener`` sends the request on the first read (it may await discovery)."""
        self._opener = opener

    def bind_canceller(self, canceller: Canceller) -> None:
        """Called by the plane once the request is sent."""
        self._canceller = canceller

    # -- fed by the plane ---------------------------------------------------------------
    def deliver(self, chunk: StreamChunk) -> None:
        self._put(chunk)

    def keepalive(self) -> None:
        self._put(_KEEPALIVE)

    def fail(self, exc: BaseException) -> None:
        self._put(exc)

    def _put(self, item: Any) -> None:
        self._buffer.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(False)

    # -- consumer side ------------------------------------------------------------------
    async def __anext__(self) -> Any:
        return (await self._read(1))[0]

    async def next_batch(self) -> list[Any]:
        return await self._read(None)

    async def _read(self, limit: int | None) -> list[Any]:
        try:
            if self._opener is not None:
                await self._open()
            while True:
                if self._end is not None:
                    self._raise_end()
                if self._buffer:
                    items = self._take(limit)
                    if items:
                        return items
                else:
                    await self._wait()
        except asyncio.CancelledError:
            self._finish(cancel_remote=True)
            raise

    async def _open(self) -> None:
        opener, self._opener = self._opener, None
        assert opener is not None
        try:
            await opener()
        except Exception:
            self._finish(cancel_remote=False)
            raise

    def _raise_end(self) -> None:
        end, self._end = self._end, StopAsyncIteration
        raise end  # type: ignore[misc]

    async def _wait(self) -> None:
        """Until the plane puts something in the buffer, or a timeout puts its error there."""
        timeout, error = self._inactivity_s, None
        if self._deadline is not None and self._deadline - time.monotonic() <= timeout:
            timeout = max(self._deadline - time.monotonic(), 0.0)
            error = DeadlineExceededError(f"request {self.request_id} passed its deadline")
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(timeout, _time_out, waiter)
        try:
            timed_out = await waiter
        finally:
            timer.cancel()
            self._waiter = None
        if timed_out and not self._buffer:
            self._buffer.append(
                error
                or InstanceFailedError(
                    f"instance {self.instance_id}: no response to {self.request_id} for "
                    f"{self._inactivity_s} s"
                )
            )

    def _take(self, limit: int | None) -> list[Any]:
        """Decodes buffered chunks (up to ``limit``) until the buffer is empty or the stream
        ends; an end is kept in ``_end`` for the next read."""
        items: list[Any] = []
        buffer = self._buffer
        while buffer and (limit is None or len(items) < limit):
            item = buffer.popleft()
            if item is _KEEPALIVE:
                continue
            try:
                if isinstance(item, BaseException):
                    raise item
                value = self._accept(item)
            except StopAsyncIteration:
                self._end_with(StopAsyncIteration, cancel_remote=False)
                break
            except Exception as exc:
                self._end_with(exc, cancel_remote=not isinstance(exc, _RemoteEnd))
                break
            items.append(value)
        return items

    def _accept(self, chunk: StreamChunk) -> Any:
        check_version(chunk.version)
        if chunk.seq != self._next_seq:
            raise InstanceFailedError(
                f"instance {self.instance_id}: chunk {chunk.seq} of "
                f"{self.request_id}, expected {self._next_seq}"
            )
        self._next_seq += 1
        if chunk.final:
            if chunk.error is not None:
                raise _RemoteEnd(error_from_chunk(chunk))
            raise StopAsyncIteration
        return self._decode(chunk.payload)

    def _end_with(self, end: BaseException | type[StopAsyncIteration], cancel_remote: bool) -> None:
        if isinstance(end, _RemoteEnd):
            end = end.error
        self._finish(cancel_remote)
        self._end = end

    def _finish(self, cancel_remote: bool) -> None:
        if self._end is None:
            self._end = StopAsyncIteration
        self._opener = None
        if self._canceller is not None:
            canceller, self._canceller = self._canceller, None
            if cancel_remote:
                canceller()
            else:
                canceller.forget()

    async def aclose(self) -> None:
        self._finish(cancel_remote=self._opener is None)


class _RemoteEnd(Exception):
    """The handler's error, as its final chunk carried it (the remote side already ended)."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


def _time_out(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(True)


class Canceller:
    """What ``RemoteStream`` calls when it ends: ``__call__`` cancels the remote handler and
    forgets the stream; ``forget()`` only forgets it (the remote side already finished)."""

    def __init__(self, forget: Callable[[], None], cancel: Callable[[], None]):
        self._forget, self._cancel = forget, cancel

    def __call__(self) -> None:
        self._forget()
        self._cancel()

    def forget(self) -> None:
        self._forget()


class ReplyChannel(Protocol):
    """Where a server-side stream's chunks go (a TCP connection or a NATS reply subject)."""

    key: object  # identifies the client connection, for duplicate detection and cancels

    async def send(self, chunk: StreamChunk) -> None: ...

    def send_keepalive(self, request_id: str) -> None: ...


class _Running:
    __slots__ = ("task", "channel", "last_send")

    def __init__(self, channel: ReplyChannel):
        self.channel, self.last_send = channel, time.monotonic()
        self.task: asyncio.Task[None] | None = None


class StreamRunner:
    """Runs handler calls for every instance one runtime serves. ``keepalive_s`` is how often
    an idle stream gets a keepalive (a quarter of the clients' inactivity timeout)."""

    def __init__(self, keepalive_s: float):
        self._handlers: dict[str, tuple[Handler, Callable[[bytes], Any]]] = {}
        self._running: dict[tuple[object, str], _Running] = {}
        self._keepalive_s = keepalive_s
        self._keepalive_task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def num_running(self) -> int:
        return len(self._running)

    def add_handler(self, instance_id: str, handler: Handler, request_type: type | None) -> None:
        self._handlers[instance_id] = (handler, payload_decoder(request_type))
        if self._keepalive_task is None:
            self._keepalive_task = asyncio.get_running_loop().create_task(self._keepalives())

    def remove_handler(self, instance_id: str) -> None:
        self._handlers.pop(instance_id, None)

    def start(self, envelope: RequestEnvelope, channel: ReplyChannel) -> None:
        """Starts the call in a task; unknown instance or duplicate id: a final error chunk."""
        key = (channel.key, envelope.request_id)
        error = self._reject_reason(envelope, key)
        if error is not None:
            chunk = error_to_chunk(envelope.request_id, 0, error)
            asyncio.get_running_loop().create_task(channel.send(chunk))
            return
        running = self._running[key] = _Running(channel)
        running.task = asyncio.get_running_loop().create_task(self._run(envelope, running, key))

    def _reject_reason(
        self, envelope: RequestEnvelope, key: tuple[object, str]
    ) -> Exception | None:
        if envelope.version > WIRE_VERSION:
            return InternalError(f"wire version {envelope.version} unsupported")
        if envelope.instance_id not in self._handlers:
            return NoInstancesError(f"instance {envelope.instance_id} is not served")
        if key in self._running:
            return DuplicateRequestError.for_request(envelope.request_id)
        return None

    def cancel(self, channel_key: object, request_id: str) -> None:
        running = self._running.get((channel_key, request_id))
        if running is not None and running.task is not None:
            running.task.cancel()

    def cancel_channel(self, channel_key: object) -> None:
        """The client connection is gone: cancel everything it had open."""
        for (key, _), running in list(self._running.items()):
            if key == channel_key and running.task is not None:
                running.task.cancel()

    async def _run(self, env: RequestEnvelope, running: _Running, key: tuple[object, str]) -> None:
        handler, decode = self._handlers[env.instance_id]
        deadline = _monotonic_deadline(env.deadline_unix_s)
        ctx = RequestContext(env.request_id, env.instance_id, deadline)
        gen, seq = None, 0
        try:
            gen = handler(decode(env.payload), ctx)
            async with asyncio.timeout(None if deadline is None else _loop_time(deadline)):
                async for item in gen:
                    chunk = StreamChunk(
                        request_id=env.request_id, seq=seq, payload=encode_payload(item)
                    )
                    await self._send(running, chunk)
                    seq += 1
            final = StreamChunk(request_id=env.request_id, seq=seq, final=True)
        except asyncio.CancelledError:
            if not self._closing:
                return  # the client cancelled: it expects nothing more
            final = error_to_chunk(
                env.request_id,
                seq,
                InstanceFailedError(
                    f"instance {env.instance_id} shut down during {env.request_id}"
                ),
            )
        except TimeoutError as exc:
            final = error_to_chunk(env.request_id, seq, _deadline_error(env, exc, deadline))
        except Exception as exc:
            if not is_registered(exc):  # the client learns only its class: log the rest here
                log.error(
                    "handler of %s failed on %s", env.instance_id, env.request_id, exc_info=exc
                )
            final = error_to_chunk(env.request_id, seq, exc)
        finally:
            self._running.pop(key, None)
            if gen is not None:
                await gen.aclose()  # type: ignore[attr-defined]  # runs a suspended finally
        await running.channel.send(final)

    async def _send(self, running: _Running, chunk: StreamChunk) -> None:
        running.last_send = time.monotonic()
        await running.channel.send(chunk)

    async def _keepalives(self) -> None:
        while True:
            await asyncio.sleep(self._keepalive_s)
            idle_since = time.monotonic() - self._keepalive_s
            for (_, request_id), running in list(self._running.items()):
                if running.last_send <= idle_since:
                    running.channel.send_keepalive(request_id)

    async def close(self) -> None:
        """Cancels the keepalive loop and every running call; each open stream gets a final
        ``InstanceFailedError`` chunk (so its client can migrate at once)."""
        self._closing = True
        tasks = [r.task for r in self._running.values() if r.task is not None]
        if self._keepalive_task is not None:
            tasks.append(self._keepalive_task)
            self._keepalive_task = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _monotonic_deadline(deadline_unix_s: float | None) -> float | None:
    if deadline_unix_s is None:
        return None
    return time.monotonic() + (deadline_unix_s - time.time())


def _loop_time(deadline_monotonic: float) -> float:
    return asyncio.get_running_loop().time() + (deadline_monotonic - time.monotonic())


def _deadline_error(env: RequestEnvelope, exc: TimeoutError, deadline: float | None) -> Exception:
    if deadline is not None and time.monotonic() >= deadline - 1e-3:
        return DeadlineExceededError(f"request {env.request_id} passed its deadline")
    return exc
