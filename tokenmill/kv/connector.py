"""The scheduler side of a KV connector (pure: no I/O; time only from an injected clock):
the seam through which KV blocks come from elsewhere and finished requests' blocks go
elsewhere. Shaped after vLLM v1's KV connector (a scheduler side that decides, a worker side
that moves bytes); the worker side is ``tokenmill.engine.executor.kv_connector``.

The scheduler calls, per request and per step::

    admission   hit = local prefix hit (tokens)
                n, async_ = get_num_new_matched_tokens(request, hit)   # loadable beyond hit
                allocate blocks for the whole prompt
                update_state_after_alloc(request, table, hit, n)
                async_: request -> WAITING_FOR_REMOTE_KV (not running, not waiting)
                sync:   the n tokens count as computed now; the worker side loads them
                        before this step's forward
    each step   meta = build_connector_meta()        -> SchedulerOutput / StepPlan -> worker
                update_connector_output(out)         <- worker: finished / failed loads, sends
                take_releasable()                    -> held tables to free now
    finish      request_finished(request, table)     True: hold the blocks (delayed free);
                transfer_params(request_id)          what the last output tells the client

A finished load makes its tokens computed (their full blocks cached) and the request
schedulable; a failed load frees its blocks and requeues the request to recompute, with the
connector giving it nothing to load. A request aborted while loading keeps its blocks
(held) until the worker side reports the load over, since bytes may still land in them.

How the two users plug in:

- disaggregation (``kv.pd_connector``): a decode worker's request names a prefill worker's
  held blocks; ``get_num_new_matched_tokens`` counts the prompt tokens past the local hit, the
  worker side READs them with NIXL and checks them. A prefill worker's request finishes with
  its blocks held (``request_finished`` True) until the decode worker says it read them, the
  frontend aborts, or the transfer timeout (``take_releasable``).
- KV tiers (host / disk / remote): ``get_num_new_matched_tokens`` looks the request's next
  block hashes up in the lower tiers; the load is an async onboard (or a sync one,
  ``async_`` False, for host memory); ``request_finished`` (and an eviction hook) returns True
  while an offload of the blocks is in flight and releases them when it is written.

``NULL_CONNECTOR`` loads nothing and holds nothing: the scheduler then behaves exactly as
without a connector (``build_connector_meta`` is None, so the engine does no connector work).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import msgspec

from tokenmill.core.kv_transfer import KvTransferParams
from tokenmill.core.request import FinishReason
from tokenmill.kv.manager import KVRequest


class ConnectorRequest(KVRequest, Protocol):
    """What a connector reads from a request (``tokenmill.engine.request.Request`` fits)."""

    num_prompt_tokens: int
    kv_transfer_params: KvTransferParams | None
    finish_reason: FinishReason | None


class KvLoad(msgspec.Struct, frozen=True, kw_only=True):
    """One load for the worker side to run: fill local ``block_ids`` (the request's table
    entries ``first_block ..``) with the KV of ``num_tokens`` tokens starting at token
    ``first_block * block_size``. ``block_hashes``: the chained hashes of the full blocks
    among them (what a tier looks bytes up by, what a transfer is checked against);
    ``source``: where to READ from for a disaggregated load (None for a tier's onboard)."""

    request_id: str
    block_ids: list[int]
    first_block: int
    num_tokens: int
    block_hashes: list[int] = []
    source: KvTransferParams | None = None
    is_async: bool = True


class KvHold(msgspec.Struct, frozen=True, kw_only=True):
    """Blocks a finished request holds for a transfer out (a remote READ, an offload)."""

    request_id: str
    block_ids: list[int]
    num_tokens: int


class ConnectorMetadata(msgspec.Struct, frozen=True, kw_only=True):
    """Scheduler side -> worker side, once per step (in the step plan).

    ``loads``: start these (async ones are reported later, sync ones before the forward).
    ``holds``: blocks newly held for a send (the worker side may start an offload, or wait
    for a remote READ). ``releases``: held tables freed since the previous step (send done,
    aborted or timed out): forget them, their blocks may be reused from now on.
    ``abandoned``: remote holds this worker will not read (nothing missing, hashes differ,
    request aborted before its load started): tell their owners at once."""

    loads: list[KvLoad] = []
    holds: list[KvHold] = []
    releases: list[str] = []
    abandoned: list[KvTransferParams] = []


class ConnectorOutput(msgspec.Struct, frozen=True, kw_only=True):
    """Worker side -> scheduler side, each step: ``finished_loads`` (bytes in place and
    checked), ``failed_loads`` (unreachable source, timeout, hash or checksum mismatch:
    recompute), ``finished_sends`` (a consumer read the held blocks, or an offload was
    written: release them)."""

    finished_loads: list[str] = []
    failed_loads: list[str] = []
    finished_sends: list[str] = []

    @property
    def is_empty(self) -> bool:
        return not (self.finished_loads or self.failed_loads or self.finished_sends)


class SchedulerConnector:
    """Base and null object: loads nothing, holds nothing. Subclasses override what they use.

    Every method is called from the engine loop's thread only (one scheduler)."""

    # ------------------------------------------------------------------ loading

    def get_num_new_matched_tokens(
        self, request: ConnectorRequest, num_computed_tokens: int
    ) -> tuple[int, bool]:
        """``(tokens, is_async)``: how many prompt tokens past ``num_computed_tokens`` (the
        local prefix hit, a multiple of the block size) can be loaded from elsewhere, at most
        ``num_tokens - 1 - num_computed_tokens`` (the last token is always computed, for its
        logits). May be called more than once for one request; no side effects."""
        return 0, False

    def update_state_after_alloc(
        self,
        request: ConnectorRequest,
        block_ids: Sequence[int],
        num_computed_tokens: int,
        num_external_tokens: int,
    ) -> None:
        """The request's table ``block_ids`` now covers its prompt; the connector records the
        load of ``num_external_tokens`` tokens after ``num_computed_tokens`` (copy what it
        keeps). Called only after ``get_num_new_matched_tokens`` returned them."""

    def request_not_loaded(self, request: ConnectorRequest) -> None:
        """The request will not load what it could have (admitted without it, or finished
        before admission): the connector may tell the source at once."""

    # ------------------------------------------------------------------ each step

    def build_connector_meta(self) -> ConnectorMetadata | None:
        """What the worker side must do this step (and forget what it hands over). None when
        the connector has nothing to say and nothing in flight (the engine then skips all
        connector work)."""
        return None

    def update_connector_output(self, output: ConnectorOutput) -> None:
        """Bookkeeping for what the worker side reported (the scheduler acts on the loads;
        finished sends become releasable)."""

    def take_releasable(self) -> list[str]:
        """Ids of held tables to free now (send done, aborted, timed out); each id once."""
        return []

    def has_pending(self) -> bool:
        """Whether a load or a held table is in flight (the engine loop then keeps polling
        while otherwise idle)."""
        return False

    # ------------------------------------------------------------------ finishing

    def request_finished(self, request: ConnectorRequest, block_ids: Sequence[int]) -> bool:
        """Called once per finished, aborted or errored request that holds blocks (never on
        preemption), before they are freed. True: keep the blocks referenced until
        ``take_releasable`` returns the id; the connector owns that promise and must release
        on completion, abort or timeout. Must not keep ``block_ids`` beyond the call without
        copying it."""
        return False

    def transfer_params(self, request_id: str) -> KvTransferParams | None:
        """After ``request_finished`` returned True: the parameters the request's last output
        carries (where its held blocks can be read), or None."""
        return None

    def release(self, request_ids: Iterable[str]) -> None:
        """A consumer will not (or no longer) read these held tables: make them releasable
        at the next ``take_releasable``. Unknown ids are ignored."""


NULL_CONNECTOR = SchedulerConnector()
