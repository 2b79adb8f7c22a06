"""Conditional disaggregation: does a request prefill on a prefill worker, then move its KV
to its decode worker, or prefill locally on the decode worker? One pure function (plain data
in, a decision with its reason out), shared by the live frontend and the offline replay.

The frontend picks the decode worker first (KV-aware, as for aggregated serving); ``decide``
then looks at the prompt tokens that worker would still have to compute after its own prefix
hit and at the prefill pool's load:

- ``never``: always local. ``always``: remote whenever a prefill worker exists.
- ``auto``: remote when the tokens left exceed ``min_remote_prefill_tokens`` and the prefill
  pool is not saturated (its least-loaded worker has no more than
  ``max_prefill_queue_tokens`` waiting prefill tokens); else local.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class DisaggMode(StrEnum):
    AUTO = "auto"
    ALWAYS = "always"
    NEVER = "never"


class Reason(StrEnum):
    """Why a request prefills where it does (a metric label and a request-log field)."""

    MODE_NEVER = "mode_never"
    NO_PREFILL_WORKERS = "no_prefill_workers"
    MODE_ALWAYS = "mode_always"
    SHORT_PREFILL = "short_prefill"
    PREFILL_SATURATED = "prefill_saturated"
    LONG_PREFILL = "long_prefill"


@dataclass(frozen=True)
class DisaggConfig:
    mode: DisaggMode = DisaggMode.AUTO
    # remote only when more prompt tokens than this are left after the decode worker's hit
    min_remote_prefill_tokens: int = 512
    # the pool is saturated when its least-loaded worker has more waiting prefill tokens
    max_prefill_queue_tokens: int = 16_384

    def __post_init__(self) -> None:
        if self.min_remote_prefill_tokens < 0:
            raise ValueError("min_remote_prefill_tokens must be non-negative")
        if self.max_prefill_queue_tokens < 0:
            raise ValueError("max_prefill_queue_tokens must be non-negative")


@dataclass(frozen=True)
class PrefillPool:
    """The prefill pool as the decider sees it."""

    num_workers: int = 0
    min_waiting_prefill_tokens: int = 0  # of the least-loaded prefill worker


@dataclass(frozen=True)
class Decision:
    remote: bool
    reason: Reason
    new_prefill_tokens: int  # prompt tokens left after the decode worker's prefix hit


def decide(
    cfg: DisaggConfig, prompt_tokens: int, decode_hit_tokens: int, pool: PrefillPool
) -> Decision:
    """Where to prefill one request whose decode worker already caches ``decode_hit_tokens``
    leading tokens of its ``prompt_tokens``-token prompt."""
    new = max(0, prompt_tokens - decode_hit_tokens)
    if cfg.mode is DisaggMode.NEVER:
        return Decision(False, Reason.MODE_NEVER, new)
    if pool.num_workers <= 0:
        return Decision(False, Reason.NO_PREFILL_WORKERS, new)
    if cfg.mode is DisaggMode.ALWAYS:
        return Decision(True, Reason.MODE_ALWAYS, new)
    if new <= cfg.min_remote_prefill_tokens:
        return Decision(False, Reason.SHORT_PREFILL, new)
    if pool.min_waiting_prefill_tokens > cfg.max_prefill_queue_tokens:
        return Decision(False, Reason.PREFILL_SATURATED, new)
    return Decision(True, Reason.LONG_PREFILL, new)
