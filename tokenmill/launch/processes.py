"""Child processes of a deployment: spawn ``tokenmill worker`` processes, check they live,
stop them. ``serve --workers N`` uses it (and a planner's local actuator will).

Children get SIGKILL if this process dies (PR_SET_PDEATHSIG, Linux), and ``stop_processes``
ends them on a normal exit (SIGTERM, then SIGKILL after the drain time), so no orphan is left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from tokenmill.core.errors import TokenmillError
from tokenmill.launch.specs import EngineSpec, WorkerSpec
from tokenmill.runtime.nats_server import NatsServer, _die_with_parent

Process = subprocess.Popen[bytes]


def worker_argv(engine: EngineSpec, worker: WorkerSpec, nats_url: str) -> list[str]:
    """The command line of a ``tokenmill worker`` child running ``engine``."""
    argv = [
        sys.executable,
        "-m",
        "tokenmill",
        "--log-level",
        "WARNING",
        "worker",
        "--nats",
        nats_url,
        *engine.argv(),
        "--drain-timeout",
        str(worker.drain_timeout_s),
        "--event-loop",
        worker.event_loop,
    ]
    if worker.instance_id is not None:
        argv += ["--instance-id", worker.instance_id]
    return argv


def spawn_worker(engine: EngineSpec, worker: WorkerSpec, nats_url: str) -> Process:
    """Starts a worker child (one torch thread unless ``OMP_NUM_THREADS`` says otherwise:
    N workers share the machine's cores)."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    argv = worker_argv(engine, worker, nats_url)
    return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)


class WorkerProcess:
    """A ``tokenmill worker`` child that ``supervision.Supervisor`` can restart."""

    def __init__(self, engine: EngineSpec, worker: WorkerSpec, nats_url: str, index: int):
        self.name = f"worker {index}"
        self._spawn = lambda: spawn_worker(engine, worker, nats_url)
        self.proc = self._spawn()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def restart(self) -> None:
        self.proc = self._spawn()


class NatsProcess:
    """The embedded nats-server as a supervised child: restarted on the same port with its
    JetStream store (discovery buckets, blobs) kept, so clients simply reconnect."""

    name = "nats-server"

    def __init__(self, server: NatsServer):
        self.server = server

    @property
    def pid(self) -> int | None:
        return self.server.pid

    def poll(self) -> int | None:
        return self.server.poll()

    def restart(self) -> None:
        self.server.restart()


def alive_check(procs: Sequence[Process]) -> Callable[[], None]:
    """A check that raises ``TokenmillError`` naming the first child that exited."""

    def check() -> None:
        for proc in procs:
            if proc.poll() is not None:
                raise TokenmillError(f"worker process {proc.pid} exited with {proc.returncode}")

    return check


def stop_processes(procs: Sequence[Process], timeout_s: float) -> None:
    """SIGTERM every process, wait up to ``timeout_s`` (+5 s) for all, SIGKILL the rest."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s + 5.0
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
