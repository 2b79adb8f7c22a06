"""Which asyncio event loop a command runs on (``--event-loop``).

HTTP frontends (``serve``, ``frontend``) default to asyncio's own loop. Measured on the
2-core box (docs/online.md §1): with uvloop, the task uvicorn starts when a request's headers
are parsed ran 47 ms after that socket read on average at concurrency 128, while timers in the
same loop fired on time; the requests on connections opened during a burst waited up to 1.8 s,
and TTFT p99 was 492 ms (median of 5 runs) against 281 ms on asyncio's loop at the same
request rate (-11% at concurrency 32). Workers and the standalone router default to uvloop:
they serve no HTTP, and with 8 mocker workers on asyncio's loop the serve process tree used
12% more CPU with no gain in the online routing experiment's TTFT (``serve --worker-event-loop`` chooses theirs).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

EVENT_LOOPS = ("asyncio", "uvloop")
T = TypeVar("T")


def run(main: Coroutine[Any, Any, T], name: str) -> T:
    """``main`` to completion on a new loop of kind ``name`` (one of ``EVENT_LOOPS``)."""
    if name == "uvloop":
        import uvloop

        return uvloop.run(main)
    if name != "asyncio":
        raise ValueError(f"unknown event loop {name!r}; choose from {', '.join(EVENT_LOOPS)}")
    return asyncio.run(main)
