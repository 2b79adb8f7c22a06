"""NATS request plane: a request is published to the instance's subject with a reply subject
under the client's single wildcard inbox; the instance publishes ``StreamChunk``s (msgpack)
to that reply subject, and an empty message as a keepalive. Cancels go to the instance's
cancel subject. A request carries a header, so when no instance listens NATS answers with a
``503`` status message at once (an instance failure, not a wait for the inactivity timeout).
When this process's NATS connection drops, streams open on this plane fail with
``InstanceFailedError`` (chunks may have been lost in the gap).
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import msgspec

from tokenmill.core.errors import InstanceFailedError
from tokenmill.runtime.remote_stream import Canceller, RemoteStream, StreamRunner
from tokenmill.runtime.wire import CancelRequest, RequestEnvelope, StreamChunk

SUBJECT_PREFIX = "tokenmill.rpc"
_ENC = msgspec.msgpack.Encoder()
_ENVELOPE = msgspec.msgpack.Decoder(RequestEnvelope)
_CHUNK = msgspec.msgpack.Decoder(StreamChunk)
_CANCEL = msgspec.msgpack.Decoder(CancelRequest)
_REQUEST_HEADERS = {"Tm-Plane": "1"}


def request_subject(path: str, instance_id: str) -> str:
    return f"{SUBJECT_PREFIX}.{path}.{instance_id}"


class _NatsChannel:
    """Reply path of one request. ``key`` is the reply subject's client inbox prefix."""

    __slots__ = ("key", "_nc", "_reply")

    def __init__(self, nc: Any, reply: str):
        self._nc, self._reply = nc, reply
        self.key = reply.rpartition(".")[0]

    async def send(self, chunk: StreamChunk) -> None:
        await self._nc.publish(self._reply, _ENC.encode(chunk))

    def send_keepalive(self, request_id: str) -> None:
        asyncio.get_running_loop().create_task(self._nc.publish(self._reply, b""))


class NatsPlaneServer:
    """Subscribes each served instance's request and cancel subjects. ``remove`` stops new
    requests only: streams already open can still be cancelled until ``close``."""

    def __init__(self, nc: Any, runner: StreamRunner):
        self._nc, self._runner = nc, runner
        self._requests: dict[str, Any] = {}
        self._cancels: list[Any] = []

    async def add(self, subject: str) -> None:
        self._requests[subject] = await self._nc.subscribe(subject, cb=self._on_request)
        self._cancels.append(await self._nc.subscribe(subject + ".cancel", cb=self._on_cancel))

    async def remove(self, subject: str) -> None:
        sub = self._requests.pop(subject, None)
        if sub is not None:
            await sub.unsubscribe()

    async def close(self) -> None:
        for sub in [*self._requests.values(), *self._cancels]:
            await sub.unsubscribe()
        self._requests.clear()
        self._cancels.clear()

    async def _on_request(self, msg: Any) -> None:
        if msg.reply:
            self._runner.start(_ENVELOPE.decode(msg.data), _NatsChannel(self._nc, msg.reply))

    async def _on_cancel(self, msg: Any) -> None:
        inbox, _, request_id = msg.data.decode().partition(" ")
        self._runner.cancel(inbox, request_id)


class NatsPlaneClient:
    """One wildcard inbox subscription per runtime; streams keyed by a counter token."""

    def __init__(self, nc: Any):
        self._nc = nc
        self._prefix = nc.new_inbox()
        self._streams: dict[str, RemoteStream] = {}
        self._tokens = itertools.count()
        self._sub: Any = None
        self._sub_lock = asyncio.Lock()

    async def _ensure_subscribed(self) -> None:
        if self._sub is None:
            async with self._sub_lock:
                if self._sub is None:
                    self._sub = await self._nc.subscribe(self._prefix + ".*", cb=self._on_reply)

    async def open_stream(
        self, subject: str, stream: RemoteStream, envelope: RequestEnvelope
    ) -> None:
        await self._ensure_subscribed()
        token = str(next(self._tokens))
        self._streams[token] = stream

        def forget() -> None:
            self._streams.pop(token, None)

        def cancel() -> None:
            body = f"{self._prefix} {envelope.request_id}".encode()
            asyncio.get_running_loop().create_task(self._publish(subject + ".cancel", body))

        stream.bind_canceller(Canceller(forget, cancel))
        await self._nc.publish(
            subject,
            _ENC.encode(envelope),
            reply=f"{self._prefix}.{token}",
            headers=_REQUEST_HEADERS,
        )

    async def _publish(self, subject: str, body: bytes) -> None:
        try:
            await self._nc.publish(subject, body)
        except Exception:  # disconnected: the instance's inactivity handling takes over
            pass

    async def _on_reply(self, msg: Any) -> None:
        stream = self._streams.get(msg.subject.rpartition(".")[2])
        if stream is None:
            return
        if msg.headers and msg.headers.get("Status") == "503":
            stream.fail(
                InstanceFailedError(
                    f"no responder on the instance's subject for {stream.request_id}"
                )
            )
        elif not msg.data:
            stream.keepalive()
        else:
            stream.deliver(_CHUNK.decode(msg.data))

    def fail_all(self, reason: str) -> None:
        """The NATS connection dropped: every open stream may have lost chunks."""
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.fail(InstanceFailedError(reason))
