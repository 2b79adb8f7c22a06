"""``tokenmill`` subprocesses for tests: ``tokenmill serve`` on a free loopback port (ready
when /health answers 200: ``ServerProcess``, ``running_server``), ``tokenmill serve --workers N
--engine mocker`` (PIDs parsed from the ready line: ``Serve``), any command ready on a line
(``Proc``), process liveness by PID, and the text an uninterrupted mocker run produces for a
response id. Every process runs from the repository root with one OpenMP thread."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tokenmill.engine.mocker import TokenSource
from tokenmill.engine.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[2]
READY = re.compile(r"tokenmill: serving .*worker pids ([\d ]+)\)")
NATS_PID = re.compile(r"nats \S+ pid (\d+)")
STARTUP_TIMEOUT_S = 120.0


def free_port() -> int:
    """A loopback TCP port free right now (another process may take it before it is used)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m tokenmill serve ...`` in a subprocess; ``url`` is its /v1 base."""

    def __init__(self, *args: str):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = self.base + "/v1"
        cmd = [
            sys.executable,
            "-m",
            "tokenmill",
            "--log-level",
            "WARNING",
            "serve",
            "--port",
            str(self.port),
            *args,
        ]
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
    """A ready ``ServerProcess`` for the ``with`` block, stopped (SIGTERM) afterwards."""
    server = ServerProcess(*args)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def pid_gone(pid: int) -> bool:
    """No such process, or a zombie (exited, not yet reaped by init)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


class Serve:
    """``python -m tokenmill serve --workers N --engine mocker ...``; ``worker_pids`` and
    ``nats_pid`` (embedded server only) come from its ready line."""

    def __init__(self, model_dir: Path, workers: int, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        cmd = [
            sys.executable,
            "-m",
            "tokenmill",
            "--log-level",
            "WARNING",
            "serve",
            "--port",
            str(self.port),
            "--workers",
            str(workers),
            "--engine",
            "mocker",
            "--model",
            str(model_dir),
            "--served-model-name",
            "tiny",
            *extra,
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.output: list[str] = []
        self.worker_pids: list[int] = []
        self.nats_pid: int | None = None

    def wait_ready(self, timeout_s: float = 120.0) -> Serve:
        deadline = time.monotonic() + timeout_s
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                pytest.fail(f"serve exited {self.proc.wait()}: {''.join(self.output)}")
            self.output.append(line)
            if match := READY.search(line):
                self.worker_pids = [int(p) for p in match.group(1).split()]
                if nats := NATS_PID.search(line):
                    self.nats_pid = int(nats.group(1))
                return self
        pytest.fail("serve did not become ready")

    def stop(self, timeout_s: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            if self.proc.stdout is not None:
                self.output.append(self.proc.stdout.read())
                self.proc.stdout.close()
            for pid in self.worker_pids:  # never leave a worker behind a failed test
                if not pid_gone(pid):
                    os.kill(pid, signal.SIGKILL)


def expected_text(tokenizer: Tokenizer, response_id: str, prompt_len: int, n: int) -> str:
    """What the mocker generates for choice 0 of ``response_id``, uninterrupted."""
    tokens = TokenSource(vocab_size=tokenizer.vocab_size).tokens(
        f"{response_id}-0", prompt_len, prompt_len + n
    )
    return tokenizer.decode(tokens, skip_special_tokens=True)


class Proc:
    """``python -m tokenmill <args>``, ready once a line of its output contains ``ready``."""

    def __init__(self, *args: str):
        cmd = [sys.executable, "-m", "tokenmill", "--log-level", "WARNING", *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.output: list[str] = []

    def wait_for(self, text: str, timeout_s: float = 120.0) -> Proc:
        deadline = time.monotonic() + timeout_s
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                pytest.fail(f"exited {self.proc.wait()}: {''.join(self.output)}")
            self.output.append(line)
            if text in line:
                return self
        pytest.fail(f"no {text!r} in time")

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            if self.proc.stdout is not None and not self.proc.stdout.closed:
                self.output.append(self.proc.stdout.read())
                self.proc.stdout.close()
