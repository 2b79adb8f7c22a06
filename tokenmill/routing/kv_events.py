"""Feeds a ``KvRouterPolicy``'s index from the workers' KV events on the event plane.

Per worker instance the feed tracks the ``epoch`` and the next expected event id:

- a worker seen for the first time (a batch, or discovery listing it) or with a new epoch
  (it restarted) gets a full dump through its ``kv_replay`` endpoint (chunks; the first one
  clears what the index held for it);
- a gap in event ids asks for a replay from the first missing id (a full dump when the
  worker's ring buffer no longer holds it);
- live batches arriving while a replay or dump runs are buffered and applied after it,
  skipping what the replay already covered.

A worker whose card says ``kv_events=0``, or that has not published any event
``silence_s`` seconds after its first request was routed to it, triggers a loud warning and
the policy's approximate mode (``KvRouterPolicy.use_approx``), never silence.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field

from tokenmill.core.events import KvEvent
from tokenmill.routing.kv_policy import KvRouterPolicy
from tokenmill.runtime.interface import EndpointClient, EndpointId, Runtime
from tokenmill.runtime.kv_wire import (
    KV_REPLAY_ENDPOINT,
    KV_TOPIC,
    KvEventBatch,
    KvReplayChunk,
    KvReplayRequest,
    replay_instance_id,
)

log = logging.getLogger(__name__)


@dataclass
class _WorkerState:
    epoch: str | None = None
    next_event_id: int = 0
    syncing: bool = False
    buffered: list[KvEvent] = field(default_factory=list)


class KvEventFeed:
    def __init__(
        self,
        runtime: Runtime,
        generate: EndpointClient,
        policy: KvRouterPolicy,
        silence_s: float = 10.0,
    ):
        self.runtime, self.generate, self.policy = runtime, generate, policy
        ep = generate.endpoint
        self.replay_client = runtime.client(
            EndpointId(ep.namespace, ep.component, KV_REPLAY_ENDPOINT), KvReplayChunk
        )
        self.silence_s = silence_s
        self.states: dict[str, _WorkerState] = {}
        self.num_replays = 0
        self.num_dumps = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._syncs: set[asyncio.Task[None]] = set()
        self.silence = SilenceWatch(self)

    async def start(self) -> None:
        """Subscribes (returns once the subscription is live) and starts watching workers."""
        ep = self.generate.endpoint
        sub = self.runtime.subscribe(ep.namespace, ep.component, KV_TOPIC, KvEventBatch)
        ready = getattr(sub, "ready", None)
        if ready is not None:
            await ready()
        self.policy.listeners.append(self._on_route)
        self._tasks = [
            asyncio.create_task(self._consume(sub)),
            asyncio.create_task(self._watch()),
            asyncio.create_task(self._check_silence()),
        ]

    def _on_route(self, kind: str, request_id: str, instance_id: str, *_: object) -> None:
        if kind == "added":
            self.silence.routed(instance_id)

    async def _check_silence(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.silence.check()

    async def stop(self) -> None:
        for task in [*self._tasks, *self._syncs]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._syncs, return_exceptions=True)

    # ---- discovery ---------------------------------------------------------------------
    async def _watch(self) -> None:
        watch = self.generate.watch()
        try:
            async for event in watch:
                iid = event.instance.instance_id
                if event.kind == "removed":
                    self.states.pop(iid, None)
                elif event.instance.metadata.get("kv_events") == "0":
                    self.policy.use_approx(f"worker {iid} publishes no KV events")
                elif iid not in self.states:
                    self._sync(iid, self.states.setdefault(iid, _WorkerState()), None)
        finally:
            await watch.aclose()

    # ---- live events -------------------------------------------------------------------
    async def _consume(self, sub) -> None:
        try:
            async for batch in sub:
                self.on_batch(batch)
        finally:
            await sub.aclose()

    def on_batch(self, batch: KvEventBatch) -> None:
        """Applies one worker's batch; workers not (yet) listed by ``generate`` are skipped
        (another model's, or a new one whose dump will follow its discovery)."""
        iid = batch.instance_id
        state = self.states.get(iid)
        if state is None and all(i.instance_id != iid for i in self.generate.instances()):
            return
        if state is None or (state.epoch is not None and state.epoch != batch.epoch):
            state = self.states[iid] = _WorkerState(epoch=batch.epoch)
            state.buffered.extend(batch.events)
            self._sync(iid, state, None)
            return
        if state.syncing:
            state.buffered.extend(batch.events)
            return
        self._apply_live(iid, state, batch.events)

    def _apply_live(self, iid: str, state: _WorkerState, events: list[KvEvent]) -> None:
        for i, event in enumerate(events):
            if event.event_id < state.next_event_id:
                continue  # already applied (a replay covered it)
            if event.event_id > state.next_event_id:
                log.info(
                    "router: KV event gap from %s: expected %d, got %d; replaying",
                    iid,
                    state.next_event_id,
                    event.event_id,
                )
                state.buffered.extend(events[i:])
                self._sync(iid, state, state.next_event_id)
                return
            self._apply(iid, event)
            state.next_event_id += 1

    def _apply(self, iid: str, event: KvEvent) -> None:
        self.policy.router.index.apply_data(self.policy.worker_id(iid), event.data, event.tier)

    # ---- replay and dump ---------------------------------------------------------------
    def _sync(self, iid: str, state: _WorkerState, from_event_id: int | None) -> None:
        state.syncing = True
        task = asyncio.create_task(self._run_sync(iid, state, from_event_id))
        self._syncs.add(task)
        task.add_done_callback(self._syncs.discard)

    async def _run_sync(self, iid: str, state: _WorkerState, from_event_id: int | None) -> None:
        try:
            await self._fetch(iid, state, from_event_id)
        except Exception as exc:  # the worker may be gone; the next batch retries
            log.warning("router: KV replay from %s failed: %s", iid, exc)
            state.epoch = None
        finally:
            state.syncing = False
        buffered, state.buffered = state.buffered, []
        if self.states.get(iid) is state:
            self._apply_live(iid, state, buffered)

    async def _fetch(self, iid: str, state: _WorkerState, from_event_id: int | None) -> None:
        request = KvReplayRequest(from_event_id=from_event_id)
        replay_iid = replay_instance_id(iid)
        stream = self.replay_client.generate(request, f"kv-{uuid.uuid4().hex}", replay_iid, 30.0)
        async with stream:
            async for chunk in stream:
                if chunk.reset:
                    self.num_dumps += 1
                    self.policy.router.index.clear(self.policy.worker_id(iid))
                for event in chunk.events:
                    if event.event_id < 0 or event.event_id >= state.next_event_id:
                        self._apply(iid, event)
                state.epoch, state.next_event_id = chunk.epoch, chunk.next_event_id
        if from_event_id is not None:
            self.num_replays += 1


class SilenceWatch:
    """Warns (and turns on approximate mode) when a worker that was routed requests has
    published no KV event ``silence_s`` after the first one."""

    def __init__(self, feed: KvEventFeed):
        self.feed = feed
        self._first_routed: dict[str, float] = {}

    def routed(self, instance_id: str) -> None:
        self._first_routed.setdefault(instance_id, time.monotonic())

    def check(self) -> None:
        now = time.monotonic()
        for iid, since in list(self._first_routed.items()):
            state = self.feed.states.get(iid)
            if state is not None and state.epoch is not None:
                del self._first_routed[iid]
            elif now - since > self.feed.silence_s:
                del self._first_routed[iid]
                self.feed.policy.use_approx(
                    f"worker {iid} published no KV events {self.feed.silence_s:.0f} s "
                    "after requests were routed to it"
                )
