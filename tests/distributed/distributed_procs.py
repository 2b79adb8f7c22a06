"""Helpers of the multi-process tests: ``tokenmill serve --workers N`` processes (PIDs parsed
from the ready line), process liveness by PID, and the text an uninterrupted mocker run
produces for a response id."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from tiny_models import make_tiny_hf_model  # noqa: E402,F401  (re-exported to conftest)

from tokenmill.engine.mocker import TokenSource  # noqa: E402
from tokenmill.engine.tokenizer import Tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
READY = re.compile(r"tokenmill: serving .*worker pids ([\d ]+)\)")
NATS_PID = re.compile(r"nats \S+ pid (\d+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        cmd = [sys.executable, "-m", "tokenmill", "--log-level", "WARNING", "serve",
               "--port", str(self.port), "--workers", str(workers), "--engine", "mocker",
               "--model", str(model_dir), "--served-model-name", "tiny", *extra]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)  # fmt: skip
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
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)  # fmt: skip
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
