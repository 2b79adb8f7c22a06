"""``tokenmill serve --workers 2``: a worker killed with SIGKILL is reaped, logged with its
signal and replaced by a worker that serves; the embedded nats-server is restarted the same
way; with ``--worker-restarts 0`` nothing is replaced."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time

import httpx
from helpers.procs import Serve, pid_gone

REPLACEMENT_S = 30.0  # the bound on a replacement serving
BODY = {"model": "tiny", "prompt": "hello there", "max_tokens": 4}


async def _line_matching(serve: Serve, pattern: str, timeout_s: float) -> re.Match[str]:
    """Reads ``serve``'s output until a line matches ``pattern``."""
    assert serve.proc.stdout is not None
    regex = re.compile(pattern)
    async with asyncio.timeout(timeout_s):
        while True:
            line = await asyncio.to_thread(serve.proc.stdout.readline)
            serve.output.append(line)
            assert line, f"serve exited: {''.join(serve.output)}"
            if match := regex.search(line):
                return match


async def _completes(url: str) -> bool:
    async with httpx.AsyncClient(timeout=10.0) as client:
        r = await client.post(url + "/completions", json=BODY)
    return r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


async def test_a_killed_worker_and_nats_are_replaced(tiny_model_dir):
    serve = Serve(tiny_model_dir, 2, "--mocker-speedup", "20").wait_ready()
    try:
        killed_at = time.monotonic()
        os.kill(serve.worker_pids[0], signal.SIGKILL)
        await _line_matching(
            serve,
            rf"worker 0 \(pid {serve.worker_pids[0]}\) killed by "
            r"SIGKILL; restarting in",
            10,
        )
        new_pid = int((await _line_matching(serve, r"worker 0 restarted \(pid (\d+)\)", 10))[1])
        await _line_matching(serve, r"tokenmill worker: ready", REPLACEMENT_S)
        assert pid_gone(serve.worker_pids[0])  # reaped, not a zombie
        os.kill(serve.worker_pids[1], signal.SIGKILL)  # only the replacement is left
        serve.worker_pids.append(new_pid)
        while not await _completes(serve.url):
            assert time.monotonic() - killed_at < REPLACEMENT_S
            await asyncio.sleep(0.2)
        print(f"replacement served {time.monotonic() - killed_at:.1f} s after the kill")
        assert serve.nats_pid is not None
        os.kill(serve.nats_pid, signal.SIGKILL)
        await _line_matching(serve, r"nats-server \(pid \d+\) killed by SIGKILL", 10)
        await _line_matching(serve, r"nats-server restarted", 10)
        deadline = time.monotonic() + REPLACEMENT_S
        while not await _completes(serve.url):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
        assert serve.proc.poll() is None
    finally:
        serve.stop()


async def test_without_restarts_a_dead_worker_stays_dead(tiny_model_dir):
    serve = Serve(tiny_model_dir, 2, "--worker-restarts", "0").wait_ready()
    try:
        os.kill(serve.worker_pids[0], signal.SIGKILL)
        await _line_matching(serve, r"worker 0 \(pid \d+\) killed by SIGKILL; not restarted", 10)
        assert await _completes(serve.url)  # the other worker serves
    finally:
        serve.stop()
