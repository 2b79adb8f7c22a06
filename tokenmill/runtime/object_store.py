"""A named bucket of the NATS JetStream object store on its own connection: bytes by name,
for the shared KV tier (``tokenmill.kvstore.nats_store``). The NATS client stays under
``runtime/`` (import-linter); this is the only object-store surface the tier needs.

    bucket = await ObjectBucket.connect("nats://127.0.0.1:4222", "tokenmill_kv", max_bytes=...)
    await bucket.put("name", data); data = await bucket.get("name")  # None when absent
    await bucket.close()

Every failure to reach the server (no connection, a timeout, JetStream unavailable) raises
``ObjectStoreUnavailable``; an absent object is ``None``, never an exception. The connection
reconnects forever in the background, so a server that comes back is used again.
"""

from __future__ import annotations

import asyncio
from typing import Any

import nats
from nats.errors import Error as NatsError
from nats.js.api import ObjectStoreConfig
from nats.js.errors import NotFoundError, ObjectNotFoundError


async def _quiet(_: Exception) -> None:
    pass


class ObjectStoreUnavailable(ConnectionError):
    """The NATS server or its JetStream object store cannot be used right now."""


class ObjectBucket:
    """One object-store bucket. All methods are coroutines of the loop that connected."""

    def __init__(self, nc: Any, store: Any, timeout_s: float):
        self._nc = nc
        self._store = store
        self._timeout_s = timeout_s

    @classmethod
    async def connect(
        cls, url: str, bucket: str, max_bytes: int | None = None, timeout_s: float = 5.0
    ) -> ObjectBucket:
        """Connects (raises ``ObjectStoreUnavailable`` if the server does not answer within
        ``timeout_s``) and creates the bucket if it does not exist (``max_bytes``: its cap;
        JetStream then refuses puts beyond it)."""
        try:  # reconnects forever once connected; the first connect is bounded here
            nc = await asyncio.wait_for(
                nats.connect(
                    url,
                    connect_timeout=timeout_s,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.25,
                    allow_reconnect=True,
                    error_cb=_quiet,  # the tier logs its store going down once, not each try
                ),
                timeout_s,
            )
        except (TimeoutError, OSError, NatsError) as exc:
            raise ObjectStoreUnavailable(f"cannot reach NATS at {url}: {exc}") from exc
        try:
            config = ObjectStoreConfig(bucket=bucket, max_bytes=max_bytes or -1)
            store = await nc.jetstream(timeout=timeout_s).create_object_store(bucket, config)
        except (TimeoutError, OSError, NatsError) as exc:
            await nc.close()
            raise ObjectStoreUnavailable(f"object store {bucket!r}: {exc}") from exc
        return cls(nc, store, timeout_s)

    async def put(self, name: str, data: bytes) -> None:
        await self._call(self._store.put(name, data))

    async def get(self, name: str) -> bytes | None:
        try:
            result = await self._call(self._store.get(name))
        except (NotFoundError, ObjectNotFoundError):
            return None
        return bytes(result.data)

    async def contains(self, name: str) -> bool:
        try:
            await self._call(self._store.get_info(name))
        except (NotFoundError, ObjectNotFoundError):
            return False
        return True

    async def _call(self, coro: Any) -> Any:
        if not self._nc.is_connected:
            coro.close()
            raise ObjectStoreUnavailable("not connected to NATS")
        try:
            return await asyncio.wait_for(coro, self._timeout_s)
        except (NotFoundError, ObjectNotFoundError):
            raise
        except (TimeoutError, OSError, NatsError) as exc:
            raise ObjectStoreUnavailable(f"object store: {exc!r}") from exc

    async def close(self) -> None:
        await self._nc.close()
