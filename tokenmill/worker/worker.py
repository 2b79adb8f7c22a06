"""A worker: one engine replica served as the runtime endpoint ``generate`` (``EngineRequest``
in, ``RequestOutput``s out), publishing its load on the event plane.

Life cycle: ``start()`` registers the instance (with ``metadata``: the model card and the
worker's ``role``, see ``tokenmill.routing.models.instance_role``) and starts
the load publisher and, given a ``KvPublisher`` (fed by the engine's KV event sink), the
``kv_replay`` endpoint under the same instance id; a ``prefill`` or ``decode`` worker also
serves ``kv_release`` (free blocks held for KV transfers at once) and, before registering,
checks that its KV layout (``metadata["kv_layout"]``) is the one the other P/D workers of its
model registered (``KvLayoutMismatchError`` otherwise: blocks could not move between them); ``stop()`` deregisters (no new requests), lets in-flight requests finish up
to ``drain_timeout_s``, then evicts the rest: their engine requests are aborted and their
streams end with ``InstanceFailedError``, so a frontend migrates them to another worker.
The engine itself is owned by the caller.

Duplicate request ids among in-flight requests are rejected (``DuplicateRequestError``, from
``core.errors``: HTTP 400 whichever transport carried the request) before anything reaches
the engine. A client that closes its stream aborts the engine request (closing the
engine's iterator frees its blocks).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from tokenmill.core.errors import DuplicateRequestError, EngineDeadError, KvLayoutMismatchError
from tokenmill.core.request import EngineRequest, FinishReason, RequestOutput
from tokenmill.routing.models import (
    DEFAULT_ROLE,
    LAYOUT_KEY,
    ROLE_KEY,
    check_role,
    layout_conflict,
)
from tokenmill.runtime.interface import (
    EndpointId,
    InstanceFailedError,
    RequestContext,
    Runtime,
    ServedEndpoint,
)
from tokenmill.runtime.kv_wire import (
    KV_RELEASE_ENDPOINT,
    KV_REPLAY_ENDPOINT,
    KvReleaseReply,
    KvReleaseRequest,
    KvReplayRequest,
    release_instance_id,
    replay_instance_id,
)
from tokenmill.runtime.wire import LOAD_TOPIC, InstanceInfo, WorkerLoad
from tokenmill.worker.kv_publisher import KvPublisher
from tokenmill.worker.protocol import EngineClient, load_from_stats, maybe_await

log = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "tokenmill"
DEFAULT_COMPONENT = "backend"
GENERATE_ENDPOINT = "generate"
LAYOUT_CHECK_WAIT_S = 0.5  # how long a P/D worker waits to see its pool before registering


@dataclass(frozen=True)
class WorkerConfig:
    """``role``: ``both`` (aggregated), ``prefill`` or ``decode`` (``ValueError`` otherwise);
    registered in the instance metadata under ``role``."""

    namespace: str = DEFAULT_NAMESPACE
    component: str = DEFAULT_COMPONENT
    instance_id: str | None = None
    model_name: str = ""
    load_interval_s: float = 0.5
    drain_timeout_s: float = 30.0
    metadata: tuple[tuple[str, str], ...] = ()  # extra instance metadata (the model card)
    role: str = DEFAULT_ROLE

    def __post_init__(self) -> None:
        check_role(self.role)

    @property
    def endpoint(self) -> EndpointId:
        return EndpointId(self.namespace, self.component, GENERATE_ENDPOINT)


class Worker:
    def __init__(
        self,
        engine: EngineClient,
        runtime: Runtime,
        config: WorkerConfig | None = None,
        kv_publisher: KvPublisher | None = None,
    ):
        self.engine = engine
        self.kv_publisher = kv_publisher
        self._replay: ServedEndpoint | None = None
        self.runtime = runtime
        self.config = config or WorkerConfig()
        self._active: set[str] = set()
        self._evicted: set[str] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._served: ServedEndpoint | None = None
        self._release: ServedEndpoint | None = None
        self._publisher: asyncio.Task[None] | None = None

    @property
    def info(self) -> InstanceInfo | None:
        return None if self._served is None else self._served.info

    @property
    def num_active_requests(self) -> int:
        return len(self._active)

    async def wait_idle(self) -> None:
        """Returns once no request is in flight on this worker."""
        await self._idle.wait()

    async def start(self) -> InstanceInfo:
        metadata = {"model": self.config.model_name} if self.config.model_name else {}
        metadata.update(self.config.metadata)
        metadata[ROLE_KEY] = self.config.role
        if self.config.role != DEFAULT_ROLE:
            await self._check_layout(metadata)
        self._served = await self.runtime.serve_endpoint(
            self.config.endpoint,
            self.generate,
            instance_id=self.config.instance_id,
            metadata=metadata,
            request_type=EngineRequest,
        )
        self._publisher = asyncio.create_task(self._publish_load())
        if self.kv_publisher is not None:
            await self._serve_kv_replay(self.kv_publisher, self._served.info.instance_id)
        if self.config.role != DEFAULT_ROLE:
            await self._serve_kv_release(self._served.info.instance_id)
        return self._served.info

    async def _check_layout(self, metadata: dict[str, str]) -> None:
        layout = metadata.get(LAYOUT_KEY)
        if layout is None:
            return
        client = self.runtime.client(self.config.endpoint)
        with contextlib.suppress(TimeoutError):  # alone so far: nothing to disagree with
            await client.wait_for_instances(LAYOUT_CHECK_WAIT_S)
        conflict = layout_conflict(layout, metadata.get("model", ""), client.instances())
        if conflict is not None:
            raise KvLayoutMismatchError(
                f"this {self.config.role} worker's KV layout {layout} differs from worker "
                f"{conflict.instance_id}'s {conflict.metadata.get(LAYOUT_KEY)}: KV blocks "
                "cannot move between them (same model, dtype and --block-size needed)"
            )

    async def _serve_kv_release(self, instance_id: str) -> None:
        endpoint = EndpointId(self.config.namespace, self.config.component, KV_RELEASE_ENDPOINT)
        self._release = await self.runtime.serve_endpoint(
            endpoint,
            self.release_transfers,
            instance_id=release_instance_id(instance_id),
            request_type=KvReleaseRequest,
        )

    async def release_transfers(
        self, request: KvReleaseRequest, ctx: RequestContext
    ) -> AsyncIterator[KvReleaseReply]:
        """The ``kv_release`` handler: the engine frees the blocks held for these requests'
        transfers at its next turn (ids holding nothing are ignored)."""
        release = getattr(self.engine, "release_transfers", None)
        if release is not None:
            release(list(request.request_ids))
        yield KvReleaseReply(num_requests=len(request.request_ids))

    async def _serve_kv_replay(self, publisher: KvPublisher, instance_id: str) -> None:
        publisher.bind(instance_id)
        endpoint = EndpointId(self.config.namespace, self.config.component, KV_REPLAY_ENDPOINT)
        self._replay = await self.runtime.serve_endpoint(
            endpoint,
            publisher.replay,
            instance_id=replay_instance_id(instance_id),
            request_type=KvReplayRequest,
        )

    async def stop(self, drain_timeout_s: float | None = None) -> int:
        """Deregisters, drains, aborts the rest; returns how many requests were aborted."""
        for served in (self._served, self._replay, self._release):
            if served is not None:
                await served.stop()
        timeout = self.config.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        aborted = list(self._active)
        self._evicted.update(aborted)
        for request_id in aborted:
            await maybe_await(self.engine.abort(request_id))
        if self._publisher is not None:
            self._publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._publisher
        return len(aborted)

    async def generate(
        self, request: EngineRequest, ctx: RequestContext
    ) -> AsyncIterator[RequestOutput]:
        """The endpoint handler: streams the engine's outputs for ``request``."""
        request_id = request.request_id
        if request_id in self._active:
            raise DuplicateRequestError.for_request(request_id)
        if not self.engine.is_healthy():
            raise EngineDeadError("the engine of this worker is not healthy")
        self._active.add(request_id)
        self._idle.clear()
        stream = self.engine.generate(request)
        try:
            async for output in stream:
                if output.finish_reason is FinishReason.ABORT and request_id in self._evicted:
                    break
                yield output
            if request_id in self._evicted:
                raise InstanceFailedError(f"worker stopped before request {request_id} ended")
        finally:
            await _close(stream)
            self._active.discard(request_id)
            self._evicted.discard(request_id)
            if not self._active:
                self._idle.set()

    def load(self) -> WorkerLoad:
        instance_id = self.info.instance_id if self.info else (self.config.instance_id or "")
        return load_from_stats(instance_id, self.engine.stats())

    async def _publish_load(self) -> None:
        last: WorkerLoad | None = None
        while True:
            try:
                load = self.load()
                if load != last:
                    await self.runtime.publish(
                        self.config.namespace, self.config.component, LOAD_TOPIC, load
                    )
                    last = load
            except Exception:  # a stats hiccup must not kill the publisher
                log.exception("worker: publishing load failed")
            await asyncio.sleep(self.config.load_interval_s)


async def _close(stream: AsyncIterator[RequestOutput]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()
