"""Typed, frozen specs built once from the parsed flags (``flags.py``), at the border: the
``cmd_*`` modules call ``*.from_args(args)`` and hand the specs on; the assembly modules
(``engines``, ``stacks``, ``servers``, ``processes``, ...) see specs, never a ``Namespace``.

Engine settings resolve per engine kind: a flag left unset takes that kind's default
(``ENGINE_DEFAULTS``). The mocker's defaults are ``tokenmill replay``'s (Dynamo's replay
anchor), so a live mocker fleet and an offline replay simulate the same engine.
"""

from __future__ import annotations

import dataclasses
import shlex
from argparse import Namespace
from dataclasses import dataclass
from typing import Any

from tokenmill.launch.supervision import RestartPolicy


@dataclass(frozen=True)
class EngineSettings:
    """KV pool and step limits of one engine replica. ``num_blocks`` None: sized from the
    KV memory budget (real engine only)."""

    block_size: int
    num_blocks: int | None
    max_num_batched_tokens: int
    max_num_seqs: int
    watermark: float


MOCKER_DEFAULTS = EngineSettings(64, 16_384, 8_192, 256, 0.01)
REAL_DEFAULTS = EngineSettings(16, None, 2_048, 256, 0.0)
# vLLM's CPU attention takes blocks in multiples of 32; prefix caching needs no watermark
VLLM_DEFAULTS = EngineSettings(32, None, 2_048, 256, 0.0)
ENGINE_DEFAULTS = {
    "mocker": MOCKER_DEFAULTS,
    "real": REAL_DEFAULTS,
    "echo": REAL_DEFAULTS,
    "vllm": VLLM_DEFAULTS,
}
SETTING_FLAGS = tuple(f.name for f in dataclasses.fields(EngineSettings))


def _settings(args: Namespace, defaults: EngineSettings) -> EngineSettings:
    """``defaults`` overridden by the setting flags given (None: not given)."""
    given = {k: v for k in SETTING_FLAGS if (v := getattr(args, k, None)) is not None}
    return dataclasses.replace(defaults, **given)


@dataclass(frozen=True)
class EngineSpec:
    """What engine a process runs (``engines.build_engine`` builds it)."""

    kind: str = "real"  # a name in engines.ENGINES
    model: str | None = None  # HF directory or GGUF file; None: the default model
    served_model_name: str | None = None
    context_length: int | None = None  # None: the model's (the mocker's at least 131,072)
    dtype: str = "auto"
    device: str = "auto"
    settings: EngineSettings = REAL_DEFAULTS
    mocker_speedup: float = 1.0
    echo_delay_s: float = 0.0
    stream_interval_ms: float = 1.0  # AsyncEngine.output_interval_s, in ms
    vllm_args: tuple[str, ...] = ()  # ``--vllm-args``: vLLM engine flags (engine ``vllm``)

    @classmethod
    def from_args(cls, args: Namespace) -> EngineSpec:
        return cls(
            kind=args.engine,
            model=args.model,
            served_model_name=args.served_model_name,
            context_length=args.context_length,
            dtype=args.dtype,
            device=args.device,
            settings=_settings(args, ENGINE_DEFAULTS[args.engine]),
            mocker_speedup=args.mocker_speedup,
            echo_delay_s=args.echo_delay,
            stream_interval_ms=args.stream_interval_ms,
            vllm_args=tuple(shlex.split(getattr(args, "vllm_args", None) or "")),
        )

    @property
    def stream_interval_s(self) -> float:
        return self.stream_interval_ms / 1000.0

    def argv(self) -> list[str]:
        """The ``worker`` flags that rebuild this spec in a child process. Settings equal to
        the kind's defaults are left out, so the child resolves them the same way."""
        argv = [
            "--engine",
            self.kind,
            "--dtype",
            self.dtype,
            "--device",
            self.device,
            "--mocker-speedup",
            str(self.mocker_speedup),
            "--echo-delay",
            str(self.echo_delay_s),
            "--stream-interval-ms",
            str(self.stream_interval_ms),
        ]
        optional = (
            ("--model", self.model),
            ("--served-model-name", self.served_model_name),
            ("--context-length", self.context_length),
        )
        argv += [str(x) for flag, value in optional if value is not None for x in (flag, value)]
        if self.vllm_args:
            argv += ["--vllm-args", shlex.join(self.vllm_args)]
        defaults = ENGINE_DEFAULTS[self.kind]
        for name in SETTING_FLAGS:
            value = getattr(self.settings, name)
            if value is not None and value != getattr(defaults, name):
                argv += ["--" + name.replace("_", "-"), str(value)]
        return argv


# Longer than the idle timeout of common client pools (aiohttp 15 s, httpx 5 s, load
# balancers 60 s): the client closes an idle connection first. With uvicorn's 5 s a client
# could reuse a connection the server was closing, and that request failed
# (``connection_dropped`` in tokenmill bench serve).
KEEP_ALIVE_S = 65.0


@dataclass(frozen=True)
class HttpSpec:
    """The uvicorn server of ``serve`` / ``frontend``. The defaults are the flags' defaults
    (``flags.add_http`` reads them from here)."""

    host: str = "127.0.0.1"
    port: int = 8000
    event_loop: str = "asyncio"
    timeout_keep_alive_s: float = KEEP_ALIVE_S
    shutdown_timeout_s: float = 30.0  # in-flight streams' drain time on SIGTERM
    header_timeout_s: float = 30.0  # a request's headers, from its first byte; 408 after

    @classmethod
    def from_args(cls, args: Namespace) -> HttpSpec:
        return cls(
            args.host,
            args.port,
            args.event_loop,
            args.timeout_keep_alive,
            args.shutdown_timeout,
            args.header_timeout,
        )


WORKER_COMPONENT = "backend"  # the discovery component of worker endpoints


@dataclass(frozen=True)
class RuntimeSpec:
    """How a process joins a deployment over NATS (defaults: ``flags.add_runtime``'s)."""

    nats_url: str
    namespace: str = "tokenmill"
    listen_host: str = "127.0.0.1"  # TCP request plane bind address
    advertise_host: str | None = None  # the address others dial (multi-host)
    plane_token: str = ""
    request_plane: str = "tcp"  # or "nats"

    @classmethod
    def from_args(cls, args: Namespace) -> RuntimeSpec:
        return cls(
            args.nats,
            args.namespace,
            args.listen_host,
            args.advertise_host,
            args.plane_token,
            args.request_plane,
        )

    def config(self) -> Any:
        """The ``NatsRuntimeConfig`` of this spec."""
        from tokenmill.runtime.nats_runtime import NatsRuntimeConfig

        return NatsRuntimeConfig(
            request_plane=self.request_plane,
            host=self.listen_host,
            advertise_host=self.advertise_host,
            token=self.plane_token,
        )


@dataclass(frozen=True)
class RouterSpec:
    """How requests pick a worker. ``remote``: ask standalone router replicas; ``block_size``
    None: the workers' (from their model cards, or the engine's)."""

    mode: str = "round-robin"
    remote: bool = False
    block_size: int | None = None

    @classmethod
    def from_args(cls, args: Namespace) -> RouterSpec:
        return cls(args.router_mode, getattr(args, "remote_router", False))


@dataclass(frozen=True)
class WorkerSpec:
    """One worker process: identity, drain time on SIGTERM, event loop (defaults:
    ``flags.add_worker``'s)."""

    instance_id: str | None = None
    drain_timeout_s: float = 30.0
    event_loop: str = "uvloop"

    @classmethod
    def from_args(cls, args: Namespace) -> WorkerSpec:
        return cls(args.instance_id, args.drain_timeout, args.event_loop)


@dataclass(frozen=True)
class FleetSpec:
    """``serve --workers N``: N worker processes over NATS (an embedded server unless
    ``nats_url``), each with ``worker``'s settings."""

    num_workers: int
    nats_url: str | None = None
    worker: WorkerSpec = WorkerSpec()
    restarts: RestartPolicy = RestartPolicy()

    @classmethod
    def from_args(cls, args: Namespace) -> FleetSpec:
        worker = WorkerSpec(None, args.shutdown_timeout, args.worker_event_loop)
        restarts = RestartPolicy(args.worker_restarts, args.restart_window)
        return cls(args.workers, args.nats, worker, restarts)


def frontend_config(args: Namespace) -> Any:
    """The ``frontend.app.FrontendConfig`` of the frontend flags (``flags.add_frontend``)."""
    from tokenmill.core.errors import TokenmillError
    from tokenmill.frontend.app import FrontendConfig

    if args.protect_metrics and args.api_key is None:
        raise TokenmillError("--protect-metrics needs --api-key")
    return FrontendConfig(
        api_key=args.api_key,
        protect_metrics=args.protect_metrics,
        max_tokens_default=args.max_tokens_default,
        max_body_bytes=args.max_body_bytes,
        body_timeout_s=args.body_timeout,
        request_timeout_s=args.request_timeout,
        migration_limit=args.migration_limit,
        allow_pinning=args.allow_pinning,
        request_log=args.request_log,
    )
