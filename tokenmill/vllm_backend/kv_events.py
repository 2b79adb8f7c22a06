"""vLLM's KV events (its ZMQ publisher) as ours: block hashes recomputed by our one hash
function from the events' token ids.

Wire format (vLLM ``distributed/kv_events.py``, read from 0.32.0): each ZMQ message is
``(topic, seq: u64 big-endian, msgpack(KVEventBatch))``; a batch is ``[ts, events, dp_rank]``
and each event a map tagged ``type``: ``BlockStored`` (vLLM's ``block_hashes``, its
``parent_block_hash``, the blocks' ``token_ids``, ``block_size``, ``medium``, per-block
``extra_keys``), ``BlockRemoved`` (``block_hashes``) or ``AllBlocksCleared``. The structs
below mirror it, so decoding needs no vLLM import. A replay socket (ROUTER) answers an 8-byte
start ``seq`` with the buffered messages from there, then an end marker (``seq == -1``).

``KvEventTranslator`` (pure, one per worker, fed in publish order) keeps vLLM hash -> (our
sequence hash, seed) for the blocks vLLM holds, so a child block chains from its parent's
hash and inherits its salt (vLLM puts a request's ``cache_salt`` in the first block's
``extra_keys``; our seed salts every block of the request). Blocks it cannot hash as ours
(another block size, a LoRA or multimodal key, an unknown parent) are skipped, counted and
logged: the router then under-counts that worker's cache, which costs a prefill, never a
wrong answer. ``Removed`` of unknown hashes is dropped. The map holds only blocks vLLM holds,
so it is bounded by vLLM's pool.

``KvEventSubscriber`` is the thread that reads the socket, detects a ``seq`` gap (the
subscriber joined late, or the PUB socket dropped messages at its high-water mark) and asks
the replay socket for the missing messages; when vLLM's buffer no longer has them it sends
``Cleared`` (the router forgets this worker's blocks, then relearns from new events) and logs
a warning.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import msgspec

from tokenmill.core.block_hash import chain_hashes, local_block_hashes, seed_for
from tokenmill.core.events import Cleared, KvEventData, Removed, Stored, StoredBlock

log = logging.getLogger(__name__)

VllmHash = int | bytes  # vLLM's ExternalBlockHash
DEVICE_MEDIUMS = ("GPU", None)  # vLLM names the engine's own KV memory "GPU", on CPU too
END_SEQ = -1


class BlockStored(msgspec.Struct, tag="BlockStored"):
    block_hashes: list[VllmHash]
    parent_block_hash: VllmHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[list[Any] | None] | None = None


class BlockRemoved(msgspec.Struct, tag="BlockRemoved"):
    block_hashes: list[VllmHash]
    medium: str | None = None


class AllBlocksCleared(msgspec.Struct, tag="AllBlocksCleared"):
    pass


class VllmEventBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]
    data_parallel_rank: int | None = None


_decoder = msgspec.msgpack.Decoder(VllmEventBatch)


def decode_batch(payload: bytes) -> VllmEventBatch:
    """One ZMQ payload; ``msgspec.DecodeError`` when it is not a vLLM KV event batch."""
    return _decoder.decode(payload)


class KvEventTranslator:
    """vLLM events -> our ``KvEventData`` (see the module docstring). Not thread-safe: one
    caller, in publish order."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.blocks: dict[VllmHash, tuple[int, int]] = {}  # vLLM hash -> (our hash, seed)
        self.num_skipped_blocks = 0

    def translate(self, batch: VllmEventBatch) -> list[KvEventData]:
        out: list[KvEventData] = []
        for event in batch.events:
            data = self._one(event)
            if data is not None:
                out.append(data)
        return out

    def _one(self, event: BlockStored | BlockRemoved | AllBlocksCleared) -> KvEventData | None:
        if isinstance(event, AllBlocksCleared):
            self.blocks.clear()
            return Cleared()
        if event.medium not in DEVICE_MEDIUMS:
            return None  # vLLM's own offload tiers: not enabled by this backend
        if isinstance(event, BlockRemoved):
            ours = [h for v in event.block_hashes if (h := self._forget(v)) is not None]
            return Removed(ours) if ours else None
        return self._stored(event)

    def _forget(self, vllm_hash: VllmHash) -> int | None:
        entry = self.blocks.pop(vllm_hash, None)
        return None if entry is None else entry[0]

    def _stored(self, event: BlockStored) -> Stored | None:
        n = len(event.block_hashes)
        why = self._unhashable(event)
        if why is not None:
            self.num_skipped_blocks += n
            log.warning("vLLM KV event: %d blocks not routable: %s", n, why)
            return None
        parent_entry = None
        if event.parent_block_hash is not None:
            parent_entry = self.blocks[event.parent_block_hash]
        seed = parent_entry[1] if parent_entry else seed_for(_salt(event))
        parent = parent_entry[0] if parent_entry else None
        local = local_block_hashes(event.token_ids, self.block_size, seed)
        ours = chain_hashes(local, parent, seed)
        for vllm_hash, h in zip(event.block_hashes, ours, strict=True):
            self.blocks[vllm_hash] = (h, seed)
        return Stored(parent, [StoredBlock(h, lh) for h, lh in zip(ours, local, strict=True)])

    def _unhashable(self, event: BlockStored) -> str | None:
        """Why ``event``'s blocks cannot get our hashes, or None."""
        if event.block_size != self.block_size:
            return f"block size {event.block_size}, the worker's is {self.block_size}"
        if len(event.token_ids) != len(event.block_hashes) * self.block_size:
            return f"{len(event.token_ids)} token ids for {len(event.block_hashes)} blocks"
        if event.lora_id is not None or event.lora_name is not None:
            return "a LoRA adapter's blocks"
        if event.parent_block_hash is not None and event.parent_block_hash not in self.blocks:
            return "the parent block is unknown (its event was lost)"
        keys = event.extra_keys or []
        first = keys[0] if keys else None
        if any(k for k in keys[1:]) or (first and not _is_salt(first)):
            return f"extra keys {keys!r} (multimodal or embeddings)"
        return None


def _is_salt(keys: list[Any]) -> bool:
    return len(keys) == 1 and isinstance(keys[0], str)


def _salt(event: BlockStored) -> str | None:
    keys = (event.extra_keys or [None])[0]
    return keys[0] if keys else None


class KvEventSubscriber:
    """Reads vLLM's KV event socket in its own thread, hands our events to ``sink`` (any
    thread-safe callable: ``KvPublisher.sink``). ``start()`` once, ``stop()`` joins."""

    POLL_MS = 100

    def __init__(
        self,
        endpoint: str,
        replay_endpoint: str | None,
        translator: KvEventTranslator,
        sink: Callable[[KvEventData], None],
    ):
        import zmq

        self.endpoint, self.replay_endpoint = endpoint, replay_endpoint
        self.translator, self.sink = translator, sink
        self.next_seq = 0
        self.num_batches = 0
        self.num_lost = 0  # messages neither received nor replayed
        self._ctx = zmq.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.connect(endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vllm-kv-events", daemon=True)

    def start(self) -> KvEventSubscriber:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._sub.close(linger=0)
        self._ctx.term()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self._sub.poll(self.POLL_MS):
                    _, seq, payload = self._sub.recv_multipart()
                    self._receive(int.from_bytes(seq, "big", signed=True), payload)
            except Exception:  # one bad message must not end the worker's event stream
                log.exception("vLLM KV events: reading the socket failed")

    def _receive(self, seq: int, payload: bytes) -> None:
        if seq < self.next_seq:
            return  # already applied (it came through a replay)
        if seq > self.next_seq:
            self._catch_up(seq)
        self._apply(seq, payload)

    def _apply(self, seq: int, payload: bytes) -> None:
        for data in self.translator.translate(decode_batch(payload)):
            self.sink(data)
        self.next_seq = seq + 1
        self.num_batches += 1

    def _catch_up(self, upto: int) -> None:
        """Messages ``next_seq .. upto - 1`` from the replay socket; ``Cleared`` when vLLM's
        buffer lacks some of them."""
        for seq, payload in self._replay(self.next_seq):
            if seq >= upto:
                break
            if seq == self.next_seq:
                self._apply(seq, payload)
        if self.next_seq < upto:
            lost = upto - self.next_seq
            self.num_lost += lost
            log.warning("vLLM KV events: %d batches lost; the router forgets this worker", lost)
            self.translator.blocks.clear()
            self.sink(Cleared())
            self.next_seq = upto

    def _replay(self, start: int) -> list[tuple[int, bytes]]:
        """The replay socket's messages from ``start`` ([] without one, or on a timeout)."""
        if self.replay_endpoint is None:
            return []
        import zmq

        sock = self._ctx.socket(zmq.DEALER)
        try:
            sock.connect(self.replay_endpoint)
            sock.send_multipart((b"", start.to_bytes(8, "big")))
            out: list[tuple[int, bytes]] = []
            while sock.poll(2000):
                _, _, seq_bytes, payload = sock.recv_multipart()
                seq = int.from_bytes(seq_bytes, "big", signed=True)
                if seq == END_SEQ:
                    break
                out.append((seq, payload))
            return out
        finally:
            sock.close(linger=0)
