"""The networked ``Runtime``: discovery and the event plane over NATS, request streams over
a direct TCP connection (default) or NATS (see docs/runtime.md for the measurements).

    rt = await NatsRuntime.connect("nats://127.0.0.1:4222", NatsRuntimeConfig(...))
    served = await rt.serve_endpoint(EndpointId("ns", "backend", "generate"), handler,
                                     request_type=MyRequest)
    async for item in rt.client(ep, response_type=MyResponse).generate(req, "req-1"): ...
    await rt.shutdown()

Payloads are msgpack-encoded with msgspec: pass ``request_type``/``response_type`` (and
``message_type`` to ``subscribe``) to get structs back, otherwise builtins. An instance's
``address`` says which plane reaches it (``tcp://host:port``, ``tls://host:port`` or
``nats://<subject>``), so clients follow whatever each server chose. On a NATS reconnect the
runtime rewrites its leases at once and re-reads every discovery snapshot; TCP streams do not
depend on the NATS connection and survive a NATS restart. One runtime per event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import nats

from tokenmill.runtime.discovery import InstanceCache, Leases
from tokenmill.runtime.event_plane import NatsSubscription, event_subject
from tokenmill.runtime.interface import (
    EndpointClient,
    EndpointId,
    Handler,
    InstanceEvent,
    NoInstancesError,
    ResponseStream,
    Runtime,
    ServedEndpoint,
)
from tokenmill.runtime.nats_plane import NatsPlaneClient, NatsPlaneServer, request_subject
from tokenmill.runtime.remote_stream import (
    RemoteStream,
    StreamRunner,
    encode_payload,
    payload_decoder,
)
from tokenmill.runtime.tcp_plane import TcpClientPool, TcpServer
from tokenmill.runtime.wire import InstanceInfo, RequestEnvelope

log = logging.getLogger(__name__)
REQUEST_PLANES = ("tcp", "nats")
BLOB_BUCKET = "tokenmill_blobs"


@dataclass(frozen=True)
class NatsRuntimeConfig:
    """``host`` is where the TCP plane listens; ``advertise_host`` what others dial (defaults
    to ``host``; set it when listening on 0.0.0.0). ``token`` must match between servers and
    clients of the TCP plane; ``server_ssl``/``client_ssl`` turn on TLS for it."""

    request_plane: str = "tcp"
    lease_ttl_s: float = 5.0
    bucket: str = "tokenmill_instances"
    host: str = "127.0.0.1"
    advertise_host: str | None = None
    tcp_port: int = 0
    token: str = ""
    server_ssl: ssl.SSLContext | None = None
    client_ssl: ssl.SSLContext | None = None
    inactivity_timeout_s: float = 10.0
    reconnect_wait_s: float = 0.25

    def __post_init__(self) -> None:
        if self.request_plane not in REQUEST_PLANES:
            raise ValueError(
                f"request_plane must be one of {REQUEST_PLANES}: {self.request_plane!r}"
            )
        if self.lease_ttl_s < 1.0:
            raise ValueError(
                f"lease_ttl_s must be >= 1 s (NATS TTL granularity): {self.lease_ttl_s}"
            )


class _Served(ServedEndpoint):
    def __init__(self, runtime: NatsRuntime, info: InstanceInfo, key: str):
        self._runtime, self.info, self._key = runtime, info, key
        self._stopped = False

    async def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            await self._runtime._unserve(self.info, self._key)


class NatsEndpointClient(EndpointClient):
    def __init__(
        self,
        runtime: NatsRuntime,
        endpoint: EndpointId,
        cache: InstanceCache,
        response_type: type | None,
    ):
        self._runtime, self.endpoint, self._cache = runtime, endpoint, cache
        self._decode = payload_decoder(response_type)
        self._rr = itertools.count()

    def instances(self) -> list[InstanceInfo]:
        return list(self._cache.instances.values())

    async def wait_for_instances(self, timeout_s: float | None = None) -> list[InstanceInfo]:
        async with asyncio.timeout(timeout_s):
            while not self._cache.instances:
                await self._cache.changed.wait()
        return self.instances()

    async def watch(self) -> AsyncIterator[InstanceEvent]:
        await self._cache.ready.wait()
        queue = self._cache.add_queue()
        try:
            while True:
                yield await queue.get()
        finally:
            self._cache.remove_queue(queue)

    def generate(
        self,
        request: Any,
        request_id: str,
        instance_id: str | None = None,
        deadline_s: float | None = None,
    ) -> ResponseStream:
        info = self._pick(instance_id) if self._cache.ready.is_set() else None
        deadline = None if deadline_s is None else time.monotonic() + deadline_s
        stream = RemoteStream(
            request_id,
            info.instance_id if info else (instance_id or ""),
            decode=self._decode,
            deadline=deadline,
            inactivity_timeout_s=self._runtime.config.inactivity_timeout_s,
        )
        envelope_args = (encode_payload(request), request_id, deadline_s)
        stream.set_opener(lambda: self._open(stream, info, instance_id, envelope_args))
        return stream

    async def _open(
        self,
        stream: RemoteStream,
        info: InstanceInfo | None,
        instance_id: str | None,
        args: tuple[bytes, str, float | None],
    ) -> None:
        if info is None:
            await self._cache.ready.wait()
            info = self._pick(instance_id)
            stream.instance_id = info.instance_id
        payload, request_id, deadline_s = args
        envelope = RequestEnvelope(
            request_id=request_id,
            instance_id=info.instance_id,
            payload=payload,
            deadline_unix_s=None if deadline_s is None else time.time() + deadline_s,
        )
        await self._runtime._open_stream(info, stream, envelope)

    def _pick(self, instance_id: str | None) -> InstanceInfo:
        live = self.instances()
        if instance_id is not None:
            for info in live:
                if info.instance_id == instance_id:
                    return info
            raise NoInstancesError(f"instance {instance_id} of {self.endpoint.path} is gone")
        if not live:
            raise NoInstancesError(f"no live instance of {self.endpoint.path}")
        return live[next(self._rr) % len(live)]


class NatsRuntime(Runtime):
    """Create with ``await NatsRuntime.connect(url, config)`` (or ``start()``) inside the
    event loop that will use it; ``shutdown()`` deregisters and closes everything."""

    def __init__(self, url: str, config: NatsRuntimeConfig | None = None):
        self.url, self.config = url, config or NatsRuntimeConfig()
        self.nc: Any = None
        self._leases: Leases | None = None
        self._caches: dict[str, InstanceCache] = {}
        self._served: list[_Served] = []
        self._subs: set[NatsSubscription] = set()
        self._runner = StreamRunner(keepalive_s=self.config.inactivity_timeout_s / 4)
        self._tcp_server: TcpServer | None = None
        self._nats_server: NatsPlaneServer | None = None
        self._tcp_pool = TcpClientPool(token=self.config.token, ssl_context=self.config.client_ssl)
        self._nats_client: NatsPlaneClient | None = None
        self.num_reconnects = 0  # completed NATS reconnects (leases rewritten after each)
        self._reconnected = asyncio.Event()

    async def wait_reconnected(self, count: int, timeout_s: float | None = None) -> None:
        """Returns once ``num_reconnects >= count`` and the leases were rewritten."""
        async with asyncio.timeout(timeout_s):
            while self.num_reconnects < count:
                self._reconnected.clear()
                await self._reconnected.wait()

    @classmethod
    async def connect(cls, url: str, config: NatsRuntimeConfig | None = None) -> NatsRuntime:
        return await cls(url, config).start()

    async def start(self) -> NatsRuntime:
        self.nc = await nats.connect(
            self.url,
            max_reconnect_attempts=-1,
            reconnect_time_wait=self.config.reconnect_wait_s,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
            error_cb=self._on_error,
            name=f"tokenmill-{uuid.uuid4().hex[:8]}",
        )
        js = self.nc.jetstream()
        self._leases = await Leases(js, self.config.bucket, self.config.lease_ttl_s).open()
        self._nats_client = NatsPlaneClient(self.nc)
        return self

    async def __aenter__(self) -> NatsRuntime:
        return self if self.nc is not None else await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    # -- NATS connection events -------------------------------------------------------
    async def _on_disconnected(self) -> None:
        if self._nats_client is not None:
            self._nats_client.fail_all("NATS connection lost during a NATS-plane stream")

    async def _on_reconnected(self) -> None:
        """Recreate the bucket if the server lost it, rewrite leases, re-read snapshots."""
        try:
            if self._leases is not None:
                await self._leases.renew_all()
        except Exception as exc:  # the heartbeat retries
            log.warning("re-registering after NATS reconnect failed: %s", exc)
        for cache in self._caches.values():
            cache.restart()
        self.num_reconnects += 1
        self._reconnected.set()

    async def _on_error(self, exc: Exception) -> None:
        log.debug("NATS client error: %s", exc)

    async def _get_kv(self) -> Any:
        assert self._leases is not None, "call start() first"
        if self._leases.kv is None:
            await self._leases.open()
        return self._leases.kv

    # -- request plane ----------------------------------------------------------------
    async def serve_endpoint(
        self,
        endpoint: EndpointId,
        handler: Handler,
        *,
        instance_id: str | None = None,
        metadata: dict[str, str] | None = None,
        request_type: type | None = None,
    ) -> ServedEndpoint:
        instance_id = instance_id or uuid.uuid4().hex[:12]
        address = await self._listen(endpoint, instance_id)
        info = InstanceInfo(
            namespace=endpoint.namespace,
            component=endpoint.component,
            endpoint=endpoint.endpoint,
            instance_id=instance_id,
            address=address,
            metadata=dict(metadata or {}),
        )
        self._runner.add_handler(instance_id, handler, request_type)
        assert self._leases is not None, "call start() first"
        served = _Served(self, info, await self._leases.put(info))
        self._served.append(served)
        return served

    async def _listen(self, endpoint: EndpointId, instance_id: str) -> str:
        """Starts this runtime's server for the configured plane; returns the address."""
        if self.config.request_plane == "nats":
            if self._nats_server is None:
                self._nats_server = NatsPlaneServer(self.nc, self._runner)
            subject = request_subject(endpoint.path, instance_id)
            await self._nats_server.add(subject)
            return f"nats://{subject}"
        if self._tcp_server is None:
            self._tcp_server = TcpServer(
                self._runner, token=self.config.token, ssl_context=self.config.server_ssl
            )
            await self._tcp_server.start(self.config.host, self.config.tcp_port)
        scheme = "tls" if self.config.server_ssl is not None else "tcp"
        host = self.config.advertise_host or self.config.host
        return f"{scheme}://{host}:{self._tcp_server.port}"

    async def _unserve(self, info: InstanceInfo, key: str) -> None:
        assert self._leases is not None
        await self._leases.remove(key)
        self._runner.remove_handler(info.instance_id)
        if self._nats_server is not None and info.address.startswith("nats://"):
            await self._nats_server.remove(info.address.removeprefix("nats://"))

    async def _open_stream(
        self, info: InstanceInfo, stream: RemoteStream, envelope: RequestEnvelope
    ) -> None:
        if info.address.startswith("nats://"):
            assert self._nats_client is not None
            subject = info.address.removeprefix("nats://")
            await self._nats_client.open_stream(subject, stream, envelope)
        else:
            await self._tcp_pool.open_stream(info.address, stream, envelope)

    def client(self, endpoint: EndpointId, response_type: type | None = None) -> EndpointClient:
        cache = self._caches.get(endpoint.path)
        if cache is None:
            cache = self._caches[endpoint.path] = InstanceCache(self._get_kv, endpoint.path)
        return NatsEndpointClient(self, endpoint, cache, response_type)

    # -- event plane ------------------------------------------------------------------
    async def publish(self, namespace: str, component: str, topic: str, message: Any) -> None:
        await self.nc.publish(event_subject(namespace, component, topic), encode_payload(message))

    def subscribe(
        self, namespace: str, component: str, topic: str, message_type: type | None = None
    ) -> NatsSubscription:
        """Messages published after the subscription reached the server (``await
        sub.ready()``); decoded into ``message_type`` (default: by topic, see event_plane)."""
        sub = NatsSubscription(
            self.nc, event_subject(namespace, component, topic), topic, message_type, self._subs
        )
        return sub

    # -- blobs (JetStream object store) ------------------------------------------------
    async def put_blob(self, name: str, data: bytes) -> None:
        """Stores ``data`` under ``name`` in the object store (model cards' tokenizers)."""
        store = await self._blob_store()
        await store.put(name, data)

    async def get_blob(self, name: str) -> bytes:
        """The blob stored under ``name``; ``KeyError`` when there is none."""
        from nats.js.errors import NotFoundError, ObjectNotFoundError

        store = await self._blob_store()
        try:
            return (await store.get(name)).data
        except (NotFoundError, ObjectNotFoundError) as exc:
            raise KeyError(name) from exc

    async def has_blob(self, name: str) -> bool:
        """Whether the object store holds ``name``. Reads only the object's metadata (one
        message), not its data: the cheap check for a periodic "is it still there?"."""
        from nats.js.errors import NotFoundError, ObjectNotFoundError

        store = await self._blob_store()
        try:
            await store.get_info(name)
        except (NotFoundError, ObjectNotFoundError):
            return False
        return True

    async def _blob_store(self) -> Any:
        from nats.js.api import ObjectStoreConfig

        js = self.nc.jetstream()
        return await js.create_object_store(BLOB_BUCKET, ObjectStoreConfig(bucket=BLOB_BUCKET))

    # -- shutdown ---------------------------------------------------------------------
    async def shutdown(self) -> None:
        """Deregisters every instance, stops running handlers, closes subscriptions and the
        connection. Idempotent."""
        for served in self._served:
            await served.stop()
        self._served.clear()
        for sub in list(self._subs):
            await sub.aclose()
        for cache in self._caches.values():
            await cache.close()
        self._caches.clear()
        await self._close_planes()
        if self.nc is not None:
            await self.nc.drain() if self.nc.is_connected else await self.nc.close()
            self.nc = None

    async def _close_planes(self) -> None:
        if self._leases is not None:
            await self._leases.close()
        await self._runner.close()  # open streams get a final InstanceFailedError
        if self._tcp_server is not None:
            await self._tcp_server.close()
            self._tcp_server = None
        if self._nats_server is not None and self.nc is not None and self.nc.is_connected:
            await self._nats_server.close()
            self._nats_server = None
        await self._tcp_pool.close()
