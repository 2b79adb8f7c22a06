"""What a scheduler step decides and what it reports back: plain typed structs, no torch.

The executor (real or simulated) reads a ``SchedulerOutput``; the scheduler's
``update_from_output`` returns one ``RequestUpdate`` per request that got tokens or finished.

For each ``ScheduledRequest`` the step computes tokens at positions
``[position, position + num_tokens)`` of the request's ``all_token_ids``; their KV goes to
``block_ids[p // block_size]`` at offset ``p % block_size`` (see ``tokenmill.kv.manager``).
When ``samples`` is true the chunk ends at the request's last known token and the executor
samples one token from the last position's logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.core.request import FinishReason
from tokenmill.engine.request import Request


class ScheduledRequest:
    """One request's share of a step. ``block_ids`` is the manager's live block table
    (covers every position computed so far and this step); read it, never mutate it."""

    __slots__ = ("request", "position", "num_tokens", "block_ids", "samples")

    def __init__(
        self, request: Request, position: int, num_tokens: int, block_ids: list[int], samples: bool
    ):
        self.request = request  # params, output ids (penalties), seed, ...
        self.position = position  # num_computed_tokens before this step
        self.num_tokens = num_tokens
        self.block_ids = block_ids
        self.samples = samples

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def token_ids(self) -> list[int]:
        """The token ids to compute this step (a fresh slice)."""
        return self.request.all_token_ids[self.position : self.position + self.num_tokens]

    @property
    def is_decode(self) -> bool:
        """A single token past the prompt: computing the last sampled token. (A resumed,
        preempted request whose cache hit leaves one token looks the same; ``SchedulerOutput``
        counts it as prefill because it was admitted this step.)"""
        return self.num_tokens == 1 and self.position >= self.request.num_prompt_tokens

    def __repr__(self) -> str:
        return (
            f"ScheduledRequest({self.request_id!r}, position={self.position}, "
            f"num_tokens={self.num_tokens}, samples={self.samples})"
        )


@dataclass(slots=True)
class SchedulerOutput:
    """One step. Totals are what a simulated executor prices the step with.

    - ``num_prefill_tokens``: tokens of chunks that are not decodes (new, uncached prompt
      tokens and recomputation after preemption); ``num_decode_tokens``: decode chunks.
    - ``num_active_blocks``: blocks referenced by running requests after this step's
      allocations (cached-but-free blocks do not count); ``num_total_blocks``: pool size.
    - ``preempted_request_ids``: freed this step, back in the waiting queue.
    - ``finished_request_ids``: finished or aborted since the previous step: executors drop
      any per-request state they keep.
    """

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    num_active_blocks: int = 0
    num_total_blocks: int = 0
    preempted_request_ids: list[str] = field(default_factory=list)
    finished_request_ids: list[str] = field(default_factory=list)

    @property
    def num_scheduled_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode_tokens

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(slots=True)
class RequestUpdate:
    """What one step did to one request: new output tokens, and how it ended if it did.
    Counts are cumulative (``num_cached_tokens``: prompt tokens hit at first schedule)."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None
    stop_reason: int | str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    num_running: int
    num_waiting: int
    kv_usage: float  # fraction of blocks referenced by running requests
    num_queried_tokens: int  # tokens of admitted requests looked up in the prefix cache
    num_hit_tokens: int  # of which found in the cache
    num_preemptions: int

    @property
    def prefix_hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0
