"""A standalone router over the runtime: ``RouterService`` serves the endpoint
``<namespace>.router.route`` from a ``KvRouterPolicy`` (fed by KV events, sharing in-flight
state with other replicas); ``RemoteRoutePolicy`` is the frontend's ``RoutePolicy`` that asks it.

One routing is one stream: the service yields a ``RouteDecision`` and keeps the stream open
while the request runs; the end of the request is the stream's close (the handler's
``finally`` frees it). The router counts the prompt's prefill until then (prefill completion
is not reported separately). A router that dies closes its streams: their
requests carry on, and the frontend's next ``select`` goes to another router replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from tokenmill.core.request import EngineRequest
from tokenmill.routing.kv_policy import KvRouterPolicy
from tokenmill.routing.options import RouterOptions
from tokenmill.runtime.interface import (
    EndpointClient,
    EndpointId,
    InstanceFailedError,
    NoInstancesError,
    RequestContext,
    Runtime,
)

ROUTER_COMPONENT = "router"
ROUTE_ENDPOINT = "route"


class RouteRequest(msgspec.Struct, frozen=True, kw_only=True):
    request: EngineRequest
    instance_ids: list[str]
    options: RouterOptions | None = None  # the client's per-request router options


class RouteDecision(msgspec.Struct, frozen=True, kw_only=True):
    instance_id: str


def route_endpoint(namespace: str) -> EndpointId:
    return EndpointId(namespace, ROUTER_COMPONENT, ROUTE_ENDPOINT)


class RouterService:
    """One ``KvRouterPolicy`` per model (``make_policy(model name)``, created on the model's
    first request), so routing one model's request never drops another model's workers."""

    def __init__(
        self,
        runtime: Runtime,
        namespace: str,
        generate: EndpointClient,
        make_policy: Callable[[str], Awaitable[KvRouterPolicy]],
    ):
        self.runtime, self.namespace, self.generate = runtime, namespace, generate
        self.make_policy = make_policy
        self.policies: dict[str, asyncio.Future[KvRouterPolicy]] = {}
        self._served: Any = None

    async def start(self) -> None:
        self._served = await self.runtime.serve_endpoint(
            route_endpoint(self.namespace), self.route, request_type=RouteRequest
        )

    async def stop(self) -> None:
        if self._served is not None:
            await self._served.stop()

    async def route(self, req: RouteRequest, ctx: RequestContext):
        """Yields the decision, then holds the request as in flight until the stream closes."""
        policy = await self._policy(req.instance_ids)
        instance_id = await policy.select(req.request, req.instance_ids, req.options)
        try:
            yield RouteDecision(instance_id=instance_id)
            await asyncio.Event().wait()  # until the caller closes the stream
        finally:
            policy.on_finished(req.request.request_id)

    async def _policy(self, instance_ids: list[str]) -> KvRouterPolicy:
        wanted = set(instance_ids)
        model = next(
            (
                i.metadata.get("model", "")
                for i in self.generate.instances()
                if i.instance_id in wanted
            ),
            "",
        )
        future = self.policies.get(model)
        if future is None:
            future = self.policies[model] = asyncio.ensure_future(self.make_policy(model))
        return await asyncio.shield(future)


class RemoteRoutePolicy:
    """``RoutePolicy`` asking a standalone router: live replicas in turn; a replica that fails
    the call is skipped for this request (the next one is asked), none left ->
    ``NoInstancesError``."""

    def __init__(self, client: EndpointClient):
        self.client = client
        self._streams: dict[str, Any] = {}
        self._turn = itertools.count()

    async def select(
        self, request: EngineRequest, instance_ids: list[str], options: Any = None
    ) -> str:
        route = RouteRequest(request=request, instance_ids=instance_ids, options=options)
        failed: set[str] = set()
        while True:
            live = [i.instance_id for i in self.client.instances() if i.instance_id not in failed]
            if not live:
                raise NoInstancesError("no router replica is serving")
            replica = live[next(self._turn) % len(live)]
            stream = self.client.generate(route, request.request_id, replica)
            try:
                decision = await stream.__anext__()
            except (InstanceFailedError, NoInstancesError):
                failed.add(replica)
                await stream.aclose()
                continue
            self._streams[request.request_id] = stream
            return decision.instance_id

    def on_prefill_done(self, request_id: str) -> None:
        pass  # the router counts the prompt as prefill until the request ends

    def on_finished(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            task = asyncio.ensure_future(stream.aclose())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def close(self) -> None:
        for stream in list(self._streams.values()):
            with contextlib.suppress(Exception):
                await stream.aclose()
        self._streams.clear()
