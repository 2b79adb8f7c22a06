"""What goes into an engine and what streams out of it: the contract between the engine's
async client, the worker, the offline ``LLM`` API and the frontend. msgspec structs, so the
same objects cross process boundaries unchanged."""

from __future__ import annotations

import enum

import msgspec

from tokenmill.core.kv_transfer import KvTransferParams
from tokenmill.core.sampling import SamplingParams

REQUEST_VERSION = 1


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"  # client disconnect, deadline, shutdown
    ERROR = "error"  # the request failed (NaN logits, executor error); ``error`` says why


class EngineRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One sequence to generate. ``n > 1`` is expanded by the caller into n requests.

    ``cache_salt`` salts the block hashes so tenants never share cached prefixes.
    ``priority``: lower values are scheduled first when the scheduler runs by priority.
    ``kv_transfer_params``: this leg of a disaggregated request (``core.kv_transfer``).
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams = SamplingParams()
    cache_salt: str | None = None
    priority: int = 0
    arrival_time: float | None = None
    version: int = REQUEST_VERSION
    kv_transfer_params: KvTransferParams | None = None


class TokenLogprob(msgspec.Struct, frozen=True, array_like=True):
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the top-k alternatives (token id, logprob), best first


class RequestOutput(msgspec.Struct, kw_only=True):
    """One increment of a request's stream. Counts are cumulative; token ids and text are new.

    The last output of a stream has ``finish_reason`` set (and ``error`` when it is ERROR).
    ``stop_reason`` is the stop string or stop token id that ended it, if any.
    ``queue_time_s``, on a request's first output only (None on the others, and from an
    engine that does not measure it): seconds from its arrival in the engine to its first
    scheduling (waiting for a batch slot or for free KV blocks).
    ``kv_transfer_params``: on the last output of a prefill worker's request whose blocks
    it holds for a decode worker: where to read them from.
    """

    request_id: str
    new_token_ids: list[int]
    text_delta: str = ""
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    error: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    version: int = REQUEST_VERSION
    queue_time_s: float | None = None
    kv_transfer_params: KvTransferParams | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
