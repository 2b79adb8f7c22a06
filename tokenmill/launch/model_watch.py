"""Serves every model a worker registers: ``ModelWatcher`` watches the workers' model cards
in discovery and, for each model name not served yet, fetches its tokenizer blob and adds it
to the frontend with a dispatcher (and router, per ``--router-mode``) over that model's
workers only (``routing.models.ModelView``). A model whose last worker is gone stays known
but is no longer listed by ``/v1/models``; its requests get 503 until a worker returns."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from tokenmill.launch.model_card import ModelCard, tokenizer_from_blob

log = logging.getLogger(__name__)


async def served_model(runtime: Any, card: ModelCard) -> Any:
    """The frontend's ``ServedModel`` for ``card`` (tokenizer from the object store)."""
    from tokenmill.frontend.preprocess import ServedModel

    tokenizer = tokenizer_from_blob(await runtime.get_blob(f"tokenizer-{card.tokenizer}"))
    return ServedModel(card.model, tokenizer, card.context_length, int(time.time()))


async def model_dispatcher(args: Any, runtime: Any, client: Any, card: ModelCard):
    """(Dispatcher over ``card.model``'s instances, parts to stop)."""
    from tokenmill.launch.cmd_frontend import route_policy
    from tokenmill.routing.dispatch import Dispatcher
    from tokenmill.routing.models import ModelView

    view = ModelView(client, card.model)
    policy, parts = await route_policy(args, runtime, view, card.block_size)
    return Dispatcher(view, policy), parts


class ModelWatcher:
    def __init__(self, args: Any, runtime: Any, client: Any, front: Any):
        self.args, self.runtime, self.client, self.front = args, runtime, client, front
        self.parts: list[Any] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for part in self.parts:
            await part.stop()

    async def _run(self) -> None:
        watch = self.client.watch()
        try:
            async for event in watch:
                card = ModelCard.from_metadata(event.instance.metadata)
                if event.kind == "added" and card and card.model not in self.front.served:
                    await self._add(card)
        finally:
            await watch.aclose()

    async def _add(self, card: ModelCard) -> None:
        try:
            model = await served_model(self.runtime, card)
            dispatcher, parts = await model_dispatcher(self.args, self.runtime, self.client, card)
        except Exception as exc:  # a missing blob: the next instance of the model retries
            log.warning("frontend: cannot serve model %r yet: %s", card.model, exc)
            return
        self.parts.extend(parts)
        self.front.add_model(model, dispatcher)
        log.info("frontend: now serving model %r", card.model)
