"""The engine's mutable per-request state (no torch), in the "tokens per request" model.

A request is a growing token sequence ``all_token_ids = prompt + output``. The scheduler only
tracks how far the KV cache has caught up with it::

    all_token_ids:  [ p0 p1 ... p(P-1) | o0 o1 ... o(O-1) ]        num_tokens = P + O
                      <-- num_computed_tokens --><- to compute ->
                      <- num_cached_tokens -> (prefix-cache hit at first schedule)

There is no prefill or decode phase: a step computes ``num_tokens - num_computed_tokens``
tokens or a chunk of them; when a step reaches ``num_tokens`` the model samples one more
token, which is appended and becomes the next token to compute. Preemption sets
``num_computed_tokens`` back to 0; the prefix cache may give part of it back.

With prefix caching on, the chained hashes of every full block of ``all_token_ids`` are
kept up to date incrementally (``block_hashes[i]`` covers tokens ``[i*B, (i+1)*B)``), so no
sequence is ever hashed twice.
"""

from __future__ import annotations

import array
import enum

import numpy as np

from tokenmill.core.block_hash import chain_hashes, local_block_hashes, seed_for
from tokenmill.core.kv_transfer import KvTransferParams
from tokenmill.core.request import EngineRequest, FinishReason
from tokenmill.core.sampling import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # never scheduled yet
    RUNNING = "running"  # holds KV blocks
    PREEMPTED = "preempted"  # blocks freed; waits to recompute from scratch
    WAITING_FOR_REMOTE_KV = "waiting_for_remote_kv"  # holds blocks; a connector loads them
    FINISHED = "finished"  # ``finish_reason`` says why; blocks freed


class Request:
    """One request inside the engine. Mutated only by the scheduler (and ``append_output_token``).

    ``num_cached_tokens`` is -1 until the request is first scheduled, then the number of
    prompt tokens its first schedule found in the prefix cache (what usage reports).
    ``order`` breaks ties between equal (priority, arrival_time): the scheduler's add order.
    ``stop_ids`` / ``max_num_tokens`` are the scheduler's fast stop test (``set_stop_conditions``).
    ``kv_transfer_params``: the request's KV-transfer leg as it came in (None: none);
    ``kv_transfer_result``: what its last output tells the client (set when a connector
    holds its blocks at finish).
    """

    __slots__ = (
        "request_id",
        "prompt_token_ids",
        "output_token_ids",
        "all_token_ids",
        "params",
        "priority",
        "arrival_time",
        "cache_salt",
        "order",
        "status",
        "finish_reason",
        "stop_reason",
        "num_computed_tokens",
        "num_cached_tokens",
        "num_prompt_tokens",
        "max_tokens",
        "max_num_tokens",
        "stop_ids",
        "num_preemptions",
        "block_hashes",
        "local_hashes",
        "_block_size",
        "_hash_seed",
        "kv_transfer_params",
        "kv_transfer_result",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams | None = None,
        *,
        priority: int = 0,
        arrival_time: float = 0.0,
        cache_salt: str | None = None,
        block_size: int | None = None,
        order: int = 0,
        prompt_hashes: tuple[list[int], list[int]] | None = None,
        kv_transfer_params: KvTransferParams | None = None,
    ):
        """``block_size=None`` disables block hashing (prefix caching off).

        ``prompt_hashes``: ``(block_hashes, local_hashes)`` of the prompt's full blocks, if the
        caller already has them (a router or a simulator hashed the prompt with
        ``tokenmill.core.block_hash``, this block size and this salt): trusted, not re-hashed.
        """
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids  # never mutated: no copy
        self.output_token_ids: list[int] = []
        self.all_token_ids = list(prompt_token_ids)
        self.params = params if params is not None else SamplingParams()
        self.priority = priority
        self.arrival_time = arrival_time
        self.cache_salt = cache_salt
        self.order = order
        self.status = RequestStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.stop_reason: int | str | None = None
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1
        self.num_prompt_tokens = len(self.prompt_token_ids)
        max_tokens = self.params.max_tokens
        self.max_tokens = max_tokens if max_tokens is not None else 1 << 62
        self.max_num_tokens = self.num_prompt_tokens + self.max_tokens
        self.stop_ids: frozenset[int] = frozenset(self.params.stop_token_ids)
        self.num_preemptions = 0
        self.kv_transfer_params = kv_transfer_params
        self.kv_transfer_result: KvTransferParams | None = None
        self.block_hashes: list[int] = []
        self.local_hashes: list[int] = []
        self._block_size = block_size
        self._hash_seed = seed_for(cache_salt)
        if prompt_hashes is not None and block_size is not None:
            self.block_hashes, self.local_hashes = list(prompt_hashes[0]), list(prompt_hashes[1])
        self._hash_new_blocks()

    @classmethod
    def from_engine_request(
        cls,
        request: EngineRequest,
        block_size: int | None = None,
        order: int = 0,
        prompt_hashes: tuple[list[int], list[int]] | None = None,
    ) -> Request:
        """A fresh WAITING state for ``request`` (``arrival_time`` None becomes 0.0)."""
        return cls(
            request.request_id,
            request.prompt_token_ids,
            request.params,
            priority=request.priority,
            arrival_time=request.arrival_time or 0.0,
            cache_salt=request.cache_salt,
            block_size=block_size,
            order=order,
            prompt_hashes=prompt_hashes,
            kv_transfer_params=request.kv_transfer_params,
        )

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def sort_key(self) -> tuple[int, float, int]:
        """Scheduling order under the "priority" policy: lower first."""
        return (self.priority, self.arrival_time, self.order)

    def set_stop_conditions(self, eos_token_ids: frozenset[int], max_model_len: int) -> None:
        """Called once by the scheduler on add: ``stop_ids`` become every token id that may end
        the request (EOS unless ignore_eos, stop_token_ids) and ``max_num_tokens`` the length
        at which it ends (``max_tokens`` or ``max_model_len``, whichever comes first)."""
        eos = frozenset() if self.params.ignore_eos else eos_token_ids
        self.stop_ids = eos | frozenset(self.params.stop_token_ids)
        self.max_num_tokens = min(self.num_prompt_tokens + self.max_tokens, max_model_len)

    def append_output_token(self, token_id: int) -> None:
        """Append a sampled token; hashes the block it completes, if any (O(block_size))."""
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        if self._block_size is not None and len(self.all_token_ids) % self._block_size == 0:
            self._hash_new_blocks()

    def _hash_new_blocks(self) -> None:
        """Extend ``block_hashes`` / ``local_hashes`` over the full blocks not hashed yet."""
        size = self._block_size
        if size is None:
            return
        start = len(self.block_hashes) * size
        end = len(self.all_token_ids) // size * size
        # array.array converts a list 3x faster than np.asarray; "I" is the native u32
        native = np.frombuffer(array.array("I", self.all_token_ids[start:end]), dtype="=u4")
        tokens = native.astype("<u4", copy=False)  # a no-op on little-endian machines
        new_local = local_block_hashes(tokens, size, self._hash_seed)
        parent = self.block_hashes[-1] if self.block_hashes else None
        self.block_hashes.extend(chain_hashes(new_local, parent, self._hash_seed))
        self.local_hashes.extend(new_local)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens})"
        )
