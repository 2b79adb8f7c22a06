"""The planner: a pure state machine. The adapter calls ``plan(observations)`` whenever
``due()`` (every ``interval_s`` of the injected clock) with one ``PoolObservation`` per pool
over the window since the last call; it gets one ``PoolDecision`` per pool (target replicas,
why, the inputs) and applies them through an actuator. No I/O and no clock of its own.

``PlannerConfig.mode`` picks the policy (``sla``, ``load``, ``dynamo``); ``sla`` and
``dynamo`` need a ``TimingProfile``. Every decision passes the pool's ``Governor`` (except
``dynamo``'s, which paces itself), the pool's ``PoolLimits`` and the ``total_budget``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from tokenmill.core.timing_profile import TimingProfile
from tokenmill.planner.dynamo import DynamoConfig, DynamoPolicy
from tokenmill.planner.governor import Governor, GovernorConfig, apply_budget
from tokenmill.planner.observation import PoolDecision, PoolLimits, PoolObservation
from tokenmill.planner.perf import PerfModel
from tokenmill.planner.policies import (
    LoadPolicy,
    LoadThresholds,
    Policy,
    SlaConfig,
    SlaPolicy,
    Targets,
)

MODES = ("sla", "load", "dynamo")


@dataclass(frozen=True)
class PlannerConfig:
    mode: str = "sla"
    interval_s: float = 10.0
    targets: Targets = Targets()
    limits: Mapping[str, PoolLimits] = field(default_factory=lambda: {"both": PoolLimits()})
    total_budget: int | None = None
    startup_s: float = 0.0  # how long a new worker takes to serve: the sla forecast horizon
    governor: GovernorConfig = GovernorConfig()
    sla: SlaConfig = SlaConfig()
    load: LoadThresholds = LoadThresholds()
    dynamo: DynamoConfig = DynamoConfig()

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown planner mode {self.mode!r}; choose from {MODES}")
        if self.interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        if not self.limits:
            raise ValueError("a planner needs at least one pool")
        floor = sum(lim.min_replicas for lim in self.limits.values())
        if self.total_budget is not None and self.total_budget < floor:
            raise ValueError(f"total budget {self.total_budget} below the pools' minimum {floor}")


def make_policy(config: PlannerConfig, profile: TimingProfile | None) -> Policy:
    if config.mode == "load":
        return LoadPolicy(config.load)
    if profile is None:
        raise ValueError(f"planner mode {config.mode!r} needs a timing profile")
    perf = PerfModel(profile)
    if config.mode == "dynamo":
        return DynamoPolicy(perf, config.targets, config.dynamo)
    ticks = max(1, math.ceil((config.startup_s + config.interval_s) / config.interval_s))
    sla = SlaConfig(**{**config.sla.__dict__, "lookahead_ticks": ticks})
    return SlaPolicy(perf, config.targets, sla)


class Planner:
    def __init__(
        self,
        config: PlannerConfig,
        clock: Callable[[], float],
        profile: TimingProfile | None = None,
    ):
        self.config = config
        self.policy = make_policy(config, profile)
        self._clock = clock
        self._governors = {p: Governor(config.governor, lim) for p, lim in config.limits.items()}
        self._next_due = clock() + config.interval_s
        self.num_decisions = 0

    @property
    def pools(self) -> list[str]:
        return list(self.config.limits)

    def due(self) -> bool:
        return self._clock() >= self._next_due - 1e-9

    def plan(self, observations: Mapping[str, PoolObservation]) -> list[PoolDecision]:
        """One decision per pool (a pool without an observation raises ``KeyError``)."""
        now = self._clock()
        self._next_due = now + self.config.interval_s
        self.num_decisions += 1
        current = {p: observations[p].num_provisioned for p in self.pools}
        targets, reasons, inputs = {}, {}, {}
        for pool in self.pools:
            limits = self.config.limits[pool]
            prop = self.policy.propose(
                now, pool, observations[pool], current[pool], limits.max_replicas
            )
            if prop.final:
                target, why = limits.clamp(prop.up), "policy"
            else:
                target, why = self._governors[pool].next_size(
                    now, current[pool], prop.up, prop.down
                )
            targets[pool], reasons[pool] = target, why
            inputs[pool] = {"proposed_up": prop.up, "proposed_down": prop.down, **prop.inputs}
        if self.config.total_budget is not None:
            cut = apply_budget(targets, dict(self.config.limits), current, self.config.total_budget)
            reasons.update({p: "budget" for p in cut if cut[p] != targets[p]})
            targets = cut
        return [
            PoolDecision(
                pool,
                current[pool],
                targets[pool],
                reasons[pool],
                self.policy.drain,
                {"time_s": round(now, 3), **inputs[pool]},
            )
            for pool in self.pools
        ]
