"""The worker side of the disaggregation connector: KV blocks moved between processes by
NIXL (NVIDIA's transfer library, UCX backend: shared memory / TCP on a CPU machine, RDMA or
NVLink on GPUs), pulled by the decode worker with a READ.

Memory: every layer's K and V tensor ``[num_blocks, block_size, Hkv, D]`` is registered once;
one descriptor per (tensor, block) is prepared once (``prep_xfer_dlist``), so a transfer is
``make_prepped_xfer`` over index lists (NIXL merges runs of adjacent blocks)::

    descriptor index = tensor * num_blocks + block      tensor = 2 * layer + (0 K | 1 V)

Who knows whom: this agent's connection info (``get_agent_metadata``) plus its tensors'
base addresses travel, as ``NixlPeer`` bytes, in the prefill worker's transfer parameters
over the request plane; the decode side adds the agent on first use. No side channel.

Messages (NIXL notifications, to the prefill agent): ``done:<request id>`` rides the READ
itself (delivered when the bytes have been read), ``abort:<request id>`` says the decode side
will not read (abandoned, failed, timed out). Both release the hold on the prefill side.

Checks: the scheduler side compared block hashes before the load; after it, each moved
block's checksum (XXH3-64 of a sample: layer 0's K and the last layer's V of that block) must
equal the sender's, computed when its hold began; a mismatch (the sender's blocks changed or
were reused) fails the load, and the request is recomputed locally.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
import torch
import xxhash

from tokenmill.core.errors import KvTransferUnavailableError
from tokenmill.core.kv_transfer import KvLayout, KvTransferParams, KvTransferReport
from tokenmill.engine.executor.kv_connector import WorkerConnector
from tokenmill.kv.connector import ConnectorMetadata, ConnectorOutput, KvLoad

log = logging.getLogger(__name__)

NIXL_INSTALL = "pip install --no-deps nixl==1.5.2 nixl-cu12==1.5.1"
_DONE, _ABORT = b"done:", b"abort:"
MAX_REPORTS = 4096  # load reports kept for requests' first outputs (aborted ones never ask)


def load_nixl() -> tuple[Any, Any]:
    """``(nixl_agent, nixl_agent_config)``; raises ``KvTransferUnavailableError`` saying why
    and how to install it."""
    try:
        from nixl._api import nixl_agent, nixl_agent_config
    except Exception as e:  # noqa: BLE001 - ImportError, or a native library that fails
        raise KvTransferUnavailableError(
            f"NIXL cannot be loaded ({type(e).__name__}: {e}); prefill and decode roles need "
            f"it: `{NIXL_INSTALL}` (aggregated serving, --role both, works without it)"
        ) from e
    return nixl_agent, nixl_agent_config


class NixlPeer(msgspec.Struct, frozen=True):
    """What a decode side needs to READ from this agent (``remote_agent_metadata``)."""

    agent_metadata: bytes
    base_addrs: list[int]  # per tensor, in descriptor order
    num_blocks: int
    block_bytes: int  # one block of one tensor
    mem_type: str
    device_id: int


_peer_encoder = msgspec.msgpack.Encoder()
_peer_decoder = msgspec.msgpack.Decoder(NixlPeer)


@dataclass
class TransferStats:
    """Cumulative figures of this side's loads."""

    num_loads: int = 0
    num_failed: int = 0
    num_checksum_failures: int = 0
    bytes: int = 0


@dataclass
class _Read:
    load: KvLoad
    handle: Any
    remote: str
    started: float
    num_bytes: int


class NixlWorkerConnector(WorkerConnector):
    """``name``: this agent's unique name (the worker's instance id). ``transfer_timeout_s``:
    a READ not done by then fails (and the request is recomputed)."""

    def __init__(
        self,
        name: str,
        layout: KvLayout,
        transfer_timeout_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        nixl_agent, nixl_agent_config = load_nixl()
        self.name = name
        self.layout = layout
        self.transfer_timeout_s = transfer_timeout_s
        self.clock = clock
        self.agent = nixl_agent(name, nixl_agent_config(backends=["UCX"]))
        self.stats = TransferStats()
        self._tensors: list[torch.Tensor] = []
        self._reads: dict[str, _Read] = {}
        self._remotes: dict[str, tuple[str, Any, NixlPeer]] = {}  # engine id -> agent, dlist
        self._failed: list[str] = []
        self._reports: dict[str, KvTransferReport] = {}
        self._reg: Any = None
        self._local: Any = None
        self._peer = b""

    # ------------------------------------------------------------------ setup

    def register_kv_caches(self, k_caches: Sequence[Any], v_caches: Sequence[Any]) -> None:
        tensors = [t for pair in zip(k_caches, v_caches, strict=True) for t in pair]
        num_blocks = tensors[0].shape[0]
        block_bytes = tensors[0][0].numel() * tensors[0].element_size()
        if block_bytes != self.layout.bytes_per_block_layer:
            raise ValueError("KV tensors do not match the connector's layout")
        mem_type = "VRAM" if tensors[0].is_cuda else "DRAM"
        device_id = tensors[0].device.index or 0
        self._tensors = tensors
        self._reg = self.agent.register_memory(tensors)
        bases = [t.data_ptr() for t in tensors]
        self._local = self.agent.prep_xfer_dlist(
            "NIXL_INIT_AGENT", _descs(bases, num_blocks, block_bytes, device_id), mem_type
        )
        peer = NixlPeer(
            self.agent.get_agent_metadata(), bases, num_blocks, block_bytes, mem_type, device_id
        )
        self._peer = _peer_encoder.encode(peer)
        self._num_blocks = num_blocks

    def shutdown(self) -> None:
        for read in self._reads.values():
            _quietly(self.agent.release_xfer_handle, read.handle)
        self._reads.clear()
        if self._reg is not None:
            _quietly(self.agent.deregister_memory, self._reg)
            self._reg = None

    # ------------------------------------------------------------------ prefill side

    def complete_transfer_params(self, params: KvTransferParams) -> KvTransferParams:
        checksums = [self.block_checksum(b) for b in params.remote_block_ids]
        return msgspec.structs.replace(
            params,
            remote_engine_id=self.name,
            remote_agent_metadata=self._peer,
            checksums=checksums,
            layout=self.layout,
        )

    def block_checksum(self, block_id: int) -> int:
        """XXH3-64 of layer 0's K and the last layer's V of one block (the sample)."""
        digest = xxhash.xxh3_64()
        for tensor in (self._tensors[0], self._tensors[-1]):
            digest.update(tensor[block_id].view(torch.uint8).cpu().numpy().data)
        return digest.intdigest()

    # ------------------------------------------------------------------ each step

    def start_load_kv(self, metadata: ConnectorMetadata) -> None:
        for load in metadata.loads:
            try:
                self._start_read(load)
            except Exception:  # noqa: BLE001 - an unreachable peer fails this load only
                log.exception("KV READ for %s could not start", load.request_id)
                self._fail(load)
        for source in metadata.abandoned:
            self._notify(source, _ABORT)

    def _start_read(self, load: KvLoad) -> None:
        source = load.source
        assert source is not None
        remote, remote_dlist, peer = self._remote(source)
        end = load.first_block + len(load.block_ids)
        remote_blocks = source.remote_block_ids[load.first_block : end]
        local_idx = _indices(load.block_ids, len(self._tensors), self._num_blocks)
        remote_idx = _indices(remote_blocks, len(self._tensors), peer.num_blocks)
        notif = _DONE + source.remote_request_id.encode()
        handle = self.agent.make_prepped_xfer(
            "READ", self._local, local_idx, remote_dlist, remote_idx, notif
        )
        num_bytes = len(local_idx) * peer.block_bytes
        read = _Read(load, handle, remote, self.clock(), num_bytes)
        self._reads[load.request_id] = read
        if self.agent.transfer(handle) == "ERR":
            raise RuntimeError("NIXL transfer failed to post")

    def _remote(self, source: KvTransferParams) -> tuple[str, Any, NixlPeer]:
        known = self._remotes.get(source.remote_engine_id)
        if known is None:
            peer = _peer_decoder.decode(source.remote_agent_metadata)
            remote = self.agent.add_remote_agent(peer.agent_metadata)
            remote = remote.decode() if isinstance(remote, bytes) else remote
            descs = _descs(peer.base_addrs, peer.num_blocks, peer.block_bytes, peer.device_id)
            dlist = self.agent.prep_xfer_dlist(remote, descs, peer.mem_type)
            known = self._remotes[source.remote_engine_id] = (remote, dlist, peer)
        return known

    def _notify(self, source: KvTransferParams, kind: bytes) -> None:
        try:
            remote = self._remote(source)[0]
            self.agent.send_notif(remote, kind + source.remote_request_id.encode())
        except Exception:  # noqa: BLE001 - the sender's timeout releases its hold anyway
            log.warning("could not tell %s about %s", source.remote_engine_id, kind.decode())

    def get_finished(self) -> ConnectorOutput | None:
        finished: list[str] = []
        failed, self._failed = self._failed, []
        now = self.clock()
        for rid, read in list(self._reads.items()):
            state = self.agent.check_xfer_state(read.handle)
            if state == "PROC" and now - read.started < self.transfer_timeout_s:
                continue
            if state == "PROC" and not _quietly(self.agent.release_xfer_handle, read.handle):
                continue  # cannot cancel it: bytes may still land, keep waiting
            del self._reads[rid]
            if state == "DONE":
                self.agent.release_xfer_handle(read.handle)
                if self._verify(read.load):
                    finished.append(rid)
                    self.stats.num_loads += 1
                    self.stats.bytes += read.num_bytes
                    if len(self._reports) >= MAX_REPORTS:  # first outputs that never came
                        self._reports.pop(next(iter(self._reports)))
                    self._reports[rid] = KvTransferReport(
                        read.num_bytes, now - read.started, len(read.load.block_ids)
                    )
                    continue
            else:
                log.warning("KV READ for %s %s", rid, "timed out" if state == "PROC" else state)
                self._notify(read.load.source, _ABORT)  # type: ignore[arg-type]
                if state != "PROC":
                    _quietly(self.agent.release_xfer_handle, read.handle)
            self.stats.num_failed += 1
            failed.append(rid)
        sends = self._take_notifs()
        if not (finished or failed or sends):
            return None
        return ConnectorOutput(finished_loads=finished, failed_loads=failed, finished_sends=sends)

    def take_load_report(self, request_id: str) -> KvTransferReport | None:
        return self._reports.pop(request_id, None)

    def _verify(self, load: KvLoad) -> bool:
        source = load.source
        assert source is not None
        expected = source.checksums[load.first_block : load.first_block + len(load.block_ids)]
        got = [self.block_checksum(b) for b in load.block_ids]
        if got != list(expected):
            log.warning("KV blocks of %s changed at the sender: recomputing", load.request_id)
            self.stats.num_checksum_failures += 1
            return False
        return True

    def _fail(self, load: KvLoad) -> None:
        self._reads.pop(load.request_id, None)
        self.stats.num_failed += 1
        self._failed.append(load.request_id)
        if load.source is not None:
            self._notify(load.source, _ABORT)

    def _take_notifs(self) -> list[str]:
        out = []
        for messages in self.agent.get_new_notifs().values():
            for message in messages:
                for prefix in (_DONE, _ABORT):
                    if message.startswith(prefix):
                        out.append(message[len(prefix) :].decode())
        return out


def _descs(bases: Sequence[int], num_blocks: int, block_bytes: int, device_id: int) -> Any:
    """[num_tensors * num_blocks, 3] (address, length, device) in descriptor order."""
    offsets = np.arange(num_blocks, dtype=np.int64) * block_bytes  # [num_blocks]
    addrs = (np.asarray(bases, dtype=np.int64)[:, None] + offsets[None, :]).reshape(-1)
    descs = np.empty((addrs.size, 3), dtype=np.int64)
    descs[:, 0], descs[:, 1], descs[:, 2] = addrs, block_bytes, device_id
    return descs


def _indices(blocks: Sequence[int], num_tensors: int, num_blocks: int) -> np.ndarray:
    """Descriptor indices of ``blocks`` in every tensor, tensor-major."""
    per_tensor = np.arange(num_tensors, dtype=np.int64)[:, None] * num_blocks  # [T, 1]
    return (per_tensor + np.asarray(blocks, dtype=np.int64)[None, :]).reshape(-1)


def _quietly(fn: Callable[..., Any], *args: Any) -> bool:
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - best effort on teardown and cancel
        return False
    return True
