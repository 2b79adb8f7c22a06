"""What a scheduler step decides and what it reports back: plain typed structs, no torch.

The executor (real or simulated) reads a ``SchedulerOutput``; the scheduler's
``update_from_output`` returns one ``RequestUpdate`` per request that got tokens or finished.

For each ``ScheduledRequest`` the step computes tokens at positions
``[position, position + num_tokens)`` of the request's ``all_token_ids``; their KV goes to
``block_ids[p // block_size]`` at offset ``p % block_size`` (see ``tokenmill.kv.manager``).
When ``samples`` is true the chunk ends at the request's last known token and the executor
samples one token from the last position's logits.

``SchedulerOutput.to_plan()`` gives the same step as data (``StepPlan``, a msgspec struct)
for a consumer in another process (an executor, a worker-side KV connector), which keeps
its own copy of each request's tokens and block table by applying the plans in order::

    preempted_request_ids  -> empty the request's table (its tokens stay)
    new_requests           -> tokens = prompt_token_ids; params kept until it finishes
    scheduled[i]           -> tokens[position:position + num_tokens] = token_ids
                              table += new_block_ids
    finished_request_ids   -> forget the request (tokens, table, params)

after which, for every scheduled request, the copy equals the scheduler's
``all_token_ids[:position + num_tokens]`` and ``kv.get_block_ids(request_id)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from tokenmill.core.kv_transfer import KvTransferParams
from tokenmill.core.request import FinishReason
from tokenmill.core.sampling import SamplingParams
from tokenmill.engine.request import Request
from tokenmill.kv.connector import ConnectorMetadata

PLAN_VERSION = 1


class ScheduledRequest:
    """One request's share of a step. ``block_ids`` is the manager's live block table
    (covers every position computed so far and this step); read it, never mutate it.
    ``num_held_blocks``: the table's length before this step's allocation, so
    ``block_ids[num_held_blocks:]`` are new this step (0 for a request admitted from the
    waiting queue this step: new, or resumed after preemption)."""

    __slots__ = ("request", "position", "num_tokens", "block_ids", "samples", "num_held_blocks")

    def __init__(
        self,
        request: Request,
        position: int,
        num_tokens: int,
        block_ids: list[int],
        samples: bool,
        num_held_blocks: int = 0,
    ):
        self.request = request  # params, output ids (penalties), seed, ...
        self.position = position  # num_computed_tokens before this step
        self.num_tokens = num_tokens
        self.block_ids = block_ids
        self.samples = samples
        self.num_held_blocks = num_held_blocks

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def token_ids(self) -> list[int]:
        """The token ids to compute this step (a fresh slice)."""
        return self.request.all_token_ids[self.position : self.position + self.num_tokens]

    @property
    def is_first_schedule(self) -> bool:
        """Admitted for the first time this step (not a later chunk, not a resume after a
        preemption)."""
        return self.num_held_blocks == 0 and self.request.num_preemptions == 0

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
      allocations, plus blocks a connector holds for finished requests (cached-but-free
      blocks do not count); ``num_total_blocks``: pool size.
    - ``preempted_request_ids``: freed this step, back in the waiting queue.
    - ``finished_request_ids``: finished or aborted since the previous step: executors drop
      any per-request state they keep.
    - ``kv_connector_metadata``: the KV connector's work for this step (loads to start,
      holds, releases; ``kv.connector``); None with the null connector. A step may carry it
      with nothing scheduled (loads in flight): the engine then runs the connector alone.
    """

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    num_active_blocks: int = 0
    num_total_blocks: int = 0
    preempted_request_ids: list[str] = field(default_factory=list)
    finished_request_ids: list[str] = field(default_factory=list)
    kv_connector_metadata: ConnectorMetadata | None = None

    @property
    def num_scheduled_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode_tokens

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    def to_plan(self) -> StepPlan:
        """This step as data (see the module docstring). Call it before the next
        ``schedule()`` (it reads the live block tables and requests); it copies what it
        reads, so the plan stays valid afterwards."""
        new_requests = [
            NewRequestPlan(
                request_id=item.request.request_id,
                prompt_token_ids=list(item.request.prompt_token_ids),
                params=item.request.params,
            )
            for item in self.scheduled
            if item.is_first_schedule
        ]
        return StepPlan(
            scheduled=[_plan_of(item) for item in self.scheduled],
            new_requests=new_requests,
            num_prefill_tokens=self.num_prefill_tokens,
            num_decode_tokens=self.num_decode_tokens,
            num_active_blocks=self.num_active_blocks,
            num_total_blocks=self.num_total_blocks,
            preempted_request_ids=list(self.preempted_request_ids),
            finished_request_ids=list(self.finished_request_ids),
            kv_connector_metadata=self.kv_connector_metadata,  # immutable: shared
        )


def _plan_of(item: ScheduledRequest) -> ScheduledPlan:
    return ScheduledPlan(
        request_id=item.request.request_id,
        position=item.position,
        num_tokens=item.num_tokens,
        token_ids=item.token_ids,
        new_block_ids=item.block_ids[item.num_held_blocks :],
        samples=item.samples,
    )


class ScheduledPlan(msgspec.Struct, frozen=True, kw_only=True):
    """One scheduled request in a ``StepPlan``: compute ``token_ids`` at positions
    ``[position, position + num_tokens)``; ``new_block_ids`` are appended to the request's
    table this step (the whole table for a request admitted this step, whose table was empty);
    ``samples``: sample one token from the last position's logits."""

    request_id: str
    position: int
    num_tokens: int
    token_ids: list[int]
    new_block_ids: list[int]
    samples: bool


class NewRequestPlan(msgspec.Struct, frozen=True, kw_only=True):
    """A request scheduled for the first time (never before a preemption): what a consumer
    keeps about it until it appears in ``finished_request_ids``."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


class StepPlan(msgspec.Struct, frozen=True, kw_only=True):
    """A ``SchedulerOutput`` as wire data: the same totals and id lists (same meaning), the
    scheduled requests in step order, the first-time requests among them (a request whose
    KV a connector loaded is first scheduled after its load: its whole table is new then),
    and the connector's metadata."""

    scheduled: list[ScheduledPlan]
    new_requests: list[NewRequestPlan]
    num_prefill_tokens: int
    num_decode_tokens: int
    num_active_blocks: int
    num_total_blocks: int
    preempted_request_ids: list[str]
    finished_request_ids: list[str]
    version: int = PLAN_VERSION
    kv_connector_metadata: ConnectorMetadata | None = None

    @property
    def num_scheduled_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode_tokens


_plan_encoder = msgspec.msgpack.Encoder()
_plan_decoder = msgspec.msgpack.Decoder(StepPlan)


def encode_plan(plan: StepPlan) -> bytes:
    return _plan_encoder.encode(plan)


def decode_plan(data: bytes) -> StepPlan:
    """Raises ``msgspec.ValidationError`` for a malformed plan and ``ValueError`` for one
    from a newer plan version."""
    plan = _plan_decoder.decode(data)
    if plan.version > PLAN_VERSION:
        raise ValueError(f"step plan version {plan.version} is newer than {PLAN_VERSION}")
    return plan


@dataclass(slots=True)
class RequestUpdate:
    """What one step did to one request: new output tokens, and how it ended if it did.
    Counts are cumulative (``num_cached_tokens``: prompt tokens hit at first schedule).
    ``kv_transfer_params``: on a finishing update whose blocks a connector holds, where
    they can be read (``Request.kv_transfer_result``)."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None
    stop_reason: int | str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    kv_transfer_params: KvTransferParams | None = None

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
    # tokens waiting requests must compute before they run (prompt, plus the output so far of
    # preempted ones); prefix-cache hits are found only at admission, so not subtracted
    num_waiting_prefill_tokens: int = 0
    num_waiting_for_remote_kv: int = 0  # requests parked while a connector loads their KV
    num_held_blocks: int = 0  # blocks finished requests hold for a transfer
    num_kv_load_failures: int = 0  # loads that failed and were recomputed (cumulative)

    @property
    def prefix_hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0
