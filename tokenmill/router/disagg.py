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

Interference guard (``max_local_decodes``, off by default; ``decode`` says how many requests
the decode worker is decoding): a local prefill stalls every request decoding there for one
step (each gets one long inter-token gap), so a request that would prefill locally (short,
or the prefill pool saturated) goes remote instead when more than ``max_local_decodes``
requests decode on its worker (reason ``decode_busy``). The replay measured why: on the
conversation trace at 2x, local prefills on busy decode workers are what lifts the ITL p99
of a split above the best pure split's (docs/disagg_replay.md).
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
    DECODE_BUSY = "decode_busy"


@dataclass(frozen=True)
class DisaggConfig:
    mode: DisaggMode = DisaggMode.AUTO
    # remote only when more prompt tokens than this are left after the decode worker's hit
    min_remote_prefill_tokens: int = 512
    # the pool is saturated when its least-loaded worker has more waiting prefill tokens
    max_prefill_queue_tokens: int = 16_384
    # local prefill only on a decode worker decoding at most this many requests (None: any)
    max_local_decodes: int | None = None

    def __post_init__(self) -> None:
        if self.max_local_decodes is not None and self.max_local_decodes < 0:
            raise ValueError("max_local_decodes must be non-negative")
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
class DecodeLoad:
    """The chosen decode worker as the decider sees it."""

    num_decoding: int = 0  # requests in flight there (each stalls if it prefills locally)


@dataclass(frozen=True)
class Decision:
    remote: bool
    reason: Reason
    new_prefill_tokens: int  # prompt tokens left after the decode worker's prefix hit


def decide(
    cfg: DisaggConfig,
    prompt_tokens: int,
    decode_hit_tokens: int,
    pool: PrefillPool,
    decode: DecodeLoad | None = None,
) -> Decision:
    """Where to prefill one request whose decode worker already caches ``decode_hit_tokens``
    leading tokens of its ``prompt_tokens``-token prompt (``decode``: that worker's load, for
    the interference guard; None: unknown, no guard)."""
    new = max(0, prompt_tokens - decode_hit_tokens)
    if cfg.mode is DisaggMode.NEVER:
        return Decision(False, Reason.MODE_NEVER, new)
    if pool.num_workers <= 0:
        return Decision(False, Reason.NO_PREFILL_WORKERS, new)
    if cfg.mode is DisaggMode.ALWAYS:
        return Decision(True, Reason.MODE_ALWAYS, new)
    local = None
    if new <= cfg.min_remote_prefill_tokens:
        local = Reason.SHORT_PREFILL
    elif pool.min_waiting_prefill_tokens > cfg.max_prefill_queue_tokens:
        local = Reason.PREFILL_SATURATED
    if local is None:
        return Decision(True, Reason.LONG_PREFILL, new)
    guard = cfg.max_local_decodes
    if guard is not None and decode is not None and decode.num_decoding > guard and new > 0:
        return Decision(True, Reason.DECODE_BUSY, new)
    return Decision(False, local, new)
