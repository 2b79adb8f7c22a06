"""Helpers the benchmark scripts share for starting a server and waiting for it."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_model(port: int, proc: subprocess.Popen, model: str, timeout_s: float = 120.0) -> None:
    """Until /v1/models lists ``model``; raises if the server exits or the timeout passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tokenmill serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                if any(m.get("id") == model for m in json.load(r).get("data", [])):
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"tokenmill serve: model {model!r} never appeared")
