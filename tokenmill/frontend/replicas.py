"""Router replicas share in-flight state over the event plane (topic ``route``), so several
frontends (or standalone routers) do not herd onto the same worker.

``ReplicaSync`` publishes every in-flight change its ``KvRouterPolicy`` makes (``added`` with
the worker, the prompt's block hashes and prefill tokens; ``prefill_done``; ``freed``) and
applies other replicas' changes to its router's ``ActiveSequences`` under the key
``<replica id>:<request id>``. Messages are at most once: a lost ``freed`` is cleaned up by
the active set's TTL (``RouterConfig.active_ttl_s``); changes for an instance this replica
does not know (yet) are ignored.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from tokenmill.frontend.kv_policy import KvRouterPolicy
from tokenmill.runtime.interface import Runtime
from tokenmill.runtime.kv_wire import ROUTE_TOPIC, RouteEvent

log = logging.getLogger(__name__)


class ReplicaSync:
    def __init__(self, runtime: Runtime, namespace: str, component: str,
                 policy: KvRouterPolicy):  # fmt: skip
        self.runtime, self.namespace, self.component = runtime, namespace, component
        self.policy = policy
        self.replica_id = uuid.uuid4().hex[:12]
        self.num_applied = 0
        self._task: asyncio.Task[None] | None = None
        self._sends: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        sub = self.runtime.subscribe(self.namespace, self.component, ROUTE_TOPIC, RouteEvent)
        ready = getattr(sub, "ready", None)
        if ready is not None:
            await ready()
        self.policy.listeners.append(self._local)
        self._task = asyncio.create_task(self._consume(sub))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await asyncio.gather(*([self._task] if self._task else []), *self._sends,
                             return_exceptions=True)  # fmt: skip

    def _local(self, kind: str, request_id: str, instance_id: str, hashes, ntok: int,
               prefill: int) -> None:  # fmt: skip
        event = RouteEvent(kind=kind, replica_id=self.replica_id, request_id=request_id,
                           instance_id=instance_id, block_hashes=list(hashes),
                           num_prompt_tokens=ntok, num_prefill_tokens=prefill)  # fmt: skip
        task = asyncio.ensure_future(
            self.runtime.publish(self.namespace, self.component, ROUTE_TOPIC, event)
        )
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _consume(self, sub) -> None:
        try:
            async for event in sub:
                if event.replica_id != self.replica_id:
                    self.apply(event)
        finally:
            await sub.aclose()

    def apply(self, event: RouteEvent) -> None:
        """Applies another replica's change to this router's in-flight accounting."""
        active = self.policy.router.active
        key = f"{event.replica_id}:{event.request_id}"
        now = time.monotonic()
        if event.kind == "added":
            wid = self.policy.known_worker_id(event.instance_id)
            if wid is None:
                return
            active.add_request(key, wid, event.block_hashes, event.num_prompt_tokens,
                               event.num_prefill_tokens, now)  # fmt: skip
        elif event.kind == "prefill_done":
            active.mark_prefill_done(key, now)
        else:
            active.mark_finished(key)
        self.num_applied += 1
