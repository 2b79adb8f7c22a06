"""Turning a policy's proposal into a pool's next size, against oscillation.

A policy proposes two numbers per pool each tick: ``up`` (the size it needs now) and
``down`` (the size it would be content with, computed with more headroom: the hysteresis
band). The governor:

- grows at once to ``up`` when ``up > current`` (and ``up_cooldown_s`` passed since the last
  growth);
- shrinks only when ``down`` has stayed below ``current`` for ``down_window_s`` (every
  proposal since it first dropped below; one at or above resets the wait) and
  ``down_cooldown_s`` passed since the last change, then to the largest of those proposals,
  by at most ``max_down_step`` workers;
- clamps to the pool's ``PoolLimits``.

``apply_budget`` then cuts a set of targets to a total budget: one worker at a time from the
pool furthest above its minimum (ties: the pool that wanted to grow, then by name). Pure:
times are given.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from tokenmill.planner.observation import PoolLimits


@dataclass(frozen=True)
class GovernorConfig:
    up_cooldown_s: float = 0.0
    down_cooldown_s: float = 30.0
    down_window_s: float = 30.0
    max_down_step: int = 2


class Governor:
    """One pool's governor (it keeps the recent ``down`` proposals)."""

    def __init__(self, config: GovernorConfig, limits: PoolLimits):
        self.config, self.limits = config, limits
        self._downs: deque[tuple[float, int]] = deque()
        self._last_up = self._last_change = -float("inf")

    def next_size(self, now: float, current: int, up: int, down: int) -> tuple[int, str]:
        """``(target, why)`` for a pool of ``current`` provisioned workers."""
        cfg = self.config
        if self.limits.clamp(current) != current:
            return self._changed(now, self.limits.clamp(current), "limits")
        if up > current and now - self._last_up >= cfg.up_cooldown_s:
            target = self.limits.clamp(up)
            if target > current:
                self._last_up = now
                return self._changed(now, target, "scale-up")
        if down >= current:
            self._downs.clear()  # the band holds: any shrink must be wanted anew
            return current, "hold"
        self._downs.append((now, down))
        wanted_for = now - self._downs[0][0]
        if wanted_for >= cfg.down_window_s and now - self._last_change >= cfg.down_cooldown_s:
            worst = max(d for _, d in self._downs)
            target = self.limits.clamp(max(worst, current - cfg.max_down_step))
            if target < current:
                self._downs.clear()
                return self._changed(now, target, "scale-down")
        return current, "hold"

    def _changed(self, now: float, target: int, why: str) -> tuple[int, str]:
        self._last_change = now
        return target, why


def apply_budget(
    targets: dict[str, int], limits: dict[str, PoolLimits], current: dict[str, int], budget: int
) -> dict[str, int]:
    """``targets`` cut to ``sum <= budget`` (never below a pool's minimum)."""
    out = dict(targets)
    while sum(out.values()) > budget:
        cuttable = [p for p in out if out[p] > limits[p].min_replicas]
        if not cuttable:
            break
        pool = max(
            cuttable,
            key=lambda p: (out[p] - limits[p].min_replicas, out[p] > current.get(p, 0), p),
        )
        out[pool] -= 1
    return out
