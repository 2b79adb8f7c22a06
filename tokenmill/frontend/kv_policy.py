"""``RoutePolicy`` over the router core (``tokenmill.router.KvRouter``): maps runtime instance
ids to the router's integer worker ids, hashes prompts with ``core.block_hash`` (salted by
``cache_salt``), waits while the router queues a request, and raises ``OverloadedError`` when
it sheds one (HTTP 503 with Retry-After).

In-process there are no KV events on the wire yet, so ``kv`` mode runs the router's
approximate index (routing decisions predict cache contents) and says so in the log once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

from tokenmill.core.block_hash import block_hashes
from tokenmill.core.errors import OverloadedError
from tokenmill.core.request import EngineRequest
from tokenmill.router.approx import ApproxConfig
from tokenmill.router.router import KvRouter, Queued, Routed, RouterConfig, Shed

log = logging.getLogger(__name__)


class KvRouterPolicy:
    def __init__(self, router: KvRouter, retry_after_s: float = 1.0):
        self.router = router
        self.retry_after_s = retry_after_s
        self._worker_ids: dict[str, int] = {}
        self._instance_ids: dict[int, str] = {}
        self._waiters: dict[str, asyncio.Future[Routed]] = {}
        self._next_worker_id = itertools.count(1)

    @classmethod
    def create(cls, mode: str, block_size: int = 16) -> KvRouterPolicy:
        approx = ApproxConfig() if mode == "kv" else None
        if approx is not None:
            log.warning("router: no KV events in-process; kv mode uses the approximate index")
        config = RouterConfig(mode=mode, block_size=block_size, approx=approx)
        return cls(KvRouter(config, time.monotonic))

    async def select(self, request: EngineRequest, instance_ids: list[str]) -> str:
        self._sync_workers(instance_ids)
        prompt = request.prompt_token_ids
        hashes = block_hashes(prompt, self.router.config.block_size, request.cache_salt)
        decision = self.router.route(request.request_id, hashes, len(prompt))
        if isinstance(decision, Shed):
            raise OverloadedError(f"request shed: {decision.reason}", self.retry_after_s)
        if isinstance(decision, Queued):
            decision = await self._wait(request.request_id)
        return self._instance_ids[decision.worker_id]

    def on_prefill_done(self, request_id: str) -> None:
        self.router.mark_prefill_done(request_id)
        self._drain()

    def on_finished(self, request_id: str) -> None:
        self.router.mark_finished(request_id)
        self._drain()

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
            if iid not in self._worker_ids:
                wid = next(self._next_worker_id)
                self._worker_ids[iid], self._instance_ids[wid] = wid, iid
                self.router.add_worker(wid)
        live = set(instance_ids)
        for iid in [i for i in self._worker_ids if i not in live]:
            wid = self._worker_ids.pop(iid)
            self._instance_ids.pop(wid, None)
            self.router.remove_worker(wid)
