"""The scheduler side of the disaggregation connector (pure; time from an injected clock).

Prefill side: a request sent with ``do_remote_decode`` that finishes at its one-token limit
keeps its prompt's blocks (``request_finished`` True) and its last output says where they
are (``transfer_params``). The hold ends when the decode worker says it read them
(``finished_sends`` from the worker side), when someone says it never will (``release``:
the frontend, after a decode worker rejected, died or the client left; or the decode
worker's abandon notice), or after ``transfer_timeout_s`` at the latest.

Decode side: a request sent with ``do_remote_prefill`` can load the prompt tokens its local
prefix hit does not cover, if the sender's layout is this worker's and the sender's block
hashes equal this request's own (same tokens, same salt); only the missing blocks move. A
request that will not load (its hit covers everything, hashes or layout differ, finished
before admission) is *abandoned*: the worker side tells the prefill worker at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

from tokenmill.core.kv_transfer import KvLayout, KvTransferParams
from tokenmill.core.request import FinishReason
from tokenmill.kv.connector import (
    ConnectorMetadata,
    ConnectorOutput,
    ConnectorRequest,
    KvHold,
    KvLoad,
    SchedulerConnector,
)

DEFAULT_TRANSFER_TIMEOUT_S = 30.0


class PdSchedulerConnector(SchedulerConnector):
    """Both directions (a worker of any role may be sent either kind of request).

    Counters (cumulative): ``num_holds``, ``num_hold_timeouts``, ``num_loads``,
    ``num_hash_mismatches``, ``num_abandoned``."""

    def __init__(
        self,
        layout: KvLayout,
        transfer_timeout_s: float = DEFAULT_TRANSFER_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        if transfer_timeout_s <= 0:
            raise ValueError("transfer_timeout_s must be positive")
        self.layout = layout
        self.block_size = layout.block_size
        self.transfer_timeout_s = transfer_timeout_s
        self.clock = clock
        self._deadlines: dict[str, float] = {}  # held request id -> when the hold lapses
        self._params: dict[str, KvTransferParams] = {}  # held, not yet handed to the output
        self._releasable: list[str] = []
        self._loading: set[str] = set()
        self._held_loading: set[str] = set()  # aborted while loading: held until it ends
        self._settled: set[str] = set()  # decode requests that loaded or were abandoned
        self._new_loads: list[KvLoad] = []
        self._new_holds: list[KvHold] = []
        self._new_releases: list[str] = []
        self._new_abandoned: list[KvTransferParams] = []
        self.num_holds = self.num_hold_timeouts = self.num_loads = 0
        self.num_hash_mismatches = self.num_abandoned = 0

    # ------------------------------------------------------------------ decode side

    def get_num_new_matched_tokens(
        self, request: ConnectorRequest, num_computed_tokens: int
    ) -> tuple[int, bool]:
        source = request.kv_transfer_params
        if source is None or not source.do_remote_prefill or request.request_id in self._settled:
            return 0, False
        if not self._loadable(request, source):
            return 0, False
        num = min(source.num_tokens, request.num_tokens - 1) - num_computed_tokens
        return max(0, num), True

    def _loadable(self, request: ConnectorRequest, source: KvTransferParams) -> bool:
        """Same layout, and the sender's block hashes are this request's (its prompt's
        first ``num_tokens`` tokens are the ones the blocks hold)."""
        if source.layout != self.layout or source.num_tokens >= request.num_tokens:
            return False
        num_full = source.num_tokens // self.block_size
        num_blocks = -(-source.num_tokens // self.block_size)
        if len(source.remote_block_ids) != num_blocks or len(source.checksums) != num_blocks:
            return False
        return list(source.block_hashes) == request.block_hashes[:num_full]

    def update_state_after_alloc(
        self,
        request: ConnectorRequest,
        block_ids: Sequence[int],
        num_computed_tokens: int,
        num_external_tokens: int,
    ) -> None:
        source = request.kv_transfer_params
        assert source is not None  # only called after get_num_new_matched_tokens offered
        size = self.block_size
        first = num_computed_tokens // size
        end_token = num_computed_tokens + num_external_tokens
        last = -(-end_token // size)
        self._new_loads.append(
            KvLoad(
                request_id=request.request_id,
                block_ids=list(block_ids[first:last]),
                first_block=first,
                num_tokens=num_external_tokens,
                block_hashes=request.block_hashes[first : end_token // size],
                source=source,
            )
        )
        self._loading.add(request.request_id)
        self._settled.add(request.request_id)
        self.num_loads += 1

    def request_not_loaded(self, request: ConnectorRequest) -> None:
        source = request.kv_transfer_params
        if source is None or not source.do_remote_prefill:
            return
        if request.request_id in self._settled:
            return
        if source.layout == self.layout and not self._loadable(request, source):
            self.num_hash_mismatches += 1
        if request.finish_reason is None:  # still alive: remember not to offer it again
            self._settled.add(request.request_id)
        self._new_abandoned.append(source)
        self.num_abandoned += 1

    # ------------------------------------------------------------------ each step

    def build_connector_meta(self) -> ConnectorMetadata | None:
        news = self._new_loads or self._new_holds or self._new_releases or self._new_abandoned
        if not (news or self.has_pending()):
            return None
        meta = ConnectorMetadata(
            loads=self._new_loads,
            holds=self._new_holds,
            releases=self._new_releases,
            abandoned=self._new_abandoned,
        )
        self._new_loads, self._new_holds, self._new_releases = [], [], []
        self._new_abandoned = []
        return meta

    def update_connector_output(self, output: ConnectorOutput) -> None:
        for request_id in (*output.finished_loads, *output.failed_loads):
            self._loading.discard(request_id)
            if request_id in self._held_loading:
                self._held_loading.discard(request_id)
                self._settled.discard(request_id)
                self._releasable.append(request_id)
        self.release(output.finished_sends)

    def take_releasable(self) -> list[str]:
        if self._deadlines:
            now = self.clock()
            expired = [rid for rid, deadline in self._deadlines.items() if deadline <= now]
            self.num_hold_timeouts += len(expired)
            self.release(expired)
        out, self._releasable = self._releasable, []
        self._new_releases.extend(out)
        return out

    def has_pending(self) -> bool:
        return bool(self._loading or self._deadlines or self._held_loading or self._releasable)

    # ------------------------------------------------------------------ finishing

    def request_finished(self, request: ConnectorRequest, block_ids: Sequence[int]) -> bool:
        rid = request.request_id
        params = request.kv_transfer_params
        if params is None:
            return False
        if params.do_remote_prefill:
            if rid in self._loading:  # bytes may still land in these blocks
                self._held_loading.add(rid)
                return True
            self.request_not_loaded(request)
            self._settled.discard(rid)
            return False
        if not params.do_remote_decode or request.finish_reason is not FinishReason.LENGTH:
            return False
        return self._hold(request, block_ids)

    def _hold(self, request: ConnectorRequest, block_ids: Sequence[int]) -> bool:
        num_tokens = request.num_prompt_tokens
        num_blocks = -(-num_tokens // self.block_size)
        held = list(block_ids[:num_blocks])
        if len(held) != num_blocks:
            return False  # not every prompt block is there: nothing to offer
        rid = request.request_id
        self._deadlines[rid] = self.clock() + self.transfer_timeout_s
        self._params[rid] = KvTransferParams(
            do_remote_decode=True,
            remote_request_id=rid,
            remote_block_ids=held,
            block_hashes=request.block_hashes[: num_tokens // self.block_size],
            num_tokens=num_tokens,
            layout=self.layout,
        )
        self._new_holds.append(KvHold(request_id=rid, block_ids=held, num_tokens=num_tokens))
        self.num_holds += 1
        return True

    def transfer_params(self, request_id: str) -> KvTransferParams | None:
        return self._params.pop(request_id, None)

    def release(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            if self._deadlines.pop(request_id, None) is not None:
                self._params.pop(request_id, None)
                self._releasable.append(request_id)

    @property
    def num_held_requests(self) -> int:
        return len(self._deadlines) + len(self._held_loading)
