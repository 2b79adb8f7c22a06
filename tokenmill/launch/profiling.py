"""``tokenmill profile``'s assembly: the engine core to measure (real or mocker, built as
``engines`` builds them, without the async engine around it) and the run
(``bench.profile.Profiler``) writing the ``TimingProfile`` JSON. ``load_step_timing`` reads
either profile format for the mocker's ``--timing-profile``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenmill.launch.specs import EngineSpec

MOCKER_PROFILE_CONTEXT = 131_072


def build_profile_core(spec: EngineSpec) -> tuple[Any, Any]:
    """``(EngineCore, simulated_ms)`` for ``spec`` (kinds ``real`` and ``mocker``);
    ``simulated_ms`` None: steps are timed by the wall clock."""
    from tokenmill.engine.builder import build_mock_core, build_real_core
    from tokenmill.engine.config import CacheConfig
    from tokenmill.launch.engines import scheduler_config

    s = spec.settings
    if spec.kind == "mocker":
        assert s.num_blocks is not None
        context = spec.context_length or MOCKER_PROFILE_CONTEXT
        core = build_mock_core(
            CacheConfig(s.block_size, s.num_blocks), scheduler_config(s, context)
        )
        return core, lambda: core.executor.last_step_ms
    if spec.kind != "real":
        raise ValueError(f"cannot profile engine {spec.kind!r}: use real or mocker")
    from tokenmill.engine.loader import load_model

    loaded = load_model(spec.model, dtype=spec.dtype, device=spec.device)
    cache = None if s.num_blocks is None else CacheConfig(s.block_size, s.num_blocks)
    context = spec.context_length or loaded.config.max_position_embeddings
    core = build_real_core(
        loaded, scheduler_config(s, context), cache=cache, block_size=s.block_size, decode=False
    )
    return core, None


def run_profile(spec: EngineSpec, config: Any, output: str, verbose: bool = True) -> Any:
    """Profiles one worker of ``spec`` with ``config`` (a ``ProfileConfig``); writes and
    returns the ``TimingProfile``."""
    from tokenmill.bench.profile import Profiler

    core, simulated_ms = build_profile_core(spec)
    profile = Profiler(core, spec.kind, simulated_ms).run(config, print if verbose else _quiet)
    profile.save(output)
    return profile


def _quiet(_: str) -> None:
    pass


def load_step_timing(path: str | Path) -> Any:
    """The mocker's ``StepTiming`` from a profile file: a ``TimingProfile`` (``tokenmill
    profile``'s JSON, with ``version``) or the mocker's older ``{"prefill": [[N, ms]],
    "decode": [[u, ms]]}`` (``ProfileTiming``)."""
    from tokenmill.core.timing_profile import TimingProfile
    from tokenmill.engine.mocker import ProfileTiming

    data = json.loads(Path(path).read_text())
    if isinstance(data, dict) and "version" in data:
        return TimingProfile.load(path)
    return ProfileTiming.load(path)
