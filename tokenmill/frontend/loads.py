"""The latest ``WorkerLoad`` of every live worker, fed by the event plane (topic ``load``) and
pruned by discovery (a removed instance's load is forgotten)."""

from __future__ import annotations

import asyncio
import contextlib

from tokenmill.runtime.interface import EndpointClient, Runtime
from tokenmill.runtime.wire import LOAD_TOPIC, WorkerLoad


class LoadTracker:
    def __init__(self, runtime: Runtime, client: EndpointClient):
        self._runtime, self._client = runtime, client
        self._loads: dict[str, WorkerLoad] = {}
        self._task: asyncio.Task[None] | None = None

    def loads(self) -> list[WorkerLoad]:
        """Loads of the instances discovery lists now (unknown ones are skipped)."""
        live = {info.instance_id for info in self._client.instances()}
        return [load for iid, load in self._loads.items() if iid in live]

    def start(self) -> None:
        endpoint = self._client.endpoint
        subscription = self._runtime.subscribe(
            endpoint.namespace, endpoint.component, LOAD_TOPIC, message_type=WorkerLoad
        )
        self._task = asyncio.create_task(self._run(subscription))

    async def _run(self, subscription) -> None:
        try:
            async for load in subscription:
                self._loads[load.instance_id] = load
        finally:
            await subscription.aclose()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
