"""The engine loop: a thread that owns an ``EngineCore`` and steps it while there is work.

Other threads talk to it only through ``add`` / ``abort`` / ``shutdown``, which queue a
command and notify a condition variable: the loop sleeps on that condition when idle (no
polling sleeps) and drains all queued commands before each step; after such a wait it calls
``executor.on_wake()`` (the mocker starts its simulated time there). While KV transfers are
in flight (``core.has_pending_transfers()``) and no step computes anything, the loop polls
every ``KV_POLL_INTERVAL_S`` instead of sleeping until a command. Each step's outputs are
handed to ``on_outputs`` as one list, from the loop thread.

If anything escapes ``EngineCore.step`` (the core already isolates per-request failures),
the loop is dead: ``error`` is set, ``on_dead(error)`` is called once, and every later
``add`` raises ``EngineDeadError``. The loop never touches asyncio.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from tokenmill.core.errors import EngineDeadError
from tokenmill.core.request import EngineRequest, FinishReason, RequestOutput
from tokenmill.engine.core import EngineCore

log = logging.getLogger(__name__)

OutputsFn = Callable[[list[RequestOutput]], None]

# Weight of the latest step in ``step_time_ms``: ~10 steps of memory, so the published load
# follows a change of batch within a load interval but one slow step does not swing it.
STEP_TIME_EWMA_ALPHA = 0.2

# While KV transfers are in flight and there is nothing to compute, the loop polls the
# connector this often (a NIXL READ of a few MiB takes about a millisecond here).
KV_POLL_INTERVAL_S = 0.0005


class EngineLoop:
    """Runs ``core`` in a daemon thread. ``clock`` times steps (inject a fake one in tests).

    ``last_step_s``: wall time of the last loop turn's step; ``step_time_ms``: an EWMA of the
    wall time of steps that computed something (0.0 until one did). Both are written by the
    loop thread only; other threads read them racily (plain floats)."""

    def __init__(
        self,
        core: EngineCore,
        on_outputs: OutputsFn,
        on_dead: Callable[[BaseException], None] = lambda e: None,
        clock: Callable[[], float] = time.monotonic,
        name: str = "tokenmill-engine",
    ):
        self.core = core
        self.on_outputs = on_outputs
        self.on_dead = on_dead
        self.clock = clock
        self.error: BaseException | None = None
        self.last_step_s = 0.0
        self.step_time_ms = 0.0
        self._cond = threading.Condition()
        self._commands: list[tuple[str, Any]] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> EngineLoop:
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self.error is None and self._thread.is_alive() and not self._stopping

    def add(self, request: EngineRequest) -> None:
        """Queues a request (validate it first: errors found here come back as an ERROR output)."""
        self._command("add", request)

    def abort(self, request_ids: Iterable[str]) -> None:
        """Aborts at the next loop turn (before the next step): their blocks are freed then."""
        self._command("abort", list(request_ids))

    def call(self, fn: Callable[[EngineCore], Any]) -> None:
        """Runs ``fn(core)`` in the loop thread before the next step (tests, introspection)."""
        self._command("call", fn)

    def shutdown(self, timeout: float | None = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _command(self, kind: str, arg: Any) -> None:
        with self._cond:
            if self.error is not None or self._stopping:
                raise EngineDeadError(f"engine loop is not running: {self.error!r}")
            self._commands.append((kind, arg))
            self._cond.notify()

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        try:
            self.core.executor.on_thread_start()
            while self._next_commands() is not None:
                pass
        except BaseException as e:  # noqa: BLE001 - any escape kills the loop, loudly
            log.exception("engine loop died")
            with self._cond:
                self.error = e
                self._commands.clear()
            self.on_dead(e)
        finally:
            self.core.shutdown()

    def _next_commands(self) -> bool | None:
        """One loop turn: wait for work, apply commands, step. None when shutting down."""
        with self._cond:
            woke = False
            while not (self._commands or self._stopping or self.core.has_unfinished_requests()):
                if self.core.has_pending_transfers():
                    self._cond.wait(KV_POLL_INTERVAL_S)  # held blocks: poll their sends
                    break
                self._cond.wait()
                woke = True
            if self._stopping:
                return None
            commands, self._commands = self._commands, []
        if woke:
            self.core.executor.on_wake()
        outputs = self._apply(commands)
        num_steps, start = self.core.num_steps, self.clock()
        outputs.extend(self.core.step())
        self.last_step_s = self.clock() - start
        if self.core.num_steps != num_steps:  # an empty step would pull the average to 0
            self._record_step_time(self.last_step_s * 1000.0)
        elif not outputs and self.core.has_pending_transfers():
            self._idle_poll()  # loads in flight, nothing to compute: do not spin
        if outputs:
            self.on_outputs(outputs)
        return True

    def _idle_poll(self) -> None:
        with self._cond:
            if not (self._commands or self._stopping):
                self._cond.wait(KV_POLL_INTERVAL_S)

    def _record_step_time(self, ms: float) -> None:
        previous = self.step_time_ms
        if previous == 0.0:
            self.step_time_ms = ms  # the first step: no history to average with
        else:
            self.step_time_ms = previous + STEP_TIME_EWMA_ALPHA * (ms - previous)

    def _apply(self, commands: list[tuple[str, Any]]) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        for kind, arg in commands:
            if kind == "add":
                outputs.extend(self._add(arg))
            elif kind == "abort":
                outputs.extend(self.core.abort_requests(arg))
            else:
                arg(self.core)
        return outputs

    def _add(self, request: EngineRequest) -> list[RequestOutput]:
        try:
            self.core.add_request(request)
        except Exception as e:  # noqa: BLE001 - a bad request fails alone
            out = RequestOutput(
                request_id=request.request_id,
                new_token_ids=[],
                finish_reason=FinishReason.ERROR,
                error=f"{type(e).__name__}: {e}",
                num_prompt_tokens=len(request.prompt_token_ids),
            )
            return [out]
        return []
