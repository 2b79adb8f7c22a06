"""Assembling a serving stack: frontend + router + workers, in one process or over NATS.

- ``LocalStack`` (``tokenmill serve``): one engine behind a worker on the in-process runtime,
  a dispatcher with the route policy of ``RouterSpec``, the FastAPI app.
- ``RemoteStack`` (``tokenmill frontend``, ``serve --workers N``): the frontend over the NATS
  runtime; it serves every model a worker registers (``model_watch``), each with its own
  dispatcher and policy over that model's workers.
- ``kv_policy_parts``: the KV router fed by the workers' KV events and sharing in-flight
  state with other replicas; the standalone router (``router_service``) uses it too.

Call the ``build_*`` coroutines inside the event loop that will serve the stack; ``close()``
stops everything in dependency order.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from tokenmill.launch.engines import BuiltEngine, build_engine
from tokenmill.launch.model_card import ModelCard
from tokenmill.launch.model_watch import ModelWatcher, served_model
from tokenmill.launch.specs import (
    WORKER_COMPONENT,
    DisaggSpec,
    EngineSpec,
    RouterSpec,
    RuntimeSpec,
)
from tokenmill.worker.protocol import maybe_await

WORKER_WAIT_S = 300.0


@dataclass
class LocalStack:
    """Everything ``serve`` runs in one process; ``close()`` stops it in dependency order."""

    app: Any
    model: Any  # frontend.preprocess.ServedModel
    engine: Any
    runtime: Any
    worker: Any
    loads: Any

    async def drain(self, timeout_s: float) -> None:
        """No new requests; in-flight ones get ``timeout_s`` to finish, the rest are aborted
        (their streams end with an error event, their blocks are freed)."""
        await self.worker.stop(drain_timeout_s=timeout_s)

    async def close(self) -> None:
        await self.worker.stop(drain_timeout_s=0.0)
        await self.loads.stop()
        await self.runtime.shutdown()
        await maybe_await(self.engine.shutdown())


async def build_local_stack(engine: EngineSpec, config: Any, router: RouterSpec) -> LocalStack:
    """Builds the engine (in a thread, off the event loop), then ``assemble_local_stack``.
    ``config``: the ``FrontendConfig``."""
    from tokenmill.frontend.preprocess import ServedModel

    built: BuiltEngine = await asyncio.to_thread(build_engine, engine)
    model = ServedModel(built.model_name, built.tokenizer, built.context_length, int(time.time()))
    policy = local_policy(router, built.block_size)
    return await assemble_local_stack(built.engine, model, config, policy, _metrics(built))


def _metrics(built: BuiltEngine) -> Any:
    """The frontend's metrics, with the engine's KV tier metrics when it has tiers."""
    from tokenmill.frontend.metrics import FrontendMetrics
    from tokenmill.kvstore.metrics import TierCollector

    metrics = FrontendMetrics()
    if built.kv_tiers is not None:
        metrics.registry.register(TierCollector(built.kv_tiers.stats))
    return metrics


async def assemble_local_stack(
    engine: Any, model: Any, config: Any, policy: Any = None, metrics: Any = None
) -> LocalStack:
    """Worker over ``engine`` on a fresh in-process runtime, dispatcher (``policy`` None: round
    robin), load tracker, app."""
    from tokenmill.frontend.app import build_app
    from tokenmill.frontend.loads import LoadTracker
    from tokenmill.routing.dispatch import Dispatcher
    from tokenmill.runtime.inprocess import InProcessRuntime
    from tokenmill.worker.worker import Worker, WorkerConfig

    runtime = InProcessRuntime()
    worker = Worker(engine, runtime, WorkerConfig(model_name=model.name))
    await worker.start()
    client = runtime.client(worker.config.endpoint)
    loads = LoadTracker(runtime, client)
    loads.start()
    app = build_app(model, Dispatcher(client, policy), config, loads.loads, metrics)
    return LocalStack(app, model, engine, runtime, worker, loads)


def local_policy(router: RouterSpec, block_size: int) -> Any:
    """The in-process route policy: round robin, or the KV router core (no KV events on the
    wire in one process: ``kv`` mode predicts cache contents from its own routing decisions,
    see ``routing.kv_policy``)."""
    from tokenmill.routing.dispatch import RoundRobinPolicy
    from tokenmill.routing.kv_policy import KvRouterPolicy

    if router.mode == "round-robin":
        return RoundRobinPolicy()
    return KvRouterPolicy.create(router.mode, block_size)


@dataclass
class RemoteStack:
    """The frontend's parts over NATS; ``close()`` stops them and the runtime."""

    app: Any
    model: Any
    runtime: Any
    loads: Any
    parts: list[Any] = field(default_factory=list)  # objects with an async stop()

    async def drain(self, timeout_s: float) -> None:
        """Nothing to drain here: the workers drain their own requests on SIGTERM."""

    async def close(self) -> None:
        for part in [self.loads, *self.parts]:
            await part.stop()
        await self.runtime.shutdown()


async def build_remote_stack(
    runtime_spec: RuntimeSpec,
    config: Any,
    router: RouterSpec,
    expect_workers: int = 1,
    check: Any = None,
    disagg: DisaggSpec | None = None,
) -> RemoteStack:
    """Connects, waits for ``expect_workers`` live workers, serves the first one's model
    (card + tokenizer) and, through a ``ModelWatcher``, every other model that registers.
    ``check()`` (optional) is called while waiting; it raises to give up (a child died).
    ``disagg``: route through prefill/decode pools (``frontend.disagg``); None: one pool."""
    from tokenmill.core.request import RequestOutput
    from tokenmill.frontend.app import build_app
    from tokenmill.frontend.loads import LoadTracker
    from tokenmill.runtime.interface import EndpointId
    from tokenmill.runtime.nats_runtime import NatsRuntime

    runtime = await NatsRuntime.connect(runtime_spec.nats_url, runtime_spec.config())
    endpoint = EndpointId(runtime_spec.namespace, WORKER_COMPONENT, "generate")
    client = runtime.client(endpoint, response_type=RequestOutput)
    card = await first_card(client, expect_workers, check)
    model = await served_model(runtime, card)
    loads = LoadTracker(runtime, client)
    loads.start()

    async def make_dispatcher(card: ModelCard) -> tuple[Any, list[Any]]:
        namespace = runtime_spec.namespace
        if disagg is not None:
            return await disagg_dispatcher(
                router, disagg, runtime, namespace, client, card, loads.loads
            )
        return await model_dispatcher(router, runtime, namespace, client, card)

    dispatcher, parts = await make_dispatcher(card)
    app = build_app(model, dispatcher, config, loads.loads)
    watcher = ModelWatcher(runtime, client, app.front, make_dispatcher)  # models yet to come
    watcher.start()
    return RemoteStack(app, model, runtime, loads, [*parts, watcher])


async def model_dispatcher(
    router: RouterSpec, runtime: Any, namespace: str, client: Any, card: ModelCard
) -> tuple[Any, list[Any]]:
    """(Dispatcher over ``card.model``'s instances, parts to stop)."""
    from tokenmill.routing.dispatch import Dispatcher
    from tokenmill.routing.models import ModelView

    view = ModelView(client, card.model)
    policy, parts = await remote_policy(router, runtime, namespace, view, card.block_size)
    return Dispatcher(view, policy), parts


async def disagg_dispatcher(
    router: RouterSpec,
    disagg: DisaggSpec,
    runtime: Any,
    namespace: str,
    client: Any,
    card: ModelCard,
    loads: Any,
) -> tuple[Any, list[Any]]:
    """(``DisaggDispatcher`` over ``card.model``'s decode pool with its prefill pool beside
    it, parts to stop). Each pool has its own policy and KV index; with no prefill worker it
    routes as ``model_dispatcher`` does."""
    from tokenmill.frontend.disagg import DisaggDispatcher
    from tokenmill.routing.dispatch import Dispatcher
    from tokenmill.routing.models import DECODE_ROLES, PREFILL_ROLES, RoleView

    decode = RoleView(client, card.model, DECODE_ROLES)
    prefill = RoleView(client, card.model, PREFILL_ROLES)
    policy, parts = await remote_policy(router, runtime, namespace, decode, card.block_size)
    prefill_policy, prefill_parts = await pool_policy(router, runtime, prefill, card.block_size)
    dispatcher = DisaggDispatcher(
        decode,
        policy,
        Dispatcher(prefill, prefill_policy),
        disagg.config(),
        kv_release(runtime, namespace),
        loads,
    )
    return dispatcher, [*parts, *prefill_parts]


async def pool_policy(
    router: RouterSpec, runtime: Any, client: Any, block_size: int
) -> tuple[Any, list[Any]]:
    """A second pool's policy (the prefill pool): round robin, or a KV router over its own
    index fed by its workers' events (no replica sync: replicas share the decode pool's)."""
    from tokenmill.routing.dispatch import RoundRobinPolicy
    from tokenmill.routing.kv_events import KvEventFeed
    from tokenmill.routing.kv_policy import KvRouterPolicy

    if router.mode == "round-robin" or router.remote:
        return RoundRobinPolicy(), []
    policy = KvRouterPolicy.create(router.mode, block_size, events=True)
    feed = KvEventFeed(runtime, client, policy)
    await feed.start()
    return policy, [feed]


def kv_release(runtime: Any, namespace: str) -> Any:
    """``release(instance_id, request_ids)``: a prefill worker's ``kv_release`` endpoint."""
    import uuid

    from tokenmill.runtime.interface import EndpointId
    from tokenmill.runtime.kv_wire import (
        KV_RELEASE_ENDPOINT,
        KvReleaseReply,
        KvReleaseRequest,
        release_instance_id,
    )

    endpoint = EndpointId(namespace, WORKER_COMPONENT, KV_RELEASE_ENDPOINT)
    client = runtime.client(endpoint, response_type=KvReleaseReply)

    async def release(instance_id: str, request_ids: list[str]) -> None:
        message = KvReleaseRequest(request_ids=request_ids)
        stream = client.generate(
            message, f"release-{uuid.uuid4().hex}", release_instance_id(instance_id), 5.0
        )
        async with stream:
            async for _ in stream:
                pass

    return release


async def remote_policy(
    router: RouterSpec, runtime: Any, namespace: str, client: Any, block_size: int
) -> tuple[Any, list[Any]]:
    """Round robin, standalone router replicas (``router.remote``), or the KV router with its
    event feed and replica sync; returns (policy, parts)."""
    from tokenmill.routing.dispatch import RoundRobinPolicy

    if router.remote:
        from tokenmill.routing.remote_router import RemoteRoutePolicy, RouteDecision, route_endpoint

        return RemoteRoutePolicy(runtime.client(route_endpoint(namespace), RouteDecision)), []
    if router.mode == "round-robin":
        return RoundRobinPolicy(), []
    return await kv_policy_parts(router.mode, runtime, namespace, client, block_size)


async def kv_policy_parts(
    mode: str, runtime: Any, namespace: str, client: Any, block_size: int
) -> tuple[Any, list[Any]]:
    """``KvRouterPolicy`` + its ``KvEventFeed`` and ``ReplicaSync`` (started)."""
    from tokenmill.routing.kv_events import KvEventFeed
    from tokenmill.routing.kv_policy import KvRouterPolicy
    from tokenmill.routing.replicas import ReplicaSync

    policy = KvRouterPolicy.create(mode, block_size, events=True)
    feed = KvEventFeed(runtime, client, policy)
    await feed.start()
    replicas = ReplicaSync(runtime, namespace, WORKER_COMPONENT, policy)
    await replicas.start()
    return policy, [feed, replicas]


async def first_card(client: Any, expect_workers: int, check: Any = None) -> ModelCard:
    """Waits for ``expect_workers`` instances with model cards; the first one's card."""
    deadline = time.monotonic() + WORKER_WAIT_S
    while True:
        cards = [ModelCard.from_metadata(i.metadata) for i in client.instances()]
        found = [c for c in cards if c is not None]
        if len(found) >= expect_workers:
            return found[0]
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(found)} of {expect_workers} workers registered")
        if check is not None:
            check()
        await asyncio.sleep(0.05)
