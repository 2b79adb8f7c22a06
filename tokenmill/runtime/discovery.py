"""Discovery over a JetStream KV bucket: one key per served instance, each written with a
per-message TTL that acts as the instance's lease.

Key: ``<namespace>.<component>.<endpoint>.<instance_id>``; value: msgpack ``InstanceInfo``.
``Leases`` rewrites every key it holds each ``ttl_s / 3`` (the heartbeat); a process that dies
stops renewing, the server expires the key after ``ttl_s`` and places a delete marker, which
every watcher sees as ``removed``. ``InstanceCache`` mirrors one endpoint's keys: it loads a
snapshot, then applies updates; after a reconnect it re-reads the snapshot and emits the
difference, so watchers never miss a change made while the connection was down.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgspec

from tokenmill.runtime.interface import InstanceEvent
from tokenmill.runtime.wire import InstanceInfo

log = logging.getLogger(__name__)
_INFO = msgspec.msgpack.Decoder(InstanceInfo)
_ENC = msgspec.msgpack.Encoder()
RETRY_S = 0.2


def lease_key(info: InstanceInfo) -> str:
    return f"{info.namespace}.{info.component}.{info.endpoint}.{info.instance_id}"


async def open_bucket(js: Any, bucket: str) -> Any:
    """The bucket, created if missing (per-message TTLs and TTL delete markers enabled)."""
    from nats.js.api import KeyValueConfig, StorageType
    from nats.js.errors import BucketNotFoundError

    try:
        return await js.key_value(bucket)
    except BucketNotFoundError:
        config = KeyValueConfig(
            bucket=bucket, history=1, storage=StorageType.FILE, limit_marker_ttl=1.0
        )
        return await js.create_key_value(config)


class Leases:
    """The keys this process holds, renewed by a heartbeat task until removed."""

    def __init__(self, js: Any, bucket: str, ttl_s: float):
        self._js, self._bucket, self.ttl_s = js, bucket, ttl_s
        self._held: dict[str, bytes] = {}
        self._task: asyncio.Task[None] | None = None
        self.kv: Any = None  # the bucket handle; reopened when the server lost it

    async def open(self) -> Leases:
        self.kv = await open_bucket(self._js, self._bucket)
        return self

    def _subject(self, key: str) -> str:
        return f"$KV.{self._bucket}.{key}"

    async def put(self, info: InstanceInfo) -> str:
        key = lease_key(info)
        self._held[key] = _ENC.encode(info)
        await self._renew(key)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._heartbeat())
        return key

    async def _renew(self, key: str) -> None:
        ttl = f"{max(int(self.ttl_s * 1000), 1000)}ms"
        await self._js.publish(self._subject(key), self._held[key], headers={"Nats-TTL": ttl})

    async def remove(self, key: str) -> None:
        if self._held.pop(key, None) is not None:
            try:
                await self.kv.delete(key)
            except Exception as exc:  # NATS down: the lease lapses on its own
                log.warning(
                    "could not delete lease %s (%s); it expires in %.1f s", key, exc, self.ttl_s
                )

    async def renew_all(self) -> None:
        """Rewrites every held key (heartbeat, and at once after a reconnect); if that
        fails, recreates the bucket (a server that lost its store) and tries once more."""
        try:
            await self._renew_held()
        except Exception as exc:
            log.info("lease renewal failed (%s); reopening bucket %s", exc, self._bucket)
            self.kv = await open_bucket(self._js, self._bucket)
            await self._renew_held()

    async def _renew_held(self) -> None:
        for key in list(self._held):
            if key in self._held:
                await self._renew(key)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            try:
                await self.renew_all()
            except Exception as exc:  # disconnected: retried next beat / on reconnect
                log.warning("lease renewal failed: %s", exc)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


class InstanceCache:
    """Live instances of one endpoint, in registration order, kept by a watch task."""

    def __init__(self, get_kv: Any, prefix: str):
        self._get_kv, self._prefix = get_kv, prefix
        self.instances: dict[str, InstanceInfo] = {}
        self.ready = asyncio.Event()  # set once the first snapshot is applied
        self.changed = asyncio.Event()
        self._queues: set[asyncio.Queue[InstanceEvent]] = set()
        self._restart = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    def add_queue(self) -> asyncio.Queue[InstanceEvent]:
        queue: asyncio.Queue[InstanceEvent] = asyncio.Queue()
        for info in self.instances.values():
            queue.put_nowait(InstanceEvent("added", info))
        self._queues.add(queue)
        return queue

    def remove_queue(self, queue: asyncio.Queue[InstanceEvent]) -> None:
        self._queues.discard(queue)

    def restart(self) -> None:
        """Re-read the snapshot (after a reconnect)."""
        self._restart.set()

    async def _run(self) -> None:
        while True:
            try:
                await self._watch_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("discovery watch on %s failed: %s; retrying", self._prefix, exc)
                await asyncio.sleep(RETRY_S)

    async def _watch_once(self) -> None:
        self._restart.clear()
        kv = await self._get_kv()
        watcher = await kv.watch(self._prefix + ".*")
        try:
            snapshot: dict[str, InstanceInfo] = {}
            async for entry in watcher:
                if entry is None:
                    break
                if entry.operation is None:
                    snapshot[entry.key] = _INFO.decode(entry.value)
            self._reconcile(snapshot)
            await self._follow(watcher)
        finally:
            await watcher.stop()

    async def _follow(self, watcher: Any) -> None:
        restart = asyncio.ensure_future(self._restart.wait())
        try:
            while True:
                update = asyncio.ensure_future(watcher.updates(timeout=None))
                done, _ = await asyncio.wait({update, restart}, return_when="FIRST_COMPLETED")
                if restart in done:
                    update.cancel()
                    return
                entry = update.result()
                if entry is None:
                    return  # the watcher stopped
                self._apply(entry)
        finally:
            restart.cancel()

    def _apply(self, entry: Any) -> None:
        if entry.operation is None:
            info = _INFO.decode(entry.value)
            if entry.key not in self.instances:
                self.instances[entry.key] = info
                self._notify(InstanceEvent("added", info))
            else:
                self.instances[entry.key] = info  # a renewal
        elif entry.key in self.instances:
            self._notify(InstanceEvent("removed", self.instances.pop(entry.key)))

    def _reconcile(self, snapshot: dict[str, InstanceInfo]) -> None:
        for key in [k for k in self.instances if k not in snapshot]:
            self._notify(InstanceEvent("removed", self.instances.pop(key)))
        for key, info in snapshot.items():
            if key not in self.instances:
                self.instances[key] = info
                self._notify(InstanceEvent("added", info))
        self.ready.set()
        self.changed.set()
        self.changed = asyncio.Event()

    def _notify(self, event: InstanceEvent) -> None:
        for queue in self._queues:
            queue.put_nowait(event)
        self.changed.set()
        self.changed = asyncio.Event()

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
