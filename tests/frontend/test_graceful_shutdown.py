"""SIGTERM on `tokenmill serve`: a stream that fits in the drain timeout completes, one that
does not ends cleanly with an error event, and the process exits 0."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
from helpers.procs import running_server


def stream_lines(url: str, max_tokens: int, started: threading.Event, out: list[str]) -> None:
    body = {"prompt": "graceful shutdown test", "max_tokens": max_tokens, "stream": True}
    with httpx.stream("POST", url + "/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line:
                out.append(line)
                started.set()


def test_sigterm_finishes_short_streams_aborts_long_ones_and_exits_0(tiny_model_dir):
    with running_server(
        "--model",
        str(tiny_model_dir),
        "--engine",
        "echo",
        "--echo-delay",
        "0.02",
        "--shutdown-timeout",
        "1.5",
    ) as server:
        short, long = [], []
        events = [threading.Event(), threading.Event()]
        threads = [
            threading.Thread(target=stream_lines, args=(server.url, 20, events[0], short)),
            threading.Thread(target=stream_lines, args=(server.url, 200, events[1], long)),
        ]
        for t in threads:
            t.start()
        assert all(e.wait(30) for e in events)
        start = time.monotonic()
        assert server.stop(signal.SIGTERM, timeout=30) == 0
        elapsed = time.monotonic() - start
        for t in threads:
            t.join(30)
    assert elapsed < 10.0
    assert short[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in short[:-1]]
    assert len(chunks) == 20 and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert long[-1] == "data: [DONE]"
    error = json.loads(long[-2][6:])["error"]
    assert error["code"] == "service_unavailable" and "abort" in error["message"]
    assert 1 < len(long) < 200
