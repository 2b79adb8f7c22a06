"""Engine configs owned by the scheduler and the KV cache (frozen, validated, no torch).

``CacheConfig`` sizes the block pool; ``SchedulerConfig`` bounds each step. Both are built
once (by the launcher, the mocker or a test) and never patched afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.engine.models.config import ModelConfig

DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
SCHEDULING_POLICIES = ("fcfs", "priority")


@dataclass(frozen=True)
class CacheConfig:
    """``num_blocks`` KV blocks of ``block_size`` tokens each (block ids 0..num_blocks-1)."""

    block_size: int = 16
    num_blocks: int = 1024

    def __post_init__(self) -> None:
        _require(self.block_size >= 1, "block_size must be at least 1")
        _require(self.num_blocks >= 1, "num_blocks must be at least 1")

    @property
    def num_tokens(self) -> int:
        """How many tokens the whole pool holds."""
        return self.block_size * self.num_blocks

    @classmethod
    def from_memory_budget(
        cls, memory_bytes: int, model: ModelConfig, dtype: str | int, block_size: int = 16
    ) -> CacheConfig:
        """The largest pool whose K and V tensors fit ``memory_bytes``.

        ``dtype`` is an itemsize in bytes or a name in ``DTYPE_BYTES``. Raises ``ValueError``
        when the budget does not hold a single block.
        """
        return cls(block_size, num_blocks_for_memory(memory_bytes, model, dtype, block_size))


def num_blocks_for_memory(
    memory_bytes: int, model: ModelConfig, dtype: str | int, block_size: int = 16
) -> int:
    """``memory_bytes // (block_size * kv_bytes_per_token * itemsize)``, at least 1 or raise."""
    itemsize = DTYPE_BYTES[dtype] if isinstance(dtype, str) else int(dtype)
    bytes_per_block = block_size * model.kv_bytes_per_token * itemsize
    num_blocks = int(memory_bytes) // bytes_per_block
    _require(
        num_blocks >= 1,
        f"KV memory budget {memory_bytes} bytes holds no block of {bytes_per_block} bytes",
    )
    return num_blocks


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one scheduler step.

    - ``max_num_seqs``: running requests at most (a step schedules at most this many).
    - ``max_num_batched_tokens``: tokens computed per step, shared by all requests.
    - ``max_model_len``: prompt + output tokens of one request (the pool's capacity caps it too).
    - ``enable_chunked_prefill``: a prompt larger than the step's remaining budget is split;
      without it a prompt waits until it fits whole, so the budget must cover ``max_model_len``.
    - ``watermark``: fraction of the pool kept free when admitting a waiting request, so
      running requests can grow before anyone must be preempted (Dynamo's mocker uses 0.01).
    - ``policy``: "fcfs" (arrival order) or "priority" (lower ``priority`` first, then arrival).
    """

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 8192
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    watermark: float = 0.0
    policy: str = "fcfs"

    def __post_init__(self) -> None:
        _require(self.max_num_seqs >= 1, "max_num_seqs must be at least 1")
        _require(self.max_num_batched_tokens >= 1, "max_num_batched_tokens must be at least 1")
        _require(self.max_model_len >= 1, "max_model_len must be at least 1")
        _require(0.0 <= self.watermark < 1.0, "watermark must be in [0, 1)")
        _require(self.policy in SCHEDULING_POLICIES, f"policy must be one of {SCHEDULING_POLICIES}")
        _require(
            self.enable_chunked_prefill or self.max_num_batched_tokens >= self.max_model_len,
            "without chunked prefill, max_num_batched_tokens must be >= max_model_len",
        )


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
