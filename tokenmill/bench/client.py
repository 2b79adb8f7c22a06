"""Async streaming client for OpenAI-compatible servers (aiohttp; HTTP only, no tokenmill imports
beyond traces and metrics), used by ``tokenmill bench serve``. aiohttp rather than httpx: on the
2-core dev box a 32-token stream cost ~0.7-1.3 ms of client CPU with aiohttp and ~7 ms with
httpx (same fake server, 600 requests at concurrency 32), and a load generator must stay cheap.

Endpoints:
- ``/v1/completions`` with a **token-id prompt** (``"prompt": [ids]``) for token-id workloads
  (Mooncake, Azure, synthetic). Token-id prompts reproduce the trace's prefix structure exactly:
  the server hashes the very ids the trace describes, with no tokenizer in between (vLLM, SGLang,
  Dynamo and tokenmill accept them). Check it with the run's ``kv_reuse_ratio`` against
  ``ideal_prefix_hit_ratio`` of the same requests.
- ``/v1/chat/completions`` with a text prompt (AIBrix).

Per request it records: send time, first-token time, the arrival time of every chunk that
carried output text, end time, output tokens (``usage.completion_tokens`` when the server
reports it, else the number of text-carrying chunks), prompt and cached tokens
(``usage.prompt_tokens_details.cached_tokens``) when reported, the response's ``id``, and an
error kind:
``http_<status>``, ``timeout`` (the per-request total limit), ``connect_error``,
``connection_dropped`` (the stream broke or ended without ``[DONE]``/finish_reason),
``sse_error`` (an error event or an ``{"error": ...}`` payload in the stream),
``client_error`` (any other transport failure, e.g. a malformed HTTP response),
``bad_payload`` (a data line that is not JSON). Times are ``time.perf_counter()`` seconds.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from dataclasses import dataclass, field

import aiohttp
import msgspec

from tokenmill.bench.metrics import RequestTiming
from tokenmill.bench.traces import DEFAULT_VOCAB_SIZE, TraceRequest, mooncake_block_tokens


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """``endpoint``: "completions", "chat" or "auto" (token ids -> completions, text -> chat).
    ``ignore_eos`` sends ``"ignore_eos": true`` (vLLM/SGLang/Dynamo/tokenmill extension) so a
    request produces exactly the trace's output length, as in the offline replay."""

    base_url: str
    model: str
    endpoint: str = "auto"
    ignore_eos: bool = True
    timeout_s: float = 600.0
    api_key: str | None = None
    vocab_size: int = DEFAULT_VOCAB_SIZE
    min_token_id: int = 0


@dataclass(slots=True)
class RequestRecord:
    """Mutable while the request streams; final once :func:`send_request` returns."""

    index: int
    scheduled_s: float | None
    send_s: float = 0.0
    first_token_s: float | None = None
    chunk_times_s: list[float] = field(default_factory=list)
    end_s: float = 0.0
    num_output_tokens: int = 0
    num_prompt_tokens: int | None = None
    num_cached_tokens: int | None = None
    error: str | None = None
    error_detail: str | None = None
    finished: bool = False  # saw [DONE] or a finish_reason
    response_id: str | None = None  # the server's ``id`` (joins a server-side request log)

    def timing(self, origin_s: float = 0.0) -> RequestTiming:
        """The metrics view, times shifted so ``origin_s`` is 0."""
        last = self.chunk_times_s[-1] - origin_s if self.chunk_times_s else None
        first = None if self.first_token_s is None else self.first_token_s - origin_s
        return RequestTiming(
            self.send_s - origin_s,
            first,
            last,
            self.end_s - origin_s,
            self.num_output_tokens,
            self.num_prompt_tokens,
            self.num_cached_tokens,
            self.error,
        )


class SseParser:
    """Incremental Server-Sent Events parser: ``feed(bytes)`` returns the complete events as
    ``(event_type, data)`` pairs (event_type "message" unless an ``event:`` line set it).
    Comment lines (``:``) are ignored; data lines of one event are joined with newlines."""

    def __init__(self) -> None:
        self._buf = b""
        self._event = "message"
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[tuple[str, str]]:
        self._buf += chunk
        events = []
        while True:
            cut = self._buf.find(b"\n")
            if cut < 0:
                return events
            line = self._buf[:cut].rstrip(b"\r").decode("utf-8", errors="replace")
            self._buf = self._buf[cut + 1 :]
            event = self._line(line)
            if event is not None:
                events.append(event)

    def _line(self, line: str) -> tuple[str, str] | None:
        if not line:
            if not self._data:
                return None
            event, self._event, data, self._data = self._event, "message", self._data, []
            return event, "\n".join(data)
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        return None


def _endpoint(request: TraceRequest, cfg: ClientConfig) -> str:
    if cfg.endpoint != "auto":
        return cfg.endpoint
    return "completions" if request.segments else "chat"


def _base_body(request: TraceRequest, cfg: ClientConfig) -> dict:
    body: dict = {
        "model": cfg.model,
        "max_tokens": max(1, request.num_output_tokens),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    return body


def request_body(request: TraceRequest, cfg: ClientConfig) -> tuple[str, dict]:
    """(path, JSON body) for one request; raises ValueError when the prompt cannot be sent
    through the configured endpoint (token ids only go through /v1/completions)."""
    body = _base_body(request, cfg)
    if _endpoint(request, cfg) == "completions":
        body["prompt"] = (
            request.prompt_token_ids(cfg.vocab_size, cfg.min_token_id)
            if request.segments
            else request.prompt_text
        )
        return "/v1/completions", body
    if request.prompt_text is None:
        raise ValueError("token-id prompts need --endpoint completions (chat takes text only)")
    body["messages"] = [{"role": "user", "content": request.prompt_text}]
    return "/v1/chat/completions", body


_JSON = msgspec.json.Encoder()


@functools.lru_cache(maxsize=8192)  # ~25 MB of 512-token blocks; Mooncake reuses 37% of them
def _segment_json(seed: int, num_tokens: int, vocab_size: int, min_token_id: int) -> bytes:
    """One block's ids as JSON array items (no brackets): msgspec writes 512 ids in ~22 us,
    5x faster than ``",".join(map(str, ids))``; a miss costs ~45 us in all."""
    tokens = mooncake_block_tokens(seed, num_tokens, vocab_size, min_token_id)
    return _JSON.encode(tokens.tolist())[1:-1]


def encode_request(request: TraceRequest, cfg: ClientConfig) -> tuple[str, bytes]:
    """(path, encoded JSON body): the bytes of :func:`request_body`'s dict, built from cached
    per-segment JSON for token-id prompts. It runs on the client's event loop, between reads
    of the streams in flight, so it must be cheap: a 13k-token Mooncake prompt whose blocks
    are all new costs ~1 ms (~10 ms when each block was joined as text, which delayed the
    requests sent next to it by as much)."""
    if not (request.segments and _endpoint(request, cfg) == "completions"):
        path, body = request_body(request, cfg)
        return path, json.dumps(body, separators=(",", ":")).encode()
    head = json.dumps(_base_body(request, cfg), separators=(",", ":"))[:-1].encode()
    ids = b",".join(
        _segment_json(seed, n, cfg.vocab_size, cfg.min_token_id) for seed, n in request.segments
    )
    return "/v1/completions", b"".join((head, b',"prompt":[', ids, b"]}"))


def _chunk_text(choice: dict) -> str:
    delta = choice.get("delta")
    if isinstance(delta, dict):
        return (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    return choice.get("text") or ""


def _apply_usage(record: RequestRecord, usage: dict) -> None:
    record.num_prompt_tokens = usage.get("prompt_tokens", record.num_prompt_tokens)
    details = usage.get("prompt_tokens_details") or {}
    if details.get("cached_tokens") is not None:
        record.num_cached_tokens = details["cached_tokens"]
    if usage.get("completion_tokens") is not None:
        record.num_output_tokens = usage["completion_tokens"]


def _apply_event(record: RequestRecord, event: str, data: str, now: float) -> bool:
    """Updates ``record`` from one SSE event; returns True at ``[DONE]`` or on an error."""
    if data.strip() == "[DONE]":
        record.finished = True
        return True
    try:
        msg = json.loads(data)
    except json.JSONDecodeError:
        msg = None
    if not isinstance(msg, dict):
        record.error, record.error_detail = "bad_payload", data[:200]
        return True
    if event == "error" or msg.get("error"):
        record.error, record.error_detail = "sse_error", data[:200]
        return True
    if record.response_id is None:
        record.response_id = msg.get("id")
    for choice in msg.get("choices") or ():
        if _chunk_text(choice):
            record.first_token_s = record.first_token_s or now
            record.chunk_times_s.append(now)
        record.finished = record.finished or bool(choice.get("finish_reason"))
    if msg.get("usage"):
        _apply_usage(record, msg["usage"])
    return False


class HttpClient:
    """One pooled aiohttp session for a whole run, bound to the server's base URL (which may
    carry a path prefix). No connection limit: the runner bounds concurrency. Use as
    ``async with HttpClient(cfg) as client``."""

    def __init__(self, cfg: ClientConfig) -> None:
        self.base_url = cfg.base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> HttpClient:
        connector = aiohttp.TCPConnector(limit=0)
        self.session = aiohttp.ClientSession(
            connector=connector, headers=self._headers, timeout=aiohttp.ClientTimeout(total=None)
        )
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.close()

    def url(self, path: str) -> str:
        return self.base_url + path

    async def get_text(self, path: str, timeout_s: float) -> tuple[int, str]:
        """(status, body) of ``GET path``; raises aiohttp.ClientError/TimeoutError."""
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with self.session.get(self.url(path), timeout=timeout) as resp:
            return resp.status, await resp.text()


async def _stream(client: HttpClient, path: str, payload: bytes, record: RequestRecord):
    headers = {"Content-Type": "application/json"}
    async with client.session.post(client.url(path), data=payload, headers=headers) as resp:
        if resp.status != 200:
            text = (await resp.read()).decode("utf-8", errors="replace")
            record.error, record.error_detail = f"http_{resp.status}", text[:200]
            return
        parser = SseParser()
        async for chunk in resp.content.iter_any():
            if record.end_s:
                continue  # drain what follows [DONE] so the connection is kept alive
            now = time.perf_counter()
            for event, data in parser.feed(chunk):
                if _apply_event(record, event, data, now):
                    record.end_s = now  # the end is when [DONE] arrived, not the close after
                    if record.error is not None:
                        return
                    break


_CONNECT_ERRORS = (aiohttp.ClientConnectorError, aiohttp.InvalidURL)
_DROP_ERRORS = (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)


async def send_request(
    client: HttpClient,
    request: TraceRequest,
    index: int,
    cfg: ClientConfig,
    scheduled_s: float | None = None,
    encoded: tuple[str, bytes] | None = None,
) -> RequestRecord:
    """Sends one streaming request and returns its record; never raises for server or network
    faults (they become ``record.error``). ``encoded``:
    :func:`encode_request`'s result when the caller prepared it ahead of time."""
    path, payload = encoded or encode_request(request, cfg)  # encoded before send_s
    record = RequestRecord(index, scheduled_s, send_s=time.perf_counter())
    try:
        async with asyncio.timeout(cfg.timeout_s):
            await _stream(client, path, payload, record)
    except TimeoutError as e:  # asyncio's and aiohttp's timeouts both derive from it
        record.error, record.error_detail = "timeout", repr(e)[:200]
    except _CONNECT_ERRORS as e:
        record.error, record.error_detail = "connect_error", repr(e)[:200]
    except _DROP_ERRORS as e:
        record.error, record.error_detail = "connection_dropped", repr(e)[:200]
    except aiohttp.ClientError as e:  # anything else the transport raises (bad response line)
        record.error, record.error_detail = "client_error", repr(e)[:200]
    record.end_s = record.end_s or time.perf_counter()
    if record.error is None and not record.finished:
        record.error, record.error_detail = "connection_dropped", "stream ended without [DONE]"
    if record.num_output_tokens == 0:
        record.num_output_tokens = len(record.chunk_times_s)
    return record
