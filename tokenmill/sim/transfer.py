"""The replay's KV-transfer-time model (prefill worker -> decode worker), pure arithmetic.

A transfer of ``n`` tokens moves ``n * bytes_per_token`` bytes and takes

    latency_ms + bytes / (bandwidth_gbps * 1e9) * 1e3   ms        (bandwidth in decimal GB/s)

``bandwidth_gbps`` None (or 0) means "no transfer model": every transfer takes 0 ms, latency
included, which is Dynamo's replay default (it sets bytes per token but no bandwidth). Which
tokens move (``tokens``): ``"missing"``, the prompt's whole blocks the decode worker does not
already cache (what the live decode worker READs), or ``"full_prompt"`` (Dynamo's default
``kv_transfer_timing_mode``). ``link``: ``"independent"`` (each transfer is its own fixed
delay, no contention: Dynamo's model) or ``"per_worker"`` (each prefill worker's NIC sends one
transfer at a time, FIFO: a burst of long prompts queues on the link).

``bytes_per_token`` comes from the model shape: ``2 (K and V) * layers * KV heads * head dim *
dtype bytes`` (``kv_bytes_per_token``); the default is Llama-3-8B in bf16 (131,072 B), the
figure Dynamo's replay configs use.
"""

from __future__ import annotations

from dataclasses import dataclass

LLAMA3_8B_BYTES_PER_TOKEN = 2 * 32 * 8 * 128 * 2  # 131,072
TRANSFER_TOKENS = ("missing", "full_prompt")
TRANSFER_LINKS = ("independent", "per_worker")
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1}


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: str) -> int:
    """KV bytes one token occupies over every layer, K and V."""
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"unknown KV dtype {dtype!r}; known: {sorted(_DTYPE_BYTES)}")
    if min(num_layers, num_kv_heads, head_dim) <= 0:
        raise ValueError("layers, KV heads and head dim must be positive")
    return 2 * num_layers * num_kv_heads * head_dim * _DTYPE_BYTES[dtype]


@dataclass(frozen=True)
class TransferConfig:
    bytes_per_token: int = LLAMA3_8B_BYTES_PER_TOKEN
    bandwidth_gbps: float | None = None  # None / 0: transfers take no time (Dynamo's default)
    latency_ms: float = 0.0
    tokens: str = "missing"
    link: str = "independent"

    def __post_init__(self) -> None:
        if self.bytes_per_token <= 0:
            raise ValueError("bytes_per_token must be positive")
        if self.bandwidth_gbps is not None and self.bandwidth_gbps < 0:
            raise ValueError("bandwidth_gbps must be >= 0")
        if self.latency_ms < 0:
            raise ValueError("latency_ms must be >= 0")
        if self.tokens not in TRANSFER_TOKENS:
            raise ValueError(f"tokens must be one of {TRANSFER_TOKENS}")
        if self.link not in TRANSFER_LINKS:
            raise ValueError(f"link must be one of {TRANSFER_LINKS}")

    @property
    def modelled(self) -> bool:
        return bool(self.bandwidth_gbps)

    def num_bytes(self, num_tokens: int) -> int:
        return num_tokens * self.bytes_per_token

    def duration_ms(self, num_bytes: int) -> float:
        """Time on the wire of one transfer (0 without a bandwidth)."""
        if not self.bandwidth_gbps:
            return 0.0
        return self.latency_ms + num_bytes / (self.bandwidth_gbps * 1e9) * 1e3


class TransferLinks:
    """When each transfer runs: independent delays, or one FIFO link per prefill worker."""

    def __init__(self, cfg: TransferConfig):
        self.cfg = cfg
        self._free_at: dict[int, float] = {}  # prefill worker -> when its link is free

    def schedule(self, source: int, now_ms: float, num_bytes: int) -> tuple[float, float]:
        """``(start_ms, end_ms)`` of a transfer of ``num_bytes`` out of worker ``source``
        asked for at ``now_ms``."""
        ms = self.cfg.duration_ms(num_bytes)
        if self.cfg.link == "independent" or ms == 0.0:
            return now_ms, now_ms + ms
        start = max(now_ms, self._free_at.get(source, 0.0))
        self._free_at[source] = start + ms
        return start, start + ms

    def forget(self, source: int) -> None:
        self._free_at.pop(source, None)
