"""The shared remote tier: blocks every worker of a deployment can read, in the NATS JetStream
object store (already running in a multi-process deployment) or in Redis.

A block is one value, ``record.encode(...)`` (header + payload), under a name made of the layout
fingerprint and the block hash, so workers of one model share blocks and other models never
see them. The slot the placement gives is ignored (the store keys by hash); the store evicts on
its own (Redis ``maxmemory``, the bucket's ``max_bytes``), so an absent block is a plain miss.
A failure to reach the server raises ``StoreUnavailable``; the clients reconnect on their own,
so a store that comes back is used again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from tokenmill.core.events import Tier
from tokenmill.kvstore import record
from tokenmill.kvstore.base import BlockStore, StoreUnavailable
from tokenmill.kvstore.record import Miss

KV_BUCKET = "tokenmill_kv"


def block_key(fingerprint: int, block_hash: int) -> str:
    return f"tmkv.{fingerprint:016x}.{block_hash:016x}"


class _RemoteStore(BlockStore):
    tier = Tier.REMOTE

    def __init__(self, block_bytes: int, fingerprint: int):
        self.block_bytes = block_bytes
        self.fingerprint = fingerprint

    def _check(self, value: bytes | None, block_hash: int) -> memoryview | Miss:
        if value is None:
            return Miss.ABSENT
        return record.decode(value, block_hash, self.fingerprint, self.block_bytes)

    async def start(self) -> list[tuple[int, int]]:
        return []


class NatsObjectStore(_RemoteStore):
    """Blocks in the JetStream object store bucket ``bucket`` of the NATS server at ``url``."""

    def __init__(
        self,
        url: str,
        block_bytes: int,
        fingerprint: int,
        bucket: str = KV_BUCKET,
        max_bytes: int | None = None,
        timeout_s: float = 5.0,
    ):
        super().__init__(block_bytes, fingerprint)
        self.url, self.bucket_name, self.max_bytes, self.timeout_s = (
            url,
            bucket,
            max_bytes,
            timeout_s,
        )
        self._bucket: Any = None

    async def start(self) -> list[tuple[int, int]]:
        await self._connect()
        return []

    async def _connect(self) -> Any:
        from tokenmill.runtime.object_store import ObjectBucket, ObjectStoreUnavailable

        if self._bucket is None:
            try:
                self._bucket = await ObjectBucket.connect(
                    self.url, self.bucket_name, self.max_bytes, self.timeout_s
                )
            except ObjectStoreUnavailable as exc:
                raise StoreUnavailable(str(exc)) from exc
        return self._bucket

    async def _call(self, method: str, *args: Any) -> Any:
        from tokenmill.runtime.object_store import ObjectStoreUnavailable

        bucket = await self._connect()
        try:
            return await getattr(bucket, method)(*args)
        except ObjectStoreUnavailable as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def put(self, slot: int, block_hash: int, payload: memoryview) -> None:
        value = record.encode(block_hash, self.fingerprint, payload)
        await self._call("put", block_key(self.fingerprint, block_hash), value)

    async def get(self, slot: int, block_hash: int) -> memoryview | Miss:
        value = await self._call("get", block_key(self.fingerprint, block_hash))
        return self._check(value, block_hash)

    async def count_present(self, block_hashes: Sequence[int]) -> int:
        keys = [block_key(self.fingerprint, h) for h in block_hashes]
        present = await asyncio.gather(*(self._call("contains", k) for k in keys))
        return next((i for i, p in enumerate(present) if not p), len(present))

    async def close(self) -> None:
        bucket, self._bucket = self._bucket, None
        if bucket is not None:
            await bucket.close()


class RedisStore(_RemoteStore):
    """Blocks as Redis strings on the server at ``url`` (``redis://host:port``)."""

    def __init__(self, url: str, block_bytes: int, fingerprint: int, timeout_s: float = 5.0):
        super().__init__(block_bytes, fingerprint)
        import redis.asyncio as aioredis

        self.url = url
        self._redis: Any = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )

    async def _call(self, coro: Any) -> Any:
        import redis.exceptions

        try:
            return await coro
        except (OSError, redis.exceptions.RedisError) as exc:
            raise StoreUnavailable(f"redis at {self.url}: {exc}") from exc

    async def start(self) -> list[tuple[int, int]]:
        await self._call(self._redis.ping())
        return []

    async def put(self, slot: int, block_hash: int, payload: memoryview) -> None:
        value = record.encode(block_hash, self.fingerprint, payload)
        await self._call(self._redis.set(block_key(self.fingerprint, block_hash), value))

    async def get(self, slot: int, block_hash: int) -> memoryview | Miss:
        value = await self._call(self._redis.get(block_key(self.fingerprint, block_hash)))
        return self._check(value, block_hash)

    async def count_present(self, block_hashes: Sequence[int]) -> int:
        pipe = self._redis.pipeline(transaction=False)
        for h in block_hashes:
            pipe.exists(block_key(self.fingerprint, h))
        present = await self._call(pipe.execute())
        return next((i for i, p in enumerate(present) if not p), len(present))

    async def close(self) -> None:
        await self._redis.aclose()
