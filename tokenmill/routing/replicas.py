"""Router replicas share in-flight state over the event plane (topic ``route``), so several
frontends (or standalone routers) do not herd onto the same worker.

``ReplicaSync`` publishes every in-flight change its ``KvRouterPolicy`` makes (``added`` with
the worker, the prompt's block hashes and prefill tokens; ``prefill_done``; ``freed``) and
applies other replicas' changes to its router's ``ActiveSequences`` under the key
``<replica id>:<request id>``. Messages are at most once: a lost ``freed`` is cleaned up by
the active set's TTL (``RouterConfig.active_ttl_s``); changes for an instance this replica
does not know (yet) are ignored. Local changes are queued and published in order by one
sender task (a task per change cost more than the publish itself); ``stop()`` publishes
what is still queued.

Changes are published only while another replica is alive: each replica sends a ``hello``
every ``hello_interval_s`` and answers a replica it hears for the first time (or again after
``peer_ttl_s`` of silence) with one at once, so a lone frontend sends no per-request
messages (they were ~70% of nats-server's load in the single-frontend benchmark). A replica
that joins learns only the changes made after it was heard; requests already in flight
elsewhere are invisible to it until they end.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid

from tokenmill.routing.kv_policy import KvRouterPolicy
from tokenmill.runtime.interface import Runtime
from tokenmill.runtime.kv_wire import ROUTE_TOPIC, RouteEvent

log = logging.getLogger(__name__)


class ReplicaSync:
    def __init__(
        self,
        runtime: Runtime,
        namespace: str,
        component: str,
        policy: KvRouterPolicy,
        hello_interval_s: float = 2.0,
        peer_ttl_s: float = 6.0,
    ):
        self.runtime, self.namespace, self.component = runtime, namespace, component
        self.policy = policy
        self.replica_id = uuid.uuid4().hex[:12]
        self.hello_interval_s, self.peer_ttl_s = hello_interval_s, peer_ttl_s
        self.num_applied = 0
        self._peers: dict[str, float] = {}  # replica id -> monotonic time last heard
        self._task: asyncio.Task[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._queued: collections.deque[RouteEvent] = collections.deque()
        self._wakeup = asyncio.Event()
        self._stopping = False

    async def start(self) -> None:
        sub = self.runtime.subscribe(self.namespace, self.component, ROUTE_TOPIC, RouteEvent)
        ready = getattr(sub, "ready", None)
        if ready is not None:
            await ready()
        self.policy.listeners.append(self._local)
        self._task = asyncio.create_task(self._consume(sub))
        self._sender = asyncio.create_task(self._send_queued())
        self._queue(self._event("hello"))
        self._heartbeat = asyncio.create_task(self._hellos())

    async def stop(self) -> None:
        for task in (self._task, self._heartbeat):
            if task is not None:
                task.cancel()
        self._stopping = True
        self._wakeup.set()
        tasks = [t for t in (self._task, self._heartbeat, self._sender) if t is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

    def has_peers(self) -> bool:
        """Whether another replica was heard within ``peer_ttl_s`` (forgets older ones)."""
        horizon = time.monotonic() - self.peer_ttl_s
        for rid in [rid for rid, seen in self._peers.items() if seen < horizon]:
            del self._peers[rid]
        return bool(self._peers)

    def receive(self, event: RouteEvent) -> None:
        """An event from the topic: notes its replica (answering a new one with a hello)
        and applies its change; this replica's own events are ignored."""
        if event.replica_id == self.replica_id:
            return
        self.has_peers()
        if event.replica_id not in self._peers:
            self._queue(self._event("hello"))
        self._peers[event.replica_id] = time.monotonic()
        if event.kind != "hello":
            self.apply(event)

    def _event(self, kind: str, request_id: str = "", **fields) -> RouteEvent:
        return RouteEvent(kind=kind, replica_id=self.replica_id, request_id=request_id, **fields)  # type: ignore[arg-type]

    def _queue(self, event: RouteEvent) -> None:
        self._queued.append(event)
        self._wakeup.set()

    def _local(
        self, kind: str, request_id: str, instance_id: str, hashes, ntok: int, prefill: int
    ) -> None:
        if not self.has_peers():
            return  # nobody to tell
        self._queue(
            self._event(
                kind,
                request_id,
                instance_id=instance_id,
                block_hashes=list(hashes),
                num_prompt_tokens=ntok,
                num_prefill_tokens=prefill,
            )
        )

    async def _hellos(self) -> None:
        while True:
            await asyncio.sleep(self.hello_interval_s)
            self._queue(self._event("hello"))

    async def _send_queued(self) -> None:
        while not self._stopping or self._queued:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queued:
                event = self._queued.popleft()
                try:
                    await self.runtime.publish(self.namespace, self.component, ROUTE_TOPIC, event)
                except Exception as exc:  # at most once: a lost change expires by TTL
                    log.warning("router replica %s: publish failed: %s", self.replica_id, exc)

    async def _consume(self, sub) -> None:
        try:
            async for event in sub:
                self.receive(event)
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
            active.add_request(
                key, wid, event.block_hashes, event.num_prompt_tokens, event.num_prefill_tokens, now
            )
        elif event.kind == "prefill_done":
            active.mark_prefill_done(key, now)
        else:
            active.mark_finished(key)
        self.num_applied += 1
