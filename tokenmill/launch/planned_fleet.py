"""``tokenmill serve --planner load|sla``: the frontend here, an embedded nats-server (unless
``--nats``) and worker processes that the planner starts and stops between
``--min-workers`` and ``--max-workers`` (``actuator.LocalProcessActuator``), decided every
``--planner-interval-s`` by ``planner_loop.PlannerLoop``. ``min_workers`` workers are started
first and awaited before serving. The ready line ends with ``planner MODE MIN..MAX``.
The embedded NATS is supervised as in ``serve --workers N``; planned workers are not (a lost
worker is replaced by the planner's next decision)."""

from __future__ import annotations

import contextlib
import time
from typing import Any

from tokenmill.launch import event_loop
from tokenmill.launch.actuator import LocalProcessActuator
from tokenmill.launch.http_server import serve_stack
from tokenmill.launch.processes import NatsProcess
from tokenmill.launch.specs import (
    WORKER_COMPONENT,
    EngineSpec,
    FleetSpec,
    HttpSpec,
    PlannerSpec,
    RouterSpec,
    RuntimeSpec,
)
from tokenmill.launch.stacks import build_remote_stack
from tokenmill.launch.supervision import Supervisor


def serve_planned(
    engine: EngineSpec,
    fleet: FleetSpec,
    http: HttpSpec,
    config: Any,
    router: RouterSpec,
    spec: PlannerSpec,
) -> int:
    import dataclasses

    from tokenmill.core.errors import TokenmillError
    from tokenmill.core.timing_profile import TimingProfile
    from tokenmill.planner.planner import Planner
    from tokenmill.runtime.nats_server import NatsServer

    if spec.mode == "sla" and not spec.profile:
        raise TokenmillError("serve --planner sla needs --planner-profile (tokenmill profile)")
    profile = TimingProfile.load(spec.profile) if spec.profile else None
    start = time.monotonic()
    nats = None if fleet.nats_url else NatsServer().start()
    url = fleet.nats_url if nats is None else nats.url
    worker = dataclasses.replace(fleet.worker, drain_timeout_s=spec.drain_deadline_s)
    discovered: set[str] = set()
    loads_by_id: dict[str, Any] = {}
    actuator = LocalProcessActuator(
        engine,
        worker,
        url,
        lambda: discovered,
        lambda iid: getattr(loads_by_id.get(iid), "num_running_requests", 0),
    )
    try:
        for _ in range(spec.min_workers):
            actuator.start_worker()

        async def main() -> int:
            from tokenmill.core.request import RequestOutput
            from tokenmill.launch.planner_loop import PlannerLoop
            from tokenmill.runtime.interface import EndpointId

            stack = await build_remote_stack(RuntimeSpec(url), config, router, spec.min_workers)
            endpoint = EndpointId(RuntimeSpec.namespace, WORKER_COMPONENT, "generate")
            client = stack.runtime.client(endpoint, response_type=RequestOutput)

            def live() -> set[str]:
                discovered.clear()
                discovered.update(i.instance_id for i in client.instances())
                return discovered

            def loads() -> list[Any]:
                live()
                current = stack.loads.loads()
                loads_by_id.clear()
                loads_by_id.update((w.instance_id, w) for w in current)
                return current

            actuator.set_discovery(live)
            registry = stack.app.state.frontend.metrics.registry
            planner = Planner(spec.planner_config(), time.monotonic, profile)
            with contextlib.ExitStack() as files:
                log = files.enter_context(open(spec.log, "a")) if spec.log else None
                loop = PlannerLoop(planner, actuator, registry, loads, log)
                loop.start()
                supervisor = Supervisor([NatsProcess(nats)] if nats else [], fleet.restarts)
                supervisor.start()
                note = f", planner {spec.mode} {spec.min_workers}..{spec.max_workers}"
                try:
                    return await serve_stack(stack, http, start, note, supervisor.fatal)
                finally:
                    await loop.stop()
                    await supervisor.stop()

        return event_loop.run(main(), http.event_loop)
    finally:
        actuator.stop(spec.drain_deadline_s)
        if nats is not None:
            nats.stop()
