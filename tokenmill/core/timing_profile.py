"""A worker's measured timing profile: the one JSON that ``tokenmill profile`` writes and both
the planner (``planner.perf``) and the mocker (``--timing-profile``) read.

Format (version 1; msgspec decodes and type-checks it)::

    {"version": 1, "engine": "mocker", "block_size": 64, "num_blocks": 16384,
     "max_num_batched_tokens": 8192, "max_num_seqs": 256,
     "prefill": [{"input_tokens": 1024, "prefix_hit": 0.0, "ms": 33.4}, ...],
     "decode":  [{"batch_size": 8, "context_tokens": 2048, "itl_ms": 9.1,
                  "kv_usage": 0.0156}, ...]}

- ``prefill``: time of one request's whole prefill (alone on the worker) against its input
  length and the fraction of it found in the prefix cache;
- ``decode``: one decode step's time (the ITL) with ``batch_size`` running requests of
  ``context_tokens`` each; ``kv_usage`` is the share of the worker's KV blocks they hold.

Interpolation is piecewise linear and clamped at the ends: prefill over ``input_tokens`` per
measured ``prefix_hit`` level, then between levels; decode over ``context_tokens`` per
measured ``batch_size``, then between batch sizes. ``TimingProfile`` also satisfies the
mocker's ``StepTiming`` protocol (``prefill_ms(new tokens)``: the no-prefix-hit curve;
``decode_ms(usage)``: the decode points ordered by ``kv_usage``, equal usages averaged), so a
profile replaces the mocker's polynomial without the engine knowing its format.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import msgspec

PROFILE_VERSION = 1


class PrefillPoint(msgspec.Struct, frozen=True):
    input_tokens: int
    prefix_hit: float
    ms: float


class DecodePoint(msgspec.Struct, frozen=True):
    batch_size: int
    context_tokens: int
    itl_ms: float
    kv_usage: float


class TimingProfile(msgspec.Struct, frozen=True, kw_only=True):
    engine: str
    block_size: int
    num_blocks: int
    max_num_batched_tokens: int
    max_num_seqs: int
    prefill: list[PrefillPoint]
    decode: list[DecodePoint]
    version: int = PROFILE_VERSION

    def __post_init__(self) -> None:
        if self.version != PROFILE_VERSION:
            raise ValueError(f"timing profile version {self.version}, expected {PROFILE_VERSION}")
        if not self.prefill or not self.decode:
            raise ValueError("a timing profile needs at least one prefill and one decode point")

    # ---- files ---------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> TimingProfile:
        """Reads and validates a profile (``ValueError`` naming the file when malformed)."""
        try:
            return msgspec.json.decode(Path(path).read_bytes(), type=cls)
        except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as exc:
            raise ValueError(f"{path}: not a timing profile: {exc}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(msgspec.json.format(msgspec.json.encode(self), indent=1))

    # ---- what the planner asks -----------------------------------------------------------
    @property
    def kv_capacity_tokens(self) -> int:
        return self.block_size * self.num_blocks

    def prefill_time_ms(self, input_tokens: float, prefix_hit: float = 0.0) -> float:
        """One request's prefill time (ms) alone on a worker."""
        levels = _curves((p.prefix_hit, p.input_tokens, p.ms) for p in self.prefill)
        return _interp2(levels, prefix_hit, input_tokens)

    def itl_ms(self, batch_size: float, context_tokens: float) -> float:
        """Decode step time (ms) with ``batch_size`` requests of ``context_tokens`` each."""
        curves = _curves((d.batch_size, d.context_tokens, d.itl_ms) for d in self.decode)
        return _interp2(curves, batch_size, context_tokens)

    # ---- the mocker's StepTiming ---------------------------------------------------------
    def prefill_ms(self, num_tokens: int) -> float:
        return self.prefill_time_ms(num_tokens, 0.0)

    def decode_ms(self, usage: float) -> float:
        by_usage: dict[float, list[float]] = defaultdict(list)
        for d in self.decode:
            by_usage[d.kv_usage].append(d.itl_ms)
        points = sorted((u, sum(v) / len(v)) for u, v in by_usage.items())
        return interp(points, usage)


def interp(points: list[tuple[float, float]], x: float) -> float:
    """Piecewise-linear ``y(x)`` through sorted ``points``, clamped at both ends."""
    i = bisect.bisect_left(points, (x, float("-inf")))
    if i == 0:
        return points[0][1]
    if i == len(points):
        return points[-1][1]
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def _curves(
    rows: Iterable[tuple[float, float, float]],
) -> list[tuple[float, list[tuple[float, float]]]]:
    """``(outer, inner, y)`` rows as sorted ``[(outer, [(inner, y), ...]), ...]``."""
    grouped: dict[float, list[tuple[float, float]]] = defaultdict(list)
    for outer, inner, y in rows:
        grouped[float(outer)].append((float(inner), float(y)))
    return sorted((k, sorted(v)) for k, v in grouped.items())


def _interp2(
    curves: list[tuple[float, list[tuple[float, float]]]], outer: float, x: float
) -> float:
    """Interpolates along each curve at ``x``, then across curves at ``outer``."""
    return interp([(k, interp(pts, x)) for k, pts in curves], outer)
