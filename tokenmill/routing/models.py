"""Several models behind one frontend: ``ModelView`` narrows an endpoint client to the
instances whose model card names one model (``metadata["model"]``), so each served model gets
its own dispatcher and router over its own workers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from tokenmill.runtime.interface import EndpointClient, InstanceEvent, ResponseStream
from tokenmill.runtime.wire import InstanceInfo


class ModelView(EndpointClient):
    def __init__(self, client: EndpointClient, model: str):
        self.client, self.model = client, model
        self.endpoint = client.endpoint

    def _mine(self, info: InstanceInfo) -> bool:
        return info.metadata.get("model") == self.model

    def instances(self) -> list[InstanceInfo]:
        return [info for info in self.client.instances() if self._mine(info)]

    async def wait_for_instances(self, timeout_s: float | None = None) -> list[InstanceInfo]:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not (found := self.instances()):
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"no instance of model {self.model!r}")
            await asyncio.sleep(0.05)
        return found

    async def watch(self) -> AsyncIterator[InstanceEvent]:
        watch = self.client.watch()
        try:
            async for event in watch:
                if self._mine(event.instance):
                    yield event
        finally:
            await watch.aclose()  # type: ignore[attr-defined]

    def generate(self, request: Any, request_id: str, instance_id: str | None = None,
                 deadline_s: float | None = None) -> ResponseStream:  # fmt: skip
        return self.client.generate(request, request_id, instance_id, deadline_s)
