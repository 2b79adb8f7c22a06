"""The worker side of a KV connector (this interface is torch-free; implementations may use
torch and NIXL): it moves the bytes the scheduler side (``tokenmill.kv.connector``) decided.

Driven by ``EngineCore`` in the engine loop's thread, once per step, in this order::

    register_kv_caches(k, v)        once, when the executor has allocated its KV tensors
    start_load_kv(meta)             before the step's forward (also on a step with nothing
                                    scheduled): start async loads, finish sync ones, note
                                    holds and releases, tell owners of abandoned holds
    get_finished()                  after the step: loads done / failed, sends done
    complete_transfer_params(p)     for a finishing request whose blocks are held: add what
                                    only this side knows (agent, layout, checksums)

``NULL_WORKER_CONNECTOR`` does nothing; the core never calls it while the scheduler side is
the null connector (no metadata).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokenmill.core.kv_transfer import KvTransferParams
from tokenmill.kv.connector import ConnectorMetadata, ConnectorOutput


class WorkerConnector:
    """Base and null object. Not thread-safe: the engine loop's thread calls it."""

    def register_kv_caches(self, k_caches: Sequence[Any], v_caches: Sequence[Any]) -> None:
        """The executor's per-layer K and V tensors ``[num_blocks, block_size, Hkv, D]``."""

    def start_load_kv(self, metadata: ConnectorMetadata) -> None:
        """Start this step's work (see the module docstring). Must not block on a network
        or disk transfer except for loads marked ``is_async=False``."""

    def get_finished(self) -> ConnectorOutput | None:
        """What finished since the last call (None: nothing). Never blocks."""
        return None

    def complete_transfer_params(self, params: KvTransferParams) -> KvTransferParams:
        return params

    def shutdown(self) -> None:
        """Stop transfers and release registered memory (the executor frees its tensors
        afterwards)."""


NULL_WORKER_CONNECTOR = WorkerConnector()
