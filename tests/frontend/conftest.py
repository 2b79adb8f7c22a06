"""Fixtures for frontend tests: a tiny HF model directory, `tokenmill serve` processes on free
loopback ports (ready when /health answers 200), and in-process stacks served by uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from tiny_models import make_tiny_hf_model  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m tokenmill serve ...`` in a subprocess; ``url`` is its /v1 base."""

    def __init__(self, *args: str):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = self.base + "/v1"
        cmd = [sys.executable, "-m", "tokenmill", "--log-level", "WARNING", "serve",
               "--port", str(self.port), *args]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    def wait_ready(self) -> None:
        """Returns once /health is 200; fails with the server's output if it exits first."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    pytest.fail(f"server exited {self.proc.returncode}: {self.proc.stdout.read()}")
                with contextlib.suppress(httpx.TransportError):
                    if client.get(self.base + "/health").status_code == 200:
                        return
                time.sleep(0.05)
        pytest.fail("server did not become healthy")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            if self.proc.stdout:
                self.proc.stdout.close()


@contextlib.contextmanager
def running_server(*args: str) -> Iterator[ServerProcess]:
    server = ServerProcess(*args)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_hf_model(tmp_path_factory.mktemp("model"), "llama3")


@pytest.fixture(scope="session")
def echo_server(tiny_model_dir) -> Iterator[ServerProcess]:
    """Echo engine (deterministic text: the prompt echoed back) served as "tiny"."""
    with running_server(
        "--model", str(tiny_model_dir), "--engine", "echo", "--served-model-name", "tiny",
        "--max-body-bytes", str(1 << 20),
    ) as server:  # fmt: skip
        yield server


@pytest.fixture(scope="session")
def real_server(tiny_model_dir) -> Iterator[ServerProcess]:
    """The real engine over the tiny llama, with an API key."""
    with running_server(
        "--model", str(tiny_model_dir), "--engine", "real", "--api-key", "sekret",
        "--dtype", "fp32", "--device", "cpu",
    ) as server:  # fmt: skip
        yield server


class InProcessServer:
    """A stack (from ``stacks.assemble_local_stack``) served by uvicorn in the test's loop."""

    def __init__(self, stack):
        import uvicorn

        class _Quiet(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):
                yield

        self.stack = stack
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(stack.app, port=self.port, loop="none", http="httptools",
                                log_level="warning", lifespan="on")  # fmt: skip
        self.server = _Quiet(config)
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> InProcessServer:
        self._task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            assert not self._task.done(), "uvicorn failed to start"
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.should_exit = True
        await self._task
        await self.stack.close()
