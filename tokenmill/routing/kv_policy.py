"""``RoutePolicy`` over the router core (``tokenmill.router.KvRouter``): maps runtime instance
ids to the router's integer worker ids, hashes prompts with ``core.block_hash`` (salted by
``cache_salt``), waits while the router queues a request, and raises ``OverloadedError`` when
it sheds one (HTTP 503 with Retry-After).

In-process there are no KV events on the wire, so ``kv`` mode runs the router's approximate
index (routing decisions predict cache contents) and says so in the log once. Over NATS
(``events=True``) the index is fed by ``kv_events.KvEventFeed``; ``use_approx()`` falls back
to the approximate index when a worker publishes nothing.

``listeners`` hear every in-flight change this policy makes (``added`` with the
placement, ``prefill_done``, ``freed``): ``replicas.ReplicaSync`` shares them with other
router replicas, and applies theirs through ``router.active``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any

from tokenmill.core.block_hash import block_hashes
from tokenmill.core.errors import OverloadedError
from tokenmill.core.request import EngineRequest
from tokenmill.router.approx import ApproxConfig, ApproxIndexer
from tokenmill.router.policy import default_policy_config
from tokenmill.router.router import (
    KvRouter,
    Queued,
    Routed,
    RouteOverrides,
    RouterConfig,
    Shed,
)

log = logging.getLogger(__name__)


class KvRouterPolicy:
    def __init__(self, router: KvRouter, retry_after_s: float = 1.0):
        self.router = router
        # callables (kind, request_id, instance_id, block hashes, prompt tokens, prefill tokens)
        self.listeners: list[Any] = []
        self.retry_after_s = retry_after_s
        self._worker_ids: dict[str, int] = {}
        self._instance_ids: dict[int, str] = {}
        self._waiters: dict[str, asyncio.Future[Routed]] = {}
        self._next_worker_id = itertools.count(1)

    @classmethod
    def create(cls, mode: str, block_size: int = 16, events: bool = False) -> KvRouterPolicy:
        approx = ApproxConfig() if mode == "kv" and not events else None
        if approx is not None:
            log.warning("router: no KV events in-process; kv mode uses the approximate index")
        config = RouterConfig(mode=mode, block_size=block_size, approx=approx)
        return cls(KvRouter(config, time.monotonic))

    def use_approx(self, reason: str) -> None:
        """Switches to the approximate index (loudly): KV events are missing."""
        if self.router.approx is None and self.router.config.mode == "kv":
            log.error(
                "router: %s; kv routing falls back to the APPROXIMATE index "
                "(predicted from routing decisions, not from KV events)",
                reason,
            )
            self.router.approx = ApproxIndexer(self.router.index, ApproxConfig())

    def known_worker_id(self, instance_id: str) -> int | None:
        return self._worker_ids.get(instance_id)

    def worker_id(self, instance_id: str) -> int:
        """The router's id of ``instance_id`` (registered on first use)."""
        wid = self._worker_ids.get(instance_id)
        if wid is None:
            wid = next(self._next_worker_id)
            self._worker_ids[instance_id], self._instance_ids[wid] = wid, instance_id
            self.router.add_worker(wid)
        return wid

    async def select(
        self, request: EngineRequest, instance_ids: list[str], overrides: Any = None
    ) -> str:
        """``overrides``: per-request ``options.RouterOptions`` (knobs, pinned instance)."""
        return (await self.select_with_hit(request, instance_ids, overrides))[0]

    async def select_with_hit(
        self, request: EngineRequest, instance_ids: list[str], overrides: Any = None
    ) -> tuple[str, int]:
        """``select``, plus how many leading prompt tokens the chosen instance caches (as the
        index knows it): the conditional-disaggregation decision reads it."""
        self._sync_workers(instance_ids)
        prompt = request.prompt_token_ids
        hashes = block_hashes(prompt, self.router.config.block_size, request.cache_salt)
        ov = self._overrides(overrides)
        decision = self.router.route(request.request_id, hashes, len(prompt), ov)
        if isinstance(decision, Shed):
            raise OverloadedError(f"request shed: {decision.reason}", self.retry_after_s)
        if isinstance(decision, Queued):
            decision = await self._wait(request.request_id)
        instance_id = self._instance_ids[decision.worker_id]
        cached = min(decision.overlap_blocks * self.router.config.block_size, len(prompt))
        for listener in self.listeners:
            listener(
                "added", request.request_id, instance_id, hashes, len(prompt), len(prompt) - cached
            )
        return instance_id, cached

    def _overrides(self, options: Any) -> RouteOverrides | None:
        """``options.RouterOptions`` -> the router's ``RouteOverrides`` (pin by instance id,
        policy knobs over the mode's defaults)."""
        if options is None:
            return None
        pin = self._worker_ids.get(options.worker_id) if options.worker_id else None
        knobs = options.knobs()
        policy = default_policy_config(self.router.config.mode, **knobs) if knobs else None
        return RouteOverrides(worker_id=pin, policy=policy)

    def on_prefill_done(self, request_id: str) -> None:
        self.router.mark_prefill_done(request_id)
        self._notify("prefill_done", request_id)
        self._drain()

    def on_finished(self, request_id: str) -> None:
        self.router.mark_finished(request_id)
        self._notify("freed", request_id)
        self._drain()

    def _notify(self, kind: str, request_id: str) -> None:
        for listener in self.listeners:
            listener(kind, request_id, "", (), 0, 0)

    async def _wait(self, request_id: str) -> Routed:
        future = asyncio.get_running_loop().create_future()
        self._waiters[request_id] = future
        try:
            return await future
        finally:
            self._waiters.pop(request_id, None)

    def _drain(self) -> None:
        for routed in self.router.drain():
            future = self._waiters.pop(routed.request_id, None)
            if future is None or future.done():  # the client left while queued
                self.router.mark_finished(routed.request_id)
            else:
                future.set_result(routed)

    def _sync_workers(self, instance_ids: list[str]) -> None:
        """Adds instances the router has not seen; removes the ones discovery dropped."""
        for iid in instance_ids:
            self.worker_id(iid)
        live = set(instance_ids)
        for iid in [i for i in self._worker_ids if i not in live]:
            wid = self._worker_ids.pop(iid)
            self._instance_ids.pop(wid, None)
            self.router.remove_worker(wid)
