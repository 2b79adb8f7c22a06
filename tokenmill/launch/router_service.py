"""A standalone KV router replica (``tokenmill router``): it rebuilds its index from the
workers' KV events (dumps on start, replays on gaps), shares in-flight state with the other
replicas and frontends, and serves ``<namespace>.router.route``; frontends started with
``--remote-router`` ask it instead of routing themselves. Each model's blocks are hashed with
the block size in its workers' model cards (``RouterSpec.block_size`` overrides)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tokenmill.launch.model_card import ModelCard
from tokenmill.launch.signals import wait_for_signal
from tokenmill.launch.specs import REAL_DEFAULTS, WORKER_COMPONENT, RouterSpec, RuntimeSpec
from tokenmill.launch.stacks import kv_policy_parts


async def serve_router(runtime_spec: RuntimeSpec, router: RouterSpec) -> int:
    """Runs the router service until SIGINT/SIGTERM; returns 0."""
    from tokenmill.core.request import RequestOutput
    from tokenmill.routing.models import ModelView
    from tokenmill.routing.remote_router import RouterService
    from tokenmill.runtime.interface import EndpointId
    from tokenmill.runtime.nats_runtime import NatsRuntime

    namespace = runtime_spec.namespace
    runtime = await NatsRuntime.connect(runtime_spec.nats_url, runtime_spec.config())
    client = runtime.client(EndpointId(namespace, WORKER_COMPONENT, "generate"), RequestOutput)
    parts: list[Any] = []

    async def make_policy(model: str) -> Any:
        """The policy of one model's workers (its own KV event feed and replica sync)."""
        view = ModelView(client, model)
        block_size = router.block_size or card_block_size(view.instances())
        policy, model_parts = await kv_policy_parts(
            router.mode, runtime, namespace, view, block_size
        )
        parts.extend(model_parts)
        return policy

    service = RouterService(runtime, namespace, client, make_policy)
    await service.start()
    print(f"tokenmill router: ready ({router.mode})", flush=True)
    try:
        await wait_for_signal()
    finally:
        await service.stop()
        for part in parts:
            await part.stop()
        await runtime.shutdown()
    return 0


def card_block_size(instances: Iterable[Any]) -> int:
    """The block size in the first model card among ``instances`` (the real engine's default
    when none has a card)."""
    cards = (ModelCard.from_metadata(i.metadata) for i in instances)
    return next((c.block_size for c in cards if c is not None), REAL_DEFAULTS.block_size)
