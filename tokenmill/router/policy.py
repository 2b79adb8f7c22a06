"""Routing policies: pure functions of plain data (``RouteInput``) and a seeded rng.

A policy sees, per worker, the prompt blocks it has cached (device, and lower tiers beyond
the device run), its in-flight load from ``ActiveSequences`` and its cached tree size, and
returns one worker id. Policies are looked up by name in ``POLICIES`` (``make_policy``); only
``round-robin`` keeps state (its cursor).

Cost of the ``kv`` and ``dynamo`` policies, in blocks (lower is better)::

    prefill(w) = prompt_blocks - credit(w) + active_prefill_tokens(w) / block_size
    decode(w)  = active_blocks(w) + new_blocks(w)        # new: the prompt's blocks not active on w
    cost(w)    = prefill_load_scale * prefill(w) + decode_weight * decode(w)

with ``prompt_blocks = num_prompt_tokens / block_size`` (fractional) and
``credit = device_overlap + lower_tier_credit * lower_overlap``.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerView:
    """What a policy knows about one worker for one request."""

    worker_id: int
    device_overlap: int = 0  # leading prompt blocks cached on the worker's device
    lower_overlap: int = 0  # further leading blocks held only in host/disk/remote tiers
    active_blocks: int = 0
    active_prefill_tokens: int = 0
    new_blocks: int = 0  # blocks of this prompt not already among the worker's active blocks
    num_requests: int = 0
    cached_blocks: int = 0  # size of the worker's cached tree (device)


@dataclass(frozen=True)
class RouteInput:
    num_prompt_tokens: int
    block_size: int
    workers: tuple[WorkerView, ...]


@dataclass(frozen=True)
class PolicyConfig:
    """Knobs of the cost policies. ``temperature`` 0 is argmin; > 0 samples softmax(-cost/T)
    over costs normalised to [0, 1] (so T does not depend on the prompt's size)."""

    prefill_load_scale: float = 1.0
    decode_weight: float = 1.0
    lower_tier_credit: float = 0.5
    temperature: float = 0.0


Policy = Callable[[RouteInput, random.Random], int]


TUNED: dict[str, PolicyConfig] = {
    # Tuned on the Mooncake conversation trace (benchmarks/routing.py): decode load counted at
    # a tenth of prefill work. In this regime a step's decode cost hardly depends on how many
    # sequences decode (u is small), while every uncached prompt block is prefill time, so
    # following the cache and the prefill queue matters more than spreading decoders.
    "kv": PolicyConfig(decode_weight=0.1),
}


def default_policy_config(mode: str, **overrides: float) -> PolicyConfig:
    """The default knobs of ``mode`` (``TUNED`` or the plain ``PolicyConfig``) with
    ``overrides`` applied; ``dynamo`` ignores its config anyway."""
    return dataclasses.replace(TUNED.get(mode, PolicyConfig()), **overrides)


def prefill_blocks(view: WorkerView, inp: RouteInput, lower_credit: float) -> float:
    """Prompt blocks still to compute after cache credit + the worker's queued prefill."""
    credit = view.device_overlap + lower_credit * view.lower_overlap
    prompt = inp.num_prompt_tokens / inp.block_size
    return max(prompt - credit, 0.0) + view.active_prefill_tokens / inp.block_size


def decode_blocks(view: WorkerView) -> int:
    return view.active_blocks + view.new_blocks


def kv_cost(view: WorkerView, inp: RouteInput, cfg: PolicyConfig) -> float:
    pre = prefill_blocks(view, inp, cfg.lower_tier_credit)
    return cfg.prefill_load_scale * pre + cfg.decode_weight * decode_blocks(view)


def softmax_pick(costs: list[float], temperature: float, rng: random.Random) -> int:
    """Index sampled with p ∝ exp(-normalised cost / temperature)."""
    lo, hi = min(costs), max(costs)
    span = hi - lo or 1.0
    weights = [math.exp(-(c - lo) / span / temperature) for c in costs]
    return rng.choices(range(len(costs)), weights=weights)[0]


def argmin_pick(keys: Sequence[tuple[float, ...]], rng: random.Random) -> int:
    """Index of the smallest key; exact ties broken uniformly at random."""
    best = min(keys)
    ties = [i for i, k in enumerate(keys) if k == best]
    return ties[0] if len(ties) == 1 else rng.choice(ties)


# ---- registry -----------------------------------------------------------------------------
PolicyFactory = Callable[[PolicyConfig], Policy]
POLICIES: dict[str, PolicyFactory] = {}


def register(name: str) -> Callable[[PolicyFactory], PolicyFactory]:
    def deco(factory: PolicyFactory) -> PolicyFactory:
        POLICIES[name] = factory
        return factory

    return deco


def make_policy(name: str, cfg: PolicyConfig | None = None) -> Policy:
    """The policy registered as ``name`` (KeyError lists the known names)."""
    if name not in POLICIES:
        raise KeyError(f"unknown router policy {name!r}; known: {sorted(POLICIES)}")
    return POLICIES[name](cfg or PolicyConfig())


@register("round-robin")
def _round_robin(cfg: PolicyConfig) -> Policy:
    cursor = [0]

    def choose(inp: RouteInput, rng: random.Random) -> int:
        view = inp.workers[cursor[0] % len(inp.workers)]
        cursor[0] += 1
        return view.worker_id

    return choose


@register("random")
def _random(cfg: PolicyConfig) -> Policy:
    return lambda inp, rng: rng.choice(inp.workers).worker_id


@register("least-loaded")
def _least_loaded(cfg: PolicyConfig) -> Policy:
    def choose(inp: RouteInput, rng: random.Random) -> int:
        keys = [(float(v.active_blocks), float(v.num_requests)) for v in inp.workers]
        return inp.workers[argmin_pick(keys, rng)].worker_id

    return choose


@register("kv")
def _kv(cfg: PolicyConfig) -> Policy:
    """Cost policy; temperature 0: argmin, ties to the fewest active blocks, then random."""

    def choose(inp: RouteInput, rng: random.Random) -> int:
        costs = [kv_cost(v, inp, cfg) for v in inp.workers]
        if cfg.temperature > 0:
            return inp.workers[softmax_pick(costs, cfg.temperature, rng)].worker_id
        keys = [(c, float(v.active_blocks)) for c, v in zip(costs, inp.workers, strict=True)]
        return inp.workers[argmin_pick(keys, rng)].worker_id

    return choose


@register("dynamo")
def _dynamo(cfg: PolicyConfig) -> Policy:
    """Dynamo 1.6's default: overlap weight 1, device overlap only, argmin, ties to the
    smallest cached tree, then random. Ignores ``cfg`` on purpose (it is the control)."""
    fixed = PolicyConfig(lower_tier_credit=0.0)

    def choose(inp: RouteInput, rng: random.Random) -> int:
        keys = [(kv_cost(v, inp, fixed), float(v.cached_blocks)) for v in inp.workers]
        return inp.workers[argmin_pick(keys, rng)].worker_id

    return choose
