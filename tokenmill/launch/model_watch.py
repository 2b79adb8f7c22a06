"""Serves every model a worker registers: ``ModelWatcher`` watches the workers' model cards
in discovery and, for each model name not served yet, fetches its tokenizer blob and adds it
to the frontend with a dispatcher (and router) over that model's workers only
(``routing.models.ModelView``), made by the stack's ``make_dispatcher``. A model whose last
worker is gone stays known but is no longer listed by ``/v1/models``; its requests get 503
until a worker returns."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from tokenmill.launch.model_card import ModelCard, tokenizer_from_blob

log = logging.getLogger(__name__)

# card -> (Dispatcher over that model's instances, parts with an async stop())
MakeDispatcher = Callable[[ModelCard], Awaitable[tuple[Any, list[Any]]]]


async def served_model(runtime: Any, card: ModelCard) -> Any:
    """The frontend's ``ServedModel`` for ``card`` (tokenizer from the object store)."""
    from tokenmill.frontend.preprocess import ServedModel

    tokenizer = tokenizer_from_blob(await runtime.get_blob(f"tokenizer-{card.tokenizer}"))
    return ServedModel(card.model, tokenizer, card.context_length, int(time.time()))


class ModelWatcher:
    """Adds each newly registered model to ``front`` (``frontend.app.Frontend``); ``stop()``
    ends the watch and stops the parts of every dispatcher it made."""

    def __init__(self, runtime: Any, client: Any, front: Any, make_dispatcher: MakeDispatcher):
        self.runtime, self.client, self.front = runtime, client, front
        self.make_dispatcher = make_dispatcher
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
            dispatcher, parts = await self.make_dispatcher(card)
        except Exception as exc:  # a missing blob: the next instance of the model retries
            log.warning("frontend: cannot serve model %r yet: %s", card.model, exc)
            return
        self.parts.extend(parts)
        self.front.add_model(model, dispatcher)
        log.info("frontend: now serving model %r", card.model)
