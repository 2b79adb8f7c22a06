"""A tiny scripted OpenAI-compatible streaming server (raw asyncio, HTTP/1.1 keep-alive, chunked
SSE) on 127.0.0.1 and a free port. Each POST gets the :class:`Script` that ``script_for(n, body)``
returns for the n-th POST (0-based). The server records, on the same ``time.perf_counter`` clock
the client uses, when it wrote each token chunk and when it finished, so tests can compare the
client's measurements with what the server actually did."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Script:
    """``kind``: "ok", "http_503", "hang" (never answers), "drop" (closes the connection after
    ``num_tokens`` tokens), "sse_error" (an error payload after ``num_tokens`` tokens)."""

    kind: str = "ok"
    ttft_s: float = 0.05
    itl_s: float = 0.01
    num_tokens: int = 4
    cached_tokens: int | None = None
    report_usage: bool = True


@dataclass
class Served:
    """What the server did for one POST."""

    path: str
    body: dict
    recv_s: float
    token_write_s: list[float] = field(default_factory=list)
    end_s: float | None = None


class FakeOpenAIServer:
    def __init__(self, script_for: Callable[[int, dict], Script], metrics_text: str | None = None):
        self.script_for = script_for
        self.metrics_text = metrics_text
        self.served: list[Served] = []
        self._release = asyncio.Event()
        self._server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        self._release.set()
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await self._one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _one(self, reader, writer) -> bool:
        head = await reader.readuntil(b"\r\n\r\n")
        recv_s = time.perf_counter()
        lines = head.decode().split("\r\n")
        method, path, _ = lines[0].split(" ")
        headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
        length = int(headers.get("content-length") or headers.get("Content-Length") or 0)
        body = json.loads(await reader.readexactly(length)) if length else {}
        if method == "GET":
            return await self._get(path, writer)
        served = Served(path, body, recv_s)
        self.served.append(served)
        script = self.script_for(len(self.served) - 1, body)
        return await self._post(script, served, writer)

    async def _get(self, path: str, writer) -> bool:
        if path == "/metrics" and self.metrics_text is not None:
            await self._plain(writer, 200, self.metrics_text)
        elif path == "/v1/models":
            await self._plain(writer, 200, json.dumps({"object": "list", "data": []}))
        else:
            await self._plain(writer, 404, "not found")
        return True

    @staticmethod
    async def _plain(writer, status: int, text: str) -> None:
        data = text.encode()
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
        await writer.drain()

    @staticmethod
    async def _chunk(writer, payload: str) -> None:
        data = f"data: {payload}\n\n".encode()
        writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        await writer.drain()

    async def _post(self, script: Script, served: Served, writer) -> bool:
        if script.kind == "http_503":
            await self._plain(writer, 503, json.dumps({"error": {"message": "overloaded"}}))
            return True
        if script.kind == "hang":
            await self._release.wait()
            return False
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chat = served.path.endswith("/chat/completions")
        for i in range(script.num_tokens):
            await asyncio.sleep(script.ttft_s if i == 0 else script.itl_s)
            choice = (
                {"index": 0, "delta": {"content": f"t{i}"}}
                if chat
                else {"index": 0, "text": f"t{i}"}
            )
            served.token_write_s.append(time.perf_counter())
            await self._chunk(writer, json.dumps({"choices": [choice]}))
        return await self._finish(script, served, writer)

    async def _finish(self, script: Script, served: Served, writer) -> bool:
        if script.kind == "drop":
            writer.transport.abort()
            served.end_s = time.perf_counter()
            return False
        if script.kind == "sse_error":
            await self._chunk(writer, json.dumps({"error": {"message": "engine died"}}))
        else:
            await self._chunk(
                writer,
                json.dumps({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}),
            )
            if script.report_usage:
                await self._chunk(
                    writer, json.dumps({"choices": [], "usage": _usage(script, served)})
                )
            await self._chunk(writer, "[DONE]")
        served.end_s = time.perf_counter()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True


def _usage(script: Script, served: Served) -> dict:
    prompt = served.body.get("prompt")
    usage = {
        "prompt_tokens": len(prompt) if isinstance(prompt, list) else 10,
        "completion_tokens": script.num_tokens,
    }
    if script.cached_tokens is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": script.cached_tokens}
    return usage
