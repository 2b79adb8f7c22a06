"""The request log (``--request-log PATH``): one JSON line per completion request, written when
the request ends, with the times its stages were reached.

A line::

    {"id": "cmpl-…", "endpoint": "completions", "status": 200, "error": null,
     "arrival_unix": 1764226800.12, "arrival_monotonic": 5312.804,
     "ms": {"body": 0.9, "routed": 3.2, "first_token": 181.0, "first_write": 181.3,
            "end": 3402.7},
     "prompt_tokens": 13483, "cached_tokens": 4096, "completion_tokens": 349,
     "workers": ["3f2a…"]}

``arrival_monotonic`` is ``time.monotonic()`` when the handler started (so a client on the same
host can join its own send times); each ``ms`` entry is milliseconds after it, null when the
request never got there:
- ``body``: the request body was read;
- ``routed``: every choice's worker stream was open (routing and the send to the worker);
- ``first_token``: the first output tokens reached the frontend (the TTFT histogram's moment);
- ``first_write``: the first SSE bytes were handed to the HTTP server (streaming only);
- ``end``: the response was complete, or the request failed.

``status`` is the HTTP status; a stream that failed after its 200 has ``error`` set (the
error's type, or ``client_disconnected``). ``workers``: the instances that served it, in
order (more than one when it migrated). ``disagg``: per opening that made a
prefill/decode decision (``frontend.disagg``), ``remote``, ``reason``, ``prefill_worker`` and
``fallback`` (why a remote prefill fell back to a local one); empty without prefill workers.
Lines go out line-buffered; the file is appended to.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

_STAGES = ("body", "routed", "first_token", "first_write", "end")


class TokenCounts(Protocol):
    """The request's token counts so far (``responses.Usage``)."""

    num_prompt_tokens: int
    num_completion_tokens: int
    num_cached_tokens: int


@dataclass(slots=True)
class RequestStages:
    """What one request reached and when (``time.monotonic()`` seconds); filled in by the
    frontend as the request goes."""

    endpoint: str
    arrival: float = field(default_factory=time.monotonic)
    arrival_unix: float = field(default_factory=time.time)
    id: str | None = None
    body: float | None = None
    routed: float | None = None
    first_token: float | None = None
    first_write: float | None = None
    end: float | None = None
    status: int = 200
    error: str | None = None
    model: str = ""  # the served model, once resolved (the metrics' label)
    streaming: bool = False  # the stream logs it when it ends, not the handler
    usage: TokenCounts | None = None
    # per choice, the instances that served it (live lists: a migration appends)
    instances: list[list[str]] = field(default_factory=list)

    def to_json(self) -> dict:
        usage, ms = self.usage, {}
        for name in _STAGES:
            t = getattr(self, name)
            ms[name] = None if t is None else round((t - self.arrival) * 1e3, 3)
        return {
            "id": self.id,
            "endpoint": self.endpoint,
            "status": self.status,
            "error": self.error,
            "arrival_unix": round(self.arrival_unix, 6),
            "arrival_monotonic": round(self.arrival, 6),
            "ms": ms,
            "prompt_tokens": None if usage is None else usage.num_prompt_tokens,
            "cached_tokens": None if usage is None else usage.num_cached_tokens,
            "completion_tokens": None if usage is None else usage.num_completion_tokens,
            "workers": [worker for choice in self.instances for worker in choice],
            "disagg": [d for choice in self.instances for d in getattr(choice, "disagg", ())],
        }


class RequestLog:
    """Appends each finished request's stages to ``path`` as a JSON line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file: IO[str] | None = self.path.open("a", buffering=1, encoding="utf-8")

    def write(self, stages: RequestStages) -> None:
        if stages.end is None:
            stages.end = time.monotonic()
        if self._file is not None:
            self._file.write(json.dumps(stages.to_json(), separators=(",", ":")) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
