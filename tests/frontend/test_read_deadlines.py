"""Clients that stop half-way, over raw sockets against ``http_server.make_server``: headers
or a body left unfinished get 408 and a closed connection once their read deadline passes
(``HttpSpec.header_timeout_s``, ``FrontendConfig.body_timeout_s``); a client that closes
mid-body is a 499 in the metrics and one log line, not an internal error."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator

import httpx
import pytest

from tokenmill.engine.tokenizer import Tokenizer
from tokenmill.frontend.app import FrontendConfig
from tokenmill.frontend.preprocess import ServedModel
from tokenmill.launch.http_server import make_server
from tokenmill.launch.specs import HttpSpec
from tokenmill.launch.stacks import assemble_local_stack
from tokenmill.worker.echo_engine import EchoConfig, EchoEngine

DEADLINE_S = 0.3
HEAD = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"


@contextlib.asynccontextmanager
async def serving(tiny_model_dir) -> AsyncIterator[int]:
    """An echo stack behind ``make_server`` with both deadlines at ``DEADLINE_S``; its port."""
    model = ServedModel("tiny", Tokenizer.from_hf_dir(tiny_model_dir), 256)
    config = FrontendConfig(body_timeout_s=DEADLINE_S)
    stack = await assemble_local_stack(EchoEngine(EchoConfig()), model, config)
    http = HttpSpec("127.0.0.1", 0, header_timeout_s=DEADLINE_S, shutdown_timeout_s=1.0)
    server = make_server(stack.app, http, stack.drain)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not task.done(), "uvicorn failed to start"
            await asyncio.sleep(0.01)
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        await task
        await stack.close()


async def answer_to(port: int, sent: bytes) -> tuple[int, dict, bytes]:
    """Sends ``sent`` and waits (at most 10 s) for the server to answer and close: (status,
    error JSON, what followed the close: b"" when the connection ended)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(sent)
    try:
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            body = json.loads(await reader.readexactly(length))
            after = await reader.read()  # b"" once the server closed the connection
    finally:
        writer.close()
    return int(head.split()[1]), body["error"], after


@pytest.mark.parametrize(
    "sent",
    [b"", b"POST /v1/compl", HEAD + b"content-len"],
    ids=["nothing", "half a request line", "half a header"],
)
async def test_unfinished_headers_get_408_and_close(tiny_model_dir, sent):
    async with serving(tiny_model_dir) as port:
        status, error, after = await answer_to(port, sent)
    assert (status, error["code"], after) == (408, "request_timeout", b"")


async def test_unfinished_body_gets_408_and_close(tiny_model_dir):
    async with serving(tiny_model_dir) as port:
        status, error, after = await answer_to(port, HEAD + b'content-length: 100\r\n\r\n{"pro')
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            metrics = (await client.get("/metrics")).text
    assert (status, error["code"], after) == (408, "request_timeout", b"")
    assert 'tokenmill_requests_total{endpoint="completions",model="",status="408"} 1.0' in metrics


async def test_keep_alive_requests_are_not_cut_by_the_header_deadline(tiny_model_dir):
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    async with serving(tiny_model_dir) as port:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}/v1") as client:
            for _ in range(3):  # one connection, each request well within the deadline
                assert (await client.post("/completions", json=body)).status_code == 200


async def test_client_closing_mid_body_is_a_499_not_an_internal_error(tiny_model_dir, caplog):
    caplog.set_level(logging.INFO, logger="tokenmill")
    async with serving(tiny_model_dir) as port:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(HEAD + b'content-length: 100\r\n\r\n{"prompt": "hi')
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            async with asyncio.timeout(10):  # the server notices the close on its own time
                while 'status="499"' not in (metrics := (await client.get("/metrics")).text):
                    await asyncio.sleep(0.01)
    assert 'tokenmill_requests_total{endpoint="completions",model="",status="499"} 1.0' in metrics
    assert 'status="500"' not in metrics
    records = [r for r in caplog.records if r.name.startswith("tokenmill")]
    assert [r.levelno for r in records] == [logging.INFO] and "499" in records[0].getMessage()
    assert records[0].exc_info is None
