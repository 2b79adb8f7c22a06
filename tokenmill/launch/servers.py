"""The HTTP-serving processes, each run until SIGINT/SIGTERM:

- ``serve_local``: ``tokenmill serve``, frontend + router + one engine in this process;
- ``serve_frontend``: ``tokenmill frontend``, the frontend over NATS for workers elsewhere;
- ``serve_fleet``: ``tokenmill serve --workers N``, an embedded nats-server (unless the fleet
  names one), N worker processes and the frontend here. The ready line lists their PIDs:
  ``tokenmill: serving ... (nats URL pid P, worker pids A B)``; dead workers (and the embedded
  NATS) are restarted by ``supervision.Supervisor``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from tokenmill.core.errors import TokenmillError
from tokenmill.launch import event_loop
from tokenmill.launch.http_server import serve_stack
from tokenmill.launch.processes import NatsProcess, WorkerProcess, alive_check, stop_processes
from tokenmill.launch.specs import (
    DisaggSpec,
    EngineSpec,
    FleetSpec,
    HttpSpec,
    RouterSpec,
    RuntimeSpec,
)
from tokenmill.launch.stacks import build_local_stack, build_remote_stack
from tokenmill.launch.supervision import Supervisor


def serve_local(engine: EngineSpec, http: HttpSpec, config: Any, router: RouterSpec) -> int:
    """``config``: the ``FrontendConfig``."""
    start = time.monotonic()

    async def main() -> int:
        stack = await build_local_stack(engine, config, router)
        return await serve_stack(stack, http, start)

    return event_loop.run(main(), http.event_loop)


def serve_frontend(
    runtime: RuntimeSpec,
    http: HttpSpec,
    config: Any,
    router: RouterSpec,
    disagg: DisaggSpec | None = None,
) -> int:
    start = time.monotonic()

    async def main() -> int:
        stack = await build_remote_stack(runtime, config, router, disagg=disagg)
        return await serve_stack(stack, http, start)

    return event_loop.run(main(), http.event_loop)


def serve_fleet(
    engine: EngineSpec,
    fleet: FleetSpec,
    http: HttpSpec,
    config: Any,
    router: RouterSpec,
    disagg: DisaggSpec | None = None,
    planner: Any = None,
) -> int:
    """With ``planner`` (a ``PlannerSpec`` with a mode) the planner sizes the fleet
    (``planned_fleet.serve_planned``). Otherwise starts NATS (unless ``fleet.nats_url``) and the workers, serves until a signal, then
    stops the workers (SIGTERM, their drain time) and NATS. Once serving, a ``Supervisor``
    restarts a dead worker (or the embedded NATS) within ``fleet.restarts``; when it cannot,
    the server stops and exits 1."""
    from tokenmill.runtime.nats_server import NatsServer

    if planner is not None and planner.mode is not None:
        from tokenmill.launch.planned_fleet import serve_planned

        if fleet.num_prefill_workers or fleet.num_decode_workers:
            raise TokenmillError(
                "--planner sizes an aggregated pool; with --prefill-workers/--decode-workers "
                "it is not supported yet (the replay plans split pools: replay --planner)"
            )

        return serve_planned(engine, fleet, http, config, router, planner)
    start = time.monotonic()
    nats = None if fleet.nats_url else NatsServer().start()
    url = fleet.nats_url if nats is None else nats.url
    workers: list[WorkerProcess] = []
    try:
        workers = [
            WorkerProcess(dataclasses.replace(engine, role=role), fleet.worker, url, i)
            for i, role in enumerate(fleet.roles)
        ]
        pids = " ".join(str(w.pid) for w in workers)
        note = (f", nats {url} pid {nats.pid}" if nats else "") + f", worker pids {pids}"
        check = alive_check([w.proc for w in workers])

        async def main() -> int:
            stack = await build_remote_stack(
                RuntimeSpec(url), config, router, len(workers), check, disagg
            )
            children = [*workers, *([NatsProcess(nats)] if nats else [])]
            supervisor = Supervisor(children, fleet.restarts)
            supervisor.start()
            try:
                return await serve_stack(stack, http, start, note, supervisor.fatal)
            finally:
                await supervisor.stop()

        return event_loop.run(main(), http.event_loop)
    finally:
        stop_processes([w.proc for w in workers], fleet.worker.drain_timeout_s)
        if nats is not None:
            nats.stop()
