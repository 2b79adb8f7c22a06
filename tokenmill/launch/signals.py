"""Waiting for SIGINT/SIGTERM in a service's event loop (workers, routers)."""

from __future__ import annotations

import asyncio
import signal


async def wait_for_signal() -> None:
    """Returns at the first SIGINT or SIGTERM (the handlers stay installed: a second signal
    during shutdown is ignored instead of killing the process mid-drain)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
