"""Several models behind one frontend: ``ModelView`` narrows an endpoint client to the
instances whose model card names one model (``metadata["model"]``), so each served model gets
its own dispatcher and router over its own workers.

A worker's role (``metadata["role"]``: ``both`` aggregated, ``prefill``, ``decode``) is part
of its registration; ``instance_role`` reads it (absent: ``both``, as every worker was before
roles existed)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from tokenmill.runtime.interface import EndpointClient, InstanceEvent, ResponseStream
from tokenmill.runtime.wire import InstanceInfo

ROLE_KEY = "role"
DEFAULT_ROLE = "both"
WORKER_ROLES = ("both", "prefill", "decode")


def check_role(role: str) -> str:
    """``role`` if it is one of ``WORKER_ROLES``; ``ValueError`` otherwise."""
    if role not in WORKER_ROLES:
        raise ValueError(f"worker role must be one of {WORKER_ROLES}, not {role!r}")
    return role


def instance_role(info: InstanceInfo) -> str:
    """The role an instance registered with; ``both`` when its metadata names none. Raises
    ``ValueError`` for a role this router does not know (a newer worker): never guess."""
    return check_role(info.metadata.get(ROLE_KEY, DEFAULT_ROLE))


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

    def generate(
        self,
        request: Any,
        request_id: str,
        instance_id: str | None = None,
        deadline_s: float | None = None,
    ) -> ResponseStream:
        return self.client.generate(request, request_id, instance_id, deadline_s)


PREFILL_ROLES = ("prefill",)
DECODE_ROLES = ("both", "decode")  # aggregated workers decode (and prefill locally) too


class RoleView(ModelView):
    """One model's instances of some roles (a pool: ``DECODE_ROLES`` or ``PREFILL_ROLES``),
    so each pool gets its own dispatcher, policy and KV index. An instance with a role this
    frontend does not know is in no pool."""

    def __init__(self, client: EndpointClient, model: str, roles: tuple[str, ...]):
        super().__init__(client, model)
        self.roles = roles

    def _mine(self, info: InstanceInfo) -> bool:
        return super()._mine(info) and info.metadata.get(ROLE_KEY, DEFAULT_ROLE) in self.roles


LAYOUT_KEY = "kv_layout"  # the KV layout (``core.kv_transfer.encode_layout``) in a registration


def layout_conflict(layout: str, model: str, instances: list[InstanceInfo]) -> InstanceInfo | None:
    """The first prefill or decode instance of ``model`` whose registered KV layout differs
    from ``layout`` (blocks could not move between them); None when all agree."""
    for info in instances:
        meta = info.metadata
        if meta.get("model") != model or meta.get(ROLE_KEY, DEFAULT_ROLE) == DEFAULT_ROLE:
            continue
        other = meta.get(LAYOUT_KEY)
        if other is not None and other != layout:
            return info
    return None
